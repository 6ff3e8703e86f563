"""mobilevlm-export: the artifacts folder, its manifest and hashes, external data, errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import mobilevlm_ros  # noqa: E402
from mobilevlm_ros.core.artifacts import read_manifest, sha256_file  # noqa: E402
from mobilevlm_ros.tools.export import main as export_main  # noqa: E402
from mobilevlm_ros.tools.make_tiny import has_random_decoder, make_checkpoint  # noqa: E402

PROJECTORS = {"v1": "ldpnet", "v2": "ldpnetv2"}


def exported(tmp_path_factory, version):
    """Same shared export as test_vision_onnx.exported (made once per session, whichever file runs first)."""
    base = tmp_path_factory.getbasetemp() / "vision-onnx-shared" / version
    ckpt, art = base / "ckpt", base / "artifacts"
    if not (art / "manifest.json").is_file():
        if not (ckpt / "config.json").is_file():
            make_checkpoint(ckpt, PROJECTORS[version], "tiny", seed=0)
        assert export_main(["--model", str(ckpt), "--out", str(art), "--vision-dtype", "fp32,fp16,int8",
                            "--no-llm", "-q"]) == 0
    return ckpt, art


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_manifest_contents_and_hashes(tmp_path_factory, version):
    ckpt, art = exported(tmp_path_factory, version)
    m = read_manifest(art)
    raw = json.loads((art / "manifest.json").read_text())
    assert raw["format"] == "mobilevlm_ros.artifacts" and raw["format_version"] == 1
    assert m["tool_version"] == getattr(mobilevlm_ros, "__version__", "0.1.0")
    assert m["source"]["path"] == str(ckpt.resolve())
    assert m["source"]["config_sha256"] == sha256_file(ckpt / "config.json")
    assert m["source"]["name_or_path"] == f"mobilevlm-random-{PROJECTORS[version]}"
    assert m["projector_type"] == PROJECTORS[version]
    assert (m["image_size"], m["image_tokens"], m["hidden_size"], m["mm_hidden_size"]) == (336, 144, 256, 64)
    assert m["model_id"] == "ckpt"
    src = m["vision_weights_source"]
    if version == "v2":
        assert src.startswith("checkpoint's own vision weights")
    else:
        assert src.startswith("CLIP folder") and "clip-vit-tiny-patch14-336" in src
    assert m["llm"] == {}                                   # --no-llm
    assert set(m["vision"]) == {"fp32", "fp16", "int8"}
    for dtype, e in m["vision"].items():
        f = art / e["file"]
        assert e["file"] == f"vision-{dtype}.onnx"
        assert e["sha256"] == sha256_file(f) and e["bytes"] == f.stat().st_size
        assert "external_data" not in e                     # tiny graphs fit in one file
        assert e["input"] == {"name": "pixel_values", "shape": ["batch", 3, 336, 336], "dtype": "float32"}
        assert e["output"] == {"name": "image_embeds", "shape": ["batch", 144, 256], "dtype": "float32"}
        assert e["input_dtype"] == "float32" and e["opset"] >= 17
        assert set(e["check"]) >= {"cosine", "max_abs_diff", "rel_max_abs_diff", "token_cosine_min"}
    assert m["vision"]["fp32"]["check"]["cosine"] > 0.99999
    for name, digest in m["tokenizer"].items():
        assert sha256_file(art / name) == digest
    assert sha256_file(art / "tokenizer.model") == sha256_file(ckpt / "tokenizer.model")
    assert not list(art.glob(".export-*")), "temporary export folder left behind"


def test_random_models_are_known_as_such(tmp_path_factory, tmp_path):
    """What mobilevlm-demo reads to say that its answer is random text: the checkpoint, its export,
    an export whose manifest predates source.name_or_path (found through source.path); not a model
    of another name, nor a folder whose files are missing or not JSON."""
    ckpt, art = exported(tmp_path_factory, "v2")
    assert has_random_decoder(ckpt) and has_random_decoder(art)
    old = tmp_path / "old-export"
    old.mkdir()
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["source"]["name_or_path"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert has_random_decoder(old)
    manifest["source"]["path"] = str(tmp_path / "gone")
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert not has_random_decoder(old)
    real = tmp_path / "real"
    real.mkdir()
    config = json.loads((ckpt / "config.json").read_text())
    (real / "config.json").write_text(json.dumps({**config, "_name_or_path": "mtgv/MobileVLM_V2-1.7B"}))
    assert not has_random_decoder(real)
    (real / "config.json").write_text("not json")
    assert not has_random_decoder(real) and not has_random_decoder(tmp_path / "nothing")


def test_graph_contract(tmp_path_factory):
    _, art = exported(tmp_path_factory, "v2")
    for dtype in ("fp32", "fp16", "int8"):
        g = onnx.load(str(art / f"vision-{dtype}.onnx"), load_external_data=False)
        opset = {o.domain: o.version for o in g.opset_import}
        assert opset[""] >= 17
        [inp], [out] = g.graph.input, g.graph.output
        assert inp.name == "pixel_values" and out.name == "image_embeds"
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 336, 336]
        odims = out.type.tensor_type.shape.dim
        assert odims[0].dim_param and [d.dim_value for d in odims[1:]] == [144, 256]
        ops = {n.op_type for n in g.graph.node}
        domains = {n.domain for n in g.graph.node} - {"", "ai.onnx"}
        assert not domains, f"{dtype}: non-standard ops {domains}"
        if dtype == "fp32":
            # standard ops only, so TensorRT's parser reads the same file
            assert "AveragePool" in ops and "LayerNormalization" in ops
        if dtype == "int8":
            assert "MatMulInteger" in ops
        if dtype == "fp16":
            inits = {i.data_type for i in g.graph.initializer}
            assert onnx.TensorProto.FLOAT16 in inits
    meta = {p.key: p.value for p in onnx.load(str(art / "vision-fp32.onnx")).metadata_props}
    assert meta["mobilevlm.projector_type"] == "ldpnetv2" and meta["mobilevlm.image_tokens"] == "144"


def test_large_graphs_use_external_data(tmp_path, monkeypatch):
    """Graphs over the size limit keep their weights in <file>.data; hashed, loadable, still exact."""
    from mobilevlm_ros.core import onnx_export
    from mobilevlm_ros.core.checkpoint import load_checkpoint
    from mobilevlm_ros.core.pipeline import LoadOptions
    from mobilevlm_ros.core.vision import TorchVision
    from mobilevlm_ros.core.vision_onnx import OnnxRuntimeVision
    ckpt = make_checkpoint(tmp_path / "ckpt", "ldpnetv2", "tiny", seed=2)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 100_000)
    out = tmp_path / "art"
    assert export_main(["--model", str(ckpt), "--out", str(out), "--vision-dtype", "fp32,int8",
                        "--no-llm", "-q"]) == 0
    m = read_manifest(out)
    for dtype in ("fp32", "int8"):
        e = m["vision"][dtype]
        data = e["external_data"]
        assert data["file"] == f"vision-{dtype}.onnx.data"
        assert data["sha256"] == sha256_file(out / data["file"])
        assert data["bytes"] == (out / data["file"]).stat().st_size > e["bytes"]
    assert m["vision"]["fp32"]["check"]["rel_max_abs_diff"] < 1e-5
    vis = OnnxRuntimeVision.from_artifacts(out, m, LoadOptions(vision_dtype="fp32"))
    px = onnx_export.verification_pixels(2)
    ref = TorchVision(load_checkpoint(ckpt)).encode_pixels(px)
    assert onnx_export.compare(vis.encode_pixels(px), ref)["rel_max_abs_diff"] < 1e-5
    # the weights file is part of the artifact: without it the graph does not load
    (out / "vision-fp32.onnx.data").unlink()
    from mobilevlm_ros.core.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="vision-fp32.onnx.data"):
        OnnxRuntimeVision.from_artifacts(out, m, LoadOptions(vision_dtype="fp32"))


def test_reexport_replaces_and_removes_graphs(tmp_path_factory, tmp_path):
    ckpt, art = exported(tmp_path_factory, "v2")
    out = tmp_path / "art"
    shutil.copytree(art, out)
    assert export_main(["--model", str(ckpt), "--out", str(out), "--no-llm", "-q", "--no-verify"]) == 0
    m = read_manifest(out)
    assert set(m["vision"]) == {"fp32"} and "check" not in m["vision"]["fp32"]
    assert not (out / "vision-fp16.onnx").exists() and not (out / "vision-int8.onnx").exists()


# ------------------------------------------------------------------------------------ errors
def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = export_main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--no-llm", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot load checkpoint" in err and str(tmp_path / "nope") in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_weights_or_tokenizer(tmp_path, tmp_path_factory, capsys):
    ckpt, _ = exported(tmp_path_factory, "v2")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "tokenizer.model").unlink()
    assert export_main(["--model", str(broken), "--out", str(tmp_path / "o1"), "--no-llm", "-q"]) == 1
    assert "tokenizer.model" in capsys.readouterr().err
    shutil.copyfile(ckpt / "tokenizer.model", broken / "tokenizer.model")
    (broken / "pytorch_model.bin").write_bytes(b"not a zip")
    assert export_main(["--model", str(broken), "--out", str(tmp_path / "o2"), "--no-llm", "-q"]) == 1
    assert "pytorch_model.bin" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--vision-dtype", "fp8"], ["--vision-dtype", "fp32,bf16"],
                                  ["--quant", "q2_k"], []])
def test_bad_arguments_exit_2(tmp_path, args, capsys):
    base = ["--model", str(tmp_path), "--out", str(tmp_path / "o")] if args else ["--model", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        export_main(base + args)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_out_is_a_file(tmp_path_factory, tmp_path, capsys):
    ckpt, _ = exported(tmp_path_factory, "v2")
    f = tmp_path / "file"
    f.write_text("x")
    assert export_main(["--model", str(ckpt), "--out", str(f), "--no-llm", "-q"]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_llm_export_is_called_or_clearly_missing(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """Without --no-llm the GGUF writer (core.gguf_export, another module) is called with the loaded
    checkpoint, the folder and the quant list, and its section lands in the manifest."""
    import sys
    import types
    ckpt, _ = exported(tmp_path_factory, "v2")
    calls = []

    def fake_export_gguf(checkpoint, out_dir, quants, progress):
        calls.append((checkpoint.path, Path(out_dir), list(quants)))
        p = Path(out_dir) / "llm-q8_0.gguf"
        p.write_bytes(b"GGUF")
        return {"q8_0": {"file": p.name, "sha256": sha256_file(p), "bytes": 4}}

    monkeypatch.setitem(sys.modules, "mobilevlm_ros.core.gguf_export",
                        types.SimpleNamespace(export_gguf=fake_export_gguf))
    out = tmp_path / "art"
    assert export_main(["--model", str(ckpt), "--out", str(out), "--quant", "q8_0", "-q", "--no-verify"]) == 0
    assert calls == [(ckpt, out, ["q8_0"])]
    m = read_manifest(out)
    assert m["llm"]["q8_0"]["file"] == "llm-q8_0.gguf"
    # a later vision-only re-export of the same checkpoint keeps the intact GGUF entries
    assert export_main(["--model", str(ckpt), "--out", str(out), "--no-llm", "-q", "--no-verify"]) == 0
    assert read_manifest(out)["llm"] == m["llm"]
    np.testing.assert_equal(len(calls), 1)

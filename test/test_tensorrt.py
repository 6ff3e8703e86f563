"""TensorRT vision engine.

The engine stamp / staleness logic is plain Python and is tested everywhere. Building and running an
engine needs the `tensorrt` package (TensorRT 10) and a CUDA GPU: those tests are marked `tensorrt`
and `gpu` and skip, with the reason printed (-ra), where either is missing.
"""
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest

from mobilevlm_ros.core import vision_tensorrt as vt
from mobilevlm_ros.core.errors import ModelLoadError


def _have(module):
    try:
        __import__(module)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------- stamps (run everywhere)
@pytest.fixture
def fake_onnx(tmp_path):
    p = tmp_path / "vision-fp32.onnx"
    p.write_bytes(b"graph v1")
    return p


def _stamp(onnx_path, **kw):
    args = dict(tensorrt_version="10.3.0", fp16=True, max_batch=4, device="Orin sm_87")
    args.update(kw)
    return vt.make_stamp(onnx_path, args["tensorrt_version"], args["fp16"], args["max_batch"], args["device"])


def _fake_engine(engine_dir, onnx_path, **kw):
    e = vt.engine_path(engine_dir, "fp32", kw.get("fp16", True), kw.get("max_batch", 4))
    e.parent.mkdir(parents=True, exist_ok=True)
    e.write_bytes(b"plan" * 10)
    st = _stamp(onnx_path, **kw)
    st["engine_bytes"] = e.stat().st_size
    vt.stamp_path(e).write_text(json.dumps(st))
    return e


def test_engine_names_carry_dtype_precision_and_batch(tmp_path):
    assert vt.engine_path(tmp_path, "fp32", True, 4).name == "vision-fp32-fp16-b4.engine"
    assert vt.engine_path(tmp_path, "fp16", False, 1).name == "vision-fp16-fp32-b1.engine"
    assert vt.stamp_path(tmp_path / "x.engine").name == "x.engine.json"


def test_current_engine_is_reused(tmp_path, fake_onnx):
    e = _fake_engine(tmp_path / "engines", fake_onnx)
    assert vt.stale_reason(e, _stamp(fake_onnx)) is None


@pytest.mark.parametrize("change,expect", [
    ({"tensorrt_version": "10.7.0"}, "tensorrt_version"),
    ({"fp16": False}, "fp16"),
    ({"max_batch": 8}, "max_batch"),
    ({"device": "RTX 4090 sm_89"}, "device"),
])
def test_option_or_platform_change_makes_engine_stale(tmp_path, fake_onnx, change, expect):
    e = _fake_engine(tmp_path / "engines", fake_onnx)
    reason = vt.stale_reason(e, _stamp(fake_onnx, **change))
    assert reason and expect in reason


def test_changed_onnx_makes_engine_stale(tmp_path, fake_onnx):
    e = _fake_engine(tmp_path / "engines", fake_onnx)
    fake_onnx.write_bytes(b"graph v2")                    # same size, other content
    assert vt.stale_reason(e, _stamp(fake_onnx)) == "stale engine: the ONNX graph changed"
    data = Path(str(fake_onnx) + ".data")                  # an external weights file appearing
    fake_onnx.write_bytes(b"graph v1")
    data.write_bytes(b"weights")
    assert "ONNX graph changed" in vt.stale_reason(e, _stamp(fake_onnx))


def test_missing_or_damaged_engine_or_stamp(tmp_path, fake_onnx):
    e = vt.engine_path(tmp_path, "fp32", True, 4)
    assert vt.stale_reason(e, _stamp(fake_onnx)) == "no engine built yet"
    e = _fake_engine(tmp_path, fake_onnx)
    e.write_bytes(b"plan")                                  # truncated
    assert "truncated" in vt.stale_reason(e, _stamp(fake_onnx))
    vt.stamp_path(e).write_text("{not json")
    assert "missing or unreadable" in vt.stale_reason(e, _stamp(fake_onnx))


def test_digest_reuses_hash_only_while_file_is_unchanged(fake_onnx):
    d = vt.onnx_digest(fake_onnx)
    assert set(d) == {"vision-fp32.onnx"}
    known = {"vision-fp32.onnx": dict(d["vision-fp32.onnx"], sha256="cached")}
    assert vt.onnx_digest(fake_onnx, known)["vision-fp32.onnx"]["sha256"] == "cached"
    st = fake_onnx.stat()
    os.utime(fake_onnx, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert vt.onnx_digest(fake_onnx, known)["vision-fp32.onnx"]["sha256"] == d["vision-fp32.onnx"]["sha256"]


def test_int8_graph_is_refused_before_touching_tensorrt(tmp_path):
    opts = types.SimpleNamespace(vision_dtype="int8", engine_cache=None)
    with pytest.raises(ModelLoadError, match="int8"):
        vt.TensorRTVision.from_artifacts(tmp_path, {"vision": {}}, opts)


@pytest.mark.skipif(_have("tensorrt"), reason="tensorrt is installed here; this checks the message without it")
def test_without_tensorrt_the_tools_say_so(tmp_path, capsys):
    from mobilevlm_ros.core.artifacts import write_manifest
    from mobilevlm_ros.tools.build_engine import main
    (tmp_path / "vision-fp32.onnx").write_bytes(b"x")
    write_manifest(tmp_path, {"image_size": 336, "vision": {"fp32": {"file": "vision-fp32.onnx", "bytes": 1}}})
    assert main([str(tmp_path)]) == 1
    assert "TensorRT" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="onnxruntime"):
        vt._trt()


def test_build_engine_cli_arguments(tmp_path, capsys):
    from mobilevlm_ros.tools.build_engine import main
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--max-batch", "0"])
    assert e.value.code == 2
    assert main([str(tmp_path / "missing")]) == 1           # no manifest: a clear error, not a trace
    assert "manifest.json" in capsys.readouterr().err


# ------------------------------------------------------------- TensorRT + GPU (skip elsewhere)
@pytest.fixture(scope="module")
def trt_model(tmp_path_factory):
    trt = pytest.importorskip("tensorrt", reason="TensorRT 10 Python package not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    assert int(trt.__version__.split(".")[0]) >= 10
    from mobilevlm_ros.core.artifacts import read_manifest
    from mobilevlm_ros.core.checkpoint import load_checkpoint
    from mobilevlm_ros.core.vision import TorchVision
    from mobilevlm_ros.tools.export import main as export_main
    from mobilevlm_ros.tools.make_tiny import make_checkpoint
    base = tmp_path_factory.mktemp("trt")
    ckpt = make_checkpoint(base / "ckpt", "ldpnetv2", "tiny", seed=0)
    art = base / "art"
    assert export_main(["--model", str(ckpt), "--out", str(art), "--vision-dtype", "fp32,fp16",
                        "--no-llm", "-q"]) == 0
    from mobilevlm_ros.core.onnx_export import verification_pixels
    px = np.concatenate([verification_pixels(3, seed=5), verification_pixels(3, seed=6)])
    ref = TorchVision(load_checkpoint(ckpt)).encode_pixels(px)
    return types.SimpleNamespace(art=art, manifest=read_manifest(art), px=px, ref=ref)


def _opts(**extra):
    from mobilevlm_ros.core.pipeline import LoadOptions
    return LoadOptions(vision_backend="tensorrt", extra=extra)


@pytest.mark.tensorrt
@pytest.mark.parametrize("fp16,min_cos", [(False, 0.99999), (True, 0.999)])
def test_tensorrt_parity_and_dynamic_batch(trt_model, fp16, min_cos):
    from mobilevlm_ros.core.onnx_export import compare
    vis = vt.TensorRTVision.from_artifacts(trt_model.art, trt_model.manifest,
                                           _opts(tensorrt_fp16=fp16, tensorrt_max_batch=4))
    assert vis.max_batch == 4
    got = vis.encode_pixels(trt_model.px)                    # 6 frames: run as 4 + 2
    m = compare(got, trt_model.ref)
    print(f"\ntensorrt {'fp16' if fp16 else 'fp32'} vs torch: {m}")
    assert got.shape == (6, 144, 256) and m["cosine"] >= min_cos
    one = np.concatenate([vis.encode_pixels(trt_model.px[i:i + 1]) for i in range(3)])
    assert compare(one, got[:3])["cosine"] >= min_cos


@pytest.mark.tensorrt
def test_stale_engine_is_rebuilt_not_used(trt_model):
    opts = _opts(tensorrt_fp16=True, tensorrt_max_batch=2)
    vt.TensorRTVision.from_artifacts(trt_model.art, trt_model.manifest, opts)
    engine = vt.engine_path(trt_model.art / vt.ENGINE_DIR, "fp32", True, 2)
    stamp = vt.read_stamp(engine)
    assert stamp["onnx"]["vision-fp32.onnx"]["sha256"] == trt_model.manifest["vision"]["fp32"]["sha256"]
    assert (engine.parent / vt.TIMING_CACHE).is_file()
    built = stamp["built"]
    # current: reused as is
    vt.TensorRTVision.from_artifacts(trt_model.art, trt_model.manifest, opts)
    assert vt.read_stamp(engine)["built"] == built
    # pretend it was built from another graph: rebuilt
    stamp["onnx"]["vision-fp32.onnx"]["sha256"] = "0" * 64
    vt.stamp_path(engine).write_text(json.dumps(stamp))
    import time
    time.sleep(1.1)     # `built` is stamped to the second: a rebuild must get a later one
    vis = vt.TensorRTVision.from_artifacts(trt_model.art, trt_model.manifest, opts)
    new = vt.read_stamp(engine)
    assert new["onnx"]["vision-fp32.onnx"]["sha256"] == trt_model.manifest["vision"]["fp32"]["sha256"]
    assert new["built"] != built or new["build_seconds"] >= 0
    assert vis.encode_pixels(trt_model.px[:1]).shape == (1, 144, 256)


@pytest.mark.tensorrt
def test_build_engine_cli(trt_model, capsys):
    from mobilevlm_ros.tools.build_engine import main
    assert main([str(trt_model.art), "--max-batch", "3", "--no-fp16"]) == 0
    assert main([str(trt_model.art), "--max-batch", "3", "--no-fp16", "--check"]) == 0
    assert "current" in capsys.readouterr().out
    assert main([str(trt_model.art), "--max-batch", "5", "--check"]) == 3

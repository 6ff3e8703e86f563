"""The exported vision graph run by ONNX Runtime (CPU) against the torch reference.

Tiny checkpoints (real 336 px / 14 px geometry: 576 patches -> 144 tokens) for V1 (LDP) and V2
(LDPv2). The parity bound is tight enough to catch a wrong layer, a missing residual, wrong pooling
or a wrong activation: test_parity_bound_catches_wrong_models shows each of those fails it.
The same check at the real 1.7B dimensions is test_parity_1p7b_dims (MOBILEVLM_SLOW=1).
"""
import json
import os
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from mobilevlm_ros.core.artifacts import read_manifest  # noqa: E402
from mobilevlm_ros.core.checkpoint import load_checkpoint  # noqa: E402
from mobilevlm_ros.core.errors import EncodeAborted, ImageError, ModelLoadError  # noqa: E402
from mobilevlm_ros.core.onnx_export import compare, verification_pixels  # noqa: E402
from mobilevlm_ros.core.pipeline import LoadOptions  # noqa: E402
from mobilevlm_ros.core.preprocess import preprocess  # noqa: E402
from mobilevlm_ros.core.vision import Abort, TorchVision, build_vision_encoder  # noqa: E402
from mobilevlm_ros.core.vision_onnx import OnnxRuntimeVision, select_providers  # noqa: E402
from mobilevlm_ros.tools.make_tiny import make_checkpoint  # noqa: E402

# ONNX Runtime fp32 vs torch fp32 differ by float rounding only: measured ~1e-6 relative (tiny) and
# 4e-7 (1.7B dims). The weakest deliberate error below (tanh instead of erf GELU) gives ~2e-4.
PARITY_MAX_REL_DIFF = 2e-5
PARITY_MIN_COSINE = 0.99999
FP16_MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.999
PROJECTORS = {"v1": "ldpnet", "v2": "ldpnetv2"}


def exported(tmp_path_factory, version):
    """(checkpoint, artifacts) for a tiny V1/V2 model, exported once per test session (the folder is
    shared with test_export.py through the session's base temp folder)."""
    from mobilevlm_ros.tools.export import main as export_main
    base = tmp_path_factory.getbasetemp() / "vision-onnx-shared" / version
    ckpt, art = base / "ckpt", base / "artifacts"
    if not (art / "manifest.json").is_file():
        if not (ckpt / "config.json").is_file():
            make_checkpoint(ckpt, PROJECTORS[version], "tiny", seed=0)
        rc = export_main(["--model", str(ckpt), "--out", str(art), "--vision-dtype", "fp32,fp16,int8",
                          "--no-llm", "-q"])
        assert rc == 0
    return ckpt, art


@pytest.fixture(scope="module", params=["v1", "v2"])
def model(request, tmp_path_factory):
    ckpt, art = exported(tmp_path_factory, request.param)
    ref = TorchVision(load_checkpoint(ckpt))
    return types.SimpleNamespace(version=request.param, ckpt=ckpt, art=art, manifest=read_manifest(art),
                                 torch=ref)


def ort_vision(m, dtype="fp32", **kw):
    return OnnxRuntimeVision.from_artifacts(m.art, m.manifest, LoadOptions(vision_dtype=dtype, **kw))


def frames():
    rng = np.random.default_rng(3)
    out = []
    for h, w in ((360, 640), (500, 300), (336, 336)):
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w)], -1)
        img = img + rng.integers(-20, 20, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def pixels(n=3):
    return np.stack([preprocess(f) for f in frames()[:n]])


def within_parity(metrics) -> bool:
    return metrics["rel_max_abs_diff"] <= PARITY_MAX_REL_DIFF and metrics["cosine"] >= PARITY_MIN_COSINE


def _fmt(metrics):
    return (f"max abs diff {metrics['max_abs_diff']:.3g} (rel {metrics['rel_max_abs_diff']:.3g}), "
            f"cosine {metrics['cosine']:.9f}, min token cosine {metrics['token_cosine_min']:.9f}")


# ------------------------------------------------------------------------------------ parity
def test_parity_onnxruntime_cpu_vs_torch(model):
    vis = ort_vision(model)
    assert vis.provider == "CPUExecutionProvider"
    px = pixels()
    got, ref = vis.encode_pixels(px), model.torch.encode_pixels(px)
    assert got.shape == ref.shape == (3, 144, 256) and got.dtype == np.float32
    m = compare(got, ref)
    print(f"\n[{model.version}] onnxruntime fp32 vs torch: {_fmt(m)}")
    assert within_parity(m), _fmt(m)


def test_encode_frames_through_the_backend_interface(model):
    vis = ort_vision(model)
    fr = frames()[0]
    [a] = vis.encode([fr[:, :, ::-1].copy()], channel_order="bgr")
    [b] = model.torch.encode([fr])
    assert a.embeds.shape == (144, 256) and a.embeds.dtype == np.float32 and a.vision_ms > 0
    assert within_parity(compare(a.embeds[None], b.embeds[None]))


def test_abort_stops_a_run_and_the_session_keeps_serving(model):
    """The node stops a background encode when a question arrives: ONNX Runtime's terminate flag,
    set from another thread, ends the run at its next node; a requested abort fails at once."""
    vis = ort_vision(model)
    px = np.repeat(pixels(1), 32, axis=0)
    t0 = time.perf_counter()
    full = vis.encode_pixels(px)
    full_s = time.perf_counter() - t0
    abort = Abort()
    threading.Timer(full_s / 10, abort.request).start()
    t0 = time.perf_counter()
    with pytest.raises(EncodeAborted):
        vis.encode_pixels(px, abort)
    stopped_s = time.perf_counter() - t0
    print(f"\n[{model.version}] batch 32: full run {full_s * 1e3:.0f} ms, aborted after {stopped_s * 1e3:.0f} ms")
    assert stopped_s < full_s * 0.75
    with pytest.raises(EncodeAborted):
        vis.encode([frames()[0]], abort=abort)      # already requested: nothing runs
    np.testing.assert_array_equal(vis.encode_pixels(px[:1]), full[:1])   # the session still serves


def test_dynamic_batch_equals_single_frames(model):
    vis = ort_vision(model)
    px = pixels(3)
    together = vis.encode_pixels(px)
    alone = np.concatenate([vis.encode_pixels(px[i:i + 1]) for i in range(3)])
    m = compare(together, alone)
    print(f"\n[{model.version}] batch 3 vs 3 x batch 1: {_fmt(m)}")
    assert m["rel_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("dtype,min_cos", [("fp16", FP16_MIN_COSINE), ("int8", INT8_MIN_COSINE)])
def test_reduced_precision_fidelity(model, dtype, min_cos):
    vis = ort_vision(model, dtype)
    px = pixels(2)
    m = compare(vis.encode_pixels(px), model.torch.encode_pixels(px))
    print(f"\n[{model.version}] onnxruntime {dtype} vs torch fp32: {_fmt(m)}")
    assert m["cosine"] >= min_cos
    assert m["token_cosine_min"] >= min_cos - 0.001
    # the check recorded at export time says the same
    assert model.manifest["vision"][dtype]["check"]["cosine"] >= min_cos


def _wrong_models(version):
    """Deliberately wrong variants of the reference: name -> function mutating a fresh encoder."""
    import torch.nn.functional as F
    from torch import nn

    def layers(e):
        return e.vision_tower.vision_model.encoder.layers

    def set_layers(e, new):
        e.vision_tower.vision_model.encoder.layers = nn.ModuleList(new)

    def plain_gelu(e):
        for layer in layers(e):
            layer.mlp.act = F.gelu

    v = {"one encoder layer missing": lambda e: set_layers(e, list(layers(e))[:-1]),
         "encoder layers swapped": lambda e: set_layers(e, list(layers(e))[::-1]),
         "gelu instead of quick_gelu": plain_gelu}
    if version == "v2":
        v["PEG residual missing"] = lambda e: setattr(e.mm_projector.peg, "forward",
                                                      lambda g, p=e.mm_projector.peg: p.peg(g))
        v["tanh-approximate GELU in the projector"] = (
            lambda e: e.mm_projector.mlp.mlp.__setitem__(1, nn.GELU(approximate="tanh")))
    else:
        v["block-1 residual missing"] = lambda e: setattr(e.mm_projector.model.mb_block[1], "residual", False)
        v["tanh-approximate GELU in the projector"] = (
            lambda e: e.mm_projector.model.mlp.__setitem__(2, nn.GELU(approximate="tanh")))
    return v


class _MaxPoolF:
    """torch.nn.functional with adaptive average pooling replaced by max pooling."""

    def __getattr__(self, name):
        import torch.nn.functional as F
        return F.adaptive_max_pool2d if name == "adaptive_avg_pool2d" else getattr(F, name)


def test_parity_bound_catches_wrong_models(model, monkeypatch):
    """The bound that the exported graph passes is failed by every wrong reference variant."""
    ckpt = load_checkpoint(model.ckpt)
    px = pixels(2)
    got = ort_vision(model).encode_pixels(px)

    def reference(mutate=None):
        enc = build_vision_encoder(ckpt)
        if mutate:
            mutate(enc)
        with torch.inference_mode():
            return enc(torch.from_numpy(px)).numpy()

    assert within_parity(compare(got, reference()))
    caught = {}
    for name, mutate in _wrong_models(model.version).items():
        m = compare(got, reference(mutate))
        print(f"\n[{model.version}] {name}: {_fmt(m)}")
        caught[name] = not within_parity(m)
    import mobilevlm_ros.core.projectors.ldp as ldp
    import mobilevlm_ros.core.projectors.ldpv2 as ldpv2
    # V2: 2x2 average pooling of the grid; V1: the squeeze-excite average pooling
    monkeypatch.setattr(ldpv2 if model.version == "v2" else ldp, "F", _MaxPoolF())
    m = compare(got, reference())
    print(f"\n[{model.version}] max pooling instead of average: {_fmt(m)}")
    caught["max pooling instead of average"] = not within_parity(m)
    assert all(caught.values()), f"not caught: {[k for k, v in caught.items() if not v]}"


def test_parity_bound_catches_wrong_graphs(model, tmp_path):
    """Edits of the ONNX graph itself: wrong pooling op (V2), a 0.1 % error in one weight matrix."""
    from onnx import numpy_helper
    src = model.art / "vision-fp32.onnx"
    px = pixels(2)
    ref = model.torch.encode_pixels(px)
    g = onnx.load(str(src))
    matmul_weights = {n.input[1] for n in g.graph.node if n.op_type == "MatMul"}
    inits = {t.name: t for t in g.graph.initializer}
    fc = [inits[w] for w in sorted(matmul_weights) if w in inits]
    assert fc, "no MatMul weight initializers found"
    target = max(fc, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(1.001), target.name))
    edits = {"one weight matrix x 1.001": g}
    if model.version == "v2":
        g2 = onnx.load(str(src))
        pools = [n for n in g2.graph.node if n.op_type == "AveragePool"]
        assert len(pools) == 1
        pools[0].op_type = "MaxPool"
        del pools[0].attribute[:]
        pools[0].attribute.extend([onnx.helper.make_attribute("kernel_shape", [2, 2]),
                                   onnx.helper.make_attribute("strides", [2, 2])])
        edits["AveragePool -> MaxPool"] = g2
    for name, graph in edits.items():
        sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        m = compare(sess.run(None, {"pixel_values": px})[0], ref)
        print(f"\n[{model.version}] graph edit '{name}': {_fmt(m)}")
        assert not within_parity(m), name


# --------------------------------------------------------------------------- end to end (CLI)
def _ask(capsys, model_dir, backend, image):
    from mobilevlm_ros.tools.ask import main as ask_main
    rc = ask_main(["--model", str(model_dir), "--image", str(image), "--question", "What is in the image?",
                   "--vision-backend", backend, "--decoder", "torch", "--max-new-tokens", "12", "--json",
                   "--vision-dtype", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_ask_onnxruntime_vision_answers_as_torch(model, tmp_path, capsys):
    from PIL import Image
    image = tmp_path / "frame.png"
    Image.fromarray(frames()[0]).save(image)
    a = _ask(capsys, model.art, "onnxruntime", image)
    b = _ask(capsys, model.art, "torch", image)        # torch vision from the manifest's source checkpoint
    c = _ask(capsys, model.ckpt, "torch", image)       # and from the checkpoint itself
    assert a["model"]["vision_backend"] == "onnxruntime" and b["model"]["vision_backend"] == "torch"
    print(f"\n[{model.version}] answer ids {a['answer_ids']}")
    assert a["answer_ids"] == b["answer_ids"] == c["answer_ids"]
    assert a["answer"] == c["answer"] and a["completion_tokens"] > 0


# ------------------------------------------------------------------------ inputs and loading
@pytest.mark.parametrize("bad", [
    np.zeros((1, 3, 224, 224), np.float32),       # wrong size
    np.zeros((1, 4, 336, 336), np.float32),       # wrong channels
    np.zeros((3, 336, 336), np.float32),          # no batch dimension
    np.zeros((0, 3, 336, 336), np.float32),       # empty batch
    np.zeros((1, 3, 336, 336), np.uint8),         # not normalised floats
    np.full((1, 3, 336, 336), np.nan, np.float32),
    [[0.0]],
])
def test_bad_input_raises_image_error(tmp_path_factory, bad):
    _, art = exported(tmp_path_factory, "v2")
    vis = OnnxRuntimeVision.from_artifacts(art, read_manifest(art), LoadOptions())
    with pytest.raises(ImageError):
        vis.encode_pixels(bad)


def test_float64_pixels_are_accepted(tmp_path_factory):
    _, art = exported(tmp_path_factory, "v2")
    vis = OnnxRuntimeVision.from_artifacts(art, read_manifest(art), LoadOptions())
    px = pixels(1)
    np.testing.assert_allclose(vis.encode_pixels(px.astype(np.float64)), vis.encode_pixels(px), atol=1e-6)


def test_missing_dtype_and_damaged_graph_are_load_errors(tmp_path_factory, tmp_path):
    import shutil
    _, art = exported(tmp_path_factory, "v2")
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    m = read_manifest(copy)
    del m["vision"]["int8"]
    with pytest.raises(ModelLoadError, match="no vision file for 'int8'.*mobilevlm-export"):
        OnnxRuntimeVision.from_artifacts(copy, m, LoadOptions(vision_dtype="int8"))
    f = copy / "vision-fp32.onnx"
    f.write_bytes(b"\0" * f.stat().st_size)                # same size, garbage content
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        OnnxRuntimeVision.from_artifacts(copy, m, LoadOptions(vision_dtype="fp32"))
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):    # auto without int8: fp32
        OnnxRuntimeVision.from_artifacts(copy, m, LoadOptions())
    f.write_bytes(b"\0" * 10)
    with pytest.raises(ModelLoadError, match="bytes"):
        OnnxRuntimeVision.from_artifacts(copy, m, LoadOptions(vision_dtype="fp32"))


def test_auto_dtype_follows_the_recorded_int8_fidelity(tmp_path_factory):
    """vision_dtype auto on the CPU: int8 when the export's check cosine is within INT8_MIN_COSINE,
    fp32 otherwise, whoever loads the backend (the pipeline or a direct caller)."""
    import copy as _copy

    from mobilevlm_ros.core.artifacts import INT8_MIN_COSINE as BOUND, choose_vision_dtype
    _, art = exported(tmp_path_factory, "v2")
    m = read_manifest(art)
    cos = m["vision"]["int8"]["check"]["cosine"]
    want = "int8" if cos >= BOUND else "fp32"
    assert OnnxRuntimeVision.from_artifacts(art, m, LoadOptions()).dtype == want
    worse = _copy.deepcopy(m)
    worse["vision"]["int8"]["check"]["cosine"] = BOUND - 1e-4
    assert choose_vision_dtype(worse, "onnxruntime", "cpu")[0] == "fp32"
    assert OnnxRuntimeVision.from_artifacts(art, worse, LoadOptions()).dtype == "fp32"
    better = _copy.deepcopy(m)
    better["vision"]["int8"]["check"]["cosine"] = 1.0
    assert choose_vision_dtype(better, "onnxruntime", "cpu")[0] == "int8"
    assert choose_vision_dtype(better, "onnxruntime", "cuda")[0] == "fp16"
    assert choose_vision_dtype(better, "tensorrt", "cpu")[0] == "fp16"


def test_provider_order_and_options(tmp_path):
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = select_providers(everything, None, tmp_path / "cache", profile=("pixel_values", 336, 4))
    assert [n for n, _ in chosen] == everything
    trt = chosen[0][1]
    assert trt["trt_fp16_enable"] and trt["trt_engine_cache_enable"]
    assert trt["trt_engine_cache_path"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert trt["trt_profile_min_shapes"] == trt["trt_profile_opt_shapes"] == "pixel_values:1x3x336x336"
    assert trt["trt_profile_max_shapes"] == "pixel_values:4x3x336x336"
    # an unwritable cache folder: no engine cache, but no failure either
    blocker = tmp_path / "file"
    blocker.write_text("x")
    trt = select_providers(everything, None, blocker / "cache")[0][1]
    assert "trt_engine_cache_enable" not in trt
    assert select_providers(["CPUExecutionProvider"]) == [("CPUExecutionProvider", {})]
    assert [n for n, _ in select_providers(everything, ["cuda"])] == ["CUDAExecutionProvider",
                                                                     "CPUExecutionProvider"]
    # asked for but absent: dropped, CPU still there
    assert [n for n, _ in select_providers(["CPUExecutionProvider"], ["tensorrt", "cuda"])] == [
        "CPUExecutionProvider"]


def test_threads_and_provider_reported(tmp_path_factory, caplog):
    import logging
    _, art = exported(tmp_path_factory, "v2")
    with caplog.at_level(logging.INFO, logger="mobilevlm_ros.core.vision_onnx"):
        vis = OnnxRuntimeVision.from_artifacts(art, read_manifest(art), LoadOptions(threads=1, vision_dtype="fp32"))
    assert any("runs on CPUExecutionProvider" in r.getMessage() for r in caplog.records)
    assert vis.session.get_session_options().intra_op_num_threads == 1
    assert vis.describe() == {"vision_backend": "onnxruntime", "provider": "CPUExecutionProvider",
                              "dtype": "fp32", "file": "vision-fp32.onnx"}


# --------------------------------------------------------------------------- real dimensions
SLOW = os.environ.get("MOBILEVLM_SLOW") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="1.7B-dims parity exports ViT-L/14-336 (~1.2 GB graph, ~8 GB RAM, "
                                     "minutes); run with MOBILEVLM_SLOW=1")
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_parity_1p7b_dims(version, tmp_path_factory):
    """fp32 ONNX Runtime vs torch at the real MobileVLM-1.7B dimensions (CLIP ViT-L/14-336, hidden 2048).

    Uses MOBILEVLM_1P7B_<V1|V2> (a `mobilevlm-make-tiny --dims 1.7b` folder) when set, else makes one.
    """
    from mobilevlm_ros.core.onnx_export import export_fp32
    ckpt_dir = os.environ.get(f"MOBILEVLM_1P7B_{version.upper()}")
    if not ckpt_dir:
        ckpt_dir = make_checkpoint(tmp_path_factory.mktemp("big") / version, PROJECTORS[version], "1.7b")
    ckpt = load_checkpoint(Path(ckpt_dir))
    enc = build_vision_encoder(ckpt)
    px = verification_pixels(2)
    with torch.inference_mode():
        ref = enc(torch.from_numpy(px)).numpy()
    path = tmp_path_factory.mktemp("big-onnx") / "vision-fp32.onnx"
    export_fp32(enc, path, 336)
    del enc, ckpt
    sess = OnnxRuntimeVision(path)
    got = sess.encode_pixels(px)
    m = compare(got, ref)
    print(f"\n[{version} 1.7B dims] onnxruntime fp32 vs torch: {_fmt(m)}; graph {path.stat().st_size / 1e9:.2f} GB")
    assert got.shape == (2, 144, 2048)
    assert within_parity(m), _fmt(m)

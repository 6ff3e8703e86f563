"""Vision tower + projector -> one ONNX graph, and its fp16 / int8 variants.

    pixel_values  float32 [batch, 3, S, S]  (normalised as preprocess.preprocess does)
        -> image_embeds float32 [batch, image_tokens, hidden]

The fp32 graph is exported from the torch reference (`vision.build_vision_encoder`) with the
torch.export-based exporter (`torch.onnx.export(dynamo=True)`, needs `onnxscript`), opset 18, batch
dimension dynamic, standard ONNX operators only, so ONNX Runtime (CPU, CUDA, TensorRT providers) and
TensorRT's own ONNX parser read the same file. The other dtypes are derived from it:

  fp16  weights and activations in float16, inputs/outputs kept float32; the op types in
        FP16_KEEP_FP32_OPS stay in float32 (see that constant for why).
  int8  ONNX Runtime dynamic quantization: MatMul weights int8 per output channel, activations
        quantized on the fly (MatMulInteger); attention matmuls, convolutions and norms stay fp32.

Input is float32, not uint8 with normalisation inside the graph: normalising a frame in numpy costs
about 1 ms against ~1-3 s for the ViT-L forward on a CPU (measured by `mobilevlm-bench vision`), and a
float32 input keeps one contract (`VisionBackend.encode_pixels`) for every backend.

Graphs whose weights exceed EXTERNAL_DATA_BYTES are written with their tensors in `<file>.data`
next to the .onnx (protobuf cannot hold more than 2 GB); the manifest lists and hashes both.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import MobileVLMError

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
OPSET = 18
DTYPES = ("fp32", "fp16", "int8")
# the vision_dtype option's choices (node parameter, CLIs): auto (artifacts.choose_vision_dtype), an
# exported graph, or bf16 (the torch backend under autocast)
VISION_DTYPES = ("auto", *DTYPES, "bf16")
EXTERNAL_DATA_BYTES = 1_800_000_000     # below protobuf's 2 GiB message limit, with headroom
MAX_EXPORT_BATCH = 64                   # upper bound of the dynamic batch dimension

# Kept in float32 inside the fp16 graph. LayerNormalization and Softmax reduce over 1024 (width) and
# 577 (tokens) values: a float16 sum of squares overflows (65504) once the residual stream reaches
# ~8 in magnitude over 1024 channels, and CLIP ViT-L has outlier channels far above that. Measured
# at 1.7B dims with random weights (small activations) both variants are equally close to fp32
# (cosine > 0.9999999, max abs diff 0.016-0.018), so this guards real weights at no measurable
# fidelity cost; the casts it adds make the graph slower on ONNX Runtime CPU, which is not what the
# fp16 graph is for (CUDA / TensorRT providers).
FP16_KEEP_FP32_OPS = ("LayerNormalization", "Softmax")

# Bounds the fp32 graph must meet against the torch reference at export time; anything looser is an
# exporter bug (a wrong op, layout or weight), not float rounding.
FP32_MIN_COSINE = 0.99999
FP32_MAX_REL_DIFF = 1e-3
# Fidelity wanted from the reduced-precision graphs (a warning, not an error, when missed).
REDUCED_MIN_COSINE = 0.999


class ExportError(MobileVLMError):
    """The export could not produce a correct graph."""


# --------------------------------------------------------------------------------------- metrics
def compare(out: np.ndarray, ref: np.ndarray) -> dict:
    """Agreement of out with ref ([B, N, D] each): max abs diff, the same relative to max |ref|,
    the lowest per-frame cosine similarity (flattened frame) and the lowest per-token cosine."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape {out.shape} != reference shape {ref.shape}")
    diff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max()) or 1.0

    def cos(a, b, axis):
        num = (a * b).sum(axis)
        den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
        return num / np.maximum(den, 1e-30)

    b = ref.shape[0]
    frame_cos = cos(out.reshape(b, -1), ref.reshape(b, -1), 1)
    token_cos = cos(out, ref, -1)
    return {"max_abs_diff": diff, "rel_max_abs_diff": diff / scale,
            "cosine": float(frame_cos.min()), "token_cosine_min": float(token_cos.min())}


def verification_pixels(n: int = 2, size: int = 336, seed: int = 1234) -> np.ndarray:
    """n deterministic frames (smooth gradients + noise, like a camera image) as normalised pixels."""
    from .preprocess import normalize
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = []
    for i in range(n):
        base = np.stack([np.sin(6.0 * xx + i), np.cos(4.0 * yy - i), xx * yy], 0) * 100 + 128
        noise = rng.normal(0, 30, size=(3, size, size))
        frames.append(normalize(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return np.stack(frames).astype(np.float32)


# ---------------------------------------------------------------------------------------- files
def external_data_file(onnx_path: Path) -> Optional[Path]:
    """The `<file>.data` companion of a graph written with external tensors, if present."""
    p = Path(str(onnx_path) + ".data")
    return p if p.is_file() else None


def _install(tmp_dir: Path, name: str, out_dir: Path) -> Path:
    """Move name (and name.data) from tmp_dir into out_dir, replacing older copies."""
    dst = out_dir / name
    stale = Path(str(dst) + ".data")
    if stale.exists() and not (tmp_dir / (name + ".data")).exists():
        stale.unlink()
    for f in (name + ".data", name):     # data first: a graph never points at a missing file
        if (tmp_dir / f).exists():
            os.replace(tmp_dir / f, out_dir / f)
    return dst


def _save(model, path: Path, external: bool) -> None:
    import onnx
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _initializer_bytes(model) -> int:
    import onnx
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


# --------------------------------------------------------------------------------------- export
def export_fp32(encoder, path: Path, image_size: int, metadata: Optional[dict] = None) -> Path:
    """Export a torch vision encoder (pixels -> embeds) to `path` (float32, dynamic batch)."""
    import torch
    from torch import nn

    class Graph(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.encoder = enc

        def forward(self, pixel_values):
            return self.encoder(pixel_values)

    model = Graph(encoder.float().eval())
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    example = torch.from_numpy(verification_pixels(2, image_size))
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    path = Path(path)
    # The exporter prints its progress to stdout and warns about internals; keep both out of the CLI.
    # "torchvision is not installed. Skipping ..." and per-initializer optimizer lines
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=OPSET, dynamo=True, dynamic_shapes={"pixel_values": {0: batch}},
                external_data=external, verbose=False, optimize=True)
            for k, v in (metadata or {}).items():
                program.model.metadata_props[str(k)] = str(v)
            program.save(str(path), external_data=external)
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnxscript package ({e}); pip install onnxscript") from None
    except OSError:
        raise
    except Exception as e:
        log.debug("exporter output:\n%s", chatter.getvalue())
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return path


def convert_fp16(src: Path, dst: Path, keep_fp32_ops: Iterable[str] = FP16_KEEP_FP32_OPS) -> Path:
    """float16 copy of an fp32 graph (I/O stay float32), via onnxruntime.transformers.float16."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    model = onnx.load(str(src))
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                           disable_shape_infer=_initializer_bytes(model) > EXTERNAL_DATA_BYTES)
    del model
    model16.metadata_props.add(key="mobilevlm.dtype", value="fp16")
    _save(model16, Path(dst), _initializer_bytes(model16) > EXTERNAL_DATA_BYTES)
    return Path(dst)


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantization of the MatMul weights (per output channel), ONNX Runtime's tool.

    Unsigned 8-bit weights (U8U8): with signed ones, a CPU without VNNI (AVX2 only) runs ONNX
    Runtime's u8s8 kernel, which adds products pairwise in int16 (vpmaddubsw) and saturates. A graph is
    exported once and runs on whatever CPU the robot has. At V2-1.7B dimensions on an AVX2 EPYC, cosine
    to fp32: u8s8 0.99909, u8s8 with 7-bit weights (reduce_range) 0.99883, U8U8 0.99964, as u8s8 on a
    VNNI CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, dst = Path(src), Path(dst)
    external = external_data_file(src) is not None
    quiet = logging.getLogger()   # the quantizer logs a "consider pre-processing" warning at root
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True,
                             reduce_range=False, weight_type=QuantType.QUInt8,
                             use_external_data_format=external,
                             extra_options={"MatMulConstBOnly": True})
    finally:
        quiet.setLevel(level)
    return dst


def run_onnx(path: Path, pixels: np.ndarray, threads: int = 0) -> np.ndarray:
    """One CPU ONNX Runtime pass (used to verify a freshly written graph)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def graph_entry(folder: Path, path: Path, dtype: str, image_size: int, tokens: int, hidden: int) -> dict:
    """The manifest's description of one vision graph (file hash and size, I/O contract)."""
    from .artifacts import sha256_file
    entry = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
             "opset": OPSET, "input_dtype": "float32",
             "input": {"name": INPUT_NAME, "shape": ["batch", 3, image_size, image_size],
                       "dtype": "float32"},
             "output": {"name": OUTPUT_NAME, "shape": ["batch", tokens, hidden], "dtype": "float32"}}
    data = external_data_file(path)
    if data is not None:
        entry["external_data"] = {"file": data.name, "sha256": sha256_file(data),
                                  "bytes": data.stat().st_size}
    return entry


def export_vision(checkpoint, out_dir: Path, dtypes: Iterable[str] = ("fp32",),
                  step: Optional[Callable[[str], None]] = None, verify: bool = True,
                  keep_fp32_ops: Iterable[str] = FP16_KEEP_FP32_OPS) -> dict:
    """Write vision-<dtype>.onnx for each dtype into out_dir; return the manifest "vision" section.

    fp32 is always written (the other dtypes and TensorRT engines are built from it). With verify,
    each graph is run by ONNX Runtime on two fixed frames and compared with the torch reference;
    fp32 must match to float rounding (else ExportError), the others are reported in the entry.
    step(msg) is called before each long step (for a progress bar).
    """
    from .artifacts import vision_filename
    from .projectors import projector_tokens
    from .vision import build_vision_encoder

    step = step or (lambda msg: None)
    dtypes = list(dict.fromkeys(["fp32", *dtypes]))
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ExportError(f"unknown vision dtype '{bad[0]}' (choose from {', '.join(DTYPES)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, vcfg = checkpoint.config, checkpoint.vision.config
    size, hidden = vcfg.image_size, cfg.llm.hidden_size
    tokens = projector_tokens(cfg.projector_type, vcfg.num_patches)

    step("vision: building the torch reference")
    encoder = build_vision_encoder(checkpoint)
    ref = None
    pixels = verification_pixels(2, size)
    if verify:
        import torch
        with torch.inference_mode():
            ref = encoder(torch.from_numpy(pixels)).numpy()
    meta = {"mobilevlm.projector_type": cfg.projector_type, "mobilevlm.image_tokens": tokens,
            "mobilevlm.hidden_size": hidden, "mobilevlm.source": str(checkpoint.path),
            "mobilevlm.dtype": "fp32"}
    section: dict = {}
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmp:
        tmp = Path(tmp)
        step("vision: exporting fp32 ONNX")
        export_fp32(encoder, tmp / vision_filename("fp32"), size, meta)
        del encoder                       # the fp32 torch copy is no longer needed
        fp32 = _install(tmp, vision_filename("fp32"), out_dir)
        for dtype in dtypes:
            path = out_dir / vision_filename(dtype)
            if dtype == "fp16":
                step("vision: converting to fp16")
                _install_from(tmp, path, lambda p: convert_fp16(fp32, p, keep_fp32_ops))
            elif dtype == "int8":
                step("vision: quantizing to int8")
                _install_from(tmp, path, lambda p: quantize_int8(fp32, p))
            entry = graph_entry(out_dir, path, dtype, size, tokens, hidden)
            if verify:
                step(f"vision: checking {dtype} against torch")
                got = compare(run_onnx(path, pixels), ref)
                entry["check"] = {k: float(f"{v:.6g}") for k, v in got.items()}
                entry["check"]["frames"] = int(pixels.shape[0])
                if dtype == "fp32" and (got["cosine"] < FP32_MIN_COSINE
                                        or got["rel_max_abs_diff"] > FP32_MAX_REL_DIFF):
                    raise ExportError(f"{path}: ONNX Runtime output differs from the torch reference "
                                      f"(cosine {got['cosine']:.6f}, max abs diff {got['max_abs_diff']:.3g}); "
                                      "the graph is wrong")
                if dtype != "fp32" and got["cosine"] < REDUCED_MIN_COSINE:
                    log.warning("%s: cosine %.5f to the fp32 reference is below %.3f", path.name,
                                got["cosine"], REDUCED_MIN_COSINE)
                log.info("%s: cosine %.7f, max abs diff %.3g vs torch", path.name, got["cosine"],
                         got["max_abs_diff"])
            section[dtype] = entry
    return section


def _install_from(tmp: Path, final: Path, write: Callable[[Path], Path]) -> None:
    write(tmp / final.name)
    _install(tmp, final.name, final.parent)


def remove_stale_graphs(out_dir: Path, keep: Iterable[str]) -> list[str]:
    """Delete vision-<dtype>.onnx (+ .data) for dtypes not in keep; returns the names removed."""
    from .artifacts import vision_filename
    removed = []
    for dtype in DTYPES:
        if dtype in keep:
            continue
        for p in (Path(out_dir) / vision_filename(dtype),
                  Path(str(Path(out_dir) / vision_filename(dtype)) + ".data")):
            if p.exists():
                p.unlink()
                removed.append(p.name)
    return removed


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "OPSET", "DTYPES", "VISION_DTYPES", "ExportError", "compare", "export_vision",
           "export_fp32", "convert_fp16", "quantize_int8", "verification_pixels", "graph_entry",
           "external_data_file", "remove_stale_graphs", "run_onnx"]

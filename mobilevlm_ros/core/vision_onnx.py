"""ONNX Runtime vision backend: runs the exported vision graph (tools/export.py).

Execution providers, best first, keeping those `onnxruntime.get_available_providers()` lists:
TensorRT (fp16, engines and timing cache in `LoadOptions.engine_cache`, default
ARTIFACTS/engines/ort-trt) -> CUDA -> CPU. `LoadOptions.onnx_providers` (names, in order) replaces
that list. The provider that actually runs the graph is logged once. The same code runs on a Jetson
(onnxruntime-gpu with TensorRT) and on a CPU-only machine.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import EncodeAborted, ImageError, ModelLoadError
from .vision import Abort, VisionBackend

log = logging.getLogger(__name__)

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
               "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def select_providers(available: Sequence[str], requested: Optional[Sequence[str]] = None,
                     engine_cache: Optional[Path] = None, fp16: bool = True,
                     profile: Optional[tuple] = None) -> list:
    """(provider, options) pairs for InferenceSession, best first.

    requested: provider names (full or short: tensorrt, cuda, cpu) in the order wanted; default
    PREFERENCE. Names not in `available` are dropped (with a log line if asked for explicitly);
    CPU is always last so the session can run anything the others cannot.
    profile: (input name, image size, max batch) -> a TensorRT optimisation profile batch 1..max,
    opt 1, so one engine serves every batch size instead of one engine per size seen.
    """
    names = [SHORT_NAMES.get(str(n).lower(), str(n)) for n in (requested or PREFERENCE)]
    chosen = []
    for name in dict.fromkeys(names):
        if name not in available:
            if requested:
                log.warning("onnxruntime: provider %s is not available here (have: %s)", name,
                            ", ".join(available))
            continue
        opts: dict = {}
        if name == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": bool(fp16)}
            if engine_cache is not None and _writable_dir(Path(engine_cache)):
                opts.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache),
                             "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engine_cache)})
            if profile:
                name_in, size, most = profile
                one = f"{name_in}:1x3x{size}x{size}"
                opts.update({"trt_profile_min_shapes": one, "trt_profile_opt_shapes": one,
                             "trt_profile_max_shapes": f"{name_in}:{int(most)}x3x{size}x{size}"})
        chosen.append((name, opts))
    if "CPUExecutionProvider" not in [n for n, _ in chosen]:
        chosen.append(("CPUExecutionProvider", {}))
    return chosen


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError as e:
        log.warning("onnxruntime: TensorRT engine cache %s not usable (%s); engines will be rebuilt "
                    "at every start (set engine_cache to a writable folder)", folder, e)
        return False


def validate_pixels(pixels, image_size: int) -> np.ndarray:
    """float32 C-contiguous [B, 3, S, S] with finite values, or ImageError saying what is wrong."""
    if not isinstance(pixels, np.ndarray):
        raise ImageError(f"expected pixels as a numpy array, got {type(pixels).__name__}")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise ImageError(f"expected float32 normalised pixels, got dtype {pixels.dtype}")
    if pixels.ndim != 4 or pixels.shape[0] < 1 or pixels.shape[1:] != (3, image_size, image_size):
        raise ImageError(f"expected pixels of shape [B, 3, {image_size}, {image_size}] with B >= 1, "
                         f"got {list(pixels.shape)}")
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if not np.isfinite(pixels).all():
        raise ImageError("pixels contain NaN or infinity")
    return pixels


def session_options(threads: int = 0):
    """The vision session's ONNX Runtime options (also what the vision bench profiles with)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    # ONNX Runtime's threads spin between and after their work; when an encode overlaps a question
    # on the same cores that spinning takes the decoder's CPU time. Without it encoding is < 3 %
    # slower (1.7B dims, int8, 2 cores).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OnnxRuntimeVision(VisionBackend):
    name = "onnxruntime"

    def __init__(self, onnx_path: Path, image_size: int = 336, threads: int = 0,
                 providers: Optional[Sequence[str]] = None, engine_cache: Optional[Path] = None,
                 dtype: str = "fp32", image_tokens: Optional[int] = None, hidden: Optional[int] = None,
                 input_name: str = "pixel_values", max_batch: int = 4):
        import onnxruntime as ort
        self.path, self.image_size, self.dtype = Path(onnx_path), int(image_size), dtype
        so = session_options(threads)
        chosen = select_providers(ort.get_available_providers(), providers, engine_cache,
                                  profile=(input_name, self.image_size, max_batch))
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=[n for n, _ in chosen],
                                                provider_options=[o for _, o in chosen])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
        self.provider = self.session.get_providers()[0]
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelLoadError(f"{self.path}: expected one input and one output, found "
                                 f"{len(inputs)} and {len(outputs)}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        shape = outputs[0].shape
        if image_tokens and isinstance(shape[1], int) and shape[1] != image_tokens:
            raise ModelLoadError(f"{self.path}: graph emits {shape[1]} image tokens, manifest says {image_tokens}")
        if hidden and isinstance(shape[2], int) and shape[2] != hidden:
            raise ModelLoadError(f"{self.path}: graph emits width {shape[2]}, manifest says {hidden}")
        log.info("onnxruntime vision: %s (%s) runs on %s (session ready in %.1f s, threads %s)",
                 self.path.name, dtype, self.provider, time.perf_counter() - t0, threads or "default")

    @classmethod
    def from_artifacts(cls, path, manifest: dict, opts) -> "OnnxRuntimeVision":
        from .artifacts import artifact_path, choose_vision_dtype
        path = Path(path)
        dtype = getattr(opts, "vision_dtype", "fp32") or "fp32"
        if dtype == "auto":
            dtype, _ = choose_vision_dtype(manifest, cls.name, getattr(opts, "device", "cpu"))
        onnx_path = artifact_path(path, manifest, "vision", dtype)
        entry = manifest["vision"][dtype]
        data = entry.get("external_data")
        if data and not (path / data["file"]).is_file():
            raise ModelLoadError(f"missing file: {path / data['file']} (weights of {onnx_path.name})")
        in_dtype = entry.get("input_dtype", "float32")
        if in_dtype != "float32":
            raise ModelLoadError(f"{onnx_path}: input dtype {in_dtype} is not supported (float32 only)")
        cache = Path(opts.engine_cache) if getattr(opts, "engine_cache", None) else path / "engines" / "ort-trt"
        return cls(onnx_path, image_size=int(manifest.get("image_size", 336)), threads=opts.threads,
                   providers=opts.onnx_providers, engine_cache=cache, dtype=dtype,
                   image_tokens=manifest.get("image_tokens"), hidden=manifest.get("hidden_size"),
                   input_name=entry.get("input", {}).get("name", "pixel_values"),
                   max_batch=int(opts.tensorrt.max_batch))

    def encode_pixels(self, pixels: np.ndarray, abort: Optional[Abort] = None) -> np.ndarray:
        import onnxruntime as ort
        pixels = validate_pixels(pixels, self.image_size)
        run = ort.RunOptions()
        if abort is not None:
            # ONNX Runtime checks the flag between nodes: the run stops within about a millisecond
            abort.on_request(lambda: setattr(run, "terminate", True))
        try:
            out = self.session.run([self.output_name], {self.input_name: pixels}, run)[0]
        except Exception:
            if abort is not None and abort.requested:
                raise EncodeAborted("the encode was aborted") from None
            raise
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict:
        return {"vision_backend": self.name, "provider": self.provider, "dtype": self.dtype,
                "file": self.path.name}

    def close(self) -> None:
        self.session = None

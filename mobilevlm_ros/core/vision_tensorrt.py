"""TensorRT vision backend: an engine built from the exported vision graph, run with TensorRT 10.

NOT EXECUTED ON THE DEVELOPMENT MACHINE. TensorRT cannot be installed there (no full TensorRT wheel
resolves, no GPU), so this module is written against the documented TensorRT 10 Python API
(Builder / OnnxParser / IBuilderConfig / IOptimizationProfile / ITimingCache / Runtime /
ICudaEngine / IExecutionContext) and is exercised by test/test_tensorrt.py only where `tensorrt`
imports and a CUDA GPU is visible (a Jetson with JetPack 6, or an x86 machine with TensorRT 10).
The pure-Python parts (engine file naming, staleness check) are tested everywhere.

Build (`build_engine`, also `mobilevlm-build-engine`): parse vision-<dtype>.onnx with OnnxParser
(external weight files are found next to it), one optimisation profile on the batch dimension,
min 1 / opt 1 / max `max_batch`, FP16 builder flag when asked (an fp16 graph is instead built as a
strongly typed network, its precisions taken from the graph), timing cache read from and written back
to `timing.cache` in the engine folder so rebuilds are fast.

Engine files live in ARTIFACTS/engines/ (or `LoadOptions.engine_cache`):

    vision-<dtype>-<fp16|fp32>-b<max_batch>.engine       serialized engine (a TensorRT plan)
    vision-<dtype>-<fp16|fp32>-b<max_batch>.engine.json  its stamp: ONNX sha256 (+ external data),
                                                         TensorRT version, precision, max batch, GPU
    timing.cache

An engine whose stamp does not match the current ONNX file, TensorRT version, options or GPU is stale
and is rebuilt, never used: engines are specific to all four.

Run (`TensorRTVision`): buffers are torch CUDA tensors (torch is already a dependency and JetPack's
torch wheel has CUDA), the input copied host -> device and the output back on one
`torch.cuda.Stream`; their `data_ptr()` go to `IExecutionContext.set_tensor_address`, the stream's
handle to `execute_async_v3`. Batches larger than the engine's profile are run in chunks.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ModelLoadError
from .vision import VisionBackend

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 4
ENGINE_DIR = "engines"
TIMING_CACHE = "timing.cache"
STAMP_VERSION = 1


# ------------------------------------------------------------------- engine files (no TensorRT)
def engine_path(engine_dir: Path, dtype: str, fp16: bool, max_batch: int) -> Path:
    return Path(engine_dir) / f"vision-{dtype}-{'fp16' if fp16 else 'fp32'}-b{int(max_batch)}.engine"


def stamp_path(engine_file: Path) -> Path:
    return Path(str(engine_file) + ".json")


def onnx_digest(onnx_path: Path, known: Optional[dict] = None) -> dict:
    """{file, bytes, mtime_ns, sha256} of the graph (and of its .data file), reusing `known` hashes
    when size and mtime are unchanged so a start-up does not re-hash a 1.2 GB file every time."""
    from .artifacts import sha256_file
    out = {}
    for p in (Path(onnx_path), Path(str(onnx_path) + ".data")):
        if not p.is_file():
            continue
        st = p.stat()
        prev = (known or {}).get(p.name)
        same = prev and prev.get("bytes") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns
        out[p.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "sha256": prev["sha256"] if same else sha256_file(p)}
    return out


def make_stamp(onnx_path: Path, tensorrt_version: str, fp16: bool, max_batch: int, device: str,
               known: Optional[dict] = None) -> dict:
    return {"stamp_version": STAMP_VERSION, "onnx": onnx_digest(onnx_path, known),
            "tensorrt_version": str(tensorrt_version), "fp16": bool(fp16), "max_batch": int(max_batch),
            "device": str(device)}


def _comparable(stamp: dict) -> dict:
    s = dict(stamp)
    s["onnx"] = {k: {"bytes": v["bytes"], "sha256": v["sha256"]} for k, v in stamp.get("onnx", {}).items()}
    s.pop("built", None)
    s.pop("build_seconds", None)
    return s


def read_stamp(engine_file: Path) -> Optional[dict]:
    try:
        return json.loads(stamp_path(engine_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stale_reason(engine_file: Path, wanted: dict) -> Optional[str]:
    """None when engine_file exists and was built from exactly `wanted`, else why not."""
    engine_file = Path(engine_file)
    if not engine_file.is_file():
        return "no engine built yet"
    have = read_stamp(engine_file)
    if have is None:
        return f"{stamp_path(engine_file).name} is missing or unreadable"
    a, b = _comparable(have), _comparable(wanted)
    for key in ("stamp_version", "onnx", "tensorrt_version", "fp16", "max_batch", "device"):
        if a.get(key) != b.get(key):
            what = {"onnx": "the ONNX graph changed"}.get(key, f"{key} {a.get(key)!r} -> {b.get(key)!r}")
            return f"stale engine: {what}"
    if have.get("engine_bytes") not in (None, engine_file.stat().st_size):
        return "engine file size does not match its stamp (truncated?)"
    return None


# ------------------------------------------------------------------------- TensorRT (GPU only)
def _trt():
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or libnvinfer failing to load
        raise ModelLoadError(f"the tensorrt vision backend needs TensorRT 10 (`import tensorrt` failed: "
                             f"{type(e).__name__}: {e}); use --vision-backend onnxruntime") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise ModelLoadError(f"TensorRT {trt.__version__} found, 10.x needed (execute_async_v3 API)")
    return trt


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ModelLoadError(f"the tensorrt vision backend keeps its GPU buffers in torch tensors and needs "
                             f"torch with CUDA ({e}; the runtime set, requirements-runtime.txt, leaves torch "
                             f"out: on a Jetson install NVIDIA's torch wheel for its JetPack); or use "
                             f"--vision-backend onnxruntime") from None
    return torch


def cuda_device() -> str:
    """GPU name and compute capability, part of an engine's stamp."""
    torch = _torch()
    if not torch.cuda.is_available():
        raise ModelLoadError("the tensorrt vision backend needs a CUDA GPU visible to torch")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{torch.cuda.get_device_name(0)} sm_{major}{minor}"


def build_engine(onnx_path: Path, engine_file: Path, *, fp16: bool = True, max_batch: int = DEFAULT_MAX_BATCH,
                 image_size: int = 336, strongly_typed: bool = False, workspace_bytes: int = 0,
                 known_hashes: Optional[dict] = None) -> Path:
    """Build and serialize an engine for onnx_path; write engine_file, its stamp and the timing cache."""
    trt = _trt()
    onnx_path, engine_file = Path(onnx_path), Path(engine_file)
    engine_file.parent.mkdir(parents=True, exist_ok=True)
    stamp = make_stamp(onnx_path, trt.__version__, fp16, max_batch, cuda_device(), known_hashes)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0   # TensorRT 10: networks are always explicit-batch
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(f"TensorRT cannot parse {onnx_path}: {errors}")
    if network.num_inputs != 1:
        raise ModelLoadError(f"{onnx_path}: expected one input, found {network.num_inputs}")
    name = network.get_input(0).name
    config = builder.create_builder_config()
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    one, most = (1, 3, image_size, image_size), (int(max_batch), 3, image_size, image_size)
    profile.set_shape(name, one, one, most)          # min, opt, max
    config.add_optimization_profile(profile)
    cache_file = engine_file.parent / TIMING_CACHE
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log.warning("building TensorRT engine %s from %s (%s, batch 1..%d); this takes minutes",
                engine_file.name, onnx_path.name, "fp16" if fp16 else "fp32", max_batch)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    tmp = engine_file.with_suffix(".engine.tmp")
    with open(tmp, "wb") as f:
        f.write(plan)
    os.replace(tmp, engine_file)
    with open(cache_file, "wb") as f:
        f.write(config.get_timing_cache().serialize())
    stamp.update(built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 build_seconds=round(time.perf_counter() - t0, 1), engine_bytes=engine_file.stat().st_size)
    stamp_path(engine_file).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    log.warning("built %s in %.0f s", engine_file, time.perf_counter() - t0)
    return engine_file


def ensure_engine(onnx_path: Path, engine_dir: Path, dtype: str, fp16: bool, max_batch: int,
                  image_size: int, force: bool = False) -> Path:
    """The engine for these options: reused if its stamp matches, (re)built otherwise."""
    trt = _trt()
    engine_file = engine_path(engine_dir, dtype, fp16, max_batch)
    old = read_stamp(engine_file) or {}
    wanted = make_stamp(onnx_path, trt.__version__, fp16, max_batch, cuda_device(), old.get("onnx"))
    reason = "rebuild requested" if force else stale_reason(engine_file, wanted)
    if reason is None:
        return engine_file
    log.warning("TensorRT engine %s: %s", engine_file.name, reason)
    return build_engine(onnx_path, engine_file, fp16=fp16, max_batch=max_batch, image_size=image_size,
                        strongly_typed=(dtype == "fp16"), known_hashes=wanted["onnx"])


class TensorRTVision(VisionBackend):
    name = "tensorrt"

    def __init__(self, engine_file: Path, image_size: int = 336, dtype: str = "fp32", fp16: bool = True):
        torch = _torch()
        trt = _trt()
        self.engine_file, self.image_size, self.dtype, self.fp16 = Path(engine_file), int(image_size), dtype, fp16
        self.device = torch.device("cuda", 0)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_file.read_bytes())
        if self.engine is None:
            raise ModelLoadError(f"TensorRT cannot deserialize {self.engine_file} (rebuild it with "
                                 "mobilevlm-build-engine --force)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise ModelLoadError(f"{self.engine_file}: expected one input and one output tensor")
        self.input_name, self.output_name = ins[0], outs[0]
        to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        self.in_dtype = to_torch[self.engine.get_tensor_dtype(self.input_name)]
        self.out_dtype = to_torch[self.engine.get_tensor_dtype(self.output_name)]
        _, _, most = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch = int(most[0])
        self.stream = torch.cuda.Stream(self.device)
        log.info("tensorrt vision: %s (batch 1..%d) on %s", self.engine_file.name, self.max_batch,
                 torch.cuda.get_device_name(0))

    @classmethod
    def from_artifacts(cls, path, manifest: dict, opts) -> "TensorRTVision":
        """Engine for opts.vision_dtype's graph, built on first use (or when stale).

        opts.tensorrt (pipeline.TensorRTOptions): fp16, max_batch, rebuild. Engines go to
        opts.engine_cache or ARTIFACTS/engines.
        """
        from .artifacts import artifact_path, choose_vision_dtype
        path = Path(path)
        dtype = getattr(opts, "vision_dtype", "fp32") or "fp32"
        if dtype == "auto":
            dtype, _ = choose_vision_dtype(manifest, cls.name, "cuda")
        if dtype == "int8":
            raise ModelLoadError("the tensorrt backend builds from the fp32 (or fp16) graph; the int8 graph "
                                 "uses ONNX Runtime's dynamic quantization, which TensorRT does not run")
        onnx_path = artifact_path(path, manifest, "vision", dtype)
        engine_dir = Path(opts.engine_cache) if getattr(opts, "engine_cache", None) else path / ENGINE_DIR
        fp16 = bool(opts.tensorrt.fp16) or dtype == "fp16"
        engine = ensure_engine(onnx_path, engine_dir, dtype, fp16,
                               int(opts.tensorrt.max_batch or DEFAULT_MAX_BATCH),
                               int(manifest.get("image_size", 336)), bool(opts.tensorrt.rebuild))
        return cls(engine, int(manifest.get("image_size", 336)), dtype, fp16)

    def encode_pixels(self, pixels: np.ndarray, abort=None) -> np.ndarray:
        import torch
        from .vision_onnx import validate_pixels
        if abort is not None:               # a GPU run is short: it is not stopped once started
            abort.check()
        pixels = validate_pixels(pixels, self.image_size)
        outs = []
        for i in range(0, pixels.shape[0], self.max_batch):
            chunk = torch.from_numpy(pixels[i:i + self.max_batch])
            with torch.cuda.stream(self.stream):
                x = chunk.pin_memory().to(self.device, self.in_dtype, non_blocking=True)
                if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                    raise ModelLoadError(f"TensorRT rejected input shape {tuple(x.shape)}")
                y = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                                dtype=self.out_dtype, device=self.device)
                self.context.set_tensor_address(self.input_name, x.data_ptr())
                self.context.set_tensor_address(self.output_name, y.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise ModelLoadError("TensorRT execute_async_v3 failed")
                host = y.to("cpu", torch.float32, non_blocking=False)
            self.stream.synchronize()
            outs.append(host.numpy())
        return np.concatenate(outs, axis=0)

    def describe(self) -> dict:
        return {"vision_backend": self.name, "engine": self.engine_file.name, "dtype": self.dtype,
                "precision": "fp16" if self.fp16 else "fp32", "max_batch": self.max_batch}

    def close(self) -> None:
        self.context = None
        self.engine = None

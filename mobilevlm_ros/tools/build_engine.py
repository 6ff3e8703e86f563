"""mobilevlm-build-engine: build (or check) the TensorRT engine of an artifacts folder's vision graph.

    mobilevlm-build-engine ARTIFACTS [--fp16 | --no-fp16] [--max-batch N] [--vision-dtype fp32]
                           [--engine-dir DIR] [--force] [--check]

Builds ARTIFACTS/engines/vision-<dtype>-<precision>-b<N>.engine from vision-<dtype>.onnx with the
TensorRT 10 Python API (see core/vision_tensorrt.py), unless an engine stamped with the same ONNX
sha256, TensorRT version, options and GPU is already there. Run it on the robot (engines are specific
to the GPU and TensorRT version) once after export; the node would otherwise build it at start-up.
--check only says whether the engine is current (exit 0) or stale/missing (exit 3).
Exit codes: 0 ok, 1 cannot build (no TensorRT, no GPU, bad graph), 2 bad arguments, 3 stale (--check).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    from ..core.vision_tensorrt import DEFAULT_MAX_BATCH, ENGINE_DIR
    ap = argparse.ArgumentParser(prog="mobilevlm-build-engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", type=Path, help="folder written by mobilevlm-export")
    ap.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                    help="let TensorRT use float16 kernels (default on)")
    ap.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                    help=f"largest batch of the optimisation profile (1..N, opt 1; default {DEFAULT_MAX_BATCH})")
    ap.add_argument("--vision-dtype", default="fp32", choices=("fp32", "fp16"),
                    help="ONNX graph to build from (fp16: a strongly typed network)")
    ap.add_argument("--engine-dir", type=Path, default=None, help=f"default ARTIFACTS/{ENGINE_DIR}")
    ap.add_argument("--force", action="store_true", help="rebuild even if the engine is current")
    ap.add_argument("--check", action="store_true", help="only report whether the engine is current")
    a = ap.parse_args(argv)
    if a.max_batch < 1:
        ap.error("--max-batch must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ..core.artifacts import artifact_path, read_manifest
    from ..core.errors import MobileVLMError
    from ..core import vision_tensorrt as vt
    try:
        manifest = read_manifest(a.artifacts)
        onnx_path = artifact_path(a.artifacts, manifest, "vision", a.vision_dtype)
        engine_dir = a.engine_dir or a.artifacts / ENGINE_DIR
        size = int(manifest.get("image_size", 336))
        fp16 = a.fp16 or a.vision_dtype == "fp16"
        if a.check:
            trt = vt._trt()
            engine = vt.engine_path(engine_dir, a.vision_dtype, fp16, a.max_batch)
            old = vt.read_stamp(engine) or {}
            wanted = vt.make_stamp(onnx_path, trt.__version__, fp16, a.max_batch, vt.cuda_device(),
                                   old.get("onnx"))
            reason = vt.stale_reason(engine, wanted)
            print(f"{engine}: {'current' if reason is None else reason}")
            return 0 if reason is None else 3
        engine = vt.ensure_engine(onnx_path, engine_dir, a.vision_dtype, fp16, a.max_batch, size, a.force)
    except MobileVLMError as e:
        print(f"mobilevlm-build-engine: {e}", file=sys.stderr)
        return 1
    print(f"engine: {engine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Vision encoder latency and throughput per backend and graph dtype, side by side in one run.

    mobilevlm-bench vision --model CKPT|ARTIFACTS [--artifacts DIR] [--batches 1,4]
                           [--backends torch,onnxruntime] [--dtypes fp32,fp16,int8] [--threads N]
                           [--repeats 3] [--warmup 1] [--out DIR]

For every backend x dtype x batch: per-frame latency (median, min, max over --repeats timed runs
after --warmup untimed ones), frames/s, the ONNX file size, and fidelity against the PyTorch fp32
reference on the same frames (cosine, max abs diff). `torch` runs the reference module (fp32, and
bf16 under autocast where the CPU has AMX or AVX512_BF16: oneDNN's bfloat16 matmuls), `onnxruntime`
the exported graphs, `tensorrt` an engine (GPU only). A checkpoint given as --model is
exported first (to --artifacts, default OUT/artifacts). Also reported: the cost of preprocessing a
640x480 frame and of its normalisation step alone (what in-graph normalisation could save).
CPU ms/frame is the process CPU time (all threads, including ONNX Runtime's spin-waits): on a
machine shared with other work it shows what a frame costs when wall time is inflated by waiting.
Prints a markdown table; writes OUT/vision.json and OUT/vision.md.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ...core.onnx_export import DTYPES
from ...core.pipeline import VISION_BACKENDS
from ..options import CommaList
from .common import barh, finish_machine, machine_info, machine_line, report


def _torch_dtypes() -> tuple:
    """fp32 (the reference), and bf16 where the CPU has bfloat16 matmuls (AMX or AVX512_BF16)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        flags = ""
    return ("fp32", "bf16") if ("amx_bf16" in flags or "avx512_bf16" in flags) else ("fp32",)


TORCH_DTYPES = _torch_dtypes()


def bench_frames(n: int = 4, h: int = 480, w: int = 640, seed: int = 7) -> list:
    """n deterministic camera-like uint8 RGB frames."""
    from ..synthetic import pattern_frame
    return [pattern_frame(h, w, seed + i) for i in range(n)]


def _time_pre(frames) -> dict:
    from ...core.preprocess import normalize, preprocess, preprocess_uint8
    t0 = time.perf_counter()
    for f in frames:
        preprocess(f)
    full = (time.perf_counter() - t0) / len(frames)
    chw = [preprocess_uint8(f) for f in frames]
    t0 = time.perf_counter()
    for _ in range(5):
        for c in chw:
            normalize(c)
    norm = (time.perf_counter() - t0) / (5 * len(chw))
    return {"preprocess_ms": round(full * 1e3, 2), "normalize_ms": round(norm * 1e3, 3)}


def _ensure_artifacts(model: Path, artifacts: Path, dtypes, threads: int) -> tuple[Path, dict]:
    """(artifacts folder, manifest) holding the wanted vision dtypes; exports what is missing."""
    from ...core.artifacts import MANIFEST, read_manifest, sha256_file
    if (model / MANIFEST).is_file():
        return model, read_manifest(model)
    onnx_dtypes = [d for d in dtypes if d in ("fp32", "fp16", "int8")]
    if (artifacts / MANIFEST).is_file():
        m = read_manifest(artifacts)
        if (m.get("source", {}).get("config_sha256") == sha256_file(model / "config.json")
                and all(d in m.get("vision", {}) for d in onnx_dtypes)):
            return artifacts, m
    from ..export import export
    print(f"exporting {model} -> {artifacts} ({', '.join(onnx_dtypes)}) ...", file=sys.stderr)
    m = export(model, artifacts, onnx_dtypes, [], llm=False, verify=False, quiet=False)
    return artifacts, m


def _make_backend(kind: str, dtype: str, artifacts: Path, manifest: dict, threads: int, ckpt_loader):
    from ...core.pipeline import LoadOptions
    opts = LoadOptions(vision_dtype=dtype, threads=threads)
    if kind == "torch":
        from ...core.vision import TorchVision
        return TorchVision(ckpt_loader(), "cpu", threads, bf16=dtype == "bf16")
    if kind == "onnxruntime":
        from ...core.vision_onnx import OnnxRuntimeVision
        return OnnxRuntimeVision.from_artifacts(artifacts, manifest, opts)
    if kind == "tensorrt":
        from ...core.vision_tensorrt import TensorRTVision
        return TensorRTVision.from_artifacts(artifacts, manifest, opts)
    raise ValueError(f"unknown backend {kind}")


def _file_mb(artifacts: Path, manifest: dict, kind: str, dtype: str):
    if kind == "torch":
        return None
    e = manifest.get("vision", {}).get(dtype, {})
    total = e.get("bytes", 0) + e.get("external_data", {}).get("bytes", 0)
    return round(total / 1e6, 1) if total else None


def ort_op_profile(onnx_path: Path, pixels: np.ndarray, threads: int, runs: int = 3) -> dict:
    """ms per run spent in each ONNX Runtime operator type (its profiler's kernel times, summed
    over the graph's nodes), on a CPU session of its own with the node's options."""
    import json
    import onnxruntime as ort
    from ...core.vision_onnx import session_options
    so = session_options(threads)
    with tempfile.TemporaryDirectory(prefix="mobilevlm-bench-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        so.enable_profiling = True
        session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: pixels}
        session.run(None, feed)                             # warm-up, profiled too: dropped below
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = [e["dur"] for e in events if e.get("name") == "model_run"][1:]
    warm_end = next(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    ops: dict = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warm_end:
            op = e["args"].get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + e["dur"] / 1e3 / runs
    return {"run_ms": round(statistics.median(model_runs) / 1e3, 1),
            "ops_ms": {k: round(v, 1) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])}}


def run(a) -> dict:
    from ...core.onnx_export import compare
    from ...core.preprocess import preprocess

    model = Path(a.model)
    out = Path(a.out) if a.out else None
    tmp = None
    artifacts = Path(a.artifacts) if a.artifacts else (out / "artifacts" if out else None)
    if artifacts is None:
        tmp = tempfile.TemporaryDirectory(prefix="mobilevlm-bench-")
        artifacts = Path(tmp.name)
    backends, dtypes = a.backends, a.dtypes
    batches = [int(b) for b in a.batches.split(",") if b]
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    info = machine_info(a.threads)
    need_onnx = [d for d in dtypes] if any(b != "torch" for b in backends) else []
    artifacts, manifest = _ensure_artifacts(model, artifacts, need_onnx or ["fp32"], a.threads)
    src = Path(manifest.get("source", {}).get("path", model))

    def ckpt_loader():
        from ...core.checkpoint import load_checkpoint
        return load_checkpoint(src)

    frames = bench_frames(max(batches))
    pre = _time_pre(frames)
    pixels_all = np.stack([preprocess(f) for f in frames])

    # the reference: torch fp32 on the same frames
    from ...core.vision import TorchVision
    ref_backend = TorchVision(ckpt_loader(), "cpu", a.threads)
    reference = ref_backend.encode_pixels(pixels_all)
    del ref_backend
    gc.collect()

    rows = []
    for kind in backends:
        for dtype in (TORCH_DTYPES if kind == "torch" else dtypes):
            t0 = time.perf_counter()
            try:
                backend = _make_backend(kind, dtype, artifacts, manifest, a.threads, ckpt_loader)
            except Exception as e:  # a missing provider/engine is a row, not the end of the run
                rows.append({"backend": kind, "dtype": dtype, "error": f"{type(e).__name__}: {e}"})
                print(f"{kind}/{dtype}: {e}", file=sys.stderr)
                continue
            load_s = time.perf_counter() - t0
            for batch in batches:
                px = pixels_all[:batch]
                for _ in range(a.warmup):
                    backend.encode_pixels(px)
                per_frame, cpu, y = [], [], None
                for _ in range(a.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    y = backend.encode_pixels(px)
                    per_frame.append((time.perf_counter() - t0) / batch)
                    cpu.append((time.process_time() - c0) / batch)
                fid = compare(y, reference[:batch])
                med = statistics.median(per_frame)
                row = {"backend": kind, "dtype": dtype, "batch": batch,
                       "file_mb": _file_mb(artifacts, manifest, kind, dtype),
                       "ms_per_frame_median": round(med * 1e3, 1),
                       "ms_per_frame_min": round(min(per_frame) * 1e3, 1),
                       "ms_per_frame_max": round(max(per_frame) * 1e3, 1),
                       "frames_per_s": round(1.0 / med, 3), "load_s": round(load_s, 2),
                       "cpu_ms_per_frame_median": round(statistics.median(cpu) * 1e3, 1),
                       "cosine_vs_torch_fp32": round(fid["cosine"], 7),
                       "token_cosine_min": round(fid["token_cosine_min"], 6),
                       "max_abs_diff": float(f"{fid['max_abs_diff']:.4g}"),
                       "rel_max_abs_diff": float(f"{fid['rel_max_abs_diff']:.4g}"),
                       "describe": backend.describe()}
                rows.append(row)
                print(f"{kind}/{dtype} batch {batch}: {row['ms_per_frame_median']:.0f} ms/frame "
                      f"(min {row['ms_per_frame_min']:.0f}, max {row['ms_per_frame_max']:.0f}), "
                      f"cosine {row['cosine_vs_torch_fp32']:.6f}", file=sys.stderr, flush=True)
            if a.profile and kind == "onnxruntime":
                from ...core.artifacts import artifact_path
                rows[-1]["op_profile"] = ort_op_profile(artifact_path(artifacts, manifest, "vision", dtype),
                                                        pixels_all[:1], a.threads)
            backend.close()
            del backend
            gc.collect()
    finish_machine(info)
    result = {"benchmark": "vision", "model": str(model), "artifacts": str(artifacts),
              "projector_type": manifest.get("projector_type"), "hidden_size": manifest.get("hidden_size"),
              "image_tokens": manifest.get("image_tokens"), "repeats": a.repeats, "warmup": a.warmup,
              "machine": info, **pre, "results": rows}
    if tmp is not None:
        tmp.cleanup()
    return result


def table(result: dict) -> str:
    head = ("| backend | dtype | file MB | batch | ms/frame median | min | max | frames/s | "
            "CPU ms/frame | cosine vs torch fp32 | max abs diff |")
    lines = [head, "|" + "---|" * 11]
    for r in result["results"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['dtype']} | | | {r['error'][:60]} | | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['file_mb'] if r['file_mb'] is not None else '-'} | "
                     f"{r['batch']} | {r['ms_per_frame_median']:.0f} | {r['ms_per_frame_min']:.0f} | "
                     f"{r['ms_per_frame_max']:.0f} | {r['frames_per_s']:.2f} | {r['cpu_ms_per_frame_median']:.0f} | "
                     f"{r['cosine_vs_torch_fp32']:.6f} | {r['max_abs_diff']:.3g} |")
    for r in result["results"]:
        prof = r.get("op_profile")
        if prof:
            top = ", ".join(f"{op} {ms:.0f}" for op, ms in list(prof["ops_ms"].items())[:8])
            lines.append(f"\nONNX Runtime {r['dtype']}, batch 1, ms per run by operator type "
                         f"(profiler, {prof['run_ms']:.0f} ms a run): {top}")
    lines.append("")
    lines.append(f"Medians (min–max) of {result['repeats']} runs after {result['warmup']} warm-up; "
                 f"{machine_line(result['machine'])}; preprocess {result['preprocess_ms']} ms/frame "
                 f"(normalise alone {result['normalize_ms']} ms)")
    return "\n".join(lines)


def plot(result: dict, ax) -> None:
    rows = [r for r in result["results"] if "error" not in r]
    barh(ax, [f"{r['backend']} {r['dtype']}, batch {r['batch']}" for r in rows],
         [r["ms_per_frame_median"] for r in rows],
         [(r["ms_per_frame_min"], r["ms_per_frame_max"]) for r in rows],
         xlabel="ms per frame (median, min–max)", title="Vision encoder + projector per frame",
         color=["tab:gray" if r["backend"] == "torch" else "tab:blue" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-bench vision", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder or artifacts folder")
    ap.add_argument("--artifacts", default=None, help="where to export a checkpoint's graphs")
    ap.add_argument("--batches", default="1,4")
    backends, dtypes = CommaList(VISION_BACKENDS, "vision backend"), CommaList(DTYPES, "vision dtype")
    ap.add_argument("--backends", default="torch,onnxruntime", type=backends, help=f"comma-separated: {backends.names}")
    ap.add_argument("--dtypes", default=dtypes.names, type=dtypes,
                    help=f"ONNX graphs for onnxruntime/tensorrt, comma-separated: {dtypes.names}")
    ap.add_argument("--threads", type=int, default=0, help="0 = library default")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", action="store_true",
                    help="also profile each ONNX Runtime graph by operator type (batch 1)")
    ap.add_argument("--out", default=None, help="folder for vision.json and vision.md")
    a = ap.parse_args(argv)
    from ...core.errors import MobileVLMError
    return report("vision", lambda: run(a), table, a.out, plot, errors=(MobileVLMError,))


if __name__ == "__main__":
    sys.exit(main())

"""Resident memory of the node per configuration, and which configurations fit a device's budget.

    mobilevlm-bench memory --model ARTIFACTS [--configs fp32+q4_k_m,fp16+q4_k_m,int8+q4_k_m,int8+q8_0]
                           (bf16+QUANT: the torch vision backend under bf16 autocast)
                           [--reference CKPT] [--repeats 3] [--duration 15] [--tokens 32]
                           [--budget-mb 5500] [--param NAME:=VALUE ...] [--out DIR]

Each configuration (ONNX vision graph dtype + GGUF quantization) is a node process of its own,
started as a user starts it (config/mobilevlm.yaml, -p vision_dtype:=... -p quant:=...), fed a
640x480 30 Hz camera stream over DDS while one client asks again as soon as it has its answer
(at most --tokens tokens), for --duration seconds. --reference CKPT adds the PyTorch node (torch
vision + torch decoder, float32: what the official code runs) on the checkpoint. Per run:

  loaded MB     RSS once the node serves, before any frame
  serving MB    median RSS while frames arrive and questions are answered
  peak MB       VmHWM of the node process at the end (what the device must have)

Each figure is the median (min–max) over --repeats fresh node processes. "fits" compares the
median peak with --budget-mb: an 8 GB Jetson Orin Nano shares its 8 GB between CPU and GPU, and
JetPack, the camera driver and the rest of the ROS graph take some of it; 5500 MB is the share
this package assumes one node may use there (set your own). Measured on this machine's CPU path
(ONNX Runtime + the llamacpp decoder on llama.cpp or ik_llama.cpp, whichever llama_library picks:
each row names the library the node reported); on an Orin, the TensorRT engine replaces the ONNX
Runtime session.
Prints a markdown table; writes OUT/memory.json, OUT/memory.md and OUT/memory.png.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional

from .common import barh, finish_machine, fmt, machine_info, machine_line, minmax, report, stats
from .node import node_with_traffic

DEFAULT_CONFIGS = "fp32+q4_k_m,fp16+q4_k_m,int8+q4_k_m,int8+q8_0"
STREAM = "front:640x480@30"
DEFAULT_BUDGET_MB = 5500.0


def parse_configs(spec: str) -> list:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        dtype, sep, quant = item.partition("+")
        if not sep or not dtype or not quant:
            raise ValueError(f"configuration '{item}' is not VISION_DTYPE+QUANT (e.g. int8+q4_k_m)")
        if dtype == "bf16":         # the torch vision backend under bf16 autocast (its source checkpoint)
            out.append({"vision": "torch bf16", "quant": quant, "model": None,
                        "params": {"vision_backend": "torch", "vision_dtype": dtype, "quant": quant}})
            continue
        out.append({"vision": f"onnxruntime {dtype}", "quant": quant, "model": None,
                    "params": {"vision_dtype": dtype, "quant": quant}})
    return out


def config_name(c: dict, library: Optional[str] = None) -> str:
    """A configuration's row label: vision backend and dtype, then the library the llamacpp decoder
    ran on (as the node reported it; "llamacpp" before it ran) and the quantization."""
    if "name" in c:
        return c["name"]
    return f"{c['vision']} + {library or 'llamacpp'} {c['quant']}"


def library_of(model_status: dict) -> Optional[str]:
    """The library ("llama.cpp", "ik_llama.cpp") the node's llamacpp decoder runs on, from the
    node's model diagnostics (None for another decoder); llama_library "auto" picks it at load."""
    return model_status.get("library") if model_status.get("decoder") == "llamacpp" else None


def one_run(model, params: dict, duration: float, tokens: int) -> dict:
    from ..traffic import CameraStream
    with node_with_traffic(model, CameraStream.parse(STREAM), tokens, params) as (node, flood, idle):
        summary = flood.run(duration)
        alive = node.proc.poll() is None
        samples = list(flood.samples)
        library = library_of(flood.diag.get("model", {}))
    serving = [r["rss_mb"] for r in samples if r.get("rss_mb") == r.get("rss_mb") and "rss_mb" in r]
    if not summary.answered:
        raise RuntimeError(f"no question was answered in {duration:.0f} s ({summary.error_kinds or 'no errors'})")
    return {"loaded_mb": idle.get("VmRSS"), "serving_mb": statistics.median(serving) if serving else None,
            "peak_mb": summary.hwm_mb, "answered": summary.answered, "node_alive": alive, "library": library}


def run(a) -> dict:
    configs = parse_configs(a.configs)
    if a.reference:
        configs.append({"name": "reference-style: PyTorch fp32 (torch vision + torch decoder)",
                        "model": a.reference, "params": {"vision_backend": "torch", "decoder": "torch"}})
    extra = dict(p.split(":=", 1) for p in a.param)
    info = machine_info()
    rows = []
    for c in configs:
        model = c["model"] or a.model
        runs, error = [], None
        for i in range(a.repeats):
            print(f"[bench memory] {config_name(c)}: run {i + 1}/{a.repeats}", file=sys.stderr, flush=True)
            try:
                runs.append(one_run(model, {**extra, **c["params"]}, a.duration, a.tokens))
            except RuntimeError as e:     # a configuration that fails is a row, not the end of the run
                error = str(e).splitlines()[0][:200]
                print(f"[bench memory] {config_name(c)}: {error}", file=sys.stderr)
                break
        library = "/".join(sorted({r["library"] for r in runs if r["library"]})) or None
        row = {"config": config_name(c, library), "library": library, "model": str(model),
               "params": c["params"], "runs": runs,
               **{k: stats([r[k] for r in runs]) for k in ("loaded_mb", "serving_mb", "peak_mb")}}
        if error:
            row["error"] = error
        if runs:
            print(f"[bench memory] {row['config']}: peak {row['peak_mb']['median']:.0f} MB", file=sys.stderr)
        rows.append(row)
    return {"benchmark": "memory", "model": str(a.model), "stream": STREAM, "duration_s": a.duration,
            "tokens": a.tokens, "repeats": a.repeats, "budget_mb": a.budget_mb,
            "machine": finish_machine(info), "configs": rows}


def fits(row: dict, budget_mb: float) -> str:
    peak = row["peak_mb"]["median"]
    return "-" if peak is None else ("yes" if peak <= budget_mb else "no")


def table(result: dict) -> str:
    budget = result["budget_mb"]
    lines = [f"| configuration | loaded MB | serving MB | peak MB | fits {budget:.0f} MB (8 GB Orin Nano) |",
             "|---|---|---|---|---|"]
    for r in result["configs"]:
        err = f" (failed: {r['error']})" if r.get("error") else ""
        lines.append(f"| {r['config']}{err} | {fmt(r['loaded_mb'], 0)} | {fmt(r['serving_mb'], 0)} | "
                     f"{fmt(r['peak_mb'], 0)} | {fits(r, budget)} |")
    lines += ["", f"Medians (min–max) over {result['repeats']} node processes, each serving a {result['stream']} "
              f"stream and one client ({result['tokens']} tokens per answer) for {result['duration_s']:.0f} s; "
              f"{machine_line(result['machine'])}."]
    return "\n".join(lines)


def plot(result: dict, ax) -> None:
    rows = [r for r in result["configs"] if r["peak_mb"]["median"] is not None]
    barh(ax, [r["config"] for r in rows], [r["peak_mb"]["median"] for r in rows],
         [minmax(r["peak_mb"]) for r in rows], xlabel="node peak resident memory, MB (median, min–max)",
         title="Node memory per configuration",
         color=["tab:gray" if r["params"].get("decoder") == "torch" else "tab:blue" for r in rows])
    ax.axvline(result["budget_mb"], color="tab:red", ls="--", lw=1, label=f"budget {result['budget_mb']:.0f} MB")
    ax.legend(fontsize=7, loc="lower right")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="artifacts folder")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="VISION_DTYPE+QUANT, comma-separated")
    ap.add_argument("--reference", default=None, help="checkpoint folder: add the PyTorch node")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of stream and questions per run")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--budget-mb", type=float, default=DEFAULT_BUDGET_MB)
    ap.add_argument("--param", action="append", default=[], help="node parameter override NAME:=VALUE")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not Path(a.model).is_dir():
        print(f"mobilevlm-bench memory: model folder not found: {a.model}", file=sys.stderr)
        return 2
    return report("memory", lambda: run(a), table, a.out, plot, errors=(ValueError,), error_code=2)


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark shares: the machine it ran on, peak memory, median/min/max summaries, and the
results folder (NAME.json, NAME.md and NAME.png per sub-benchmark)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

VERSIONED = ("numpy", "onnxruntime", "llama_cpp_python", "torch", "transformers", "ros-rclpy")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), in MB."""
    try:
        for line in open("/proc/self/status", encoding="utf-8"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list:
    """The vector extensions that decide llama.cpp's and ONNX Runtime's CPU kernels."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    except OSError:
        pass
    return []


def machine_info(threads=0) -> dict:
    """The machine and library versions a figure belongs to (versions from package metadata, so
    nothing heavy is imported just to report it)."""
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    info = {"cpu": cpu_model(), "cpu_features": cpu_features(), "cpu_count": os.cpu_count(),
            "memory_gib": round(mem_gb, 1) if mem_gb else None,
            "threads": threads or "default", "python": platform.python_version(),
            "load_avg_start": round(os.getloadavg()[0], 2)}
    for dist in VERSIONED:
        try:
            info[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


def machine_line(m: dict) -> str:
    """One line naming the machine of a table."""
    mem = f", {m['memory_gib']:g} GiB" if m.get("memory_gib") else ""
    end = f", {m['load_avg_end']:.1f} at end" if "load_avg_end" in m else ""
    feats = f" ({' '.join(m['cpu_features'])})" if m.get("cpu_features") else ""
    return (f"{m['cpu']}{feats}, {m['cpu_count']} CPUs{mem}; threads {m['threads']}; load average "
            f"{m['load_avg_start']:.1f} at start{end}")


def finish_machine(m: dict) -> dict:
    m["load_avg_end"] = round(os.getloadavg()[0], 2)
    return m


def run_worker(module: str, job: dict, timeout: float, env: Optional[dict] = None) -> dict:
    """Run `python -m module --worker JOB RESULT` in a process of its own (so that its peak memory,
    its threads and its DDS configuration are its own) and return the JSON result it wrote."""
    env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="mobilevlm-bench-") as tmp:
        jf, rf = Path(tmp) / "job.json", Path(tmp) / "result.json"
        jf.write_text(json.dumps(job), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", module, "--worker", str(jf), str(rf)], env=env,
                              timeout=timeout)
        if proc.returncode != 0 or not rf.is_file():
            what = " ".join(str(job[k]) for k in ("kind", "quant", "stream") if job.get(k))
            raise RuntimeError(f"benchmark worker {module} ({what}) failed (exit code {proc.returncode})")
        return json.loads(rf.read_text(encoding="utf-8"))


def worker_main(argv, work: Callable[[dict], dict]) -> Optional[int]:
    """The child side of run_worker: None unless argv is ['--worker', JOB, RESULT]."""
    if argv[:1] != ["--worker"]:
        return None
    job = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    Path(argv[2]).write_text(json.dumps(work(job)), encoding="utf-8")
    return 0


def stats(values) -> dict:
    v = [float(x) for x in values if x is not None and x == x]      # drop None and NaN
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt(s: Optional[dict], digits: int = 1) -> str:
    """'median (min–max)' of a stats() dict; '-' when it has no values."""
    if not s or s.get("median") is None:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def median(s: Optional[dict]):
    return s.get("median") if s else None


def report(name: str, run: Callable[[], dict], table: Callable[[dict], str], out=None,
           plot: Optional[Callable] = None, errors: tuple = (), error_code: int = 1) -> int:
    """A bench's main() after its arguments: run, print the markdown table, write the results
    (write_results). An expected failure (one of `errors`) prints `mobilevlm-bench NAME: why` and
    returns error_code."""
    try:
        result = run()
    except errors as e:
        print(f"mobilevlm-bench {name}: {e}", file=sys.stderr)
        return error_code
    md = table(result)
    print(md)
    write_results(out, name, result, md, plot)
    return 0


def write_results(out, name: str, result, markdown: str,
                  plot: Optional[Callable] = None, title: str = "") -> None:
    """OUT/<name>.json, OUT/<name>.md and, with a plot(result, ax) function, OUT/<name>.png
    (no-op without an out folder)."""
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown + "\n", encoding="utf-8")
    written = [f"{name}.json", f"{name}.md"]
    if plot is not None and save_figure(out / f"{name}.png", [(plot, result)], title):
        written.append(f"{name}.png")
    print(f"wrote {', '.join(str(out / w) for w in written)}", file=sys.stderr)


def save_figure(path: Path, panels, title: str = "", columns: int = 1) -> bool:
    """One PNG of several panels, each (plot, result) or (plot, result, name) drawn by
    plot(result, ax); a name goes before the panel's title. False (and a note why) when matplotlib
    is not installed: the results are in the JSON and Markdown files all the same."""
    from ..dev_packages import png_plots_possible
    if not png_plots_possible(path):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (plot, result, *name) in zip(axes.flat, panels):
        plot(result, ax)
        if name:
            ax.set_title(f"{name[0]}: {ax.get_title()}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()) if title else None)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def barh(ax, labels, values, errors=None, xlabel: str = "", title: str = "", color=None, fmt_value="{:.0f}"):
    """Horizontal bars with the value written at each bar's end; errors: (low, high) per bar."""
    y = range(len(labels))
    xerr = None
    if errors:
        xerr = [[max(0.0, (v or 0) - lo) for v, (lo, _) in zip(values, errors)],
                [max(0.0, hi - (v or 0)) for v, (_, hi) in zip(values, errors)]]
    ax.barh(list(y), [v or 0 for v in values], xerr=xerr, color=color, capsize=3)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        if v is not None:
            end = max(v, errors[i][1]) if errors else v
            ax.text(end, i, " " + fmt_value.format(v), va="center", fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.15)


def minmax(s: Optional[dict]):
    return (s["min"], s["max"]) if s and s.get("median") is not None else (0.0, 0.0)

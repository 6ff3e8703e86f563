"""mobilevlm-soak: run the node under a flood of frames and questions for a given time and record
memory, latency and drop counts over time.

    mobilevlm-soak [--model models/tiny-v2-artifacts] [--duration 600] [--clients 20]
                   [--camera front:640x480@60 --camera rear:1920x1080@60] [--max-new-tokens 16]
                   [--param max_queue:=4 ...] [--warmup 10] [--out results/soak]

Starts the node in its own process (config/mobilevlm.yaml plus --param overrides), streams every
--camera (NAME:WxH@HZ[:raw|jpeg]) and keeps --clients service clients asking at once, each asking
again as soon as it has its answer or its "busy". At the end it stops the node with SIGINT, timed.
Writes OUT/soak.csv (one row per --sample-period), OUT/soak.png (memory, latency, requests and
frames over time) and OUT/soak.json (the summary), and prints the summary.
Exit status: 0, or 1 when a request went unanswered, the node died, or it did not stop in 2 s.
Not part of the test suite (test/test_reliability.py runs the same flood for a few seconds).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from .traffic import CameraStream, Flood, NodeUnderTest

DEFAULT_MODEL = Path("models/tiny-v2-artifacts")         # what scripts/setup.sh makes
DEFAULT_CAMERAS = ["front:640x480@60", "rear:1920x1080@60"]


def plot(samples, streams, path: Path, title: str) -> bool:
    """soak.png; False (and a note why) when matplotlib is not installed."""
    from .dev_packages import png_plots_possible
    if not png_plots_possible(path):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(t, [r.get("rss_mb", math.nan) for r in samples], label="node RSS")
    axes[0].plot(t, [r.get("cache_mb", math.nan) for r in samples], label="its caches (diagnostics)")
    axes[0].set_ylabel("MB")
    axes[1].plot(t, [r["latency_ms_p50"] for r in samples], ".-", label="answer latency p50 (last 1 s)")
    axes[1].set_ylabel("ms")
    for key in ("requests_sent", "answered", "busy", "errors"):
        axes[2].plot(t, [r[key] for r in samples], label=key)
    axes[2].set_ylabel("requests (cumulative)")
    for s in streams:
        for key in ("sent", "received", "encoded", "dropped"):
            axes[3].plot(t, [r[f"{s.name}_{key}"] for r in samples], label=f"{s.name} {key}")
    axes[3].set_ylabel("frames (cumulative)")
    axes[3].set_xlabel("seconds")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint or artifacts folder")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of flood")
    ap.add_argument("--warmup", type=float, default=10.0, help="memory growth is measured from here")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--camera", action="append", help="NAME:WxH@HZ[:raw|jpeg] (repeatable); default: "
                    + " ".join(DEFAULT_CAMERAS))
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--param", action="append", default=[], help="node parameter override NAME:=VALUE")
    ap.add_argument("--sample-period", type=float, default=1.0)
    ap.add_argument("--out", default="results/soak")
    a = ap.parse_args(argv)
    try:
        streams = [CameraStream.parse(s) for s in (a.camera or DEFAULT_CAMERAS)]
        params = dict(p.split(":=", 1) for p in a.param)
    except ValueError as e:
        print(f"mobilevlm-soak: {e}", file=sys.stderr)
        return 2
    if not Path(a.model).exists():
        print(f"mobilevlm-soak: model not found: {a.model} (run scripts/setup.sh, or give --model)", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"mobilevlm_soak_{os.getpid()}"
    node = NodeUnderTest(a.model, [s.name for s in streams], name=name, params=params,
                         log_path=out / "node.log")
    print(f"node: {' '.join(node.cmd)}", file=sys.stderr)
    flood = Flood(name, streams, clients=a.clients, max_new_tokens=a.max_new_tokens, node_pid=node.proc.pid)
    code = 0
    try:
        flood.wait_ready(180)
        print(f"flooding for {a.duration:.0f} s: {', '.join(map(str, streams))}, {a.clients} clients",
              file=sys.stderr)

        def show(row):
            print(f"  t={row['t_s']:6.1f}s rss={row.get('rss_mb', math.nan):7.1f} MB "
                  f"(caches {row.get('cache_mb', math.nan):5.1f}) sent={row['requests_sent']} "
                  f"answered={row['answered']} busy={row['busy']} errors={row['errors']}", file=sys.stderr)
        summary = flood.run(a.duration, warmup_s=a.warmup, sample_period_s=a.sample_period, on_sample=show)
        alive = node.proc.poll() is None
        stop_code, stop_s = node.stop()
    finally:
        flood.close()
        if node.proc.poll() is None:
            node.stop()
    result = {"model": a.model, "streams": [str(s) for s in streams], "clients": a.clients,
              "max_new_tokens": a.max_new_tokens, **dataclasses.asdict(summary), "lost": summary.lost,
              "node_alive_at_end": alive, "shutdown_exit_code": stop_code, "shutdown_s": stop_s}
    with open(out / "soak.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(flood.samples[-1].keys()))
        w.writeheader()
        w.writerows(flood.samples)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    png = plot(flood.samples, streams, out / "soak.png",
               f"mobilevlm-soak {a.duration:.0f} s, {a.clients} clients, " + ", ".join(map(str, streams)))
    print(json.dumps(result, indent=2))
    print(f"wrote {out / 'soak.csv'}, " + (f"{out / 'soak.png'}, " if png else "") + f"{out / 'soak.json'}",
          file=sys.stderr)
    if summary.lost or not alive or stop_code != 0 or stop_s > 2.0:
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())

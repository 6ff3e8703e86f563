"""What every benchmark shares: peak memory, median/min/max summaries, writing the results folder."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


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


def stats(values) -> dict:
    v = [float(x) for x in values]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def write_results(out, name: str, result, markdown: str) -> None:
    """OUT/<name>.json and OUT/<name>.md (no-op without an out folder)."""
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown + "\n", encoding="utf-8")
    print(f"wrote {out / (name + '.json')}", file=sys.stderr)

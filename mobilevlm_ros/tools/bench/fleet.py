"""Many bags: serial single replays against a fleet run on Ray workers, on this machine.

    mobilevlm-bench fleet --model ART [--bags 4] [--questions 10] [--seconds 10] [--size 640x480]
                          [--tokens 16] [--workers 1,2] [--machines 10,100] [--threads N] [--out DIR]

N synthetic bags (`mobilevlm-make-bag`: one camera at 10 Hz, raw rgb8, mcap) with M questions each
(at evenly spread bag times, --tokens new tokens each) are replayed
  - serially, as before: `mobilevlm-replay BAG --out` one bag after another (the model loaded for
    each bag, as a script over the bags would);
  - as one fleet run, `mobilevlm-replay BAGS --out-dir` on a local Ray with W workers for each W in
    --workers (the model loaded once per worker).
Reported: wall time and questions/s of each; the model load time serial replay pays per bag; Ray's
start-up and the time until the first worker has loaded the model (once a run); Ray's overhead per
bag (a 1-worker fleet run's wall time less those two, per bag, beyond the worker's own replay
time) as a ratio of a serial bag's replay time; and, labelled as a projection, the
questions/s of K machines for K in --machines: K x the best measured questions/s of this machine
(assumes bags on a shared file system and no other limit, e.g. the driver). Writes OUT/fleet.json,
OUT/fleet.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .common import finish_machine, machine_info, machine_line, report


def make_inputs(root: Path, bags: int, questions: int, seconds: float, size, tokens: int):
    import yaml

    from ..make_bag import make_bag
    paths = []
    for i in range(bags):
        p = root / "bags" / f"bag{i:03d}"
        make_bag(p, storage="mcap", seconds=seconds, rate=10.0, cameras=["front"], size=size,
                 start_s=1700000000 + 100 * i, progress=False)
        paths.append(p)
    span = max(seconds - 0.5, 0.1)
    doc = {"cameras": {"front": "/front/image_raw"}, "defaults": {"max_new_tokens": tokens},
           "questions": [{"question": "What is in front of the robot?",
                          "at": [round(0.3 + span * k / max(questions, 1), 3) for k in range(questions)]}]}
    q = root / "questions.yaml"
    q.write_text(yaml.safe_dump(doc))
    return paths, q


def run(a) -> dict:
    from ...replay import cli
    w, h = (int(x) for x in a.size.lower().split("x"))
    worker_counts = [int(x) for x in a.workers.split(",") if x.strip()]
    machines = [int(x) for x in a.machines.split(",") if x.strip()]
    machine = machine_info(a.threads)
    with tempfile.TemporaryDirectory(prefix="mobilevlm-bench-fleet-") as tmp:
        root = Path(tmp)
        bags, questions = make_inputs(root, a.bags, a.questions, a.seconds, (w, h), a.tokens)
        common = ["--model", str(a.model), "--no-progress"] + (["--threads", str(a.threads)] if a.threads else [])
        # serial: one mobilevlm-replay per bag
        t0 = time.perf_counter()
        per_bag = []
        for b in bags:
            out = root / "serial" / f"{b.name}.jsonl"
            if cli.main([str(b), "--questions", str(questions), "--out", str(out), *common]) != 0:
                raise RuntimeError(f"mobilevlm-replay failed on {b}")
            s = json.loads(out.with_name(f"{b.name}.summary.json").read_text())
            per_bag.append({"wall_s": s["wall_s"], "load_s": s["load_ms"] / 1e3, "answers": s["answers"]})
        serial_wall = time.perf_counter() - t0
        total_q = sum(p["answers"] for p in per_bag)
        load_s = sum(p["load_s"] for p in per_bag) / len(per_bag)
        bag_s = sum(p["wall_s"] - p["load_s"] for p in per_bag) / len(per_bag)
        rows = [{"run": "serial mobilevlm-replay per bag", "workers": 0, "wall_s": serial_wall,
                 "questions_per_s": total_q / serial_wall, "model_loads": len(bags)}]
        for n in worker_counts:
            out = root / f"fleet{n}"
            t0 = time.perf_counter()
            if cli.main([str(b) for b in bags] + ["--questions", str(questions), "--out-dir", str(out),
                                                   "--workers", str(n), *common]) != 0:
                raise RuntimeError(f"the fleet run with {n} workers failed")
            wall = time.perf_counter() - t0
            s = json.loads((out / "summary.json").read_text())
            bag_walls = [json.loads((out / f"{b['name']}.summary.json").read_text())["wall_s"] for b in s["per_bag"]]
            loads = {json.loads((out / f"{b['name']}.summary.json").read_text())["worker"]: None
                     for b in s["per_bag"]}
            t = s.get("timings_s", {})
            rows.append({"run": f"fleet, {n} Ray worker{'s' if n > 1 else ''} x {s['threads_per_worker']} threads",
                         "workers": n, "wall_s": wall, "questions_per_s": s["answers"] / wall,
                         "model_loads": len(loads), "worker_bag_s": sum(bag_walls) / len(bag_walls),
                         "threads": s["threads_per_worker"], "ray_start_s": t.get("ray_start"),
                         "first_worker_ready_s": t.get("first_worker_ready")})
        one = next((r for r in rows if r["workers"] == 1), None)
        overhead = None
        if one is not None:
            # what a 1-worker run spends per bag beyond the replay itself, once Ray is up and the
            # worker has loaded the model (those two are paid once a run: ray_start_s, first ready)
            steady = one["wall_s"] - (one["ray_start_s"] or 0) - (one["first_worker_ready_s"] or 0)
            overhead = max(steady / a.bags - one["worker_bag_s"], 0.0) / bag_s
        best = max(r["questions_per_s"] for r in rows)
        return {"benchmark": "fleet", "model": str(a.model), "bags": a.bags, "questions_per_bag": a.questions,
                "seconds": a.seconds, "size": a.size, "tokens": a.tokens, "rows": rows,
                "serial_load_s_per_bag": load_s, "serial_replay_s_per_bag": bag_s,
                "ray_overhead_per_bag_ratio": overhead,
                "projection": [{"machines": k, "questions_per_s": k * best,
                                "hours_per_1000_bags": 1000 * a.questions / (k * best) / 3600} for k in machines],
                "machine": finish_machine(machine)}


def table(r: dict) -> str:
    lines = ["| run | wall s | questions/s | model loads | Ray start s | first worker ready s |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        rs, fr = row.get("ray_start_s"), row.get("first_worker_ready_s")
        lines.append(f"| {row['run']} | {row['wall_s']:.1f} | {row['questions_per_s']:.2f} | {row['model_loads']} "
                     f"| {'-' if rs is None else f'{rs:.1f}'} | {'-' if fr is None else f'{fr:.1f}'} |")
    lines += ["", f"{r['bags']} bags x {r['questions_per_bag']} questions ({r['seconds']:g} s at 10 Hz, {r['size']}, "
                  f"{r['tokens']} tokens an answer). Serial replay pays {r['serial_load_s_per_bag']:.2f} s of model "
                  f"load per bag beside {r['serial_replay_s_per_bag']:.2f} s of replay."]
    if r["ray_overhead_per_bag_ratio"] is not None:
        lines.append(f"Ray's overhead per bag (1 worker, once Ray is up and the model loaded: the wall time per bag "
                     f"beyond the worker's own replay time): {r['ray_overhead_per_bag_ratio']:.2f} x a serial bag's "
                     f"replay time.")
    lines += ["", "Projection (not measured): K machines x the best questions/s measured here.", "",
              "| machines | questions/s | hours for 1000 such bags |", "|---|---|---|"]
    lines += [f"| {p['machines']} | {p['questions_per_s']:.1f} | {p['hours_per_1000_bags']:.2f} |" for p in r["projection"]]
    lines += ["", machine_line(r["machine"]) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-bench fleet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="artifacts folder (mobilevlm-export) or checkpoint")
    ap.add_argument("--bags", type=int, default=4)
    ap.add_argument("--questions", type=int, default=10, help="questions per bag")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each bag")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per answer")
    ap.add_argument("--workers", default="1,2", help="fleet runs with these numbers of Ray workers")
    ap.add_argument("--machines", default="10,100", help="machines for the projection")
    ap.add_argument("--threads", type=int, default=0, help="per worker (default: the cores / workers)")
    ap.add_argument("--out", help="folder for fleet.json and fleet.md")
    a = ap.parse_args(argv)
    return report("fleet", lambda: run(a), table, a.out, errors=(RuntimeError,), error_code=2)


if __name__ == "__main__":
    sys.exit(main())

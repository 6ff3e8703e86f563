"""Node overhead: a camera stream into the node while it answers, one node per stream, one run.

    mobilevlm-bench node --model ARTIFACTS [--stream front:640x480@30 --stream front:1920x1080@30]
                         [--dds default,shm] [--warmup 10] [--window 15] [--windows 3] [--tokens 32]
                         [--ask-interval 3] [--fixed-interval] [--no-isolated]
                         [--annotated none,both] [--param NAME:=VALUE ...] [--out DIR]

Each --stream (NAME:WxH@HZ[:raw|jpeg]), DDS configuration and --annotated viewer (--dds: Fast DDS's defaults, and
config/fastdds_large_frames.xml in the publisher and the node) gets a node process of its own
(config/mobilevlm.yaml plus --param overrides), started as a user starts it. A benchmark process
publishes the stream over DDS (localhost, sensor-data QoS) and one client asks after each answer,
following a pause drawn uniformly from 0 to 2 x --ask-interval seconds (seeded: the same times each
run; --fixed-interval: exactly --ask-interval), at most --tokens new tokens, greedy. After --warmup seconds, each of --windows windows of --window seconds
gives one figure of each kind; the table shows the median (min–max) over the windows:

  sent / received / encoded Hz  frames published, taken by the node's image callback, encoded
                                 (the vision worker encodes the newest frame at most vision_rate_hz)
  dropped                        frames replaced by a newer one before they were encoded
  callback CPU ms                CPU time of the image callback per received frame (its own thread);
                                 max: the longest callback of the whole run
  node CPU cores                 CPU seconds of the node process per second (2 = both cores busy)
  answer ms, frame age ms        request to response, and the age of the frame an answer describes
                                 (node clock at the question minus the frame's stamp)
  encoded on demand              answers whose frame was encoded for the question because no encoded
                                 frame was fresh enough (max_frame_age_s)
--annotated (none | raw | jpeg | both, comma-separated: one node per value, side by side): the
benchmark process also subscribes to the node's ~/annotated (raw), ~/annotated/compressed (jpeg)
or both, as a viewer would; a third table shows the images received and the node's own cost per
image (decode + draw, the Image message and its publishing, JPEG encoding and publishing: wall ms
of a thread at ros_threads_nice; and the CPU time of that thread), beside the answer times.
Over the whole run after the warm-up: p50 / p95 of answer time and frame age, and the answers
encoded on demand. Unless --no-isolated, the same run first measures the isolated question
(`mobilevlm-bench question`'s `ours` on the same artifacts, the node's default quant and vision
graph, --tokens forced) and reports the node's p50 and p95 as ratios to it.
Prints a markdown table; writes OUT/node.json, OUT/node.md and OUT/node.png.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

from ...resources import share_file
from .common import (barh, finish_machine, fmt, machine_info, machine_line, minmax, report, run_worker, stats,
                     worker_main)

DEFAULT_STREAMS = ("front:640x480@30", "front:1920x1080@30")
# DDS configurations of the publishing (bench) process and the node: Fast DDS's defaults, and the
# profile this package ships for raw frames larger than a default shared-memory segment
DDS_PROFILES = {"default": "", "shm": str(share_file("config", "fastdds_large_frames.xml"))}


@contextlib.contextmanager
def node_with_traffic(model, stream, tokens: int, params: dict, log_path=None, ready_timeout: float = 300.0,
                      ask_interval_s: float = 0.0, clients: int = 1, ask_random: bool = False,
                      annotated: str = "none"):
    """A node process on `model` and a Flood (this stream, `clients` clients) against it, ready and
    with a frame encoded: yields (node, flood, the node's status once it served, before any frame)."""
    from ..traffic import Flood, NodeUnderTest
    name = f"mobilevlm_bench_{os.getpid()}"
    node = NodeUnderTest(model, [stream.name], name=name, params=params, log_path=log_path)
    flood = None
    try:
        flood = Flood(name, [stream], clients=clients, max_new_tokens=tokens, node_pid=node.proc.pid,
                      response_timeout_s=600.0, ask_interval_s=ask_interval_s, ask_random=ask_random,
                      annotated=annotated)
        try:
            flood.wait_ready(ready_timeout)
            idle = node.status()
            flood.prime(ready_timeout)
        except TimeoutError as e:
            raise RuntimeError(f"{e}; node log:\n{node.log(20)}") from None
        yield node, flood, idle
    finally:
        if flood is not None:
            flood.close()
        node.stop()


def _at(samples, t: float) -> dict:
    """The last sample taken at or before t (the first one if none)."""
    best = samples[0]
    for r in samples:
        if r["t_s"] <= t:
            best = r
    return best


def window_figures(samples, outcomes, camera: str, t0: float, t1: float) -> dict:
    """One window's figures from the flood's 1 s samples and the answers that arrived in it."""
    a, b = _at(samples, t0), _at(samples, t1)
    dt = max(1e-9, b["t_s"] - a["t_s"])
    c = camera

    def delta(key):
        return b[f"{c}_{key}"] - a[f"{c}_{key}"]
    received = delta("received")
    cb_total = (b[f"{c}_callback_cpu_ms_avg"] * b[f"{c}_received"]
                - a[f"{c}_callback_cpu_ms_avg"] * a[f"{c}_received"])
    answers = [o for o in outcomes if o.kind == "answered" and t0 <= o.t < t1]
    rss = [r["rss_mb"] for r in samples if t0 <= r["t_s"] <= t1 and r.get("rss_mb") == r.get("rss_mb")]
    return {"seconds": dt, "sent_hz": delta("sent") / dt, "received_hz": received / dt,
            "received_pct": 100.0 * received / delta("sent") if delta("sent") else None,
            "encoded_hz": delta("encoded") / dt, "dropped": delta("dropped"), "rejected": delta("rejected"),
            "callback_cpu_ms": cb_total / received if received else None,
            "node_cpu_cores": (b["cpu_s"] - a["cpu_s"]) / dt,
            "answers": len(answers),
            "answer_ms": statistics.median([o.latency_ms for o in answers]) if answers else None,
            "frame_age_ms": statistics.median([o.frame_age_ms for o in answers]) if answers else None,
            "frame_age_ms_max": max((o.frame_age_ms for o in answers), default=None),
            "on_demand_pct": 100.0 * sum(o.vision_ms > 0 for o in answers) / len(answers) if answers else None,
            "tokens": statistics.median([o.tokens for o in answers]) if answers else None,
            "rss_mb": statistics.median(rss) if rss else None}


FIGURES = ("sent_hz", "received_hz", "received_pct", "encoded_hz", "dropped", "callback_cpu_ms",
           "node_cpu_cores", "answers", "answer_ms", "frame_age_ms", "frame_age_ms_max", "on_demand_pct",
           "tokens", "rss_mb")


def run_figures(outcomes, warmup_s: float) -> dict:
    """p50 / p95 over every answer after the warm-up (not per window), and the on-demand count."""
    answers = [o for o in outcomes if o.kind == "answered" and o.t >= warmup_s]

    def pct(values, q):
        values = sorted(values)
        if not values:
            return None
        i = min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))
        return values[i]
    lat, age = [o.latency_ms for o in answers], [o.frame_age_ms for o in answers]
    # where an answer's time goes: waiting for the decoder (an encode or prefill in flight, an
    # earlier request), its own prefill, decoding, and the service round trip
    wait = [o.total_ms - o.vision_ms - o.prefill_ms - o.decode_ms for o in answers]
    return {"answers_run": len(answers), "answer_ms_p50": pct(lat, 50), "answer_ms_p95": pct(lat, 95),
            "frame_age_ms_p50": pct(age, 50), "frame_age_ms_p95": pct(age, 95),
            "on_demand_run": sum(o.vision_ms > 0 for o in answers),
            "first_token_ms_p50": pct([o.first_token_ms for o in answers], 50),
            "wait_ms_p50": pct(wait, 50), "wait_ms_p95": pct(wait, 95),
            "prefill_ms_p50": pct([o.prefill_ms for o in answers], 50),
            "decode_tok_s_p50": pct([(o.tokens - 1) / o.decode_ms * 1e3 for o in answers
                                     if o.tokens > 1 and o.decode_ms > 0], 50),
            "transport_ms_p50": pct([o.latency_ms - o.total_ms for o in answers], 50)}


def _work(job: dict) -> dict:
    """One stream and one DDS configuration, in a process of its own: Fast DDS reads its profile
    file once per process, when the first participant is made."""
    from ..traffic import CameraStream
    if job["dds_profile"]:
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = job["dds_profile"]
    else:
        os.environ.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    stream, warmup, window, n = CameraStream.parse(job["stream"]), job["warmup"], job["window"], job["windows"]
    total = warmup + n * window
    with node_with_traffic(job["model"], stream, job["tokens"], job["params"], log_path=job["log"],
                           ask_interval_s=job["ask_interval"], clients=job["clients"],
                           ask_random=job.get("ask_random", False),
                           annotated=job.get("annotated", "none")) as (node, flood, idle):
        summary = flood.run(total, warmup_s=warmup)
        alive = node.proc.poll() is None
        samples, outcomes = list(flood.samples), list(flood.outcomes)
    windows = [window_figures(samples, outcomes, stream.name, warmup + i * window, warmup + (i + 1) * window)
               for i in range(n)]
    cam = summary.cameras[stream.name]
    last = samples[-1] if samples else {}
    annotated = {k: last.get(f"annotated_{k}") for k in ("received", "drawn", "no_subscriber", "dropped",
                                                          "draw_ms_avg", "raw_ms_avg", "jpeg_ms_avg", "cpu_ms_avg")}
    return {"stream": str(stream), "dds": job["dds"], "annotated_viewer": job.get("annotated", "none"),
            "annotated": annotated, "params": job["params"], "node_alive": alive,
            "idle_rss_mb": idle.get("VmRSS"), "windows": windows, **run_figures(outcomes, warmup),
            **{k: stats([w[k] for w in windows]) for k in FIGURES},
            "callback_cpu_ms_max_run": cam["callback_cpu_ms_max"],
            "frame_age_ms_max_run": summary.frame_age_ms_max, "requests": summary.requests_sent,
            "errors": summary.errors, "error_kinds": summary.error_kinds, "lost": summary.lost,
            "hwm_mb": summary.hwm_mb,
            "answers_all": [{k: round(v, 1) if isinstance(v, float) else v for k, v in vars(o).items()}
                            for o in outcomes if o.kind == "answered"]}


def isolated_question(a, params: dict, out) -> dict:
    """`mobilevlm-bench question`'s own configuration on these artifacts, in this run: the quant and
    vision graph the node would load (its parameter table's defaults, or --param)."""
    from ...core.artifacts import choose_vision_dtype, read_manifest
    from ...ros.params import PARAMS
    defaults = {p.name: p.default for p in PARAMS}
    quant = str(params.get("quant", defaults["quant"]))
    dtype = str(params.get("vision_dtype", defaults["vision_dtype"]))
    if dtype == "auto":
        dtype, _ = choose_vision_dtype(read_manifest(a.model), "onnxruntime", "cpu")
    print(f"[bench node] isolated question ({quant}, {dtype} vision) ...", file=sys.stderr, flush=True)
    job = {"config": "ours", "model": str(a.model), "artifacts": str(a.model), "quant": quant,
           "vision_dtype": dtype, "tokens": a.tokens, "repeats": 5, "threads": 0}
    r = run_worker("mobilevlm_ros.tools.bench.question", job, timeout=1800)
    rate = stats([(a.tokens - 1) / ((t - f) / 1e3) for t, f in zip(r["total_ms_all"], r["ttft_ms_all"])])
    return {"quant": quant, "vision_dtype": dtype, "total_ms": r["total_ms"], "ttft_ms": r["ttft_ms"],
            "decode_tok_s": rate}


def run(a) -> dict:
    from ..traffic import CameraStream
    streams = [str(CameraStream.parse(s)) for s in (a.stream or DEFAULT_STREAMS)]
    dds = [d.strip() for d in a.dds.split(",") if d.strip()]
    from ..traffic import ANNOTATED_MODES
    viewers = [v.strip() for v in a.annotated.split(",") if v.strip()]
    for v in viewers:
        if v not in ANNOTATED_MODES:
            raise ValueError(f"unknown --annotated viewer '{v}' (choose from {', '.join(ANNOTATED_MODES)})")
    for d in dds:
        if d not in DDS_PROFILES:
            raise ValueError(f"unknown DDS configuration '{d}' (choose from {', '.join(DDS_PROFILES)})")
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    params = dict(p.split(":=", 1) for p in a.param)
    info = machine_info()
    isolated = None if a.no_isolated else isolated_question(a, params, out)
    rows = []
    for stream in streams:
        for d in dds:
            for viewer in viewers:
                print(f"[bench node] {stream}, DDS {d}, annotated viewer {viewer}: {a.warmup:.0f} s warm-up + "
                      f"{a.windows} x {a.window:.0f} s", file=sys.stderr, flush=True)
                log = out / f"node-{stream.replace(':', '_')}-{d}-{viewer}.log" if out else None
                job = {"model": str(a.model), "stream": stream, "dds": d, "dds_profile": DDS_PROFILES[d],
                       "warmup": a.warmup, "window": a.window, "windows": a.windows, "tokens": a.tokens,
                       "ask_interval": a.ask_interval, "clients": a.clients, "ask_random": not a.fixed_interval,
                       "annotated": viewer, "params": params, "log": str(log) if log else None}
                rows.append(run_worker("mobilevlm_ros.tools.bench.node", job,
                                       timeout=a.warmup + a.windows * a.window + 900))
    return {"benchmark": "node", "model": str(a.model), "tokens": a.tokens, "ask_interval_s": a.ask_interval,
            "annotated_viewers": viewers,
            "ask_random": not a.fixed_interval, "clients": a.clients, "isolated": isolated,
            "params": params, "warmup_s": a.warmup,
            "window_s": a.window, "windows": a.windows, "machine": finish_machine(info), "streams": rows}


def table(result: dict) -> str:
    head = ("| stream | DDS | sent Hz | received Hz (%) | encoded Hz | dropped / window | callback CPU ms (max) "
            "| node CPU cores | answers / window | answer ms | frame age ms (max) | encoded on demand % | RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["streams"]:
        lines.append(
            f"| {_label(r)} | {r['dds']} | {fmt(r['sent_hz'])} | {fmt(r['received_hz'])} ({fmt(r['received_pct'], 0)}) | "
            f"{fmt(r['encoded_hz'], 2)} | {fmt(r['dropped'], 0)} | {fmt(r['callback_cpu_ms'], 3)} "
            f"({r['callback_cpu_ms_max_run']:.2f}) | {fmt(r['node_cpu_cores'], 2)} | {fmt(r['answers'], 0)} | "
            f"{fmt(r['answer_ms'], 0)} | {fmt(r['frame_age_ms'], 0)} ({r['frame_age_ms_max_run']:.0f}) | "
            f"{fmt(r['on_demand_pct'], 0)} | {fmt(r['rss_mb'], 0)} |")
    iso = result.get("isolated")
    iso_ms = iso["total_ms"]["median"] if iso else None
    lines += ["", "| stream | DDS | answers | answer ms p50 / p95 | p50 / p95 vs isolated question | "
              "first token ms p50 | wait ms p50 / p95 | decode tok/s p50 | round trip ms p50 | "
              "frame age ms p50 / p95 | encoded on demand |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["streams"]:
        p50, p95 = r.get("answer_ms_p50"), r.get("answer_ms_p95")
        ratio = f"{p50 / iso_ms:.2f}x / {p95 / iso_ms:.2f}x" if iso_ms and p50 and p95 else "–"
        lines.append(f"| {_label(r)} | {r['dds']} | {r.get('answers_run', 0)} | {_num(p50)} / {_num(p95)} | "
                     f"{ratio} | {_num(r.get('first_token_ms_p50'))} | {_num(r.get('wait_ms_p50'))} / "
                     f"{_num(r.get('wait_ms_p95'))} | {_num(r.get('decode_tok_s_p50'), 1)} | "
                     f"{_num(r.get('transport_ms_p50'))} | {_num(r.get('frame_age_ms_p50'))} / "
                     f"{_num(r.get('frame_age_ms_p95'))} | {r.get('on_demand_run', 0)} |")
    if any(r.get("annotated_viewer", "none") != "none" for r in result["streams"]):
        lines += ["", "| stream | DDS | annotated viewer | answers | images received | drawn | dropped | "
                  "decode + draw ms | Image msg + publish ms | JPEG + publish ms | drawing thread CPU ms / image | "
                  "answer ms p50 / p95 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["streams"]:
            an = r.get("annotated", {})
            lines.append(f"| {r['stream']} | {r['dds']} | {r.get('annotated_viewer', 'none')} | "
                         f"{r.get('answers_run', 0)} | {an.get('received', 0)} | {an.get('drawn', 0)} | "
                         f"{an.get('dropped', 0)} | {_num(an.get('draw_ms_avg'), 1)} | {_num(an.get('raw_ms_avg'), 1)} | "
                         f"{_num(an.get('jpeg_ms_avg'), 1)} | "
                         f"{_num(an.get('cpu_ms_avg'), 1)} | {_num(r.get('answer_ms_p50'))} / "
                         f"{_num(r.get('answer_ms_p95'))} |")
    params = " ".join(f"{k}:={v}" for k, v in result.get("params", {}).items()) or "none"
    pause = (f"after a pause uniform in 0..{2 * result['ask_interval_s']:g} s" if result.get("ask_random")
             else f"{result['ask_interval_s']:g} s")
    notes = [f"Medians (min–max) over {result['windows']} windows of {result['window_s']:.0f} s after "
             f"{result['warmup_s']:.0f} s warm-up; p50 / p95 over every answer after the warm-up; "
             f"{result.get('clients', 1)} client(s) asking "
             f"{pause} after each answer, at most {result['tokens']} tokens per answer; node parameters: config/mobilevlm.yaml, "
             f"overrides: {params}; {machine_line(result['machine'])}."]
    if iso:
        notes.append(f"Isolated question in the same run (`mobilevlm-bench question`, ours: {iso['vision_dtype']} "
                     f"vision, {iso['quant']}, {result['tokens']} tokens forced): {fmt(iso['total_ms'], 0)} ms, "
                     f"first token {fmt(iso['ttft_ms'], 0)} ms"
                     + (f", decode {fmt(iso['decode_tok_s'])} tok/s." if iso.get("decode_tok_s") else "."))
    notes.append("Wait: an answer's time in the engine before its own evaluation (an encode or prefill in "
                 "flight, an earlier request); round trip: the client's latency minus the engine's.")
    for r in result["streams"]:
        if r["errors"] or r["lost"] or not r["node_alive"]:
            kinds = "; ".join(f"{n} x {k}" for k, n in sorted(r["error_kinds"].items(), key=lambda kv: -kv[1])[:3])
            notes.append(f"{_label(r)}, DDS {r['dds']}: {r['errors']} errors ({kinds}), {r['lost']} unanswered, "
                         f"node {'alive' if r['node_alive'] else 'DIED'}.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def _label(r: dict) -> str:
    viewer = r.get("annotated_viewer", "none")
    return r["stream"] + ("" if viewer == "none" else f" + annotated viewer {viewer}")


def _num(v, digits: int = 0) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def plot(result: dict, ax) -> None:
    rows = result["streams"]
    labels = [f"{_label(r)}, DDS {r['dds']}\ncallback {fmt(r['callback_cpu_ms'], 2)} ms, "
              f"{fmt(r['received_pct'], 0)} % received" for r in rows]
    barh(ax, labels, [r["frame_age_ms"]["median"] for r in rows], [minmax(r["frame_age_ms"]) for r in rows],
         xlabel="age of the frame an answer describes, ms (median, min–max over windows)",
         title="Node under a camera stream while answering")


def add_arguments(ap) -> None:
    ap.add_argument("--model", required=True, help="artifacts folder (or checkpoint, for the torch node)")
    ap.add_argument("--stream", action="append", help="NAME:WxH@HZ[:raw|jpeg], repeatable; default: "
                    + " ".join(DEFAULT_STREAMS))
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ask-interval", type=float, default=3.0,
                    help="seconds the client waits after each answer before it asks again (0 = at once)")
    ap.add_argument("--clients", type=int, default=1, help="clients asking (0: the stream alone)")
    ap.add_argument("--fixed-interval", action="store_true",
                    help="pause exactly --ask-interval after each answer (default: uniform 0..2x, seeded)")
    ap.add_argument("--no-isolated", action="store_true",
                    help="skip the isolated question measured first for the ratios")
    ap.add_argument("--dds", default="default,shm", help="DDS configurations, comma-separated: "
                    + ", ".join(f"{k} ({v or 'Fast DDS defaults'})" for k, v in DDS_PROFILES.items()))
    ap.add_argument("--annotated", default="none",
                    help="viewers of the node's annotated images, comma-separated, one node each: none, raw "
                         "(~/annotated), jpeg (~/annotated/compressed), both; e.g. none,both to compare")
    ap.add_argument("--param", action="append", default=[], help="node parameter override NAME:=VALUE")
    ap.add_argument("--out", default=None)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = worker_main(argv, _work)
    if code is not None:
        return code
    ap = argparse.ArgumentParser(prog="mobilevlm-bench node", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    a = ap.parse_args(argv)
    if not Path(a.model).is_dir():
        print(f"mobilevlm-bench node: model folder not found: {a.model}", file=sys.stderr)
        return 2
    return report("node", lambda: run(a), table, a.out, plot, errors=(RuntimeError, ValueError))


if __name__ == "__main__":
    sys.exit(main())

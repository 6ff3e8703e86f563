"""Every benchmark on one or more models, one results folder, one summary table and plot.

    mobilevlm-bench all [--dims 1.7b,3b | --model CKPT ...] [--out results/bench] [--quick]
                        [--only decoder,vision,question,memory,node] [--reuse] [--budget-mb 5500]

--dims D makes (once) a random-weight checkpoint at MobileVLM V2 dimensions D in the published
layout (models/bench-D, `mobilevlm-make-tiny --dims D --projector ldpnetv2`); --model names
checkpoints of your own. Each checkpoint is exported once (CKPT-artifacts beside it: ONNX vision
graphs fp32/fp16/int8, GGUF f16/q8_0/q4_k_m; reused while config.json is unchanged), then the
sub-benchmarks run one after another, each the same code as its own command:

  decoder   prompt-eval and decode tok/s per quantization vs llama.cpp's own loop, and the
            memory-bandwidth ceiling measured in the same run
  vision    per-frame latency and frames/s per backend and graph, batch 1 and 4, with fidelity
  question  a question about a frame already seen vs the reference-style pipeline
  memory    node peak RSS per configuration (and the PyTorch node), against --budget-mb
  node      a 30 Hz 640x480 and a 1080p stream into the node while it answers

OUT/<model>/<sub>.{json,md,png} hold each one's results; OUT/summary.md (the headline figures per
model, with the project's targets) and OUT/summary.png collect them; with --reuse, sub-benchmarks left
out of --only are taken from OUT's earlier files (rerun one, keep the rest). --quick runs everything
briefly (one repeat, short windows: for checking the command, not for figures).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from ...core.onnx_export import DTYPES as VISION_DTYPES      # every graph: the vision bench compares them
from .common import finish_machine, fmt, machine_info, machine_line, median, save_figure
from .decoder import DEFAULT_QUANTS

SUBS = ("decoder", "vision", "question", "memory", "node")

# the project's targets on the 2-core development machine (README), per figure of the summary
TARGET_QUESTION_MS = 1000.0
TARGET_DECODE_RATIO = 0.95
TARGET_VISION_MS = 1050.0
TARGET_NODE_MB = 2000.0


def _log(msg: str) -> None:
    print(f"[bench all] {msg}", file=sys.stderr, flush=True)


def checkpoint_for_dims(dims: str, root: Path) -> Path:
    ckpt = root / f"bench-{dims}"
    if not (ckpt / "config.json").is_file():
        from ..make_tiny import main as make_tiny
        _log(f"making {ckpt} (random weights, MobileVLM V2 {dims} dimensions)")
        if make_tiny([str(ckpt), "--projector", "ldpnetv2", "--dims", dims]):
            raise SystemExit(f"mobilevlm-make-tiny failed for {ckpt}")
    return ckpt


def ensure_artifacts(ckpt: Path, dtypes, quants) -> Path:
    """CKPT-artifacts with every wanted graph and GGUF, exported now if missing or stale."""
    from ...core.artifacts import MANIFEST, read_manifest, sha256_file
    art = ckpt.parent / f"{ckpt.name}-artifacts"
    if (art / MANIFEST).is_file():
        m = read_manifest(art)
        if (m.get("source", {}).get("config_sha256") == sha256_file(ckpt / "config.json")
                and all(d in m.get("vision", {}) for d in dtypes) and all(q in m.get("llm", {}) for q in quants)):
            return art
    from ..export import main as export
    _log(f"exporting {ckpt} -> {art}")
    t0 = time.perf_counter()
    if export(["--model", str(ckpt), "--out", str(art), "--vision-dtype", ",".join(dtypes),
               "--quant", ",".join(quants), "-q"]):
        raise SystemExit(f"mobilevlm-export failed for {ckpt}")
    _log(f"exported in {time.perf_counter() - t0:.0f} s")
    return art


def sub_argv(sub: str, ckpt: Path, art: Path, out: Path, quick: bool, budget_mb: float) -> list:
    """The command line of one sub-benchmark (the same as a user would type)."""
    o = ["--out", str(out)]
    r = ["--repeats", "1" if quick else "3"]
    if sub == "decoder":
        return ["--model", str(art), *r, *(["--warmup", "0"] if quick else []), *o]
    if sub == "vision":
        return ["--model", str(ckpt), "--artifacts", str(art), *r, *o]
    if sub == "question":
        return ["--model", str(ckpt), "--artifacts", str(art), *(["--repeats", "1"] if quick else ["--repeats", "3"]), *o]
    if sub == "memory":
        q = ["--duration", "4", "--configs", "fp32+q4_k_m,int8+q4_k_m"] if quick else []
        return ["--model", str(art), "--reference", str(ckpt), *r, *q, "--budget-mb", str(budget_mb), *o]
    if sub == "node":
        q = ["--warmup", "2", "--window", "3", "--windows", "1", "--ask-interval", "0.5", "--no-isolated"] if quick else []
        return ["--model", str(art), *q, *o]
    raise ValueError(sub)


def run_model(ckpt: Path, out: Path, subs, quick: bool, budget_mb: float, reuse: bool = False) -> dict:
    art = ensure_artifacts(ckpt, VISION_DTYPES, DEFAULT_QUANTS)
    results = {"checkpoint": str(ckpt), "artifacts": str(art)}
    for sub in SUBS:                      # --reuse: what is not run now comes from the earlier run's file
        path = out / f"{sub}.json"
        if reuse and sub not in subs and path.is_file():
            results[sub] = json.loads(path.read_text(encoding="utf-8"))
            results.setdefault("reused", []).append(sub)
            _log(f"{ckpt.name}: {sub} taken from {path} (earlier run)")
    for sub in subs:
        _log(f"{ckpt.name}: {sub}")
        t0 = time.perf_counter()
        module = importlib.import_module(f"mobilevlm_ros.tools.bench.{sub}")
        code = module.main(sub_argv(sub, ckpt, art, out, quick, budget_mb))
        path = out / f"{sub}.json"
        if code or not path.is_file():
            _log(f"{ckpt.name}: {sub} failed (exit code {code})")
            results[sub] = {"error": f"exit code {code}"}
            continue
        results[sub] = json.loads(path.read_text(encoding="utf-8"))
        _log(f"{ckpt.name}: {sub} done in {time.perf_counter() - t0:.0f} s")
    return results


# ------------------------------------------------------------------------------------ summary

def _by(rows, key, value):
    return next((r for r in rows if r.get(key) == value), None)


def summary_rows(res: dict) -> list:
    """(figure, value text, target text or '') for one model's results."""
    rows = []
    q = res.get("question", {})
    ours, ref = _by(q.get("configs", []), "name", "ours"), _by(q.get("configs", []), "name", "reference")
    n = q.get("tokens", 32)
    if ours:
        t = median(ours["total_ms"])
        rows.append((f"question about a frame already seen, {n} tokens: first token / whole answer, ms "
                     "(ONNX Runtime + llama.cpp Q4_K_M)",
                     f"{fmt(ours['ttft_ms'], 0)} / {fmt(ours['total_ms'], 0)}",
                     f"<= {TARGET_QUESTION_MS:.0f} ms: {'met' if t <= TARGET_QUESTION_MS else 'not met'}"))
    if ref:
        rows.append(("the same, reference-style (PyTorch fp32, re-encode, transformers generate), ms",
                     f"{fmt(ref['ttft_ms'], 0)} / {fmt(ref['total_ms'], 0)}", ""))
    if "speedup_total" in q:
        rows.append(("reference / ours, whole answer", f"{q['speedup_total']:.1f}x", ""))
    d = res.get("decoder", {})
    for r in d.get("quants", []):
        c = r.get("ceiling", {})
        library = r.get("library", "llama.cpp")
        rows.append((f"decode {r['quant']} on {library}, tok/s: ours / {library}'s own loop (ratio per run pair)",
                     f"{fmt(r['decode_tok_s'])} / {fmt(r['llama_tg_tok_s'])} (ratio {fmt(r['decode_ratio'], 2)})",
                     f">= {TARGET_DECODE_RATIO}: {'met' if median(r['decode_ratio']) >= TARGET_DECODE_RATIO else 'not met'}"))
        rows.append((f"prompt eval {r['quant']} on {library}, tok/s: ours / its own loop", f"{fmt(r['prompt_eval_tok_s'])} / "
                     f"{fmt(r['llama_pp_tok_s'])}", ""))
        if c:
            rows.append((f"decode ceiling {r['quant']} on {library} from the bandwidth measured in the same run: "
                         "MB read per token; tok/s; ours / ceiling",
                         f"{c['bytes'] / 1e6:.0f}; {c['tok_s']:.1f}; {c['ours_fraction']:.2f}", ""))
    if d.get("bandwidth"):
        bw = d["bandwidth"]
        rows.append(("memory read bandwidth, GB/s (median, min–max of passes)",
                     f"{bw['median_gbps']:.1f} ({bw['min_gbps']:.1f}–{bw['best_gbps']:.1f})", ""))
    v = res.get("vision", {})
    for r in v.get("results", []):
        if "error" in r:
            continue
        target = ""
        if r["backend"] == "onnxruntime" and r["batch"] == 1:
            target = (f"<= {TARGET_VISION_MS:.0f} ms: "
                      f"{'met' if r['ms_per_frame_median'] <= TARGET_VISION_MS else 'not met'}")
        rows.append((f"vision {r['backend']} {r['dtype']} batch {r['batch']}: ms/frame (frames/s), "
                     f"cosine vs torch fp32",
                     f"{r['ms_per_frame_median']:.0f} ({r['ms_per_frame_min']:.0f}–{r['ms_per_frame_max']:.0f}) "
                     f"({r['frames_per_s']:.2f}/s), {r['cosine_vs_torch_fp32']:.5f}", target))
    m = res.get("memory", {})
    for r in m.get("configs", []):
        if r["peak_mb"]["median"] is None:
            continue
        target = "" if r["params"].get("decoder") == "torch" else (
            f"<= {TARGET_NODE_MB:.0f} MB: {'met' if r['peak_mb']['median'] <= TARGET_NODE_MB else 'not met'}")
        rows.append((f"node peak RSS, {r['config']}, MB (fits {m['budget_mb']:.0f} MB?)",
                     f"{fmt(r['peak_mb'], 0)} ({'yes' if r['peak_mb']['median'] <= m['budget_mb'] else 'no'})", target))
    for r in res.get("node", {}).get("streams", []):
        rows.append((f"node, {r['stream']} stream, DDS {r['dds']}: frames received %, image callback CPU ms, "
                     "frame age of answers ms",
                     f"{fmt(r['received_pct'], 0)}, {fmt(r['callback_cpu_ms'], 3)}, {fmt(r['frame_age_ms'], 0)}", ""))
        if r.get("answer_ms_p50") is not None:
            rows.append((f"node, {r['stream']} stream, DDS {r['dds']}: answer ms p50 / p95, answers encoded on demand",
                         f"{r['answer_ms_p50']:.0f} / {r['answer_ms_p95']:.0f}, {r['on_demand_run']} of "
                         f"{r['answers_run']}", ""))
    return rows


def summary_markdown(all_results: dict, info: dict, argv_line: str) -> str:
    names = list(all_results)
    per = {n: summary_rows(all_results[n]) for n in names}
    figures = list(dict.fromkeys(f for n in names for f, _, _ in per[n]))
    head = "| figure | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    for f in figures:
        cells = []
        for n in names:
            row = next((r for r in per[n] if r[0] == f), None)
            cells.append("-" if row is None else row[1] + (f" — target {row[2]}" if row[2] else ""))
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    reused = [f"{n}: {', '.join(all_results[n]['reused'])}" for n in names if all_results[n].get("reused")]
    lines += ["", f"Medians (min–max) of repeated runs after warm-up; {machine_line(info)}."
              + (f" From an earlier run of the same command (--reuse): {'; '.join(reused)}." if reused else ""),
              f"Command: `{argv_line}`; each sub-benchmark's own table is in its folder."]
    return "\n".join(lines)


def write_summary(out: Path, all_results: dict, info: dict, argv_line: str) -> None:
    md = summary_markdown(all_results, info, argv_line)
    (out / "summary.md").write_text(md + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"machine": info, "models": all_results}, indent=2) + "\n",
                                      encoding="utf-8")
    panels = []
    for name, res in all_results.items():
        for sub in SUBS:
            r = res.get(sub)
            if r and "error" not in r:
                panels.append((importlib.import_module(f"mobilevlm_ros.tools.bench.{sub}").plot, r, name))
    png = bool(panels) and save_figure(out / "summary.png", panels, f"mobilevlm-bench all — {machine_line(info)}",
                                       columns=len(all_results))
    print(md)
    _log(f"wrote {out / 'summary.md'}, " + (f"{out / 'summary.png'}, " if png else "") + f"{out / 'summary.json'}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="mobilevlm-bench all", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default=None, help="comma-separated: 1.7b,3b (random-weight checkpoints, made once)")
    ap.add_argument("--model", action="append", default=[], help="checkpoint folder (repeatable)")
    ap.add_argument("--models-root", default="models", help="where --dims checkpoints live")
    ap.add_argument("--only", default=",".join(SUBS), help="sub-benchmarks to run, comma-separated")
    ap.add_argument("--budget-mb", type=float, default=5500.0, help="memory budget of the device (memory)")
    ap.add_argument("--quick", action="store_true", help="one repeat, short windows: checks the command only")
    ap.add_argument("--reuse", action="store_true",
                    help="sub-benchmarks left out of --only come from OUT's earlier results, for the summary")
    ap.add_argument("--out", default="results/bench")
    a = ap.parse_args(argv)
    subs = [s for s in a.only.split(",") if s]
    bad = [s for s in subs if s not in SUBS]
    if bad:
        ap.error(f"unknown sub-benchmark {bad} (choose from {', '.join(SUBS)})")
    ckpts = [Path(m) for m in a.model]
    if a.dims:
        ckpts += [checkpoint_for_dims(d.strip(), Path(a.models_root)) for d in a.dims.split(",") if d.strip()]
    if not ckpts:
        ckpts = [checkpoint_for_dims("1.7b", Path(a.models_root))]
    for c in ckpts:
        if not (c / "config.json").is_file():
            print(f"mobilevlm-bench all: not a checkpoint folder (no config.json): {c}", file=sys.stderr)
            return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    all_results = {}
    for c in ckpts:
        all_results[c.name] = run_model(c, out / c.name, subs, a.quick, a.budget_mb, a.reuse)
        write_summary(out, all_results, finish_machine(info), "mobilevlm-bench all " + " ".join(argv))
    failed = [f"{n}/{s}" for n, r in all_results.items() for s in subs if "error" in r.get(s, {})]
    if failed:
        _log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

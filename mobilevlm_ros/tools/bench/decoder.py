"""Decoder speed per GGUF quantization and llama.cpp library: our decoder beside the library's own loop.

    mobilevlm-bench decoder --model CKPT|ARTIFACTS [--quants q4_k_m,q8_0,f16] [--threads N]
                            (--quants also takes q4_0, iq4_xs, q5_k_m)
                            [--libraries llama.cpp,ik_llama.cpp] (default: every installed one)
                            [--tokens 32] [--repeats 3] [--warmup 1] [--n-ctx 0] [--out DIR]

A checkpoint is exported to GGUF first (OUT/gguf, reused while the checkpoint is unchanged); an
artifacts folder's GGUF files are used as they are. Each quantization runs in a child process of its
own (so that its peak RSS is its own) and measures, with synthetic image embeddings (144 tokens of
the model's width; the decoder's cost does not depend on their values):

  prompt eval tok/s   a question about a new frame: image tokens + question text evaluated, prefix cached
  decode tok/s        --tokens generated with EOS ignored (min_new_tokens), one frame cached: the
                      (tokens - 1) single-token evaluations / decode time
  decode, 4 KV states the same with max_kv_states (4) frames' KV states held
  TTFT frame in decoder  first token of a question about a frame already evaluated (text only)
  text batch          the same for the question the llama.cpp loop evaluates, beside that loop's own
                      time for its text (one llama_decode after the image) + its first token: the part
                      of a first token that llama.cpp's kernels set; ratio llama.cpp / ours per pair
  TTFT new frame      ... about a new frame (image + text; prefix reused)
  TTFT no reuse       ... with nothing cached (prefix + image + text: what re-encoding pipelines pay)
  llama.cpp pp / tg   the library's own speed on the same file, same threads, same process: a plain loop
                      of llama_decode calls (the same image embeddings + text in n_batch chunks, then
                      1-token batches with llama.cpp's greedy sampler), no caching, no Python per token
  ratio               our decode tok/s / llama.cpp tg tok/s of each pair of runs (target >= 0.95)
  ceiling             the decode tok/s this machine's memory bandwidth allows: read bandwidth measured
                      before and after every quantization's runs (bench/bandwidth.py, median pass) / the
                      bytes one decode step reads (weights + f16 KV cache at the mean decode position)
  peak RSS            VmHWM of the child after our decoder's runs, before llama.cpp's own context

Every figure is the median over --repeats timed runs after --warmup untimed ones, with min and max;
ours and llama.cpp's runs alternate so that background load hits both alike. With several libraries,
each (library, quantization) runs in its own child, libraries one after the other per quantization. Prints a markdown table;
writes OUT/decoder.json, OUT/decoder.md and OUT/decoder.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bandwidth import ceiling, decode_bytes_per_token, measure_read_bandwidth
from ...core.decoders.llama_library import LLAMA_LIBRARIES
from ...core.pipeline import QUANTS
from ..options import CommaList
from .common import (barh, finish_machine, fmt, machine_info, machine_line, minmax, peak_rss_mb, report,
                     run_worker, stats, worker_main)

DEFAULT_QUANTS = ("q4_k_m", "q8_0", "f16")                      # of core's QUANTS
QUESTIONS = ("What objects are on the table in front of the robot?",
             "Is the door open or closed?",
             "Describe the scene in detail.")
IMAGE_TOKENS = 144

# ------------------------------------------------------------------------------------ helpers

def _machine(threads: int) -> dict:
    info = machine_info(threads)
    try:
        import llama_cpp
        info["llama_cpp_system"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception:
        pass
    return info


def _run_child(job: dict, timeout: float) -> dict:
    return run_worker("mobilevlm_ros.tools.bench.decoder", job, timeout)


def _log(msg: str) -> None:
    print(f"[bench decoder] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ GGUF files

def _checkpoint_key(model: Path) -> dict:
    from ...core.artifacts import sha256_file
    from ...core.checkpoint import weight_files
    from ...core.tokenizer import tokenizer_file
    return {"config_sha256": sha256_file(model / "config.json"),
            "tokenizer_sha256": sha256_file(tokenizer_file(model)),
            "weights": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weight_files(model)]}


def ensure_gguf(model: Path, gguf_dir: Path, quants, timeout: float) -> tuple[dict, Path, dict]:
    """(llm section {quant: entry}, folder holding the files, export info) for --model."""
    from ...core.artifacts import MANIFEST, read_manifest
    if (model / MANIFEST).is_file():
        m = read_manifest(model)
        section = m.get("llm") or {}
        missing = [q for q in quants if q not in section]
        if missing:
            raise SystemExit(f"mobilevlm-bench decoder: {model} has no GGUF for {', '.join(missing)} "
                             f"(exported: {', '.join(section) or 'none'})")
        return section, model, {"source": "artifacts", "cached": True}
    key = _checkpoint_key(model)
    meta = gguf_dir / "export.json"
    section, info = {}, {}
    if meta.is_file():
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
            if old.get("key") == key:
                section = {q: e for q, e in old.get("llm", {}).items()
                           if (gguf_dir / e["file"]).is_file()
                           and (gguf_dir / e["file"]).stat().st_size == e["bytes"]}
                info = old.get("export", {})
        except (ValueError, KeyError, TypeError):
            section = {}
    todo = [q for q in quants if q not in section]
    if not todo:
        _log(f"reusing the GGUF files in {gguf_dir}")
        return section, gguf_dir, {**info, "cached": True}
    _log(f"exporting {model} -> {gguf_dir} ({', '.join(todo)}) ...")
    gguf_dir.mkdir(parents=True, exist_ok=True)
    res = _run_child({"kind": "export", "model": str(model), "out": str(gguf_dir), "quants": todo}, timeout)
    section.update(res["llm"])
    info = {"seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"], "quants": todo}
    meta.write_text(json.dumps({"key": key, "llm": section, "export": info}, indent=2), encoding="utf-8")
    return section, gguf_dir, {**info, "cached": False}


# ------------------------------------------------------------------------------------ workers

def _worker_export(job: dict) -> dict:
    from ...core.checkpoint import load_checkpoint
    from ...core.gguf_export import export_gguf
    t0 = time.perf_counter()
    last = [0.0]

    def progress(step, total, desc):
        if time.perf_counter() - last[0] > 10 or step == total:
            last[0] = time.perf_counter()
            _log(f"  export {step}/{total} {desc}")
    section = export_gguf(load_checkpoint(job["model"]), job["out"], job["quants"], progress)
    return {"llm": section, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


class PureLlama:
    """llama.cpp's own speed: one plain context on the same model, a loop of llama_decode calls."""

    def __init__(self, llama, model, n_embd: int, threads: int, n_ctx: int, n_batch: int):
        from ...core.decoders.llama_batch import Batches
        self.llama = llama
        cp = llama.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = llama.llama_init_from_model(model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the reference context")
        self.mem = llama.llama_get_memory(self.ctx)
        self.batches = Batches(llama, n_batch, n_embd)     # the decoder's batch builder: the same rows
        self.greedy = llama.llama_sampler_init_greedy()

    def _decode(self, batch):
        if self.llama.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed in the reference loop")

    def run(self, prefix, embeds, suffix, n_gen: int) -> dict:
        """Prefix (untimed), then timed: image + suffix (pp), n_gen greedy tokens (tg)."""
        from ...core.decoders.llama_batch import NO_LOGITS, last
        llama, batches = self.llama, self.batches
        llama.llama_memory_clear(self.mem, True)
        for _, b in batches.token_chunks(prefix, 0, NO_LOGITS):
            self._decode(b)
        pos = len(prefix)
        t0 = time.perf_counter()
        for _, b in batches.embed_chunks(embeds, pos):
            self._decode(b)
        pos += embeds.shape[0]
        t_image = time.perf_counter()
        for _, b in batches.token_chunks(suffix, pos, last(len(suffix))):
            self._decode(b)
        pos += len(suffix)
        t1 = time.perf_counter()
        token = llama.llama_sampler_sample(self.greedy, self.ctx, -1)
        t2 = time.perf_counter()
        for _ in range(n_gen - 1):
            self._decode(batches.fill_tokens((token,), pos, last(1)))
            pos += 1
            token = llama.llama_sampler_sample(self.greedy, self.ctx, -1)
        t3 = time.perf_counter()
        n_pp = embeds.shape[0] + len(suffix)
        return {"pp_tok_s": n_pp / (t1 - t0), "tg_tok_s": (n_gen - 1) / (t3 - t2),
                "ttft_ms": (t2 - t0) * 1e3, "text_ms": (t2 - t_image) * 1e3}

    def close(self):
        self.llama.llama_sampler_free(self.greedy)
        self.batches.close()
        self.llama.llama_free(self.ctx)


def _worker_quant(job: dict) -> dict:
    import numpy as np

    from ...core.decoders.llamacpp_decoder import LlamaCppDecoder
    from ...core.generation import GenerationParams
    from ...core.prompt import build_prompt
    from ...core.tokenizer import load_tokenizer
    from ...core.vision import ImageEmbedding

    quant, n_gen, repeats, warmup = job["quant"], job["tokens"], job["repeats"], job["warmup"]
    tok = load_tokenizer(job["tokenizer"])
    t0 = time.perf_counter()
    dec = LlamaCppDecoder(job["gguf"], tok, quant=quant, threads=job["threads"], n_ctx=job["n_ctx"],
                          max_kv_states=4, library=job["library"])
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)

    def frame():
        return ImageEmbedding(rng.standard_normal((IMAGE_TOKENS, dec.n_embd), dtype=np.float32))
    prompts = [build_prompt(tok, q, IMAGE_TOKENS) for q in QUESTIONS]
    forced = GenerationParams(max_new_tokens=n_gen, min_new_tokens=n_gen)
    one = GenerationParams(max_new_tokens=1, min_new_tokens=1)
    pure = None
    rss_ours = None
    rows = {k: [] for k in ("prompt_eval_tok_s", "decode_tok_s", "ttft_cached_ms", "ttft_new_frame_ms",
                            "ttft_no_reuse_ms", "llama_pp_tok_s", "llama_tg_tok_s", "llama_ttft_ms",
                            "text_ms", "llama_text_ms", "decode_4cached_tok_s")}

    def ours(record: bool):
        f, g = frame(), frame()
        dec.clear_cache()
        a = dec.generate(prompts[0], f, one)            # nothing cached: prefix + image + text
        b = dec.generate(prompts[1], f, forced)         # frame cached: text only; then decode
        assert len(b.ids) == n_gen, (len(b.ids), n_gen)
        c = dec.generate(prompts[2], g, one)            # new frame, prefix cached
        d = dec.generate(prompts[2], g, one)            # the same question, its frame cached: text only
        if record:
            rows["ttft_no_reuse_ms"].append(a.first_token_ms)
            rows["ttft_cached_ms"].append(b.first_token_ms)
            rows["decode_tok_s"].append((n_gen - 1) / (b.decode_ms / 1e3))
            rows["ttft_new_frame_ms"].append(c.first_token_ms)
            rows["prompt_eval_tok_s"].append(c.timings["evaluated_prompt_tokens"] / (c.prefill_ms / 1e3))
            rows["text_ms"].append(d.first_token_ms)

    def theirs(record: bool):
        nonlocal pure, rss_ours
        if pure is None:
            rss_ours = peak_rss_mb()
            pure = PureLlama(dec.llama, dec.llama_model, dec.n_embd, dec.threads, job["n_ctx_pure"], dec.n_batch)
        # the question ours evaluates with its new frame (c above): the same token counts
        r = pure.run(prompts[2].prefix, frame().embeds, prompts[2].suffix, n_gen)
        if record:
            rows["llama_pp_tok_s"].append(r["pp_tok_s"])
            rows["llama_tg_tok_s"].append(r["tg_tok_s"])
            rows["llama_ttft_ms"].append(r["ttft_ms"])
            rows["llama_text_ms"].append(r["text_ms"])

    for i in range(warmup + repeats):
        record = i >= warmup
        order = (ours, theirs) if i % 2 == 0 else (theirs, ours)
        for fn in order:
            fn(record)
        if record:
            _log(f"  {dec.library} {quant} run {i - warmup + 1}/{repeats}: decode {rows['decode_tok_s'][-1]:.2f} "
                 f"tok/s, its own loop {rows['llama_tg_tok_s'][-1]:.2f} tok/s")
    # steady state of a node: max_kv_states frames in the KV cache while answering
    dec.clear_cache()
    frames = [frame() for _ in range(dec.max_kv_states)]
    for f in frames:
        dec.generate(prompts[0], f, one)
    for _ in range(repeats):
        b = dec.generate(prompts[1], frames[-1], forced)
        rows["decode_4cached_tok_s"].append((n_gen - 1) / (b.decode_ms / 1e3))
    assert len(dec.kv_state_keys()) == dec.max_kv_states
    result = {"quant": quant, "library": dec.library, "file": Path(job["gguf"]).name, "file_mb": Path(job["gguf"]).stat().st_size / 2 ** 20,
              "load_s": load_s, "n_ctx": dec.n_ctx, "n_batch": dec.n_batch, "threads": dec.threads,
              "extra_buffers": dec.extra_buffers,
              "prompt_tokens": {"prefix": len(prompts[1].prefix), "image": IMAGE_TOKENS,     # decode's
                                "suffix": len(prompts[1].suffix), "frame_tail": len(dec.frame_tail),
                                "prompt_eval_suffix": len(prompts[2].suffix)},
              "peak_rss_mb": rss_ours, "peak_rss_with_llama_ctx_mb": peak_rss_mb(),
              **{k: stats(v) for k, v in rows.items()}}
    # ours and llama.cpp's runs alternate: the ratio of each pair cancels load that hit both
    result["decode_ratio"] = stats([d / t for d, t in zip(rows["decode_tok_s"], rows["llama_tg_tok_s"])])
    result["prompt_eval_ratio"] = stats([p / q for p, q in zip(rows["prompt_eval_tok_s"], rows["llama_pp_tok_s"])])
    result["text_ratio"] = stats([t / o for o, t in zip(rows["text_ms"], rows["llama_text_ms"])])
    pure.close()
    dec.close()
    return result


def _work(job: dict) -> dict:
    return _worker_export(job) if job["kind"] == "export" else _worker_quant(job)


# ------------------------------------------------------------------------------------ report

def table(result: dict) -> str:
    head = ("| library | quant | file MB | prompt eval tok/s | its own loop: pp tok/s | decode tok/s | its own loop: tg tok/s "
            "| ratio | ceiling tok/s | ours / ceiling | decode, 4 KV states held | TTFT frame in decoder ms "
            "| text batch ms, ours / its loop (ratio) | TTFT new frame ms | TTFT no reuse ms | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["quants"]:
        c = r.get("ceiling", {})
        lines.append(f"| {r.get('library', 'llama.cpp')} | {r['quant']} | {r['file_mb']:.0f} | {fmt(r['prompt_eval_tok_s'])} | "
                     f"{fmt(r['llama_pp_tok_s'])} | {fmt(r['decode_tok_s'], 2)} | {fmt(r['llama_tg_tok_s'], 2)} | "
                     f"{fmt(r['decode_ratio'], 2)} | {c.get('tok_s', 0):.1f} | {c.get('ours_fraction', 0):.2f} | "
                     f"{fmt(r['decode_4cached_tok_s'], 2)} | {fmt(r['ttft_cached_ms'], 0)} | "
                     f"{_text_cell(r)} | "
                     f"{fmt(r['ttft_new_frame_ms'], 0)} | {fmt(r['ttft_no_reuse_ms'], 0)} | {r['peak_rss_mb']:.0f} |")
    bw = result.get("bandwidth", {})
    ex = result.get("export", {})
    notes = [f"Medians (min–max) of {result['repeats']} runs after {result['warmup']} warm-up; "
             f"{result['tokens']} tokens decoded per run; {machine_line(result['machine'])}.",
             "ratio = our decode tok/s / the library's own 1-token decode loop on the same file, per pair of "
             "alternating runs (target >= 0.95).",
             "text batch = a question's own text evaluated after its frame's image (already in the decoder) "
             "and its first token sampled, the question of TTFT new frame "
             f"({result['quants'][0]['prompt_tokens'].get('prompt_eval_suffix', '?')} tokens): ours as a question "
             "about a cached frame, the library's loop as one llama_decode after the image; ratio = "
             "the loop's ms / ours per pair.",
             "weight layout: " + ("llama.cpp's repacked one (CPU_REPACK)"
                                  if result["quants"][0].get("extra_buffers", True)
                                  else "plain (this CPU backend has AMX, whose matmul crashes)") + "."]
    if bw:
        r0 = result["quants"][0]["ceiling"]
        notes.append(f"ceiling = measured read bandwidth {bw['median_gbps']:.1f} GB/s (median of {bw['n']} passes "
                     f"around the runs, {bw['min_gbps']:.1f}–{bw['best_gbps']:.1f}) / bytes read per decoded token "
                     f"(weights + f16 KV at position {r0['position']}; {result['quants'][0]['quant']}: "
                     f"{r0['bytes'] / 1e6:.0f} MB).")
    if ex and not ex.get("cached") and ex.get("seconds"):
        notes.append(f"GGUF export: {ex['seconds']:.0f} s, peak RSS {ex['peak_rss_mb']:.0f} MB.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def _text_cell(r: dict) -> str:
    if "text_ms" not in r:                      # a result written before the column existed
        return "-"
    return f"{fmt(r['text_ms'], 0)} / {fmt(r['llama_text_ms'], 0)} ({r['text_ratio']['median']:.2f})"


def plot(result: dict, ax) -> None:
    labels, values, errors, colors = [], [], [], []
    for r in result["quants"]:
        for label, key, color in (("ours", "decode_tok_s", "tab:blue"), ("its loop", "llama_tg_tok_s", "tab:orange")):
            labels.append(f"{r.get('library', 'llama.cpp')} {r['quant']} {label}")
            values.append(r[key]["median"])
            errors.append(minmax(r[key]))
            colors.append(color)
        if r.get("ceiling"):
            labels.append(f"{r.get('library', 'llama.cpp')} {r['quant']} bandwidth ceiling")
            values.append(r["ceiling"]["tok_s"])
            errors.append((r["ceiling"]["tok_s"], r["ceiling"]["tok_s"]))
            colors.append("tab:gray")
    barh(ax, labels, values, errors, xlabel="decode tokens/s (median, min–max)",
         title="Decode: ours, the library's own loop, bandwidth ceiling", color=colors,
         fmt_value="{:.1f}")


def run(a) -> dict:
    from ...core.decoders.llama_library import default_threads, libraries_option
    from ...core.tokenizer import tokenizer_file
    model = Path(a.model)
    if not model.is_dir():
        raise SystemExit(f"mobilevlm-bench decoder: model folder not found: {model}")
    quants = a.quants
    try:
        libraries = libraries_option(",".join(a.libraries))     # none named: every installed one
    except ValueError as e:
        raise SystemExit(f"mobilevlm-bench decoder: {e}") from None
    threads = a.threads if a.threads > 0 else default_threads()
    out = Path(a.out) if a.out else None
    tmp = None
    if a.gguf_dir:
        gguf_dir = Path(a.gguf_dir)
    elif out:
        gguf_dir = out / "gguf"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mobilevlm-gguf-")
        gguf_dir = Path(tmp.name)
    try:
        section, folder, export_info = ensure_gguf(model, gguf_dir, quants, a.timeout)
        tokenizer = tokenizer_file(model)       # tokenizer.model, or a BPE test model's tokenizer.json
        result = {"benchmark": "decoder", "model": str(model.resolve()), "tokens": a.tokens,
                  "repeats": a.repeats, "warmup": a.warmup, "machine": _machine(threads),
                  "export": export_info, "quants": []}
        bandwidth = [measure_read_bandwidth(threads=threads)]
        for q in quants:
            for library in libraries:
                _log(f"{library} {q}: {section[q]['file']} ...")
                gguf = folder / section[q]["file"]
                r = _run_child({"kind": "quant", "quant": q, "gguf": str(gguf), "library": library,
                                "tokenizer": str(tokenizer), "threads": threads, "tokens": a.tokens,
                                "repeats": a.repeats, "warmup": a.warmup, "n_ctx": a.n_ctx,
                                "n_ctx_pure": max(512, a.n_ctx or 0)}, a.timeout)
                bandwidth.append(measure_read_bandwidth(threads=threads))
                p = r["prompt_tokens"]      # mean KV position while decoding the measured answer
                r["ceiling"] = decode_bytes_per_token(gguf, p["prefix"] + p["image"] + p["suffix"] + a.tokens // 2)
                result["quants"].append(r)
                _log(f"{library} {q}: decode {r['decode_tok_s']['median']:.2f} tok/s vs its own loop "
                     f"{r['llama_tg_tok_s']['median']:.2f} (ratio {r['decode_ratio']['median']:.2f})")
        passes = stats([g for b in bandwidth for g in b["passes_gbps"]])
        result["bandwidth"] = {"median_gbps": passes["median"], "best_gbps": passes["max"],
                               "min_gbps": passes["min"], "n": passes["n"], "measurements": bandwidth}
        for r in result["quants"]:
            c = r["ceiling"]
            c["tok_s"] = ceiling(result["bandwidth"], c)
            c["ours_fraction"] = r["decode_tok_s"]["median"] / c["tok_s"]
            c["llama_fraction"] = r["llama_tg_tok_s"]["median"] / c["tok_s"]
        finish_machine(result["machine"])
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = worker_main(argv, _work)
    if code is not None:
        return code
    ap = argparse.ArgumentParser(prog="mobilevlm-bench decoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (exported first) or artifacts folder")
    quants, libraries = CommaList(QUANTS, "quant"), CommaList(LLAMA_LIBRARIES, "library", allow_empty=True)
    ap.add_argument("--quants", default=",".join(DEFAULT_QUANTS), type=quants,
                    help=f"comma-separated, from {quants.names} (default {','.join(DEFAULT_QUANTS)})")
    ap.add_argument("--libraries", default="", type=libraries,
                    help=f"llama.cpp libraries, comma-separated: {libraries.names} (default: every installed one)")
    ap.add_argument("--threads", type=int, default=0, help="0 = every core this process may use")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per run (EOS ignored)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=0, help="KV cells of our decoder (0 = training context)")
    ap.add_argument("--gguf-dir", default=None, help="where exported GGUF files are cached (default OUT/gguf)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--out", default=None, help="folder for decoder.json and decoder.md")
    a = ap.parse_args(argv)
    if a.tokens < 2 or a.repeats < 1 or a.warmup < 0:
        ap.error("--tokens must be >= 2, --repeats >= 1, --warmup >= 0")
    return report("decoder", lambda: run(a), table, a.out, plot, errors=(RuntimeError, subprocess.TimeoutExpired))


if __name__ == "__main__":
    sys.exit(main())

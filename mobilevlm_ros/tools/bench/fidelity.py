"""Fidelity of the quantized paths, measured on a TRAINED language model.

    mobilevlm-bench fidelity [--model CKPT] [--out DIR] [--quants f16,q8_0,q4_k_m,q4_0,iq4_xs,q5_k_m]
                             [--vision-dims 1.7b|tiny] [--questions 10] [--frames 5] [--tokens 32]
                             [--libraries llama.cpp,ik_llama.cpp] [--threads N] [--quick]

A random model's logits have near-ties that any rounding flips, so its greedy answers say little
about a quantization. This bench uses the SmolLM2 test model instead (`mobilevlm-make-tiny
--language-model smollm2`: SmolLM2-135M-Instruct as the language model, in the published MobileVLM layout,
with a random CLIP + projector at --vision-dims; made in OUT unless --model names a checkpoint), and
exports it with the project's own export (`mobilevlm-export`: vision graphs fp32 and int8, one GGUF
per quantization; reused while the checkpoint is unchanged).

Prompts: --questions x --frames (the v1 prompt; synthetic camera-like frames), each answered
greedily with --tokens new tokens at most. Every decoder is the product's own class, loaded the
product's way (load_model / from_artifacts): the reference is TorchDecoder (float32) fed with the
fp32 ONNX graph's image embeddings (OnnxRuntimeVision), each GGUF runs on LlamaCppDecoder with the
same embeddings, once per llama.cpp library (--libraries; default every installed one: the same file on other
kernels is other arithmetic).

  answers identical  greedy answer ids equal to the reference's, whole answer
  first token        the first answer token equal
  agreeing prefix    mean number of answer tokens before the first difference
  same top token     teacher-forced along the reference's answer (every position of every answer, and
                     the one after it): the argmax of the quantized logits equals the reference's
  KL                 KL(P_ref || P_quant) of the next-token distribution at those positions, in nats,
                     as `llama-perplexity --kl-divergence` reports it: mean, median, p99, max
  tensor types       what llama.cpp's quantizer wrote (tensors whose rows are not a multiple of 256
                     values cannot take k-quants or iq4_xs and get a fallback type)

Vision int8 vs fp32 (ONNX Runtime, the same frames): cosine similarity and max abs error of the
image embeddings per frame, and what it does to answers: greedy answers from int8-vision embeddings
vs fp32-vision embeddings on the torch reference and on the q4_k_m GGUF (identical %, first token %,
KL teacher-forced along the fp32-vision answer of the same decoder).

--quick: 3 questions x 2 frames, 8 tokens, tiny vision dims (a smoke run, not a measurement).
Writes OUT/fidelity.json, OUT/fidelity.md and OUT/fidelity.png.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ...core.decoders.llama_library import LLAMA_LIBRARIES
from ...core.pipeline import QUANTS
from ..options import CommaList
from .common import barh, finish_machine, machine_info, machine_line, report, stats

VISION_QUANT = "q4_k_m"          # the GGUF the int8-vision answers are also compared on
QUESTIONS = ("What is in the image?", "Describe the scene in detail.", "How many people are there?",
             "Is the door open or closed?", "What color is the largest object?",
             "Is there anything on the table?", "Where is the robot?", "Is it safe to move forward?",
             "What is on the left side of the image?", "Can you read any text in the image?")
FRAME_SIZES = ((480, 640), (360, 640), (500, 300), (256, 256), (720, 1280), (300, 400), (600, 600))


def _log(msg: str) -> None:
    print(f"[bench fidelity] {msg}", file=sys.stderr, flush=True)


def teacher_forced_logits(decoder, prompt, image, ids=()) -> np.ndarray:
    """float32 [len(ids) + 1, vocab]: row j holds the logits that predict ids[j] after the prompt
    and ids[:j]; the last row predicts the token after all of them. For parity checks, fidelity (KL
    divergence) and scoring fixed answers. Through the decoder's own frame state: the llamacpp
    decoder's KV states as generate uses them (the question and ids evaluated as batches), the torch
    decoder's cached KV."""
    ids = [int(t) for t in ids]
    if decoder.name == "torch":
        import torch
        with torch.inference_mode():
            kv, _ = decoder.frame_kv(prompt, image)
            tokens = torch.tensor([[*prompt.suffix, *ids]], device=decoder.device)
            logits, _ = decoder.llm(decoder.llm.embed(tokens), kv, last_only=False)
            return logits[0, len(prompt.suffix) - 1:].float().cpu().numpy()
    pos, skip = decoder.place(prompt, image)
    tokens = [*prompt.suffix, *ids][skip:]
    first = len(prompt.suffix) - skip - 1       # the suffix's last token predicts ids[0]
    return decoder.evaluate(tokens, pos, range(first, len(tokens)))


# ------------------------------------------------------------------------------------ inputs

def bench_frames(n: int, seed: int = 0) -> list:
    """n deterministic camera-like frames (uint8 RGB), each a different scene: its own size, colour
    gradients, a few solid objects and sensor noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        h, w = FRAME_SIZES[i % len(FRAME_SIZES)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
        phase, freq = rng.uniform(0, 2 * np.pi, 3), rng.uniform(1.0, 6.0, 3)
        img = np.stack([np.sin(freq[c] * (x if c != 1 else y) + phase[c]) for c in range(3)], -1) * 90 + 128
        for _ in range(int(rng.integers(3, 7))):
            y0, x0 = int(rng.integers(0, h - h // 5)), int(rng.integers(0, w - w // 5))
            dy, dx = int(rng.integers(h // 10, h // 3)), int(rng.integers(w // 10, w // 3))
            img[y0:y0 + dy, x0:x0 + dx] = rng.integers(0, 256, 3)
        img += rng.normal(0, 8, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def ensure_model(a, work: Path) -> Path:
    """--model, or the SmolLM2 test model at --vision-dims in the work folder (made once)."""
    if a.model:
        model = Path(a.model)
        if not (model / "config.json").is_file():
            raise SystemExit(f"mobilevlm-bench fidelity: {model} is not a checkpoint folder (no config.json)")
        return model
    from ..make_tiny import make_smollm2_checkpoint
    model = work / f"smollm2-{a.vision_dims}"
    if not (model / "config.json").is_file():
        _log(f"making {model} (SmolLM2-135M-Instruct + random {a.vision_dims} vision)")
        t0 = time.perf_counter()
        make_smollm2_checkpoint(model, "ldpnetv2", a.vision_dims, seed=0)
        _log(f"made in {time.perf_counter() - t0:.0f} s")
    return model


def ensure_artifacts(model: Path, art: Path, quants) -> tuple[dict, dict]:
    """(manifest, export info) of MODEL's export into ART with the fp32 + int8 vision graphs and
    every quant, exported now (`mobilevlm-export`'s own code) if missing or stale."""
    from ...core.artifacts import MANIFEST, read_manifest, sha256_file
    from ..export import export
    if (art / MANIFEST).is_file():
        m = read_manifest(art)
        if (m.get("source", {}).get("config_sha256") == sha256_file(model / "config.json")
                and all(d in m.get("vision", {}) for d in ("fp32", "int8"))
                and all(q in m.get("llm", {}) for q in quants)):
            _log(f"reusing the export in {art}")
            return m, {"cached": True}
    _log(f"exporting {model} -> {art} (vision fp32, int8; GGUF {', '.join(quants)}) ...")
    t0 = time.perf_counter()
    m = export(model, art, ["fp32", "int8"], list(quants), quiet=True)
    seconds = time.perf_counter() - t0
    _log(f"exported in {seconds:.0f} s")
    return m, {"cached": False, "seconds": seconds}


def tensor_types(path: Path) -> dict:
    """{GGML type name: tensor count} of a GGUF file, most frequent first."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors).most_common())


# ------------------------------------------------------------------------------------ metrics

def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_rows(logp_ref: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per row, nats (logp_ref: log-probabilities, logits: raw)."""
    lp = log_softmax(logits)
    ref = np.asarray(logp_ref, dtype=np.float64)
    return np.maximum((np.exp(ref) * (ref - lp)).sum(axis=-1), 0.0)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Tally:
    """Answer and teacher-forced agreement of one decoder against a reference, over the prompts."""

    def __init__(self):
        self.identical, self.first, self.prefix, self.kl, self.top = [], [], [], [], []
        self.examples = []

    def add(self, ref_ids, got_ids, logp_ref, logits, example=None):
        ref_ids, got_ids = list(ref_ids), list(got_ids)
        self.identical.append(ref_ids == got_ids)
        self.first.append(bool(ref_ids[:1] == got_ids[:1]))
        self.prefix.append(common_prefix(ref_ids, got_ids))
        self.kl.append(kl_rows(logp_ref, logits))
        self.top.append(np.asarray(logits).argmax(-1) == np.asarray(logp_ref).argmax(-1))
        if example is not None:
            self.examples.append(example)

    def summary(self) -> dict:
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        top = np.concatenate(self.top) if self.top else np.zeros(0, bool)
        n = len(self.identical)
        return {"prompts": n, "positions": int(kl.size),
                "answers_identical_pct": 100.0 * sum(self.identical) / max(n, 1),
                "first_token_pct": 100.0 * sum(self.first) / max(n, 1),
                "agreeing_prefix_tokens": float(np.mean(self.prefix)) if self.prefix else None,
                "same_top_pct": 100.0 * float(top.mean()) if top.size else None,
                "kl": {"mean": float(kl.mean()), "median": float(np.median(kl)),
                       "p99": float(np.percentile(kl, 99)), "max": float(kl.max())} if kl.size else None,
                "examples": self.examples}


def vision_compare(got: np.ndarray, ref: np.ndarray) -> dict:
    """Per frame: cosine of the flattened embeddings, lowest per-token cosine, max abs error and the
    same relative to the frame's max |ref|."""
    from ...core.onnx_export import compare
    rows = [compare(g[None], r[None]) for g, r in zip(got, ref)]
    return {"cosine": stats([r["cosine"] for r in rows]),
            "token_cosine_min": stats([r["token_cosine_min"] for r in rows]),
            "max_abs_diff": stats([r["max_abs_diff"] for r in rows]),
            "rel_max_abs_diff": stats([r["rel_max_abs_diff"] for r in rows]),
            "ref_rms": float(np.sqrt(np.mean(np.square(ref, dtype=np.float64))))}


# ------------------------------------------------------------------------------------ run

def run(a) -> dict:
    import torch

    from ...core.artifacts import artifact_path
    from ...core.decoders.llama_library import default_threads, libraries_option
    from ...core.decoders.llamacpp_decoder import LlamaCppDecoder
    from ...core.generation import GenerationParams
    from ...core.pipeline import LlamaCppOptions, LoadOptions, load_model
    from ...core.vision_onnx import OnnxRuntimeVision

    threads = a.threads if a.threads > 0 else default_threads()
    torch.set_num_threads(threads)
    quants = a.quants
    try:
        libraries = libraries_option(",".join(a.libraries))     # none named: every installed one
    except ValueError as e:
        raise SystemExit(f"mobilevlm-bench fidelity: {e}") from None
    tmp = None
    if a.out:
        work = Path(a.out)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mobilevlm-fidelity-")
        work = Path(tmp.name)
    try:
        model = ensure_model(a, work)
        art = work / f"{model.name}-artifacts"
        manifest, export_info = ensure_artifacts(model, art, quants)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(a.questions)]
        frames = bench_frames(a.frames)
        params = GenerationParams(max_new_tokens=a.tokens)
        result = {"benchmark": "fidelity", "model": str(model.resolve()), "artifacts": str(art.resolve()),
                  "machine": machine_info(threads), "export": export_info,
                  "settings": {"questions": len(questions), "frames": len(frames),
                               "prompts": len(questions) * len(frames), "max_new_tokens": a.tokens,
                               "greedy": True, "vision_dims": a.vision_dims if not a.model else None,
                               "hidden_size": manifest.get("hidden_size")}}
        try:
            import llama_cpp
            result["machine"]["llama_cpp_system"] = llama_cpp.llama_print_system_info().decode(
                errors="replace").strip()
        except Exception:
            pass

        # the reference: fp32 ONNX vision + float32 torch decoder, through load_model
        t0 = time.perf_counter()
        ref = load_model(art, LoadOptions(vision_backend="onnxruntime", vision_dtype="fp32", decoder="torch",
                                          threads=threads, max_kv_states=4))
        int8 = OnnxRuntimeVision.from_artifacts(art, manifest, LoadOptions(vision_dtype="int8", threads=threads))
        _log(f"encoding {len(frames)} frames with the fp32 and int8 vision graphs ...")
        t_v = time.perf_counter()
        emb32 = [ref.encode([f])[0] for f in frames]
        t_v32 = time.perf_counter()
        emb8 = [int8.encode([f])[0] for f in frames]
        t_v8 = time.perf_counter()
        int8.close()
        vision = {"graphs": {d: {"file": e["file"], "mb": (e["bytes"] + e.get("external_data", {}).get("bytes", 0))
                                 / 2 ** 20, "export_check_vs_torch": e.get("check")}
                             for d, e in manifest["vision"].items() if d in ("fp32", "int8")},
                  "ms_per_frame": {"fp32": (t_v32 - t_v) * 1e3 / len(frames),
                                   "int8": (t_v8 - t_v32) * 1e3 / len(frames)},
                  "int8_vs_fp32": vision_compare(np.stack([e.embeds for e in emb8]),
                                                 np.stack([e.embeds for e in emb32]))}
        prompts = [(fi, q, ref.prompt(q)) for fi in range(len(frames)) for q in questions]
        n_ctx = max(p.total for _, _, p in prompts) + a.tokens + 16

        _log(f"reference (torch float32): {len(prompts)} prompts, {a.tokens} tokens ...")
        refs, logp_refs = [], []
        torch_int8 = Tally()
        lengths, eos = [], 0
        t_ref = time.perf_counter()
        for k, (fi, q, p) in enumerate(prompts):
            g = ref.decoder.generate(p, emb32[fi], params)
            refs.append(g)
            lengths.append(len(g.ids))
            eos += g.finish_reason == "stop"
            lp = log_softmax(teacher_forced_logits(ref.decoder, p, emb32[fi], g.ids)).astype(np.float32)
            logp_refs.append(lp)
            g8 = ref.decoder.generate(p, emb8[fi], params)
            tf8 = teacher_forced_logits(ref.decoder, p, emb8[fi], g.ids)
            torch_int8.add(g.ids, g8.ids, lp, tf8,
                           {"frame": fi, "question": q, "fp32": g.text, "int8": g8.text} if k < 3 else None)
            if (k + 1) % 10 == 0:
                _log(f"  reference {k + 1}/{len(prompts)} ({time.perf_counter() - t_ref:.0f} s)")
        ref_s = time.perf_counter() - t_ref
        result["reference"] = {**ref.decoder.describe(), "vision": "onnxruntime fp32",
                               "answer_tokens": stats(lengths), "stopped_at_eos_pct": 100.0 * eos / len(prompts),
                               "seconds": ref_s, "load_s": t_v - t0,
                               "examples": [{"frame": fi, "question": q, "answer": g.text}
                                            for (fi, q, _), g in list(zip(prompts, refs))[:4]]}
        _log(f"reference done in {ref_s:.0f} s (mean answer {np.mean(lengths):.1f} tokens)")

        rows, q_int8 = [], None
        for quant, library in [(q, e) for q in quants for e in libraries]:
            t1 = time.perf_counter()
            tok = ref.tokenizer
            dec = LlamaCppDecoder.from_artifacts(art, manifest, tok, LoadOptions(
                quant=quant, threads=threads, llamacpp=LlamaCppOptions(n_ctx=n_ctx, library=library)))
            tally = Tally()
            vis_tally = Tally() if quant == VISION_QUANT and library == libraries[0] else None
            try:
                for k, ((fi, q, p), g, lp) in enumerate(zip(prompts, refs, logp_refs)):
                    got = dec.generate(p, emb32[fi], params)
                    tf = teacher_forced_logits(dec, p, emb32[fi], g.ids)
                    tally.add(g.ids, got.ids, lp, tf,
                              {"frame": fi, "question": q, "reference": g.text, quant: got.text} if k < 3 else None)
                    if vis_tally is not None:       # int8 vs fp32 vision on this GGUF, along its own answer
                        own = log_softmax(teacher_forced_logits(dec, p, emb32[fi], got.ids))
                        g8 = dec.generate(p, emb8[fi], params)
                        tf8 = teacher_forced_logits(dec, p, emb8[fi], got.ids)
                        vis_tally.add(got.ids, g8.ids, own, tf8,
                                      {"frame": fi, "question": q, "fp32": got.text, "int8": g8.text}
                                      if k < 3 else None)
                describe = dec.describe()
            finally:
                dec.close()
            path = artifact_path(art, manifest, "llm", quant)
            row = {"quant": quant, "library": library, "file": path.name, "file_mb": path.stat().st_size / 2 ** 20,
                   "tensor_types": tensor_types(path), "extra_buffers": describe.get("extra_buffers"),
                   "seconds": time.perf_counter() - t1, **tally.summary()}
            rows.append(row)
            if vis_tally is not None:
                q_int8 = vis_tally.summary()
            _log(f"{library} {quant}: answers identical {row['answers_identical_pct']:.0f} %, first token "
                 f"{row['first_token_pct']:.0f} %, same top {row['same_top_pct']:.1f} %, mean KL "
                 f"{row['kl']['mean']:.5f} ({row['seconds']:.0f} s)")
        result["quants"] = rows
        vision["answers"] = {"torch": torch_int8.summary(), VISION_QUANT: q_int8}
        result["vision"] = vision
        ref.close()
        finish_machine(result["machine"])
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


# ------------------------------------------------------------------------------------ report

def _types(t: dict) -> str:
    return ", ".join(f"{k.lower()} x{v}" for k, v in t.items() if k not in ("F32",))


def _kl(s, key, digits=5) -> str:
    return f"{s['kl'][key]:.{digits}f}" if s and s.get("kl") else "-"


def table(result: dict) -> str:
    st = result["settings"]
    head = ("| library | quant | file MB | tensor types (norms F32) | answers identical % | first token % | agreeing prefix, "
            "tokens | same top token % | mean KL | median KL | p99 KL | max KL |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["quants"]:
        lines.append(f"| {r.get('library', 'llama.cpp')} | {r['quant']} | {r['file_mb']:.1f} | {_types(r['tensor_types'])} | "
                     f"{r['answers_identical_pct']:.0f} | {r['first_token_pct']:.0f} | "
                     f"{r['agreeing_prefix_tokens']:.1f} | {r['same_top_pct']:.2f} | {_kl(r, 'mean')} | "
                     f"{_kl(r, 'median')} | {_kl(r, 'p99')} | {_kl(r, 'max', 3)} |")
    v = result["vision"]
    c = v["int8_vs_fp32"]
    vlines = ["| vision int8 vs fp32 | value |", "|---|---|",
              f"| cosine per frame, min (median) | {c['cosine']['min']:.6f} ({c['cosine']['median']:.6f}) |",
              f"| lowest per-token cosine | {c['token_cosine_min']['min']:.5f} |",
              f"| max abs error (rel. to max abs fp32) | {c['max_abs_diff']['max']:.4g} "
              f"({c['rel_max_abs_diff']['max']:.4g}); embedding RMS {c['ref_rms']:.4g} |",
              f"| ms per frame fp32 / int8 (ONNX Runtime, incl. preprocessing) | "
              f"{v['ms_per_frame']['fp32']:.0f} / {v['ms_per_frame']['int8']:.0f} |"]
    for name, s in v["answers"].items():
        if s:
            vlines.append(f"| answers from int8 vs fp32 vision, {name} decoder: identical % / first token % / "
                          f"same top % / mean KL | {s['answers_identical_pct']:.0f} / {s['first_token_pct']:.0f} / "
                          f"{s['same_top_pct']:.2f} / {_kl(s, 'mean')} |")
    ref = result["reference"]
    lens = ref["answer_tokens"]
    m = result["model"]
    notes = [
        f"{st['prompts']} prompts ({st['questions']} questions x {st['frames']} frames), greedy, at most "
        f"{st['max_new_tokens']} new tokens; reference answers {lens['median']:.0f} tokens median "
        f"({lens['min']:.0f}–{lens['max']:.0f}), {ref['stopped_at_eos_pct']:.0f} % ended by EOS. "
        f"{machine_line(result['machine'])}.",
        f"Model: {Path(m).name} (SmolLM2-135M-Instruct language model unless --model said otherwise; vision "
        f"{st.get('vision_dims') or 'of the checkpoint'}, random). Reference: TorchDecoder float32 on the fp32 "
        "ONNX vision graph's embeddings; each GGUF on LlamaCppDecoder with the same embeddings.",
        "KL = KL(P_ref || P_quant) of the next-token distribution, nats, teacher-forced along the reference's "
        "answer (every answer position and the one after it); same top token over the same positions.",
        "The language model's weights come from a Q4_1 GGUF (dequantized to bfloat16): they already lie on a "
        "4-bit grid, so requantizing them is not the same experiment as quantizing the original bf16 model.",
    ]
    if any("Q5_0" in r["tensor_types"] or "Q5_1" in r["tensor_types"] or "IQ4_NL" in r["tensor_types"]
           for r in result["quants"]):
        notes.append(f"hidden size {st.get('hidden_size')} is not a multiple of 256: llama.cpp gives the tensors "
                     "whose rows are that wide a 32-block fallback type (q4_k_m/q5_k_m: q5_0/q5_1, iq4_xs: iq4_nl), "
                     "so those rows do not measure the k-quants; at MobileLLaMA's 2048 / 2560 they apply throughout.")
    ex = result["export"]
    if not ex.get("cached"):
        notes.append(f"Export (vision fp32 + int8, every GGUF): {ex['seconds']:.0f} s.")
    return "\n".join(lines) + "\n\n" + "\n".join(vlines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def plot(result: dict, ax) -> None:
    labels, values, colors = [], [], []
    for r in result["quants"]:
        name = f"{r.get('library', 'llama.cpp')} {r['quant']}"
        labels += [f"{name} answers identical", f"{name} same top token"]
        values += [r["answers_identical_pct"], r["same_top_pct"]]
        colors += ["tab:blue", "tab:orange"]
    for name, s in result["vision"]["answers"].items():
        if s:
            labels.append(f"int8 vision ({name}) answers identical")
            values.append(s["answers_identical_pct"])
            colors.append("tab:green")
    barh(ax, labels, values, xlabel="% of prompts (answers) / of positions (top token)",
         title="Agreement with the float32 reference (trained SmolLM2 decoder)", color=colors,
         fmt_value="{:.0f}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="mobilevlm-bench fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint folder (default: the SmolLM2 test model, made in --out)")
    ap.add_argument("--out", default=None, help="folder for fidelity.json/.md/.png, the model and its export")
    quants, libraries = CommaList(QUANTS, "quant"), CommaList(LLAMA_LIBRARIES, "library", allow_empty=True)
    ap.add_argument("--quants", default=quants.names, type=quants, help=f"comma-separated: {quants.names}")
    ap.add_argument("--vision-dims", choices=("1.7b", "tiny"), default=None,
                    help="vision half of the SmolLM2 test model (default 1.7b: ViT-L/14-336; tiny with --quick)")
    ap.add_argument("--questions", type=int, default=None, help="questions per frame (default 10; 3 with --quick)")
    ap.add_argument("--frames", type=int, default=None, help="frames (default 5; 2 with --quick)")
    ap.add_argument("--tokens", type=int, default=None, help="max new tokens per answer (default 32; 8 with --quick)")
    ap.add_argument("--libraries", default="", type=libraries,
                    help=f"llama.cpp libraries, comma-separated: {libraries.names} (default: every installed one)")
    ap.add_argument("--threads", type=int, default=0, help="0 = every core this process may use")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (see the defaults above)")
    a = ap.parse_args(argv)
    for key, full, quick in (("vision_dims", "1.7b", "tiny"), ("questions", 10, 3), ("frames", 5, 2),
                             ("tokens", 32, 8)):
        if getattr(a, key) is None:
            setattr(a, key, quick if a.quick else full)
    if a.questions < 1 or a.frames < 1 or a.tokens < 1:
        ap.error("--questions, --frames and --tokens must be >= 1")
    from ...core.errors import MobileVLMError
    return report("fidelity", lambda: run(a), table, a.out, plot, errors=(MobileVLMError,))


if __name__ == "__main__":
    sys.exit(main())

"""Question latency with the frame already seen, next to the pipeline users have today.

    mobilevlm-bench question --model CKPT [--artifacts DIR] [--quant q4_k_m] [--tokens 32]
                             [--repeats 5] [--threads N] [--out DIR] [--configs ours,reference]
                             (--configs also takes ours-llamacpp)

`ours`: ONNX Runtime vision + the llamacpp decoder as the node loads it (llama_library auto: ik_llama.cpp on a
CPU where it is installed); the frame was encoded when it arrived, a question evaluates only its own
text and the answer. `ours-llamacpp`: the same on the llama.cpp library. `reference`: what the official inference script does, PyTorch
float32 with transformers: CLIP + projector re-run for every question, then `generate` over the whole
prompt. Both answer the same question about the same image with exactly `--tokens` generated tokens
(EOS suppressed); each figure is the median (min–max) of --repeats questions after one warm-up.
Each configuration runs in its own process, so its peak resident memory is its own.
Prints a markdown table; writes OUT/question.json, OUT/question.md and OUT/question.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ...core.onnx_export import DTYPES
from ...core.pipeline import QUANTS
from ..dev_packages import install_hint, missing
from .common import (barh, finish_machine, fmt, machine_info, machine_line, minmax, peak_rss_mb, report,
                     run_worker, stats, worker_main)

QUESTION = "What is in the image? Describe it."


def bench_frame() -> np.ndarray:
    """The deterministic 640x480 camera-like frame every configuration answers about."""
    from ..synthetic import pattern_frame
    return pattern_frame(480, 640, seed=0)


def run_ours(a, library: str = "auto") -> dict:
    from ...core.generation import GenerationParams
    from ...core.pipeline import LlamaCppOptions, LoadOptions, load_model
    model = load_model(a.artifacts, LoadOptions(vision_backend="onnxruntime", decoder="llamacpp",
                                                quant=a.quant, threads=a.threads,
                                                vision_dtype=a.vision_dtype,
                                                llamacpp=LlamaCppOptions(library=library)))
    frame = bench_frame()
    params = GenerationParams(max_new_tokens=a.tokens, min_new_tokens=a.tokens)
    vision, ttft, total = [], [], []
    for i in range(a.repeats + 1):
        t0 = time.perf_counter()
        [emb] = model.encode([frame])                     # a new frame arrives (not part of the question)
        vision.append((time.perf_counter() - t0) * 1e3)
        model.ask(QUESTION, emb, GenerationParams(max_new_tokens=1))   # the frame's first question
        t0 = time.perf_counter()
        gen = model.ask(QUESTION, emb, params)            # the measured question: frame already seen
        elapsed = (time.perf_counter() - t0) * 1e3
        assert gen.completion_tokens == a.tokens, gen.completion_tokens
        if i:                                             # the first round is the warm-up
            ttft.append(gen.first_token_ms)
            total.append(elapsed)
    return {"config": f"ours: onnxruntime {a.vision_dtype} vision + {model.decoder.library} {a.quant}",
            "ttft_ms": stats(ttft),
            "total_ms": stats(total), "ttft_ms_all": ttft, "total_ms_all": total, "vision_ms": stats(vision[1:]),
            "peak_rss_mb": peak_rss_mb(), "model": model.describe()}


def run_reference(a) -> dict:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ...core.checkpoint import load_checkpoint
    from ...core.prompt import build_prompt
    from ...core.tokenizer import Tokenizer
    from ...core.projectors import build_projector
    from ...core.preprocess import CLIP_MEAN, CLIP_STD, pad_to_square

    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(a.model)
    cfg, vcfg = ckpt.config, ckpt.vision.config
    hf_vcfg = CLIPVisionConfig(hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size,
                               num_hidden_layers=vcfg.num_hidden_layers,
                               num_attention_heads=vcfg.num_attention_heads, image_size=vcfg.image_size,
                               patch_size=vcfg.patch_size, hidden_act=vcfg.hidden_act)
    vision = CLIPVisionModel(hf_vcfg).eval()
    vision.load_state_dict({k: v.float() for k, v in ckpt.vision.state.items()
                            if k in vision.state_dict()}, strict=False)
    projector = build_projector(cfg.projector_type, cfg.mm_hidden_size, cfg.llm.hidden_size).eval()
    projector.load_state_dict({k: v.float() for k, v in ckpt.projector_state().items()})
    l = cfg.llm
    llm_cfg = LlamaConfig(
        hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
        num_hidden_layers=l.num_hidden_layers, num_attention_heads=l.num_attention_heads,
        num_key_value_heads=l.num_key_value_heads, vocab_size=l.vocab_size,
        max_position_embeddings=l.max_position_embeddings, rms_norm_eps=l.rms_norm_eps,
        rope_theta=l.rope_theta, tie_word_embeddings=False)
    with torch.device("meta"):          # no random init: one float32 copy of the weights, not two
        llm = LlamaForCausalLM(llm_cfg)
    llm.load_state_dict({k: v.float() for k, v in ckpt.llm_state().items() if "rotary_emb" not in k},
                        assign=True)
    llm.model.rotary_emb = LlamaRotaryEmbedding(llm_cfg)    # its buffer is computed, not stored
    llm.eval()
    processor = CLIPImageProcessor(size={"shortest_edge": vcfg.image_size},
                                   crop_size={"height": vcfg.image_size, "width": vcfg.image_size},
                                   image_mean=CLIP_MEAN.tolist(), image_std=CLIP_STD.tolist())
    tok = Tokenizer(ckpt.tokenizer_path)
    del ckpt
    frame = bench_frame()

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.t = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                self.t = time.perf_counter()
            return scores

    ttft, total = [], []
    for i in range(a.repeats + 1):
        with torch.inference_mode():
            t0 = time.perf_counter()
            pixels = processor(images=pad_to_square(frame), return_tensors="pt")["pixel_values"]
            feats = vision(pixels, output_hidden_states=True).hidden_states[cfg.select_layer][:, 1:]
            image = projector(feats)
            p = build_prompt(tok, QUESTION, image.shape[1])
            embeds = torch.cat([llm.get_input_embeddings()(torch.tensor([p.prefix])), image,
                                llm.get_input_embeddings()(torch.tensor([p.suffix]))], dim=1)
            first = FirstToken()
            out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                               max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False,
                               num_beams=1, logits_processor=LogitsProcessorList([first]),
                               pad_token_id=0, eos_token_id=tok.eos_id)
            elapsed = (time.perf_counter() - t0) * 1e3
        assert out.shape[-1] == a.tokens, out.shape
        if i:
            ttft.append((first.t - t0) * 1e3)
            total.append(elapsed)
    return {"config": "reference-style: PyTorch fp32, re-encode + transformers generate",
            "ttft_ms": stats(ttft), "total_ms": stats(total), "ttft_ms_all": ttft, "total_ms_all": total,
            "peak_rss_mb": peak_rss_mb()}


WORKERS = {"ours": run_ours, "ours-llamacpp": lambda a: run_ours(a, library="llama.cpp"), "reference": run_reference}


def _work(job: dict) -> dict:
    return WORKERS[job.pop("config")](argparse.Namespace(**job))


def ensure_artifacts(a) -> Path:
    if a.artifacts:
        return Path(a.artifacts)
    out = Path(a.out) / "artifacts"
    if not (out / "manifest.json").is_file():
        from ..export import main as export_main
        rc = export_main(["--model", str(a.model), "--out", str(out), "--quant", a.quant,
                          "--vision-dtype", a.vision_dtype])
        if rc:
            raise SystemExit(f"export failed ({rc})")
    return out


def run(a) -> dict:
    configs = [c for c in a.configs.split(",") if c]
    bad = [c for c in configs if c not in WORKERS]
    if bad:
        raise SystemExit(f"mobilevlm-bench question: unknown configuration {bad} (choose from {', '.join(WORKERS)})")
    lacking = missing("torch", "transformers") if "reference" in configs else []
    if lacking:     # before any work: the baseline runs last, in a worker process
        raise SystemExit(f"mobilevlm-bench question: the reference configuration (the official script's "
                         f"transformers generate) needs {' and '.join(lacking)}, {install_hint(lacking)}; "
                         f"or leave it out: --configs ours")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if any(c.startswith("ours") for c in configs):
        a.artifacts = str(ensure_artifacts(a))
    info = machine_info(a.threads)
    rows = []
    for name in configs:
        print(f"[bench question] {name} ...", file=sys.stderr, flush=True)
        job = {"config": name, "model": str(a.model), "artifacts": a.artifacts, "quant": a.quant,
               "vision_dtype": a.vision_dtype, "tokens": a.tokens, "repeats": a.repeats, "threads": a.threads}
        rows.append({"name": name, **run_worker("mobilevlm_ros.tools.bench.question", job, a.timeout)})
    result = {"benchmark": "question", "model": str(a.model), "question": QUESTION, "tokens": a.tokens,
              "repeats": a.repeats, "machine": finish_machine(info), "configs": rows}
    by = {r["name"]: r for r in rows}
    if "ours" in by and "reference" in by:
        result["speedup_total"] = by["reference"]["total_ms"]["median"] / by["ours"]["total_ms"]["median"]
        result["speedup_ttft"] = by["reference"]["ttft_ms"]["median"] / by["ours"]["ttft_ms"]["median"]
    return result


def table(result: dict) -> str:
    n = result["tokens"]
    lines = [f"| configuration | time to first token ms | {n}-token answer ms | tokens/s after the first | "
             "peak RSS MB |", "|---|---|---|---|---|"]
    for r in result["configs"]:
        rate = stats([(n - 1) / ((t - f) / 1e3) for t, f in zip(r["total_ms_all"], r["ttft_ms_all"])])
        lines.append(f"| {r['config']} | {fmt(r['ttft_ms'], 0)} | {fmt(r['total_ms'], 0)} | {fmt(rate)} | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines.append("")
    lines.append(f"Medians (min–max) of {result['repeats']} questions after a warm-up: \"{result['question']}\", "
                 f"{n} tokens forced; {machine_line(result['machine'])}.")
    if "speedup_total" in result:
        lines.append(f"reference / ours: {result['speedup_total']:.1f}x for the whole answer, "
                     f"{result['speedup_ttft']:.1f}x to the first token.")
    return "\n".join(lines)


def plot(result: dict, ax) -> None:
    labels, values, errors, colors = [], [], [], []
    for r in result["configs"]:
        for what, key, color in (("first token", "ttft_ms", "tab:cyan"), ("whole answer", "total_ms", "tab:blue")):
            labels.append(f"{r['name']}: {what}")
            values.append(r[key]["median"])
            errors.append(minmax(r[key]))
            colors.append(color if r["name"] == "ours" else "tab:gray")
    barh(ax, labels, values, errors, xlabel=f"ms (median, min–max), {result['tokens']} tokens",
         title="A question about a frame already seen", color=colors)
    ax.set_xscale("log")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = worker_main(argv, _work)
    if code is not None:
        return code
    ap = argparse.ArgumentParser(prog="mobilevlm-bench question", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (e.g. make-tiny --dims 1.7b)")
    ap.add_argument("--artifacts", help="exported folder; default: export into OUT/artifacts")
    ap.add_argument("--quant", default="q4_k_m", choices=QUANTS)
    ap.add_argument("--vision-dtype", default="fp32", choices=DTYPES, help="ONNX graph for ours")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--configs", default="ours,reference")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--out", default="results/question")
    a = ap.parse_args(argv)
    return report("question", lambda: run(a), table, a.out, plot, errors=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())

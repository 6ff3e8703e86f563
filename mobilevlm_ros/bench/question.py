"""Question latency with the frame already seen, next to the pipeline users have today.

    mobilevlm-bench question --model CKPT [--artifacts DIR] [--quant q4_k_m] [--tokens 32]
                             [--repeats 5] [--threads N] [--out DIR] [--configs ours,reference]

`ours`: ONNX Runtime vision + llama.cpp (the frame was encoded when it arrived; a question evaluates
only its own text and the answer). `reference`: what the official inference script does, PyTorch
float32 with transformers: CLIP + projector re-run for every question, then `generate` over the whole
prompt. Both answer the same question about the same image with exactly `--tokens` generated tokens
(EOS suppressed). Each configuration runs in its own process, so its peak resident memory is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import peak_rss_mb, stats, write_results

QUESTION = "What is in the image? Describe it."


def bench_frame() -> np.ndarray:
    """A deterministic 640x480 camera-like frame."""
    y, x = np.mgrid[0:480, 0:640]
    img = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], axis=-1).astype(np.uint8)
    img[100:260, 200:380] = (220, 40, 40)
    return img


def run_ours(a) -> dict:
    from ..core.generation import GenerationParams
    from ..core.pipeline import LoadOptions, load_model
    model = load_model(a.artifacts, LoadOptions(vision_backend="onnxruntime", decoder="llamacpp",
                                                quant=a.quant, threads=a.threads,
                                                vision_dtype=a.vision_dtype))
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
    return {"config": f"ours: onnxruntime {a.vision_dtype} vision + llama.cpp {a.quant}", "ttft_ms": stats(ttft),
            "total_ms": stats(total), "vision_ms": stats(vision[1:]),
            "peak_rss_mb": peak_rss_mb(), "model": model.describe()}


def run_reference(a) -> dict:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers import LogitsProcessor, LogitsProcessorList

    from ..core.checkpoint import load_checkpoint
    from ..core.prompt import build_prompt
    from ..core.tokenizer import Tokenizer
    from ..core.projectors import build_projector
    from ..core.preprocess import CLIP_MEAN, CLIP_STD, pad_to_square

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
    llm = LlamaForCausalLM(LlamaConfig(
        hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
        num_hidden_layers=l.num_hidden_layers, num_attention_heads=l.num_attention_heads,
        num_key_value_heads=l.num_key_value_heads, vocab_size=l.vocab_size,
        max_position_embeddings=l.max_position_embeddings, rms_norm_eps=l.rms_norm_eps,
        rope_theta=l.rope_theta, tie_word_embeddings=False)).eval()
    llm.load_state_dict({k: v.float() for k, v in ckpt.llm_state().items() if "rotary_emb" not in k})
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
            "ttft_ms": stats(ttft), "total_ms": stats(total), "peak_rss_mb": peak_rss_mb()}


WORKERS = {"ours": run_ours, "reference": run_reference}


def ensure_artifacts(a) -> Path:
    if a.artifacts:
        return Path(a.artifacts)
    out = Path(a.out) / "artifacts"
    if not (out / "manifest.json").is_file():
        from ..tools.export import main as export_main
        rc = export_main(["--model", str(a.model), "--out", str(out), "--quant", a.quant])
        if rc:
            raise SystemExit(f"export failed ({rc})")
    return out


def table(rows) -> str:
    lines = ["| configuration | time to first token (ms) median [min-max] | 32-token answer (ms) median "
             "[min-max] | peak RSS (MB) |", "|---|---|---|---|"]
    for r in rows:
        t, tt = r["ttft_ms"], r["total_ms"]
        lines.append(f"| {r['config']} | {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | "
                     f"{tt['median']:.0f} [{tt['min']:.0f}-{tt['max']:.0f}] | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-bench question", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (e.g. make-tiny --dims 1.7b)")
    ap.add_argument("--artifacts", help="exported folder; default: export into OUT/artifacts")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--vision-dtype", default="fp32", help="ONNX graph for ours: fp32|fp16|int8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--configs", default="ours,reference")
    ap.add_argument("--out", default="results/question")
    ap.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return 0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    a.artifacts = str(ensure_artifacts(a)) if "ours" in a.configs else a.artifacts
    rows = []
    for name in a.configs.split(","):
        cmd = [sys.executable, "-m", "mobilevlm_ros.bench.question", "--worker", name, "--model", str(a.model),
               "--quant", a.quant, "--vision-dtype", a.vision_dtype, "--tokens", str(a.tokens), "--repeats", str(a.repeats),
               "--threads", str(a.threads), "--out", a.out]
        if a.artifacts:
            cmd += ["--artifacts", a.artifacts]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    md = table(rows)
    if len(rows) == 2:
        ratio = rows[1]["total_ms"]["median"] / rows[0]["total_ms"]["median"]
        md += f"\n\nreference / ours, 32-token answer: {ratio:.1f}x"
    print(md)
    write_results(a.out, "question", rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

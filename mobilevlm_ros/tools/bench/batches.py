"""What a question's own text costs by its length: the batch a question evaluates after a frame
already in the decoder (all of its time to first token), as the decoder pads it and unpadded.

    mobilevlm-bench batches --model ART [--quant q4_k_m] [--sizes 1-33] [--repeats 5] [--threads N]
                            [--library auto|llama.cpp|ik_llama.cpp] [--pad-max N] [--out DIR]

One frame is encoded and its image tokens evaluated once; then, for every size n in --sizes, a
question of n tokens (the start of a long question's text) is answered with one new token from that
frame, and the decoder's `text_prefill_ms` is recorded: with the decoder's padding (a batch up to
`pad_max` short of a multiple of 16 is padded to it) and with none. Sizes and both variants are
interleaved in a new random order each repeat; figures are medians (min–max). On CPUs, llama.cpp's
repacked kernels multiply 16 rows at a time and take the rest row by row, which is what the padding
rule is chosen from; ik_llama.cpp's take any row count at about the same cost per row, so it gets no
padding (--pad-max 4 shows what padding would cost it). Writes OUT/batches.json, OUT/batches.md, OUT/batches.png.
"""
from __future__ import annotations

import argparse
import random
import sys

from ...core.decoders.llama_library import LLAMA_LIBRARIES
from ...core.pipeline import QUANTS, LoadOptions
from .common import finish_machine, fmt, machine_info, machine_line, report, stats

QUESTION = ("Look at the picture from the robot's front camera and tell me in detail which objects are "
            "on the table, where the door is, whether it is open, and what the person near the window "
            "is holding in their hands right now, please.")


def parse_sizes(text: str) -> list[int]:
    """'1-33' or '8,12,16' (or both, comma-separated) -> sorted sizes >= 1."""
    sizes = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        sizes.update(range(int(lo), int(hi or lo) + 1))
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be >= 1: {text!r}")
    return sorted(sizes)


def run(a) -> dict:
    from ...core.decoders.llama_batch import padded_length
    from ...core.generation import GenerationParams
    from ...core.pipeline import LlamaCppOptions, LoadOptions, load_model
    from ...core.prompt import PromptIds
    from ..synthetic import pattern_frame

    model = load_model(a.model, LoadOptions(vision_backend="onnxruntime", decoder="llamacpp", quant=a.quant,
                                            threads=a.threads, vision_dtype="auto",
                                            llamacpp=LlamaCppOptions(library=a.library)))
    try:
        dec = model.decoder
        if not hasattr(dec, "pad_max"):
            raise ValueError(f"{a.model}: the batches bench needs the llamacpp decoder")
        machine = machine_info(dec.threads)
        shipped_pad = dec.pad_max if a.pad_max < 0 else a.pad_max
        [emb] = model.encode([pattern_frame(480, 640, seed=0)])
        base = model.prompt(QUESTION)
        text = base.suffix
        sizes = [n for n in parse_sizes(a.sizes) if n <= len(text)]
        one = GenerationParams(max_new_tokens=1)
        times = {(n, pad): [] for n in sizes for pad in (True, False)}
        dec.generate(PromptIds(base.prefix, text[:sizes[-1]], base.image_tokens), emb, one)   # frame + warm-up
        order = list(times)
        rng = random.Random(0)
        for _ in range(a.repeats):
            rng.shuffle(order)
            for n, pad in order:
                dec.pad_max = shipped_pad if pad else 0
                gen = dec.generate(PromptIds(base.prefix, text[:n], base.image_tokens), emb, one)
                times[(n, pad)].append(gen.timings["text_prefill_ms"])
        dec.pad_max = shipped_pad
        rows = [{"tokens": n, "evaluated": padded_length(n, shipped_pad),
                 "ms": stats(times[(n, True)]), "ms_unpadded": stats(times[(n, False)])} for n in sizes]
        return {"benchmark": "batches", "model": str(a.model), "quant": a.quant, "library": dec.library,
                "pad_max": shipped_pad, "decoder_pad_max": dec.pad_max,
                "repeats": a.repeats, "rows": rows, "machine": finish_machine(machine),
                "decoder": dec.describe()}
    finally:
        model.close()


def table(r: dict) -> str:
    lines = ["| question tokens | evaluated (padding) | ms as the decoder does it | ms unpadded | ms per token |",
             "|---|---|---|---|---|"]
    for row in r["rows"]:
        per = row["ms"]["median"] / row["tokens"] if row["ms"]["median"] else float("nan")
        lines.append(f"| {row['tokens']} | {row['evaluated']} | {fmt(row['ms'])} | {fmt(row['ms_unpadded'])} "
                     f"| {per:.1f} |")
    lines.append("")
    lines.append(f"Medians (min–max) of {r['repeats']} interleaved repeats: the text_prefill_ms of a question of "
                 f"that many tokens after a frame already in the decoder ({r.get('library', 'llama.cpp')} "
                 f"{r['quant']}, pad_max {r['pad_max']}); "
                 f"{machine_line(r['machine'])}.")
    return "\n".join(lines)


def plot(r: dict, ax) -> None:
    n = [row["tokens"] for row in r["rows"]]
    ax.plot(n, [row["ms_unpadded"]["median"] for row in r["rows"]], "o-", label="unpadded")
    ax.plot(n, [row["ms"]["median"] for row in r["rows"]], "s--", label=f"as the decoder does it (pad_max {r['pad_max']})")
    ax.set_xlabel("question tokens")
    ax.set_ylabel("ms (time to first token)")
    ax.set_title(f"question batch cost, {r['quant']}")
    ax.grid(alpha=0.3)
    ax.legend()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-bench batches", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="artifacts folder (mobilevlm-export)")
    ap.add_argument("--quant", default=LoadOptions.quant, choices=QUANTS)
    ap.add_argument("--sizes", default="1-33", help="question lengths in tokens: 1-33 or 8,12,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = every core this process may use")
    ap.add_argument("--library", default="auto", choices=("auto", *LLAMA_LIBRARIES),
                    help="llama.cpp library (auto: as the node)")
    ap.add_argument("--pad-max", type=int, default=-1,
                    help="padding rule of the padded runs (default -1: the library's own, 0 for ik_llama.cpp)")
    ap.add_argument("--out", help="folder for batches.json, batches.md and batches.png")
    a = ap.parse_args(argv)
    return report("batches", lambda: run(a), table, a.out, plot, errors=(ValueError,), error_code=2)


if __name__ == "__main__":
    sys.exit(main())

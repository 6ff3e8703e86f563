"""mobilevlm-ask-image: answer one question about one image file, from a checkpoint or artifacts folder.

    mobilevlm-ask-image --model PATH --image IMG --question Q [--max-new-tokens N] [--temperature T]
                  [--top-p P] [--seed S] [--vision-backend B] [--decoder D] [--quant Q] [--json]

Errors go to stderr with exit code 2 (bad input) or 1 (model could not be loaded).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

from ..core.errors import MobileVLMError, ModelLoadError
from ..core.onnx_export import VISION_DTYPES
from ..core.pipeline import DECODERS, QUANTS, VISION_BACKENDS, LoadOptions


def read_image(path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise MobileVLMError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise MobileVLMError(f"cannot read image {path}: {e}") from None


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Model and backend options shared by the command-line tools."""
    ap.add_argument("--model", required=True, help="checkpoint folder or exported artifacts folder")
    ap.add_argument("--vision-backend", default="auto", choices=("auto", *VISION_BACKENDS),
                    help="auto: torch for a checkpoint, onnxruntime for artifacts")
    ap.add_argument("--decoder", default="auto", choices=("auto", *DECODERS),
                    help="auto: torch for a checkpoint, llamacpp for artifacts")
    ap.add_argument("--quant", default=LoadOptions.quant, choices=QUANTS, help="GGUF for --decoder llamacpp")
    ap.add_argument("--vision-dtype", default="auto", choices=VISION_DTYPES, help="ONNX vision graph (auto: int8 on "
                    "a CPU when manifest.json records its fidelity, else fp32; fp16 on a GPU); --vision-backend torch: "
                    "fp32 or bf16 (autocast, for CPUs with AMX / AVX512_BF16)")
    ap.add_argument("--vision-tower", default=None, help="CLIP folder for V1 checkpoints")
    ap.add_argument("--device", default="cpu", help="torch backends: cpu|cuda")
    ap.add_argument("--threads", type=int, default=0, help="0 = library default")


def add_generation_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)


def load_from_args(a):
    from ..core.pipeline import load_model
    return load_model(a.model, LoadOptions(vision_backend=a.vision_backend, decoder=a.decoder,
                                           quant=a.quant, vision_dtype=a.vision_dtype,
                                           vision_tower=a.vision_tower, device=a.device,
                                           threads=a.threads))


def params_from_args(a):
    from ..core.generation import GenerationParams
    return GenerationParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            seed=a.seed)                    # RequestError naming a bad setting


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-ask-image", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    add_generation_args(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        params = params_from_args(a)
        image = read_image(a.image)
        t0 = time.perf_counter()
        model = load_from_args(a)
        load_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        [emb] = model.encode([image])
        gen = model.ask(a.question, emb, params)
        total_ms = (time.perf_counter() - t0) * 1e3
    except ModelLoadError as e:
        print(f"mobilevlm-ask-image: cannot load model: {e}", file=sys.stderr)
        return 1
    except MobileVLMError as e:
        print(f"mobilevlm-ask-image: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({
            "answer": gen.text, "answer_ids": gen.ids, "finish_reason": gen.finish_reason,
            "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "model": model.describe(),
            "timings_ms": {"load": round(load_ms, 2), "vision": round(emb.vision_ms, 2),
                           "prefill": round(gen.prefill_ms, 2), "decode": round(gen.decode_ms, 2),
                           "first_token": round(gen.first_token_ms, 2), "total": round(total_ms, 2)},
        }))
    else:
        print(gen.text)
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

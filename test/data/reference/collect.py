"""Collect the official MobileVLM implementation's outputs into the fixtures test_reference_parity.py reads.

How the inputs were produced (outside this repository, never committed): the official code
(Meituan-AutoML/MobileVLM at 688fdec, transformers 4.33.1, torch 2.14.1 CPU float32, greedy,
`scripts/inference.py`'s path) was run on `mobilevlm-make-tiny OUT --projector ldpnet|ldpnetv2
--dims tiny --seed 0` checkpoints, with the three images here and the three questions below, 24 new
tokens, dumping pixel_values and image_embeds. Usage: python collect.py RESULTS_DIR > reference.json
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

QUESTIONS = ["What is in the image?", "Describe the scene in detail.", "Is there a red object?"]
SUB = 7            # keep every 7th pixel row/column of pixel_values (3 x 48 x 48)
EMB_TOKENS = 8     # keep the first 8 image embeddings


def main(results: Path):
    out = {"official_commit": "688fdec914810485c8766da96c63d9d2ce15f750", "transformers": "4.33.1",
           "questions": QUESTIONS, "max_new_tokens": 24, "cases": []}
    here = Path(__file__).parent
    for ck in ("tiny-v1", "tiny-v2"):
        for f in sorted((results / ck).glob("*.json")):
            r = json.loads(f.read_text())
            image, q = f.stem.split("__")
            dump = f.with_suffix(".dump")
            px = np.load(dump / "pixel_values.npy")[0][:, ::SUB, ::SUB].astype(np.float32)
            emb = np.load(dump / "image_embeds.npy")[0][:EMB_TOKENS].astype(np.float32)
            if q == "0":
                np.save(here / f"{ck}__{image}__pixels.npy", px)
                np.save(here / f"{ck}__{image}__embeds.npy", emb)
            out["cases"].append({"checkpoint": ck, "image": image + ".png", "question": QUESTIONS[int(q)],
                                 "input_ids": r["input_ids"], "output_ids": r["output_ids"],
                                 "answer": r["answer"]})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

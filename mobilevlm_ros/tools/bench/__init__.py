"""mobilevlm-bench: the numbers a robotics team chooses by, one sub-benchmark per command.

    mobilevlm-bench all      [--dims 1.7b,3b]       everything below on random-weight checkpoints at real
                                                    dimensions (made once), one results folder with a
                                                    summary table (summary.md) and plot (summary.png)
    mobilevlm-bench question --model CKPT ...       question latency with the frame already seen vs the
                                                    reference-style pipeline (re-encode + HF generate)
    mobilevlm-bench decoder  --model CKPT|ART ...   prompt-eval and decode tok/s per quant vs llama.cpp,
                                                    and the memory-bandwidth ceiling measured in the run
    mobilevlm-bench vision   --model CKPT ...       vision latency / frames/s per backend, batch 1 and 4
    mobilevlm-bench memory   --model ART ...        node peak RSS per configuration vs a device budget
    mobilevlm-bench node     --model ART ...        camera streams into the node while it answers:
                                                    callback CPU, frames received/encoded, frame age
    mobilevlm-bench batches  --model ART ...        a question's own text by its length in tokens (its
                                                    time to first token), padded as the decoder does it
                                                    and unpadded
    mobilevlm-bench bandwidth [--gguf FILE]         memory bandwidth and the decode ceiling it allows
    mobilevlm-bench images   [--sizes 640x480,...]  camera frame to RGB per raw encoding (Bayer, YUV,
                                                    16-bit ...), JPEG/PNG decoding OpenCV vs Pillow
    mobilevlm-bench fidelity [--out DIR] [--quick]  each GGUF quantization and the int8 vision graph
                                                    against the float32 reference on a trained LM
                                                    (SmolLM2 test model): answers, top token, KL
    mobilevlm-bench fleet    --model ART ...        many bags: serial replays against a fleet run on
                                                    1 and 2 Ray workers, and a projection to K machines

Each writes NAME.json, NAME.md and NAME.png into --out. Benchmarks are never part of the test suite;
run them on an otherwise idle machine.
"""
from __future__ import annotations

import importlib
import sys

from ..dev_packages import needs_dev_packages

SUBCOMMANDS = {"vision": "mobilevlm_ros.tools.bench.vision", "decoder": "mobilevlm_ros.tools.bench.decoder",
               "question": "mobilevlm_ros.tools.bench.question", "memory": "mobilevlm_ros.tools.bench.memory",
               "node": "mobilevlm_ros.tools.bench.node", "bandwidth": "mobilevlm_ros.tools.bench.bandwidth",
               "images": "mobilevlm_ros.tools.bench.images", "batches": "mobilevlm_ros.tools.bench.batches",
               "fidelity": "mobilevlm_ros.tools.bench.fidelity", "fleet": "mobilevlm_ros.tools.bench.fleet",
               "all": "mobilevlm_ros.tools.bench.all"}


@needs_dev_packages("mobilevlm-bench")
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

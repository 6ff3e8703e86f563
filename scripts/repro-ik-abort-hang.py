"""Reproduce ik_llama.cpp's abort hang (docs/llama-library.md): prefills of the tiny model, each
interrupted after 1-9 graph polls; a hang prints the stack and exits 1 after the timeout.
Usage: .venv/bin/python scripts/repro-ik-abort-hang.py [LIBRARY] [N] [TIMEOUT_S]
(LIBRARY llama.cpp or ik_llama.cpp; MOBILEVLM_IK_LLAMA_DIR picks another ik_llama.cpp build)."""
import faulthandler
import pathlib
import sys

import numpy as np

from mobilevlm_ros.core.decoders.llamacpp_decoder import LlamaCppDecoder
from mobilevlm_ros.core.prompt import build_prompt
from mobilevlm_ros.core.tokenizer import Tokenizer
from mobilevlm_ros.core.vision import ImageEmbedding

library, n, timeout = (sys.argv[1:] + ["ik_llama.cpp", "300", "60"][len(sys.argv) - 1:])[:3]
faulthandler.dump_traceback_later(float(timeout), exit=True)
art = pathlib.Path(__file__).resolve().parent.parent / "models" / "tiny-v2-artifacts"
tok = Tokenizer(str(art / "tokenizer.model"))
d = LlamaCppDecoder(art / "llm-f16.gguf", tok, library=library, threads=2, frame_tail=True)
rng = np.random.default_rng(0)
for i in range(int(n)):
    img = ImageEmbedding(rng.standard_normal((144, d.n_embd)).astype(np.float32))
    polls = []
    stop_after = 1 + i % 9
    stop = lambda: polls.append(1) or len(polls) >= stop_after  # noqa: E731
    assert d.prefill(build_prompt(tok, "", 144), img, stop) is False
    print(i + 1, end=" ", flush=True)
print(f"\n{library}: {n} interrupted prefills, no hang")

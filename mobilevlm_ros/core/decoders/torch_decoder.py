"""The reference decoder: the LLaMA of llama.py in PyTorch (float32 on CPU, float16 on CUDA)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from ..generation import GenerationParams
from ..llama import LlamaForCausalLM
from ..prompt import PromptIds
from ..tokenizer import Tokenizer
from ..vision import ImageEmbedding
from .base import Decoder, FrameCache, Turn


def sample(logits: torch.Tensor, params: GenerationParams, generator: Optional[torch.Generator]) -> int:
    """Greedy, or temperature then nucleus (top_p) sampling, as transformers' generate applies them."""
    logits = logits.float()
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False                          # always keep the most likely token
        logits = logits.scatter(0, order[remove], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class TorchDecoder(Decoder):
    name = "torch"

    def __init__(self, llm: LlamaForCausalLM, tokenizer: Tokenizer, max_kv_states: int = 4,
                 device: str = "cpu"):
        self.llm, self.tok, self.device = llm.eval(), tokenizer, torch.device(device)
        self.dtype = next(llm.parameters()).dtype
        self._prefix: dict = {}
        self._frames = FrameCache(max_kv_states)

    @classmethod
    def from_state(cls, cfg, state: dict, tokenizer: Tokenizer, device: str = "cpu", **kw):
        dtype = torch.float32 if device == "cpu" else torch.float16
        with torch.device("meta"):
            llm = LlamaForCausalLM(cfg)
        missing = [k for k in llm.state_dict() if k not in state]
        if missing:
            from ..errors import ModelLoadError
            raise ModelLoadError(f"checkpoint lacks LLM weight '{missing[0]}' (and {len(missing) - 1} more)")
        llm.load_state_dict({k: state[k].to(dtype) for k in llm.state_dict()}, strict=True, assign=True)
        return cls(llm.to(device), tokenizer, device=device, **kw)

    def describe(self) -> dict:
        return {"decoder": self.name, "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device)}

    def _ids(self, ids) -> torch.Tensor:
        return self.llm.embed(torch.tensor([list(ids)], device=self.device))

    @torch.inference_mode()
    def frame_kv(self, prompt: PromptIds, image: ImageEmbedding):
        """KV after prefix + image tokens (evaluated now unless cached), and whether it came from
        the cache; the first step of a teacher-forced measurement too (tools/bench/fidelity.py)."""
        key = (image.key, prompt.prefix)
        kv = self._frames.get_fresh(key)
        if kv is not None:
            return kv, True
        if prompt.prefix not in self._prefix:
            self._prefix = {prompt.prefix: self.llm(self._ids(prompt.prefix))[1]}
        emb = torch.from_numpy(np.ascontiguousarray(image.embeds, dtype=np.float32)).to(self.device, self.dtype)
        kv = self.llm(emb[None], self._prefix[prompt.prefix])[1]
        self._frames.put(key, kv)
        return kv, False

    @torch.inference_mode()
    def prefill(self, prompt: PromptIds, image: ImageEmbedding,
                interrupt: Optional[Callable[[], bool]] = None) -> bool:
        if interrupt is not None and interrupt():      # the image goes in one call: check once
            return False
        return not self.frame_kv(prompt, image)[1]

    def _turn(self, prompt: PromptIds, image: ImageEmbedding, params: GenerationParams) -> "_TorchTurn":
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2 ** 32))
        kv, cached = self.frame_kv(prompt, image)
        return _TorchTurn(self, kv, cached, params, gen)


class _TorchTurn(Turn):
    def __init__(self, dec: TorchDecoder, kv, cached: bool, params: GenerationParams, gen):
        self.dec, self.kv, self.frame_cached, self.params, self.gen = dec, kv, cached, params, gen
        self.logits, self.timings = None, {}

    @torch.inference_mode()
    def eval_text(self, ids) -> None:
        self.logits, self.kv = self.dec.llm(self.dec._ids(ids), self.kv)

    def sample(self) -> int:
        return sample(self.logits[0, -1], self.params, self.gen)

    @torch.inference_mode()
    def feed(self, token: int) -> bool:
        self.logits, self.kv = self.dec.llm(self.dec._ids([token]), self.kv)
        return True

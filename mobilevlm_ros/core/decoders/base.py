"""The decoder interface. A decoder answers a prompt whose image slot is filled with precomputed
embeddings; it keeps the KV of the fixed prompt prefix and of the last few frames' image tokens, so a
question about a frame it has seen pays only for its own text and answer."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, Optional

from ..generation import AnswerBuilder, Generation, GenerationParams, TokenCallback
from ..prompt import PromptIds
from ..vision import ImageEmbedding


class Turn(ABC):
    """One answer in progress on a decoder (Decoder._turn): the frame's state in place, then the
    question's text, then one token at a time."""
    frame_cached: bool = False          # the frame's image tokens came from the cache
    timings: dict                       # decoder-specific extras for Generation.timings

    @abstractmethod
    def eval_text(self, ids) -> None:
        """Evaluate the question's own tokens after the frame."""

    @abstractmethod
    def sample(self) -> int:
        """The next token from the logits of the last evaluated position."""

    @abstractmethod
    def feed(self, token: int) -> bool:
        """Evaluate one generated token; False when the context has no room for it."""

    def close(self) -> None:
        """Release what the turn holds (always called)."""


class Decoder(ABC):
    name = "decoder"

    def generate(self, prompt: PromptIds, image: ImageEmbedding, params: GenerationParams,
                 on_token: Optional[TokenCallback] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> Generation:
        """Answer `prompt` with `image` in its slot. Thread-compatible, not thread-safe: callers
        serialise calls (the node has one generation worker). The loop and its timings are the same
        for every decoder; each gives its evaluation steps through _turn. `params` checked itself
        when it was made."""
        out = AnswerBuilder(self.tok, params, on_token, cancel)
        t0 = time.perf_counter()
        turn = self._turn(prompt, image, params)        # the frame's state in place (cached or evaluated)
        try:
            t_image = time.perf_counter()
            turn.eval_text(prompt.suffix)
            t1 = time.perf_counter()
            first_token_ms = None
            if not out.cancelled():
                while True:
                    token = turn.sample()
                    if first_token_ms is None:
                        first_token_ms = (time.perf_counter() - t0) * 1e3
                    if not out.push(token):
                        break
                    if not turn.feed(token):
                        out.finish_reason = "length"
                        break
            t2 = time.perf_counter()
        finally:
            turn.close()
        return Generation(ids=out.ids, text=out.answer(), finish_reason=out.finish_reason,
                          prompt_tokens=prompt.total, prefill_ms=(t1 - t0) * 1e3,
                          decode_ms=(t2 - t1) * 1e3, first_token_ms=first_token_ms or 0.0,
                          cached_prefix_tokens=len(prompt.prefix) + (prompt.image_tokens if turn.frame_cached else 0),
                          timings={"image_prefill_ms": (t_image - t0) * 1e3,
                                   "text_prefill_ms": (t1 - t_image) * 1e3, **turn.timings})

    @abstractmethod
    def _turn(self, prompt: PromptIds, image: ImageEmbedding, params: GenerationParams) -> Turn:
        """Validate the request and put the frame's state (prefix + image tokens) in place."""

    @abstractmethod
    def prefill(self, prompt: PromptIds, image: ImageEmbedding,
                interrupt: Optional[Callable[[], bool]] = None) -> bool:
        """Evaluate `prompt`'s prefix and `image`'s tokens into the frame cache now (while the caller
        is idle), so that a question about this frame evaluates only its own text. True if it was
        evaluated, False if it was cached already or `interrupt` (polled between chunks, where the
        decoder supports that) returned True first. Same threading rules as generate."""

    def kv_state_keys(self) -> list:
        """Keys (ImageEmbedding.key) of the frames whose image tokens are cached, least recently used
        first. Subclasses keep them in self._frames, a FrameCache keyed by (image key, prompt prefix).
        Safe to call from another thread (a copy is taken at once)."""
        return [k[0] for k in list(self._frames)]

    def kv_state_bytes(self) -> int:
        """Host memory held by the saved KV states; 0 where the decoder does not count it."""
        return 0

    def describe(self) -> dict:
        return {"decoder": self.name}

    def close(self) -> None:
        """Release native resources; the decoder is unusable afterwards."""


class FrameCache(OrderedDict):
    """LRU of per-frame decoder state keyed by ImageEmbedding.key, bounded in entries."""

    def __init__(self, capacity: int, on_evict: Optional[Callable] = None):
        super().__init__()
        self.capacity, self.on_evict = max(1, int(capacity)), on_evict

    def get_fresh(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            old_key, old = self.popitem(last=False)
            if self.on_evict:
                self.on_evict(old_key, old)

"""The decoder interface. A decoder answers a prompt whose image slot is filled with precomputed
embeddings; it keeps the KV of the fixed prompt prefix and of the last few frames' image tokens, so a
question about a frame it has seen pays only for its own text and answer."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, Optional

from ..generation import Generation, GenerationParams, TokenCallback
from ..prompt import PromptIds
from ..vision import ImageEmbedding


class Decoder(ABC):
    name = "decoder"

    @abstractmethod
    def generate(self, prompt: PromptIds, image: ImageEmbedding, params: GenerationParams,
                 on_token: Optional[TokenCallback] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> Generation:
        """Answer `prompt` with `image` in its slot. Thread-compatible, not thread-safe: callers
        serialise calls (the node has one generation worker)."""

    @abstractmethod
    def prefill(self, prompt: PromptIds, image: ImageEmbedding,
                interrupt: Optional[Callable[[], bool]] = None) -> bool:
        """Evaluate `prompt`'s prefix and `image`'s tokens into the frame cache now (while the caller
        is idle), so that a question about this frame evaluates only its own text. True if it was
        evaluated, False if it was cached already or `interrupt` (polled between chunks, where the
        decoder supports that) returned True first. Same threading rules as generate."""

    def teacher_forced_logits(self, prompt: PromptIds, image: ImageEmbedding, ids=()):
        """float32 numpy [len(ids) + 1, vocab]: row j holds the logits that predict ids[j] after the
        prompt and ids[:j]; the last row predicts the token after all of them. For parity checks,
        fidelity (KL divergence) and scoring fixed answers."""
        raise NotImplementedError

    def first_token_logits(self, prompt: PromptIds, image: ImageEmbedding):
        """float32 numpy [vocab]: the logits of the first answer token."""
        return self.teacher_forced_logits(prompt, image, ())[0]

    def cached_frames(self) -> list:
        """Keys (ImageEmbedding.key) of the frames whose image tokens are cached, least recently used
        first. Subclasses keep them in self._frames, a FrameCache keyed by (image key, prompt prefix).
        Safe to call from another thread (a copy is taken at once)."""
        return [k[0] for k in list(self._frames)]

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

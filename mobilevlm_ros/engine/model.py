"""What the engine needs of a model, and nothing more: the boundary between `engine/` and `core/`.

`core.pipeline.MobileVLM` implements it; the engine, replay and tools call a model only through these
methods, never through its vision backend or decoder. A question is tokenized once, at the edge
(`prompt`, when the engine accepts a request), and its prompt ids are what `ask` answers; a
`GenerationParams` is valid once it exists (it checks itself when it is made).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from ..core.generation import Generation, GenerationParams, TokenCallback
from ..core.prompt import PromptIds
from ..core.vision import Abort, ImageEmbedding


@runtime_checkable
class Model(Protocol):
    model_id: str

    def encode(self, frames: Sequence[np.ndarray], *, abort: Optional[Abort] = None) -> List[ImageEmbedding]:
        """uint8 frames in RGB channel order (HxWx3, or HxW mono) -> one embedding each, in one
        batch. Raises EncodeAborted when `abort` is requested before or during the run."""

    def prompt(self, question: str) -> PromptIds:
        """The question tokenized into the model's prompt. Raises RequestError for a question the
        model cannot take (a special token in it)."""

    def ask(self, question: Union[str, PromptIds], image: ImageEmbedding, params: GenerationParams = ...,
            on_token: Optional[TokenCallback] = None,
            cancel: Optional[Callable[[], bool]] = None) -> Generation:
        """Answer a question (its prompt ids from `prompt`, or its text) about `image`. Not
        thread-safe: one caller at a time. Raises RequestError (e.g. the prompt does not fit the
        context) or another MobileVLMError."""

    def prefill(self, image: ImageEmbedding, interrupt: Optional[Callable[[], bool]] = None) -> bool:
        """Evaluate a frame's image tokens ahead of its questions; True if evaluated now, False if
        held already or `interrupt` returned True first. Same threading rule as `ask`."""

    def kv_state_keys(self) -> List[int]:
        """Keys (ImageEmbedding.key) of the frames whose image tokens the decoder holds, least
        recently used first. Safe from any thread."""

    def kv_state_bytes(self) -> int:
        """Host memory of the KV states the decoder keeps (prompt prefix and frames)."""

    def describe(self) -> dict:
        """model_id, backends and settings, for logs and reports."""

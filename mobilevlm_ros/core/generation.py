"""What a generation is asked for and what it returns, and the rules every decoder shares: stop at
EOS or when the text ends with "</s>", at max_new_tokens, or when cancelled between tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import RequestError
from .prompt import STOP_STRING
from .tokenizer import Tokenizer

MAX_NEW_TOKENS_LIMIT = 2048

# Both tokenizers decode the bytes of a character not finished yet (the model spells some characters
# in byte tokens, one byte each) as U+FFFD (SentencePiece: one per byte). Held back from the text
# shown while generating and dropped from the answer: a cut at max_new_tokens would otherwise end in
# it, and the streamed text would show a character that the next token replaces.
UNFINISHED = "\ufffd"

# on_token(token_id, text_so_far) is called after every generated token.
TokenCallback = Callable[[int, str], None]


@dataclass(frozen=True)
class GenerationParams:
    """How to generate; valid once it exists (checked when made, RequestError naming the field), so
    the model and the decoders take it as it is."""
    max_new_tokens: int = 128
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0
    seed: Optional[int] = None      # None = nondeterministic sampling
    min_new_tokens: int = 0         # for benchmarks: ignore EOS/stop text before this many tokens

    def __post_init__(self):
        self.validate()

    def validate(self) -> "GenerationParams":
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise RequestError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 10.0:
            raise RequestError(f"temperature must be a finite number in [0, 10], got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 32:
            raise RequestError(f"seed must be in 0..2^32-1, got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    ids: list[int]                  # generated ids, EOS and a trailing "</s>" excluded
    text: str
    finish_reason: str              # "stop" | "length" | "cancelled"
    prompt_tokens: int
    prefill_ms: float = 0.0         # evaluating what was not cached: image and/or question text
    decode_ms: float = 0.0
    first_token_ms: float = 0.0     # from the start of prefill to the first generated token
    cached_prefix_tokens: int = 0   # prompt tokens whose KV came from the cache
    timings: dict = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)


class AnswerBuilder:
    """Accumulates tokens, applies the stop rules and calls the streaming callback."""

    def __init__(self, tokenizer: Tokenizer, params: GenerationParams,
                 on_token: Optional[TokenCallback] = None, cancel: Optional[Callable[[], bool]] = None):
        self.tok, self.params, self.on_token, self.cancel = tokenizer, params, on_token, cancel
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason = "length"

    def cancelled(self) -> bool:
        if self.cancel is not None and self.cancel():
            self.finish_reason = "cancelled"
            return True
        return False

    def push(self, token: int) -> bool:
        """Record one generated token; False when generation must stop."""
        token = int(token)
        early = len(self.ids) < self.params.min_new_tokens
        if token == self.tok.eos_id and not early:
            self.finish_reason = "stop"
            return False
        self.ids.append(token)
        self.text = self.tok.decode(self.ids)
        if self.text.rstrip().endswith(STOP_STRING) and not early:
            self._drop_stop_string()
            self.finish_reason = "stop"
            return False
        if self.on_token is not None:
            self.on_token(token, self.answer())
        if len(self.ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            return False
        return not self.cancelled()

    def _drop_stop_string(self):
        keep = self.text.rstrip()[: -len(STOP_STRING)]
        while self.ids and len(self.tok.decode(self.ids)) > len(keep):
            self.ids.pop()
        self.text = keep

    def answer(self) -> str:
        """The text so far (the answer once generation has stopped), without an unfinished
        character at its end."""
        return self.text.rstrip(UNFINISHED).strip()

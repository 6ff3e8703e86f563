"""What a client asks the engine and what it gets back.

A `Request` says what to answer about (question, camera, frame stamp, freshness) and how
(generation settings, 0 / negative = the engine's defaults). `Engine.submit` returns a `Ticket` at
once; the ticket completes exactly once with a `Result` whose `status` says how it went. Clients
branch on the status code, never on the error text.
"""
from __future__ import annotations

import math
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, List, Optional

from ..core.errors import RequestError
from ..core.generation import MAX_NEW_TOKENS_LIMIT, GenerationParams


class Status(IntEnum):
    """The outcome of a request; the same values as mobilevlm_ros/msg/Status (a test checks)."""
    OK = 0
    BUSY = 1                # the queue is full: try again later
    INVALID_REQUEST = 2     # the request itself is wrong (empty question, unknown camera, bad setting)
    NO_FRAME = 3            # no frame satisfies it (none yet, too old, bad stamp, undecodable frame)
    CANCELLED = 4           # cancelled by the client, or by the node (deactivated, shutting down)
    MODEL_ERROR = 5         # the vision encoder or the decoder failed
    UNAVAILABLE = 6         # the engine is not serving (not active, stopping)


@dataclass
class Request:
    question: str
    camera: str = ""                    # "" = the default camera
    stamp_ns: int = 0                   # 0 = the latest frame; else the cached frame closest to it
    max_new_tokens: int = 0             # 0 = engine default
    temperature: float = -1.0           # negative = engine default; 0 = greedy
    top_p: float = -1.0                 # negative = engine default
    seed: int = -1                      # -1 = engine default; other negative = a fresh random seed
    max_frame_age_ms: float = 0.0       # 0 = engine default; negative = any cached frame
    kind: str = "service"               # "service" | "action" | "caption": counted and published apart


@dataclass
class Result:
    status: Status
    error: str = ""
    answer: str = ""
    answer_ids: List[int] = field(default_factory=list)
    camera: str = ""
    header: Any = None                  # the answered frame's header, as received (None: no frame)
    stamp_ns: int = 0                   # the answered frame's stamp
    frame_seq: int = 0                  # the engine's number of that frame (0: no frame)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "error"        # stop | length | cancelled | error
    vision_ms: float = 0.0              # encoding this frame for this request (0: it was cached)
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    first_token_ms: float = 0.0         # request taken by the worker -> first token
    total_ms: float = 0.0               # submitted -> finished
    frame_age_ms: float = 0.0           # clock at submission - frame stamp
    encoded_on_demand: bool = False     # the frame had to be encoded for this request
    tokens_after_cancel: int = 0        # cancelled: tokens generated after the cancel request arrived
    image: Any = field(default=None, repr=False)    # the answered frame as received (frames.Frame), when
    #                                     the engine keeps frame images: what annotate.py draws on

    @property
    def success(self) -> bool:
        return self.status == Status.OK


class Ticket:
    """A submitted request: completes exactly once; cancel() stops generation between tokens."""

    def __init__(self, request: Request, on_token: Optional[Callable[[int, str], None]] = None):
        self.request = request
        self.on_token = on_token
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.tokens_at_cancel: Optional[int] = None
        self.cancel_reason = ""
        self._result: Optional[Result] = None
        self._done = threading.Event()
        self._callbacks: List[Callable[[Result], None]] = []
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- client side
    def cancel(self, reason: str = "cancelled by the client") -> None:
        with self._lock:
            if not self.cancel_reason:
                self.cancel_reason = reason
                self.tokens_at_cancel = self.tokens

    def cancelled(self) -> bool:
        return bool(self.cancel_reason)

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: Optional[float] = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError("the request is not finished")
        return self._result

    def add_done_callback(self, fn: Callable[[Result], None]) -> None:
        """fn(result) once finished: at once if it is, else in the thread that finishes it."""
        with self._lock:
            if self._result is None:
                self._callbacks.append(fn)
                return
        fn(self._result)

    # ---------------------------------------------------------------- engine side
    def token(self, _token: int, text: str) -> None:
        self.tokens += 1
        if self.on_token is not None:
            self.on_token(self.tokens, text)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    def finish(self, result: Result) -> bool:
        """Complete with `result` (total_ms filled in); False if already finished."""
        with self._lock:
            if self._result is not None:
                return False
            result.total_ms = result.total_ms or self.elapsed_ms()
            self._result = result
            callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        for fn in callbacks:
            fn(result)
        return True


def check_question(question: str, limit: int) -> None:
    """Raise RequestError for an empty, over-long or non-printable question."""
    if not isinstance(question, str) or not question.strip():
        raise RequestError("question is empty")
    if len(question) > limit:
        raise RequestError(f"question is too long: {len(question)} characters, the limit is {limit} "
                           f"(parameter max_question_chars)")
    for i, ch in enumerate(question):
        if ch in "\t\n\r":
            continue
        if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") or ch == "\ufffd":
            raise RequestError(f"question contains a non-printable character U+{ord(ch):04X} at position {i} "
                               f"(binary data?)")


def generation_params(req: Request, cfg) -> GenerationParams:
    """The request's generation settings, 0 / negative fields replaced by the config's defaults.
    Raises RequestError naming the bad field."""
    n = int(req.max_new_tokens)
    if n == 0:
        n = cfg.max_new_tokens
    elif not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
        raise RequestError(f"max_new_tokens must be 0 (node default, {cfg.max_new_tokens}) or in "
                           f"1..{MAX_NEW_TOKENS_LIMIT}, got {n}")
    t, p = float(req.temperature), float(req.top_p)
    # what 0 / negative mean, as srv/Ask says
    for name, v, meaning in (("temperature", t, "negative = node default"), ("top_p", p, "negative = node default"),
                             ("max_frame_age_ms", float(req.max_frame_age_ms),
                              "0 = node default, negative = any cached frame")):
        if not math.isfinite(v):
            raise RequestError(f"{name} must be a finite number ({meaning}), got {v}")
    t = cfg.temperature if t < 0 else t
    p = cfg.top_p if p < 0 else p
    seed = int(req.seed)
    if seed == -1:
        seed = cfg.seed
    if seed >= 2 ** 32:
        raise RequestError(f"seed must be in 0..2^32-1 (or negative), got {seed}")
    # the remaining ranges (temperature, top_p) GenerationParams checks as it is made
    return GenerationParams(max_new_tokens=n, temperature=t, top_p=p, seed=seed if seed >= 0 else None)

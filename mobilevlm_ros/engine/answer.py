"""One request answered: its frame encoded if nobody has yet, the model asked, the Result built.

The engine's generation worker (or `run_pending` in stepped mode) calls `answer` with the decoder to
itself; the job carries what `Engine.submit` checked at the edge: the chosen frame, the question's
prompt ids (tokenized once) and its generation settings (valid once made).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..core.errors import ImageError, MobileVLMError, RequestError
from ..core.generation import GenerationParams
from ..core.prompt import PromptIds
from .frames import AnyFrame, FrameStore
from .model import Model
from .requests import Result, Status, Ticket
from .stats import Counters


@dataclass
class Job:
    ticket: Ticket
    frame: AnyFrame
    prompt: PromptIds                   # the question tokenized when it was accepted
    params: GenerationParams
    arrived_ns: int
    camera: str

    @property
    def kind(self) -> str:
        return self.ticket.request.kind


def failure(status: Status, error: str, camera: str, finish_reason: str = "error",
            frame: Optional[AnyFrame] = None, age_ms: float = 0.0) -> Result:
    """A Result without an answer; it names the frame when one was chosen."""
    r = Result(status=status, error=error, camera=camera, finish_reason=finish_reason, frame_age_ms=age_ms)
    if frame is not None:
        r.header, r.stamp_ns, r.frame_seq = frame.header, frame.stamp_ns, frame.seq
    return r


def answer(model: Model, frames: FrameStore, job: Job, counters: Counters) -> Result:
    """Answer `job` (the caller holds the decoder); model failures become a Result's status."""
    ticket = job.ticket
    age_ms = (job.arrived_ns - job.frame.stamp_ns) / 1e6
    if ticket.cancelled():
        counters.add("cancelled")
        return failure(Status.CANCELLED, ticket.cancel_reason or "cancelled before generation started",
                       job.camera, finish_reason="cancelled", frame=job.frame, age_ms=age_ms)
    try:
        cached, on_demand = frames.encode_frame(model, job.frame)
        vision_ms = cached.vision_ms if on_demand else frames.ensure_embedding(model, cached)
    except ImageError as e:
        counters.error(str(e))
        return failure(Status.NO_FRAME, f"the frame could not be encoded: {e}", job.camera,
                       frame=job.frame, age_ms=age_ms)
    if on_demand:
        counters.add("encoded_on_demand")
    stream = ticket.token if ticket.on_token is not None else None
    try:
        gen = model.ask(job.prompt, cached.embedding, job.params, stream, ticket.cancelled)
    except RequestError as e:           # e.g. the prompt does not fit the context
        counters.error(str(e))
        return failure(Status.INVALID_REQUEST, str(e), job.camera, frame=cached, age_ms=age_ms)
    except MobileVLMError as e:
        counters.error(str(e))
        return failure(Status.MODEL_ERROR, str(e), job.camera, frame=cached, age_ms=age_ms)
    after_cancel = 0
    if gen.finish_reason == "cancelled":
        counters.add("cancelled")
        status = Status.CANCELLED
        error = ticket.cancel_reason or "cancelled"
        if ticket.tokens_at_cancel is not None:
            after_cancel = gen.completion_tokens - ticket.tokens_at_cancel
            error += f" ({after_cancel} tokens after the cancel request)"
    else:
        status, error = Status.OK, ""
        counters.add("captions" if job.kind == "caption" else "answers")
    return Result(status=status, error=error, answer=gen.text, answer_ids=list(gen.ids), camera=job.camera,
                  header=cached.header, stamp_ns=cached.stamp_ns, frame_seq=cached.seq,
                  prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                  finish_reason=gen.finish_reason, vision_ms=vision_ms, prefill_ms=gen.prefill_ms,
                  decode_ms=gen.decode_ms, first_token_ms=gen.first_token_ms, frame_age_ms=age_ms,
                  encoded_on_demand=on_demand, tokens_after_cancel=after_cancel, image=cached.image)

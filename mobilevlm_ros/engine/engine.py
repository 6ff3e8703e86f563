"""The engine: camera frames in, questions answered, no ROS.

    engine = Engine(model, EngineConfig(cameras=("front",)))
    engine.start()                                   # the vision and generation workers
    engine.offer_raw("front", header, stamp_ns, raw)  # an image callback: O(1), newest frame wins
    ticket = engine.submit(Request("Is the door open?"))
    result = ticket.result()                         # or ticket.add_done_callback(fn)
    engine.stop("shutting down")                     # every request still waiting gets a result

Threads (`start`): a vision worker encodes each camera's newest frame (all cameras in one batch) at
most `vision_rate_hz` times a second; one generation worker runs the decoder (not thread-safe) on
requests from a bounded queue. Answers come first: while one is generated the vision worker starts no
encode, and one already running stops where the backend can (ONNX Runtime) and is redone later
(unless `vision_during_answers`). While no request waits, the generation worker evaluates
each camera's newest fresh frame in the decoder (prefill) and asks for periodic captions.

Stepped (`simulated=True`, no threads): the caller moves the clock and calls `vision_step()` and
`run_pending()`, so replay and tests get exact, repeatable frame choices. Encoding is simulated as
instant (a frame is cached when the vision schedule says so and encoded at its first use: the same
embedding, computed once); the same selection, validation and answering code runs in both modes.

Every submitted request gets exactly one Result, with a Status code. The model is used only through
its interface (model.py); answering one request is answer.py, the counters and stats stats.py.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Callable, Dict, Optional, Tuple

from ..core.errors import ImageError, MobileVLMError, RequestError
from ..core.prompt import PromptIds
from .answer import Job, answer, failure
from .config import AUTO_AGE_CYCLES, AUTO_AGE_MIN_S, EngineConfig
from .frames import NS, AnyFrame, CachedFrame, Frame, FrameStore, FrameUnavailable, check_stamp
from .images import RawImage, check_compressed, check_raw
from .model import Model
from .requests import Request, Result, Status, Ticket, check_question, generation_params
from .stats import Counters, EngineStats

__all__ = ["Engine", "EngineStats", "SimClock", "wall_clock_ns"]

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05


def wall_clock_ns() -> int:
    return time.time_ns()


class SimClock:
    """A clock the caller sets (replay: the bag's time)."""

    def __init__(self, ns: int = 0):
        self.ns = int(ns)

    def set(self, ns: int) -> None:
        self.ns = int(ns)

    def __call__(self) -> int:
        return self.ns


class Engine:
    def __init__(self, model: Model, config: EngineConfig, clock: Callable[[], int] = wall_clock_ns,
                 simulated: bool = False):
        self.model = model
        self.config = config.validate()
        self.clock = clock
        self.simulated = simulated
        self.frames = FrameStore(self.config.cameras, self.config.embedding_cache_size, self.config.keep_frame_images)
        self.on_answer: Optional[Callable[[Request, Result], None]] = None   # every generated answer
        self.counters = Counters()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: "deque[Job]" = deque()
        self._current: Optional[Job] = None
        self._serving = simulated
        self._stop = threading.Event()
        self._threads: list = []
        self._prefilled: Dict[str, int] = {}         # camera -> seq of the frame last prefilled
        self._prefill_ms_avg = 0.0
        self._answer_ms_avg = 0.0                    # the decoder's time per answer (auto frame age)
        self._last_total_ms = 0.0
        self._last_captioned: Dict[str, int] = {}
        self._caption: Optional[Tuple[str, PromptIds]] = None      # the caption prompt, tokenized once
        self._next_caption_ns = 0
        self._next_encode_ns = 0

    # ============================================================== lifecycle
    def start(self) -> None:
        """Serve: start the vision and generation workers."""
        if self.simulated:
            raise RuntimeError("a simulated engine is driven by vision_step() and run_pending()")
        with self._lock:
            if self._serving:
                return
            self._serving = True
        self._stop.clear()
        self._threads = [threading.Thread(target=self._vision_loop, name="mobilevlm-vision", daemon=True),
                         threading.Thread(target=self._generation_loop, name="mobilevlm-generation",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def worker_thread_ids(self) -> list:
        """Native ids of the vision and generation workers (for the adapter's thread priorities)."""
        return [t.native_id for t in getattr(self, "_threads", []) if t.native_id is not None]

    def stop(self, reason: str = "the engine stopped") -> None:
        """Stop serving: the answer in progress is cancelled, every waiting request gets UNAVAILABLE,
        the workers end, cached frames are forgotten (they are stale by the next start)."""
        with self._lock:
            self._serving = False
            current = self._current
            waiting = list(self._queue)
            self._queue.clear()
            self._work.notify_all()
        if current is not None:
            current.ticket.cancel(reason)
        for job in waiting:
            job.ticket.finish(failure(Status.UNAVAILABLE, f"not answered: {reason}", job.camera))
        self._stop.set()
        self.frames.abort_background()
        self.frames.wake()
        for t in self._threads:
            t.join(timeout=30.0)
        self._threads = []
        self.frames.clear()
        self._prefilled.clear()

    @property
    def serving(self) -> bool:
        return self._serving

    def update(self, **changes) -> EngineConfig:
        """Change settings at run time (only those whose Spec says runtime). Raises ConfigError."""
        from .config import ConfigError
        specs = EngineConfig.specs()
        fixed = [k for k in changes if k in specs and not specs[k].runtime
                 and changes[k] != getattr(self.config, k)]
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} cannot change while the engine exists")
        self.config = self.config.replace(**changes)
        with self._lock:
            self._work.notify_all()
        self.frames.wake()
        return self.config

    # ============================================================== frames in
    def offer_raw(self, camera: str, header, stamp_ns: int, raw: RawImage) -> Frame:
        """An image callback: validate (cheap: no pixel is converted) and keep as the camera's newest
        frame. Raises ImageError, counted as a rejected frame, with the reason."""
        return self._offer(camera, stamp_ns, lambda stamp, now: (check_raw(raw), Frame(
            camera, header, stamp, now, raw=raw))[1])

    def offer_compressed(self, camera: str, header, stamp_ns: int, fmt: str, data) -> Frame:
        """Like offer_raw for JPEG/PNG bytes (sniffed now, decoded when encoded)."""
        return self._offer(camera, stamp_ns, lambda stamp, now: (check_compressed(fmt, data), Frame(
            camera, header, stamp, now, compressed=data, fmt=fmt))[1])

    def _offer(self, camera: str, stamp_ns: int, make: Callable[[int, int], Frame]) -> Frame:
        if camera not in self.frames.cameras:
            raise ImageError(f"unknown camera '{camera}' (cameras: {', '.join(self.config.cameras)})")
        now = self.clock()
        try:
            stamp = int(stamp_ns) or now            # a zero stamp: the time of reception
            check_stamp(stamp, now)
            frame = make(stamp, now)
        except ImageError as e:
            self.frames.reject(camera, str(e))
            raise
        self.frames.offer(frame)
        return frame

    # ============================================================== requests in
    def submit(self, request: Request, on_token: Optional[Callable[[int, str], None]] = None) -> Ticket:
        """Validate, tokenize the question (once: the job carries its prompt ids) and queue; nothing is
        evaluated here. Returns a Ticket; a request that cannot be served (bad, busy, no frame, not
        serving) is finished at once with its status."""
        ticket = Ticket(request, on_token)
        now = self.clock()
        self.counters.add("requests")
        cfg = self.config
        camera = (request.camera or "").strip() or cfg.default_camera
        status = Status.INVALID_REQUEST
        try:
            check_question(request.question, cfg.max_question_chars)
            params = generation_params(request, cfg)
            if camera not in cfg.cameras:
                raise RequestError(f"unknown camera '{camera}' (cameras: {', '.join(cfg.cameras)})")
            if not self._serving:
                status = Status.UNAVAILABLE
                raise RequestError("the node is not active")
            prompt = self.model.prompt(request.question)    # tokenized once; special tokens: RequestError
            status = Status.NO_FRAME
            frame = self.select(camera, now, request)
            job = Job(ticket, frame, prompt, params, now, camera)
            with self._lock:
                if not self._serving:
                    status = Status.UNAVAILABLE
                    raise RequestError("the node is not active")
                if len(self._queue) >= cfg.max_queue:
                    self.counters.add("busy")
                    status = Status.BUSY
                    raise RequestError(f"busy: {len(self._queue)} requests are waiting and one is being "
                                       f"answered (max_queue {cfg.max_queue}); try again later")
                self._queue.append(job)
                self._work.notify_all()
        except MobileVLMError as e:
            self.counters.error(str(e))
            ticket.finish(failure(status, str(e), camera, age_ms=getattr(e, "age_ms", 0.0)))
        return ticket

    def max_frame_age_s(self, request: Optional[Request] = None) -> float:
        """The age limit a question gets (0 = no limit): the request's own, the config's, or auto."""
        if request is not None and request.max_frame_age_ms:
            return max(0.0, request.max_frame_age_ms / 1e3)
        limit = self.config.max_frame_age_s
        if limit >= 0:
            return limit
        stats = self.frames.stats().values()
        encode_s = max((s.vision_ms_avg for s in stats), default=0.0) / 1e3
        period = 1.0 / self.config.vision_rate_hz if self.config.vision_rate_hz > 0 else 0.0
        cycle = encode_s + self._prefill_ms_avg / 1e3
        # while an answer holds the decoder no frame is refreshed, so the frame in the decoder ages
        # by one answer beyond its cycles: the next question still takes it instead of waiting
        return max(AUTO_AGE_MIN_S, period + AUTO_AGE_CYCLES * cycle + self._answer_ms_avg / 1e3)

    def select(self, camera: str, now_ns: int, request: Optional[Request] = None) -> AnyFrame:
        """The frame a request is answered about (frames.select_frame with the decoder's cache as
        the preferred set). Raises FrameUnavailable with the reason."""
        if self.simulated:
            ready = None                            # encoding and prefill are instant there
        else:
            in_decoder = set(self.model.kv_state_keys())
            ready = lambda f: f.embedding is not None and f.embedding.key in in_decoder  # noqa: E731
        stamp = int(request.stamp_ns) if request is not None else 0
        try:
            return self.frames.select(camera, now_ns, self.max_frame_age_s(request), stamp, ready)
        except FrameUnavailable as e:
            if self.frames.stats()[camera].received == 0 and self.no_frame_hint:
                raise FrameUnavailable(f"{e} ({self.no_frame_hint(camera)})", e.age_ms) from None
            raise

    no_frame_hint: Optional[Callable[[str], str]] = None   # adapter: e.g. the topics it listens on

    # ============================================================== stepped mode
    def vision_step(self) -> int:
        """Simulated vision worker: cache the pending frames if an encode is due at clock(); returns
        how many were cached."""
        now = self.clock()
        if now < self._next_encode_ns:
            return 0
        done = self.frames.encode_pending(self.model, lazy=True)
        if done:
            rate = self.config.vision_rate_hz
            self._next_encode_ns = now + (int(NS / rate) if rate > 0 else 0)
        return len(done)

    def run_pending(self) -> int:
        """Answer every queued request in this thread (stepped mode); returns how many."""
        n = 0
        while (job := self._take(block=False)) is not None:
            self._answer(job)
            n += 1
        return n

    # ============================================================== workers
    def _vision_loop(self) -> None:
        while not self._stop.is_set():
            if not self.frames.wait_pending(0.2):
                continue
            delay_s = (self._next_encode_ns - self.clock()) / NS
            if delay_s > 0:
                self._stop.wait(min(delay_s, 0.2))
                continue
            if self._prefill_due():         # the decoder first: encode, prefill, encode, ...
                self._stop.wait(0.02)
                continue
            t0 = self.clock()
            try:
                if self.frames.encode_pending(self.model):
                    rate = self.config.vision_rate_hz
                    self._next_encode_ns = t0 + (int(NS / rate) if rate > 0 else 0)
            except Exception as e:
                self.counters.last_error = f"vision encoder: {type(e).__name__}: {e}"
                log.error(self.counters.last_error)
                self._stop.wait(0.2)

    def _generation_loop(self) -> None:
        while not self._stop.is_set():
            self._caption_tick()
            job = self._take(block=True)
            if job is None:
                self._prefill_idle()
                continue
            self._answer(job)

    def _take(self, block: bool) -> Optional[Job]:
        with self._lock:
            if not self._queue and block:
                self._work.wait(IDLE_POLL_S)
            if not self._queue:
                return None
            job = self._queue.popleft()
            self._current = job
            if not self._serving:           # taken just as the engine stopped serving
                job.ticket.cancel("the node stopped serving")
            return job

    def _decoder_turn(self, for_answer: bool = False):
        """Held while the decoder works: unless vision_during_answers, no background encode starts,
        and an answer stops the one running (a prefill lets it finish: it is the frame it needs next)."""
        if self.config.vision_during_answers or self.simulated:
            return contextlib.nullcontext()
        return self.frames.hold_background(abort_running=for_answer)

    def _answer(self, job: Job) -> None:
        t0 = time.perf_counter()
        try:
            with self._decoder_turn(for_answer=True):
                result = answer(self.model, self.frames, job, self.counters)
            if result.status == Status.OK and not self.simulated:     # replay: instant, repeatable
                ms = (time.perf_counter() - t0) * 1e3
                self._answer_ms_avg = ms if not self._answer_ms_avg else 0.8 * self._answer_ms_avg + 0.2 * ms
        except Exception as e:              # never leave a request unanswered
            log.exception("generation failed")
            result = failure(Status.MODEL_ERROR, f"internal error: {type(e).__name__}: {e}", job.camera)
        finally:
            with self._lock:
                self._current = None
        if job.ticket.finish(result):
            if result.status == Status.OK or result.finish_reason == "cancelled":
                self._last_total_ms = result.total_ms
        if result.prompt_tokens and self.on_answer is not None:
            try:
                self.on_answer(job.ticket.request, result)
            except Exception as e:          # the adapter's publisher, e.g. shutting down
                log.debug("on_answer failed: %s", e)

    # ============================================================== idle work
    def _to_prefill(self):
        """(camera, cached frame) pairs whose newest encoded frame is fresh and not yet prefilled."""
        cfg = self.config
        if not cfg.prefill_frames or not self._serving:
            return []
        max_age_s = self.max_frame_age_s()
        now = self.clock()
        todo = []
        for camera in cfg.cameras:
            cached = self.frames.latest_cached(camera)
            if cached is None or cached.embedding is None or self._prefilled.get(camera) == cached.seq:
                continue
            if max_age_s <= 0 or now - cached.stamp_ns <= max_age_s * NS:
                todo.append((camera, cached))
        return todo

    def _prefill_due(self) -> bool:
        """Whether the vision worker should wait for the decoder to take the newest frames first:
        on shared cores an encode beside a prefill slows both, and an encoded frame that is never
        prefilled costs its first question the image tokens."""
        return not self.config.vision_during_answers and bool(self._to_prefill())

    def _interrupts(self, frame: CachedFrame) -> Callable[[], bool]:
        """For a prefill of `frame`: stop when a request waits for another frame (one that waits
        for this frame is better served by letting the prefill finish)."""
        def interrupt() -> bool:
            queue = self._queue
            return bool(queue) and any(j.frame.seq != frame.seq for j in list(queue))
        return interrupt

    def _prefill_idle(self) -> None:
        """With no request waiting: evaluate each camera's newest encoded frame in the decoder, if a
        question could still use it, so that the question pays only for its text."""
        for camera, cached in self._to_prefill():
            if self._queue:
                return
            t0 = time.perf_counter()
            try:
                with self._decoder_turn():
                    done = self.model.prefill(cached.embedding, interrupt=self._interrupts(cached))
            except MobileVLMError as e:     # the question about this frame will report it
                self._prefilled[camera] = cached.seq        # no second try
                log.warning("prefill of a %s frame failed: %s", camera, e)
                continue
            # A prefill that a request interrupted is tried again when the decoder is idle (the vision
            # worker keeps waiting for it): given up instead, the frame in the decoder aged while a
            # newer one was encoded, until a question found it too old and evaluated the image itself
            # (first token 1.9-2.1 s, 2 answers in 20 in mobilevlm-bench node on the AMD EPYC).
            if done or cached.embedding.key in self.model.kv_state_keys():
                self._prefilled[camera] = cached.seq
            if done:
                ms = (time.perf_counter() - t0) * 1e3
                self._prefill_ms_avg = ms if not self._prefill_ms_avg else 0.8 * self._prefill_ms_avg + 0.2 * ms
                self.counters.add("frames_prefilled")

    def _caption_tick(self) -> None:
        """Every caption_period_s: queue a caption of each camera's newest fresh frame not captioned
        yet, only when no request is waiting."""
        cfg = self.config
        if cfg.caption_period_s <= 0 or not cfg.caption_prompt.strip() or not self._serving:
            return
        now = self.clock()
        if now < self._next_caption_ns:
            return
        self._next_caption_ns = now + int(cfg.caption_period_s * NS)
        for cam in cfg.cameras:
            try:
                frame = self.frames.select(cam, now, self.max_frame_age_s())
            except FrameUnavailable:
                continue
            if self._last_captioned.get(cam) == frame.seq:
                continue
            request = Request(cfg.caption_prompt, camera=cam, kind="caption")
            try:
                job = Job(Ticket(request), frame, self._caption_prompt(), generation_params(request, cfg), now, cam)
            except MobileVLMError as e:     # a caption prompt the model cannot take: reported, not asked
                self.counters.error(str(e))
                return
            with self._lock:
                if self._queue or not self._serving:
                    self.counters.add("captions_skipped")
                    continue
                self._queue.append(job)
            self._last_captioned[cam] = frame.seq

    def _caption_prompt(self) -> PromptIds:
        text = self.config.caption_prompt
        if self._caption is None or self._caption[0] != text:
            self._caption = (text, self.model.prompt(text))
        return self._caption[1]

    # ============================================================== reporting
    def stats(self) -> EngineStats:
        with self._lock:
            depth, busy = len(self._queue), int(self._current is not None)
        return EngineStats(serving=self._serving, counts=self.counters.snapshot(), queue_depth=depth,
                           max_queue=self.config.max_queue, in_progress=busy, cameras=self.frames.stats(),
                           vision_errors=self.frames.encode_errors, last_error=self.counters.last_error,
                           last_total_ms=self._last_total_ms, max_frame_age_s=self.max_frame_age_s(),
                           prefill_ms_avg=self._prefill_ms_avg,
                           decoder_kv_states=len(self.model.kv_state_keys()),
                           decoder_cache_bytes=self.model.kv_state_bytes(), vision_aborted=self.frames.encodes_aborted)

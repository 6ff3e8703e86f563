"""Camera frames and their image embeddings: the newest-frame slot, the per-camera embedding cache,
and the policy that picks the frame a question is answered about.

Pure Python (numpy, no rclpy), so replay and benchmark tools reuse it with frames from a bag.

Per camera (`CameraFrames`):
- a *pending* slot holding the newest received frame that is not encoded yet. A newer frame
  replaces it (latest frame wins) and counts as a drop, so the image callback is O(1);
- the embeddings of the last K encoded frames, with their headers (`embedding_cache_size`), and with
  `keep_images` the frames as received (message data or compressed bytes), so that an answer can
  be drawn on the very frame it describes (engine/annotate.py).

`FrameStore.encode_pending(model)` (the node's vision worker) takes the pending frame of every
camera, decodes compressed ones, and encodes them in one batched `model.encode` call. While
`FrameStore.hold_background()` is held (the node holds it while it answers) the worker starts no
encode: on a CPU an encode beside an answer takes the decoder's cores and the answer several times longer.
`select_frame` picks the frame for a question: the newest encoded frame, or the cached frame
closest to a requested stamp; a frame still pending is used (and encoded on demand by
`FrameStore.encode_frame`) only when no encoded frame qualifies. Frames older than
`max_frame_age_s` relative to the question's arrival time are never used.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from ..core.errors import EncodeAborted, ImageError, MobileVLMError
from ..core.preprocess import rgb_order
from ..core.vision import Abort
from .images import compressed_to_rgb, raw_to_rgb
from .model import Model
from .stats import CameraStats

NS = 1_000_000_000          # nanoseconds a second: the one definition (ROS stamps, bag times)
FUTURE_TOLERANCE_S = 1.0    # requested stamps up to this far ahead of the node clock are accepted

_seq = itertools.count(1)


def check_stamp(stamp: int, now: int) -> None:
    """Reject a frame whose header stamp (ns) no question could use: negative, or ahead of the node
    clock by more than FUTURE_TOLERANCE_S (it would shadow every real frame as the newest)."""
    if stamp < 0:
        raise ImageError(f"header stamp is negative ({stamp / NS:.3f} s)")
    if stamp - now > FUTURE_TOLERANCE_S * NS:
        raise ImageError(f"header stamp is {(stamp - now) / NS:.1f} s ahead of the node clock (tolerance "
                         f"{FUTURE_TOLERANCE_S:g} s): check the camera's clock")


class FrameUnavailable(MobileVLMError):
    """No frame satisfies the question (no frame yet, too old, bad requested stamp). age_ms: the
    newest frame's age when every frame was too old (a NO_FRAME result reports it), else 0."""

    def __init__(self, message: str, age_ms: float = 0.0):
        super().__init__(message)
        self.age_ms = age_ms


@dataclass
class Frame:
    """A received frame, not encoded yet: a raw image, compressed bytes or decoded pixels."""
    camera: str
    header: Any                       # std_msgs/Header as received (copied into answers)
    stamp_ns: int                     # header stamp; the receive time when the stamp is zero
    received_ns: int                  # node clock at reception
    pixels: Optional[np.ndarray] = None   # uint8 HxW / HxWxC, decoded already (tools, tests)
    channel_order: str = "rgb"            # of pixels: rgb | bgr
    raw: Any = None                   # images.RawImage, converted when encoded
    compressed: Any = None            # bytes-like JPEG/PNG (compressed images)
    fmt: str = ""
    seq: int = field(default_factory=lambda: next(_seq))
    received_mono: float = field(default_factory=time.monotonic)

    @property
    def encoded(self) -> bool:
        return False


@dataclass
class CachedFrame:
    """An encoded frame: its header and its image embedding (core.vision.ImageEmbedding). A frame
    cached lazily (replay, where encoding is simulated as instant) has no embedding yet, only its
    source frame: FrameStore.ensure_embedding computes it at first use, with the same result."""
    camera: str
    header: Any
    stamp_ns: int
    received_ns: int
    embedding: Any
    vision_ms: float
    seq: int
    source: Optional[Frame] = None    # lazily cached: what ensure_embedding encodes
    image: Optional[Frame] = None     # the frame as received, kept with keep_images (for drawing)

    @property
    def encoded(self) -> bool:
        return True


AnyFrame = Union[Frame, CachedFrame]


def _image_bytes(f: Optional[Frame]) -> int:
    if f is None:
        return 0
    data = f.raw.data if f.raw is not None else f.pixels if f.pixels is not None else f.compressed
    if data is None:
        return 0
    nbytes = getattr(data, "nbytes", None)       # arrays, memoryviews; bytes and lists have a length
    return int(nbytes) if nbytes is not None else len(data)


def held_bytes(c: CachedFrame) -> int:
    """Host memory a cached frame keeps alive: its embedding and the received frame (kept image, or
    the source of a lazily cached frame)."""
    emb = getattr(c.embedding, "embeds", None)
    kept = c.image if c.image is not None else c.source
    return (int(emb.nbytes) if emb is not None else 0) + _image_bytes(kept)


def decode_frame(frame: Frame) -> np.ndarray:
    """The frame's uint8 pixels in RGB channel order (HxWx3; HxW or HxWx1 for mono pixels), ready for
    model.encode. Compressed frames are decoded here (in the vision worker, not in the image
    callback). Raises ImageError."""
    if frame.raw is not None:
        return raw_to_rgb(frame.raw)
    if frame.pixels is not None:          # already decoded (tools, tests), in either channel order
        return rgb_order(frame.pixels, frame.channel_order)
    if frame.compressed is None:
        raise ImageError("frame has neither pixels nor compressed data")
    return compressed_to_rgb(frame.fmt, frame.compressed)


class CameraFrames:
    """One camera's pending frame, embedding cache and counters. Not locked: FrameStore locks."""

    def __init__(self, name: str, cache_size: int):
        self.name = name
        self.pending: Optional[Frame] = None
        self.cache: deque[CachedFrame] = deque(maxlen=max(1, int(cache_size)))
        self.stats = CameraStats()

    def offer(self, frame: Frame) -> bool:
        """Store the newest frame; True when it replaced a frame that was never encoded."""
        dropped = self.pending is not None
        self.pending = frame
        self.stats.received += 1
        self.stats.dropped += int(dropped)
        self.stats.latest_stamp_ns = frame.stamp_ns
        self.stats.latest_received_ns = frame.received_ns
        return dropped

    def candidates(self) -> List[AnyFrame]:
        out: List[AnyFrame] = list(self.cache)
        if self.pending is not None:
            out.append(self.pending)
        return out

    def find(self, seq: int) -> Optional[CachedFrame]:
        for c in self.cache:
            if c.seq == seq:
                return c
        return None


def _age_s(now_ns: int, stamp: int) -> float:
    return (now_ns - stamp) / NS


def check_requested_stamp(stamp_ns: int, now_ns: int, max_age_s: float,
                          future_tolerance_s: float = FUTURE_TOLERANCE_S) -> None:
    """Reject a requested frame time in the future or older than max_frame_age_s (0 = no limit)."""
    if stamp_ns == 0:
        return
    ahead = -_age_s(now_ns, stamp_ns)
    if ahead > future_tolerance_s:
        raise FrameUnavailable(f"requested stamp {stamp_ns / NS:.3f} is in the future: {ahead:.3f} s ahead "
                               f"of the node clock ({now_ns / NS:.3f})")
    age = _age_s(now_ns, stamp_ns)
    if max_age_s > 0 and age > max_age_s:
        raise FrameUnavailable(f"requested stamp {stamp_ns / NS:.3f} is too old: {age:.3f} s before the node "
                               f"clock, beyond max_frame_age_s {max_age_s:g}")


def select_frame(candidates: Iterable[AnyFrame], camera: str, now_ns: int, max_age_s: float,
                 stamp_ns: int = 0, ready: Optional[Callable[[AnyFrame], bool]] = None) -> AnyFrame:
    """The frame to answer about.

    stamp_ns == 0: the newest encoded frame for which `ready` is true (its image tokens are in the
    decoder already, so the answer costs only its text), if fresh enough; else the newest encoded
    frame that is fresh enough; else the newest pending frame if it is fresh enough (it will be
    encoded on demand). stamp_ns != 0: the frame (encoded first on a tie) whose stamp is closest to
    it, if fresh enough. Fresh enough: at most max_age_s old at now_ns (max_age_s <= 0: no limit).
    Raises FrameUnavailable with the reason.
    """
    frames = list(candidates)
    if not frames:
        raise FrameUnavailable(f"no frame received yet from camera '{camera}'")

    def fresh(f: AnyFrame) -> bool:
        return max_age_s <= 0 or _age_s(now_ns, f.stamp_ns) <= max_age_s

    if stamp_ns:
        best = min(frames, key=lambda f: (abs(f.stamp_ns - stamp_ns), not f.encoded, -f.seq))
        if fresh(best):
            return best
    else:
        encoded = [f for f in frames if f.encoded]
        for group in ([f for f in encoded if ready(f)] if ready else [], encoded,
                      [f for f in frames if not f.encoded]):
            if group:
                best = max(group, key=lambda f: (f.stamp_ns, f.seq))
                if fresh(best):
                    return best
    latest = max(frames, key=lambda f: (f.stamp_ns, f.seq))
    age = _age_s(now_ns, latest.stamp_ns)
    raise FrameUnavailable(f"no frame newer than {max_age_s:g} s from camera '{camera}' "
                           f"(latest is {age:.3f} s old)", age_ms=age * 1e3)


class FrameStore:
    """Every camera's frames behind one lock, plus the vision lock that serialises model.encode."""

    def __init__(self, cameras: Iterable[str], cache_size: int, keep_images: bool = False):
        self.keep_images = keep_images
        self.cameras: Dict[str, CameraFrames] = {c: CameraFrames(c, cache_size) for c in cameras}
        if not self.cameras:
            raise ValueError("at least one camera is needed")
        self.default = next(iter(self.cameras))
        self._lock = threading.Lock()
        self._has_pending = threading.Condition(self._lock)
        self.vision_lock = threading.Lock()
        self._holds = 0                     # hold_background() in effect: no background encodes
        self._background: Optional[Abort] = None   # the background encode running now
        self.encodes_aborted = 0
        self.encode_errors = 0
        self.last_encode_error = ""

    # ------------------------------------------------------------------ image callbacks
    def offer(self, frame: Frame) -> bool:
        """O(1): keep the newest frame of its camera, wake the vision worker. True if one was dropped."""
        with self._lock:
            dropped = self.cameras[frame.camera].offer(frame)
            self._has_pending.notify_all()
        return dropped

    def note_callback(self, camera: str, cpu_ms: float) -> None:
        """Add one image callback's CPU time to the camera's counters."""
        with self._lock:
            st = self.cameras[camera].stats
            st.callback_cpu_ms += cpu_ms
            st.callback_cpu_ms_max = max(st.callback_cpu_ms_max, cpu_ms)

    def reject(self, camera: str, reason: str, received: bool = True) -> None:
        """Count a frame that failed validation (received=True: in the image callback, not offered)
        or decoding (received=False: it was already counted when offered)."""
        with self._lock:
            st = self.cameras[camera].stats
            st.received += int(received)
            st.rejected += 1
            st.last_reject = reason

    # ------------------------------------------------------------------ vision worker
    def _background_ready(self) -> bool:      # self._lock is held
        return self._holds == 0 and any(c.pending is not None for c in self.cameras.values())

    def wait_pending(self, timeout: float) -> bool:
        """Block until some camera has a pending frame and no hold_background() is in effect (True),
        or the timeout passes (False)."""
        with self._lock:
            if self._background_ready():
                return True
            self._has_pending.wait(timeout)
            return self._background_ready()

    @contextlib.contextmanager
    def hold_background(self, abort_running: bool = False):
        """No background encode starts while this is held; frames keep arriving (newer ones replace
        the pending one) and encode_frame still encodes on demand. Entering waits for a background
        encode already running to finish, or with abort_running stops it (where the backend can:
        ONNX Runtime) and puts its frames back as pending unless newer ones came: on shared CPU
        cores an encode beside the decoder slows both far more than waiting does (their thread
        pools spin against each other), and an answer should not wait for an encode either."""
        with self._lock:
            self._holds += 1
        if abort_running:
            self.abort_background()
        try:
            with self.vision_lock:          # the running encode, if any, finishes first
                pass
            yield
        finally:
            with self._lock:
                self._holds -= 1
                self._has_pending.notify_all()

    def abort_background(self) -> None:
        """Stop the background encode running now, if any (see hold_background)."""
        with self._lock:
            running = self._background
        if running is not None:
            running.request()

    def wake(self) -> None:
        with self._lock:
            self._has_pending.notify_all()

    def encode_pending(self, model: Model, lazy: bool = False) -> List[CachedFrame]:
        """Encode the pending frame of every camera in one model.encode call; returns what was cached.
        Frames that cannot be decoded are counted as rejected and skipped. lazy: cache them now and
        encode each at its first use (ensure_embedding), for a simulated vision worker."""
        with self.vision_lock:
            with self._lock:
                if self._holds:             # an answer started since wait_pending: leave them pending
                    return []
                taken = [c.pending for c in self.cameras.values() if c.pending is not None]
                for c in self.cameras.values():
                    c.pending = None
                if lazy:
                    return [self._cache(CachedFrame(f.camera, f.header, f.stamp_ns, f.received_ns, None, 0.0,
                                                    f.seq, source=f, image=self._kept(f)), None) for f in taken]
                abort = self._background = Abort()
            try:
                return self._encode(model, taken, abort=abort)
            except EncodeAborted as e:
                with self._lock:
                    self.encodes_aborted += 1
                    for f in e.frames:      # encoded again later, unless a newer frame replaces it
                        cam = self.cameras[f.camera]
                        if cam.pending is None:
                            cam.pending = f
                        else:
                            cam.stats.dropped += 1
                return []
            finally:
                with self._lock:
                    self._background = None

    def ensure_embedding(self, model: Model, cached: CachedFrame) -> float:
        """Encode a lazily cached frame now; returns the ms spent (0 if it had its embedding).
        Raises ImageError when it cannot be decoded or encoded."""
        with self.vision_lock:
            if cached.embedding is not None:
                return 0.0
            [done] = self._encode(model, [cached.source], raise_errors=True, keep=False)
            cached.embedding, cached.vision_ms, cached.source = done.embedding, done.vision_ms, None
            return done.vision_ms

    def encode_frame(self, model: Model, frame: AnyFrame) -> Tuple[CachedFrame, bool]:
        """The cached frame for `frame`, encoding it now if nobody has. Returns (cached, encoded_now).
        Raises ImageError when the frame cannot be decoded or encoded."""
        if frame.encoded:
            return frame, False
        with self.vision_lock:
            with self._lock:
                cam = self.cameras[frame.camera]
                done = cam.find(frame.seq)
                if done is not None:
                    return done, False
                if cam.pending is not None and cam.pending.seq == frame.seq:
                    cam.pending = None
            cached = self._encode(model, [frame], raise_errors=True)
            return cached[0], True

    def _encode(self, model: Model, frames: List[Frame], raise_errors: bool = False,
                keep: bool = True, abort: Optional[Abort] = None) -> List[CachedFrame]:
        ready: List[Tuple[Frame, np.ndarray]] = []
        for f in frames:
            try:
                ready.append((f, decode_frame(f)))      # RGB: one channel order for the whole batch
            except ImageError as e:
                self.reject(f.camera, str(e), received=False)
                if raise_errors:
                    raise
        if not ready:
            return []
        try:
            embeddings = model.encode([p for _, p in ready], abort=abort)
        except EncodeAborted as e:
            e.frames = [f for f, _ in ready]    # to encode again (undecodable ones are counted already)
            raise
        except Exception as e:
            with self._lock:
                self.encode_errors += 1
                self.last_encode_error = f"{type(e).__name__}: {e}"
            if raise_errors:
                raise ImageError(f"vision encoder failed: {e}") from e
            raise
        done_mono = time.monotonic()
        out = []
        with self._lock:
            for (f, _), emb in zip(ready, embeddings):
                c = CachedFrame(f.camera, f.header, f.stamp_ns, f.received_ns, emb,
                                float(getattr(emb, "vision_ms", 0.0)), f.seq, image=self._kept(f))
                out.append(self._cache(c, (done_mono - f.received_mono) * 1e3) if keep else c)
        return out

    def _kept(self, f: Frame) -> Optional[Frame]:
        """What a cached frame keeps of its received frame: all of it with keep_images (its message
        data, or compressed bytes: decoded again only when an answer is drawn), else nothing."""
        return f if self.keep_images else None

    def _cache(self, c: CachedFrame, latency_ms: Optional[float]) -> CachedFrame:    # self._lock held
        cam = self.cameras[c.camera]
        cam.cache.append(c)
        st = cam.stats
        st.encoded += 1
        if latency_ms is not None:          # lazily cached frames have no encode time yet
            st.vision_ms = c.vision_ms
            st.vision_ms_avg = c.vision_ms if st.encoded == 1 else 0.8 * st.vision_ms_avg + 0.2 * c.vision_ms
            st.latency_ms = latency_ms
        return c

    # ------------------------------------------------------------------ questions
    def select(self, camera: str, now_ns: int, max_age_s: float, stamp_ns: int = 0,
               ready: Optional[Callable[[AnyFrame], bool]] = None) -> AnyFrame:
        """Validate the requested stamp and pick the frame (see select_frame). Raises FrameUnavailable."""
        check_requested_stamp(stamp_ns, now_ns, max_age_s)
        with self._lock:
            candidates = self.cameras[camera].candidates()
        return select_frame(candidates, camera, now_ns, max_age_s, stamp_ns, ready)

    def latest_cached(self, camera: str) -> Optional[CachedFrame]:
        with self._lock:
            cache = self.cameras[camera].cache
            return cache[-1] if cache else None

    def stats(self) -> Dict[str, CameraStats]:
        """A consistent copy of every camera's counters."""
        with self._lock:
            out = {}
            for n, c in self.cameras.items():
                out[n] = CameraStats(**vars(c.stats))
                out[n].cached = len(c.cache)
                out[n].cached_bytes = sum(held_bytes(f) for f in c.cache)
            return out

    def clear(self) -> None:
        """Forget pending and cached frames (counters are kept)."""
        with self._lock:
            for c in self.cameras.values():
                c.pending = None
                c.cache.clear()

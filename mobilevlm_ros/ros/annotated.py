"""~/annotated (sensor_msgs/Image, bgr8) and ~/annotated/compressed (JPEG): every answer and caption
drawn on the frame it describes (engine/annotate.py), with that frame's header, so that
rqt_image_view, RViz and Foxglove line it up with the camera topic.

The generation worker only hands an answer over (`offer`: a queue slot, no rclpy call); a thread of
its own checks the subscribers, decodes the frame, draws, encodes and publishes, so the decoder never
pays for a drawing or a JPEG. Nothing is drawn while neither topic has a subscriber, checked just
before drawing; the raw image and the JPEG are each made only for a topic that has a subscriber. While the thread is behind, the newest answers wait (QUEUE) and older
ones are dropped, counted.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Tuple

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from ..engine import annotate
from .conversion import fill_compressed, fill_image

QUEUE = 2
# reliable (matches reliable and best-effort viewers alike), only the newest image kept for a
# late or slow reader
QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                 durability=DurabilityPolicy.VOLATILE)


@dataclass
class AnnotatedStats:
    offered: int = 0            # answers handed over by the generation worker
    no_subscriber: int = 0      # not drawn: neither topic had a subscriber
    dropped: int = 0            # not drawn: newer answers came while the thread was behind
    no_image: int = 0           # not drawn: the answer carries no frame image
    drawn: int = 0
    published_raw: int = 0
    published_jpeg: int = 0
    errors: int = 0
    last_error: str = ""
    draw_ms: float = 0.0        # total over `drawn`: decoding the frame and drawing on it
    raw_ms: float = 0.0         # total over published_raw: the Image message and its publishing
    jpeg_ms: float = 0.0        # total over published_jpeg: JPEG encoding and publishing
    cpu_ms: float = 0.0         # total over `drawn`: the drawing thread's CPU time, all of the above

    def values(self) -> Dict[str, str]:
        """The diagnostics key-values."""
        n, r, j = max(1, self.drawn), max(1, self.published_raw), max(1, self.published_jpeg)
        return {"annotated_offered": str(self.offered), "annotated_drawn": str(self.drawn), "annotated_published_raw": str(self.published_raw),
                "annotated_published_jpeg": str(self.published_jpeg),
                "annotated_no_subscriber": str(self.no_subscriber), "annotated_dropped": str(self.dropped),
                "annotated_no_image": str(self.no_image), "annotated_errors": str(self.errors),
                "annotated_draw_ms_avg": f"{self.draw_ms / n:.2f}", "annotated_raw_ms_avg": f"{self.raw_ms / r:.2f}",
                "annotated_jpeg_ms_avg": f"{self.jpeg_ms / j:.2f}",
                "annotated_cpu_ms_avg": f"{self.cpu_ms / n:.2f}", "annotated_last_error": self.last_error}


class AnnotatedImages:
    """The two publishers (lifecycle: they publish while the node is active) and the drawing thread."""

    def __init__(self, node, jpeg_quality: Callable[[], int]):
        self._node = node
        self._jpeg_quality = jpeg_quality
        self.raw = node.create_lifecycle_publisher(Image, "~/annotated", QOS)
        self.jpeg = node.create_lifecycle_publisher(CompressedImage, "~/annotated/compressed", QOS)
        self.stats = AnnotatedStats()
        self._queue: Deque[Tuple[str, object]] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mobilevlm-annotate", daemon=True)
        self._thread.start()

    def subscribers(self) -> Tuple[int, int]:
        return self.raw.get_subscription_count(), self.jpeg.get_subscription_count()

    def offer(self, question: str, result) -> None:
        """An answer from the generation worker, queued for the drawing thread, which looks at the
        subscribers. O(1), and no call into rclpy, whose handle locks the drawing thread may hold
        while it publishes."""
        with self._lock:
            self.stats.offered += 1
        if getattr(result, "image", None) is None:
            with self._lock:
                self.stats.no_image += 1
            return
        with self._lock:    # no rclpy call here: the drawing thread may hold the publishers' handles
            if len(self._queue) >= QUEUE:
                self._queue.popleft()
                self.stats.dropped += 1
            self._queue.append((question, result))
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._ready.wait()
                if self._stop:
                    return
                question, result = self._queue.popleft()
            try:
                self._publish(question, result)
            except Exception as e:          # a frame that cannot be decoded, a context going down
                with self._lock:
                    self.stats.errors += 1
                    self.stats.last_error = f"{type(e).__name__}: {e}"

    def _publish(self, question: str, result) -> None:
        n_raw, n_jpeg = self.subscribers()      # publish time: a viewer may have gone meanwhile
        if not (n_raw or n_jpeg):
            with self._lock:
                self.stats.no_subscriber += 1
            return
        cpu0, t0 = time.thread_time(), time.perf_counter()
        bgr = annotate.annotate(result, question)
        t1 = time.perf_counter()
        if n_raw:
            self.raw.publish(fill_image(Image(), result.header, bgr))
        t2 = time.perf_counter()
        if n_jpeg:
            data = annotate.encode_jpeg(bgr, self._jpeg_quality())
            self.jpeg.publish(fill_compressed(CompressedImage(), result.header, data))
        t3 = time.perf_counter()
        with self._lock:
            st = self.stats
            st.drawn += 1
            st.published_raw += int(bool(n_raw))
            st.published_jpeg += int(bool(n_jpeg))
            st.draw_ms += (t1 - t0) * 1e3
            st.raw_ms += (t2 - t1) * 1e3
            st.jpeg_ms += (t3 - t2) * 1e3
            st.cpu_ms += (time.thread_time() - cpu0) * 1e3

    def snapshot(self) -> AnnotatedStats:
        with self._lock:
            return AnnotatedStats(**vars(self.stats))

    def close(self) -> None:
        """Stop the thread (an image being drawn is finished) and destroy the publishers."""
        with self._lock:
            self._stop = True
            self._queue.clear()
            self._ready.notify_all()
        self._thread.join(timeout=10.0)
        for pub in (self.raw, self.jpeg):
            self._node.destroy_lifecycle_publisher(pub)

"""What the engine reports: its counters, each camera's frame counters and the consistent copy
diagnostics read (Engine.stats)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict

COUNTERS = ("requests", "answers", "errors", "busy", "cancelled", "captions", "captions_skipped",
            "frames_prefilled", "encoded_on_demand")


class Counters:
    """The engine's event counts and its last error, safe to bump from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self.last_error = ""

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def error(self, error: str) -> None:
        """Count an error and remember it as the last one."""
        with self._lock:
            self._counts["errors"] += 1
            self.last_error = error

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._counts)


@dataclass
class CameraStats:
    """One camera's frame counters (FrameStore.stats)."""
    received: int = 0
    encoded: int = 0
    dropped: int = 0            # replaced in the pending slot before the vision worker took them
    rejected: int = 0           # failed validation or decoding
    last_reject: str = ""
    vision_ms: float = 0.0      # encode time of the last frame (per frame, batch share)
    vision_ms_avg: float = 0.0  # exponential moving average
    latency_ms: float = 0.0     # reception -> embedding cached, last frame
    latest_stamp_ns: int = 0    # newest frame received
    latest_received_ns: int = 0
    callback_cpu_ms: float = 0.0      # image callbacks' CPU time, all frames (the node's own work)
    callback_cpu_ms_max: float = 0.0
    cached: int = 0             # frames in the embedding cache now
    cached_bytes: int = 0       # what they hold: embeddings and kept images

    @property
    def callback_cpu_ms_avg(self) -> float:
        return self.callback_cpu_ms / self.received if self.received else 0.0


@dataclass
class EngineStats:
    """A consistent copy of what diagnostics report."""
    serving: bool
    counts: Dict[str, int]
    queue_depth: int
    max_queue: int
    in_progress: int
    cameras: Dict[str, CameraStats]
    vision_errors: int
    last_error: str
    last_total_ms: float
    max_frame_age_s: float               # in effect now (0 = no limit)
    prefill_ms_avg: float
    decoder_kv_states: int = 0
    decoder_cache_bytes: int = 0         # host memory of the decoder's cached KV states
    vision_aborted: int = 0              # background encodes stopped for an answer (redone later)
    extra: Dict[str, Any] = field(default_factory=dict)

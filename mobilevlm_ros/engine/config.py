"""The engine's configuration: one frozen dataclass, validated once.

Each field declares its own bounds and whether it may change while the engine runs; the node's
parameter table (ros/params.py) maps ROS parameters of the same names onto it, and replay reads the
same names from a node parameters file.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..core.errors import MobileVLMError
from ..core.generation import MAX_NEW_TOKENS_LIMIT

CAMERA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# max_frame_age_s < 0 ("auto"): frames up to this old are always accepted; beyond it, a frame is
# accepted while it is younger than one vision period + AUTO_AGE_CYCLES encode + prefill cycles +
# one answer (all measured), so on a slow CPU a question about "the latest frame" takes the newest
# frame already in the decoder instead of waiting for a new encode or prefill. Three cycles: the
# frame was one cycle old when it entered the decoder, its successor was up to a cycle along when
# an answer interrupted it, and after the answer the next frame takes a whole cycle again.
AUTO_AGE_MIN_S = 2.0
AUTO_AGE_CYCLES = 3.0

# Node parameters renamed before the first release (CHANGELOG.md). A parameters file that still sets
# an old name is refused with the new one, by the node and by replay's --params, not ignored.
RENAMED_PARAMETERS = {"llamacpp_engine": "llama_library", "frame_cache_size": "embedding_cache_size"}


class ConfigError(MobileVLMError, ValueError):
    """A configuration value is out of range (the message lists every problem)."""


@dataclass(frozen=True)
class Spec:
    """What a field accepts: a description, inclusive bounds (or an exclusive lower one), choices,
    and whether it may change while the engine runs."""
    doc: str
    runtime: bool = True
    low: Optional[float] = None
    high: Optional[float] = None
    above: Optional[float] = None
    choices: Tuple[str, ...] = ()

    def check(self, name: str, value) -> Optional[str]:
        """Why `value` is not acceptable for field `name`, or None."""
        if self.choices and value not in self.choices:
            return f"{name} must be one of {', '.join(self.choices)}, got '{value}'"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            lo = self.low if self.low is not None else "-inf"
            hi = self.high if self.high is not None else "inf"
            return f"{name} must be in [{lo}, {hi}], got {value}"
        if self.above is not None and value <= self.above:
            hi = f", {self.high}]" if self.high is not None else ", inf)"
            return f"{name} must be in ({self.above}{hi}, got {value}"
        return None


def _f(default, doc: str, **spec) -> Any:
    return field(default=default, metadata={"spec": Spec(doc, **spec)})


def check_cameras(cameras) -> Optional[str]:
    if not cameras:
        return "cameras must name at least one camera"
    for c in cameras:
        if not isinstance(c, str) or not CAMERA_NAME.match(c):
            return f"camera name '{c}' is not a valid ROS name token (letters, digits, '_')"
    if len(set(cameras)) != len(cameras):
        return f"camera names must be unique, got {list(cameras)}"
    return None


@dataclass(frozen=True)
class EngineConfig:
    cameras: Tuple[str, ...] = _f(("front",), "camera names; the first is the default camera",
                                  runtime=False)
    embedding_cache_size: int = _f(4, "encoded frames (image embeddings + headers) kept per camera",
                                   runtime=False, low=1, high=1000)
    keep_frame_images: bool = _f(True, "keep each cached frame as received (message data, or JPEG/PNG bytes) "
                                 "beside its embedding, so that an answer is drawn on the frame it describes "
                                 "(the node's ~/annotated, replay's answers bag); costs embedding_cache_size "
                                 "frames per camera in memory. false: a frame's pixels are freed once it is "
                                 "encoded, and no answer is drawn", runtime=False)
    max_queue: int = _f(4, "requests waiting for the generation worker; more are answered BUSY",
                        runtime=False, low=1, high=256)
    vision_rate_hz: float = _f(2.0, "most frame-batch encodes per second; 0 = as fast as possible",
                               low=0.0, high=1000.0)
    vision_during_answers: bool = _f(False, "encode frames in the background also while a question is "
                                     "answered; false = answers first (on a CPU an encode beside an "
                                     "answer takes the decoder's cores)")
    prefill_frames: bool = _f(True, "while no request waits, evaluate the newest fresh frame of each "
                              "camera in the decoder, so that a question about it pays only for its own text")
    max_frame_age_s: float = _f(-1.0, "frames older than this (clock at question time) are not used; "
                                "0 = no limit; negative = auto: at least "
                                f"{AUTO_AGE_MIN_S:g} s, and up to a vision period + {AUTO_AGE_CYCLES:g} "
                                "measured encode + prefill cycles + one answer", low=-1.0, high=1e9)
    max_new_tokens: int = _f(128, "default upper bound on generated tokens", low=1, high=MAX_NEW_TOKENS_LIMIT)
    temperature: float = _f(0.0, "default sampling temperature; 0 = greedy", low=0.0, high=10.0)
    top_p: float = _f(1.0, "default nucleus sampling threshold", above=0.0, high=1.0)
    seed: int = _f(-1, "default random seed; -1 = a fresh seed per request", low=-1, high=2 ** 32 - 1)
    max_question_chars: int = _f(2000, "longest accepted question, in characters", low=1, high=1000000)
    caption_prompt: str = _f("Describe the scene in one sentence.", "question asked for periodic captions")
    caption_period_s: float = _f(0.0, "caption each camera's newest frame this often; 0 = off",
                                 low=0.0, high=1e6)

    @classmethod
    def specs(cls) -> Dict[str, Spec]:
        return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls)}

    def problems(self) -> list:
        out = [e for name, spec in self.specs().items() if (e := spec.check(name, getattr(self, name)))]
        if (e := check_cameras(self.cameras)):
            out.append(e)
        return out

    def validate(self) -> "EngineConfig":
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def replace(self, **changes) -> "EngineConfig":
        """A validated copy with `changes` (names must be fields)."""
        unknown = sorted(set(changes) - set(self.specs()))
        if unknown:
            raise ConfigError(f"unknown engine setting(s): {', '.join(unknown)}")
        if "cameras" in changes:
            changes["cameras"] = tuple(changes["cameras"])
        return dataclasses.replace(self, **changes).validate()

    @property
    def default_camera(self) -> str:
        return self.cameras[0]

"""The questions file of mobilevlm-replay (docs/replay.md): its schema, and the schedule of the
'at' and 'every_s' questions on a bag's clock ('every_n_frames' ones are asked by the runner as
their frames arrive)."""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..core.errors import MobileVLMError, RequestError
from ..core.generation import GenerationParams
from ..engine.config import check_cameras
from ..engine.frames import NS

GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "seed")
ENTRY_KEYS = {"id", "question", "camera", "at", "every_s", "every_n_frames", "start_s", "end_s", *GEN_KEYS}
TOP_KEYS = {"cameras", "questions", "max_frame_age_s", "defaults"}


class QuestionsError(MobileVLMError):
    """The questions file is missing or does not follow the schema (docs/replay.md)."""


# ------------------------------------------------------------------------------------ questions file
@dataclass
class Entry:
    index: int
    id: str
    questions: List[str]
    camera: str
    at: List[Tuple[float, Optional[int], Optional[float]]] = field(default_factory=list)  # (t, stamp ns, stamp_s)
    every_s: Optional[float] = None
    every_n_frames: Optional[int] = None
    start_s: float = 0.0
    end_s: Optional[float] = None
    gen: Dict[str, Any] = field(default_factory=dict)


@dataclass
class QuestionsFile:
    path: str
    cameras: Dict[str, str]                 # camera -> topic
    entries: List[Entry]
    max_frame_age_s: Optional[float] = None
    defaults: Dict[str, Any] = field(default_factory=dict)
    sha256: str = ""                        # of the file's text (a fleet run's resume key)


def _number(v, where: str, *, minimum: Optional[float] = 0.0, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise QuestionsError(f"{where} must be a number, got {v!r}")
    if positive and v <= 0:
        raise QuestionsError(f"{where} must be > 0, got {v}")
    if minimum is not None and v < minimum:
        raise QuestionsError(f"{where} must be >= {minimum:g}, got {v}")
    return float(v)


def _gen_overrides(d: dict, where: str) -> Dict[str, Any]:
    out = {}
    for k in GEN_KEYS:
        if k not in d or d[k] is None:
            continue
        v = d[k]
        if k in ("max_new_tokens", "seed"):
            if isinstance(v, bool) or not isinstance(v, int):
                raise QuestionsError(f"{where}.{k} must be an integer, got {v!r}")
        else:
            v = _number(v, f"{where}.{k}", minimum=None)
        out[k] = v
    try:
        dataclasses.replace(GenerationParams(), **out)          # checks itself when made
    except RequestError as e:
        raise QuestionsError(f"{where}: {e}") from None
    return out


def parse_questions(doc, path: str = "<questions>") -> QuestionsFile:
    """Validate a loaded questions document (see docs/replay.md). Raises QuestionsError naming the key."""
    if not isinstance(doc, dict):
        raise QuestionsError(f"{path}: expected a mapping with 'cameras' and 'questions'")
    if unknown := sorted(set(doc) - TOP_KEYS):
        raise QuestionsError(f"{path}: unknown key(s) {', '.join(map(str, unknown))} "
                             f"(allowed: {', '.join(sorted(TOP_KEYS))})")
    cams = doc.get("cameras")
    if not isinstance(cams, dict) or not cams:
        raise QuestionsError(f"{path}: 'cameras' must map camera names to image topics")
    cameras: Dict[str, str] = {}
    for name, topic in cams.items():
        if check_cameras([name]):
            raise QuestionsError(f"{path}: camera name {name!r} must be letters, digits and '_' "
                                 f"(starting with a letter), as the node's")
        if not isinstance(topic, str) or not topic.startswith("/"):
            raise QuestionsError(f"{path}: cameras.{name} must be an absolute topic name, got {topic!r}")
        if topic in cameras.values():
            raise QuestionsError(f"{path}: topic {topic} is mapped to more than one camera")
        cameras[name] = topic
    max_age = doc.get("max_frame_age_s")
    if max_age is not None:
        max_age = _number(max_age, f"{path}: max_frame_age_s")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise QuestionsError(f"{path}: 'defaults' must be a mapping of {', '.join(GEN_KEYS)}")
    if bad := set(defaults) - set(GEN_KEYS):
        raise QuestionsError(f"{path}: 'defaults' may only set {', '.join(GEN_KEYS)} "
                             f"(unknown: {', '.join(sorted(map(str, bad)))})")
    defaults = _gen_overrides(defaults, f"{path}: defaults")
    qs = doc.get("questions")
    if not isinstance(qs, list) or not qs:
        raise QuestionsError(f"{path}: 'questions' must be a non-empty list")
    entries = []
    for i, q in enumerate(qs):
        where = f"{path}: questions[{i}]"
        if not isinstance(q, dict):
            raise QuestionsError(f"{where} must be a mapping")
        if unknown := sorted(set(q) - ENTRY_KEYS):
            raise QuestionsError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                                 f"(allowed: {', '.join(sorted(ENTRY_KEYS))})")
        text = q.get("question")
        texts = text if isinstance(text, list) else [text]
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise QuestionsError(f"{where}.question must be a non-empty string or a list of them")
        camera = q.get("camera")
        if camera is None:
            if len(cameras) != 1:
                raise QuestionsError(f"{where}.camera is required when there are several cameras "
                                     f"({', '.join(cameras)})")
            camera = next(iter(cameras))
        if camera not in cameras:
            raise QuestionsError(f"{where}.camera '{camera}' is not one of the cameras ({', '.join(cameras)})")
        when = [k for k in ("at", "every_s", "every_n_frames") if q.get(k) is not None]
        if len(when) != 1:
            raise QuestionsError(f"{where} needs exactly one of 'at', 'every_s', 'every_n_frames'"
                                 + (f" (has {', '.join(when)})" if when else ""))
        e = Entry(index=i, id=str(q.get("id", f"q{i}")), questions=texts, camera=camera,
                  gen=_gen_overrides(q, where))
        if "at" in when:
            if q.get("start_s") is not None or q.get("end_s") is not None:
                raise QuestionsError(f"{where}: start_s/end_s go with every_s or every_n_frames, not 'at'")
            items = q["at"] if isinstance(q["at"], list) else [q["at"]]
            if not items:
                raise QuestionsError(f"{where}.at must list at least one time")
            for j, item in enumerate(items):
                w = f"{where}.at[{j}]"
                if isinstance(item, dict):
                    if bad := set(item) - {"t", "stamp_s", "stamp"}:
                        raise QuestionsError(f"{w}: unknown key(s) {', '.join(sorted(map(str, bad)))} "
                                             f"(allowed: t, stamp_s, stamp)")
                    if "t" not in item:
                        raise QuestionsError(f"{w} needs 't' (seconds from the bag start)")
                    t = _number(item["t"], f"{w}.t")
                    stamp_abs, stamp_rel = None, None
                    if item.get("stamp") is not None and item.get("stamp_s") is not None:
                        raise QuestionsError(f"{w}: give 'stamp' or 'stamp_s', not both")
                    if item.get("stamp") is not None:
                        s = item["stamp"]
                        if not (isinstance(s, dict) and set(s) <= {"sec", "nanosec"} and "sec" in s
                                and all(isinstance(s.get(k, 0), int) and not isinstance(s.get(k, 0), bool)
                                        and s.get(k, 0) >= 0 for k in ("sec", "nanosec"))
                                and s.get("nanosec", 0) < NS):
                            raise QuestionsError(f"{w}.stamp must be {{sec: S, nanosec: N}} (non-negative "
                                                 f"integers, nanosec < 1e9), got {s!r}")
                        stamp_abs = int(s["sec"]) * NS + int(s.get("nanosec", 0))
                    if item.get("stamp_s") is not None:
                        stamp_rel = _number(item["stamp_s"], f"{w}.stamp_s")
                    e.at.append((t, stamp_abs, stamp_rel))
                else:
                    e.at.append((_number(item, w), None, None))
        else:
            e.start_s = _number(q.get("start_s", 0.0), f"{where}.start_s")
            if q.get("end_s") is not None:
                e.end_s = _number(q["end_s"], f"{where}.end_s")
                if e.end_s < e.start_s:
                    raise QuestionsError(f"{where}: end_s {e.end_s} is before start_s {e.start_s}")
            if "every_s" in when:
                e.every_s = _number(q["every_s"], f"{where}.every_s", positive=True)
            else:
                n = q["every_n_frames"]
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    raise QuestionsError(f"{where}.every_n_frames must be a positive integer, got {n!r}")
                e.every_n_frames = n
        entries.append(e)
    return QuestionsFile(path, cameras, entries, max_age, defaults)


def load_questions(path) -> QuestionsFile:
    import yaml
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise QuestionsError(f"cannot read questions file {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise QuestionsError(f"{path}: not valid YAML: {e}") from None
    qf = parse_questions(doc, str(path))
    qf.sha256 = hashlib.sha256(text.encode()).hexdigest()
    return qf


# ------------------------------------------------------------------------------------ schedule
@dataclass
class Ask:
    """One question to answer: at bag time `at_ns`, about `camera`, optionally near a stamp."""
    at_ns: int
    order: Tuple
    entry: Entry
    question: str
    stamp_ns: int = 0                  # requested stamp; 0 = the newest frame
    frame_seq: Optional[int] = None    # every_n_frames: the frame that triggered it


def timed_asks(qf: QuestionsFile, start_ns: int, end_ns: int) -> List[Ask]:
    """The 'at' and 'every_s' questions in the order they are asked (bag time, then file order)."""
    out: List[Ask] = []
    end_rel = (end_ns - start_ns) / NS
    for e in qf.entries:
        times: List[Tuple[float, int]] = []
        if e.at:
            for t, stamp_abs, stamp_rel in e.at:
                stamp = stamp_abs if stamp_abs is not None else (
                    start_ns + int(round(stamp_rel * NS)) if stamp_rel is not None else 0)
                times.append((t, stamp))
        elif e.every_s is not None:
            last = e.end_s if e.end_s is not None else end_rel
            i = 0
            while (t := e.start_s + i * e.every_s) <= last + 1e-9:
                times.append((t, 0))
                i += 1
        for j, (t, stamp) in enumerate(times):
            at = start_ns + int(round(t * NS))
            for k, text in enumerate(e.questions):
                out.append(Ask(at, (at, e.index, j, k), e, text, stamp))
    out.sort(key=lambda a: a.order)
    return out



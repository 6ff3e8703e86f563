"""mobilevlm-replay: answer questions about the camera frames of a rosbag2 bag, offline, as the node would.

    mobilevlm-replay BAG --questions FILE --out answers.jsonl --model PATH
                     [--vision-backend B] [--decoder D] [--quant Q] [--max-new-tokens N] [--temperature T]
                     [--top-p P] [--seed S] [--max-frame-age S] [--params NODE.yaml]
                     [--vision-rate-hz HZ] [--frame-cache-size N] [--answers-bag PATH]
                     [--expect PREVIOUS.jsonl] [--no-progress]

BAG: a rosbag2 folder (sqlite3 or mcap storage) or a bare .mcap / .db3 file, read with `rosbags` (no
ROS install needed). Camera topics: sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage.
The node's own engine (mobilevlm_ros.engine) runs on the bag's clock: messages are offered in bag
time order as the node's image callbacks offer them, a simulated vision worker caches frames on
the node's schedule (vision_rate_hz; encoding takes no time there, and a frame's embedding is
computed once, at its first use), and each question is submitted at its bag time and answered
before the bag moves on. So a question gets the frame the node would pick (engine.frames
.select_frame) whatever this machine's speed, and, under the determinism contract, the same answer.

Output: one JSON line per question (answers, and failures with "error"), a summary in
<out>.summary.json and on stderr. --answers-bag writes the answers as mobilevlm_ros/msg/Answer
(mcap) on /mobilevlm/answers, as the node publishes them, and each answer drawn on its frame
(JPEG, sensor_msgs/CompressedImage, the frame's header) on /mobilevlm/annotated/compressed, as the
node's ~/annotated/compressed. --expect compares with a previous output.
See docs/replay.md for the questions file.

Exit codes: 0 done; 1 the model cannot be loaded; 2 bad input (bag missing, corrupt or unsupported,
bad questions file or arguments); 3 --expect found differences.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .bagio import ANSWER, COMPRESSED, IMAGE, BagError, BagReader, BagWriter
from ..core.errors import ImageError, MobileVLMError, ModelLoadError, RequestError
from ..core.generation import GenerationParams
from ..engine.config import AUTO_AGE_MIN_S, ConfigError, EngineConfig, check_cameras
from ..engine.engine import Engine, SimClock
from ..engine.frames import NS
from ..engine import annotate
from ..engine.requests import Request, Result
from ..ros.conversion import JPEG_FORMAT, raw_image, stamp_ns
from .ask import add_generation_args, add_model_args, load_from_args, params_from_args

log = logging.getLogger("mobilevlm-replay")

ANSWERS_TOPIC = "/mobilevlm/answers"
ANNOTATED_TOPIC = "/mobilevlm/annotated/compressed"
PROGRESS_MIN_MESSAGES = 200
LIST_LIMIT = 50                    # --expect differences printed
EXIT_OK, EXIT_MODEL, EXIT_INPUT, EXIT_CHANGED = 0, 1, 2, 3
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
        dataclasses.replace(GenerationParams(), **out).validate()
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
    return parse_questions(doc, str(path))


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


# ------------------------------------------------------------------------------------ replay
@dataclass
class FrameInfo:
    topic: str
    index: int                         # position among the camera's messages (0 = first)
    bag_ns: int


def _stamp_dict(ns: Optional[int]):
    return None if not ns else {"sec": ns // NS, "nanosec": ns % NS}


def engine_config(qf: QuestionsFile, params_file: Optional[str] = None, **overrides) -> EngineConfig:
    """The engine's settings: the node's defaults, or those of a node parameters file (the
    `/**: ros__parameters` mapping of config/mobilevlm.yaml), with the bag's cameras and the
    frame-age limit of the command line / questions file."""
    values: Dict[str, Any] = {}
    if params_file:
        import yaml
        try:
            doc = yaml.safe_load(Path(params_file).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise QuestionsError(f"cannot read parameters file {params_file}: {e}") from None
        section = next((v.get("ros__parameters") for v in (doc or {}).values()
                        if isinstance(v, dict) and "ros__parameters" in v), None)
        if not isinstance(section, dict):
            raise QuestionsError(f"{params_file}: no '<node>: ros__parameters:' mapping")
        values = {k: v for k, v in section.items() if k in EngineConfig.specs()}
    values.update(cameras=tuple(qf.cameras), **{k: v for k, v in overrides.items() if v is not None})
    try:
        return EngineConfig(**values).validate()
    except ConfigError as e:
        raise QuestionsError(f"engine settings: {e}") from None


class Replay:
    """Walks the bag through the node's engine on the bag's clock, answers the questions, records
    one line per question and the run's counts.

    The engine runs stepped (no threads): each camera message is offered as the node's image
    callback would offer it, the simulated vision worker caches frames on the node's schedule
    (vision_rate_hz on the bag's clock; encoding is instant there and computed once, at a frame's
    first use), and each question is submitted at its bag time and answered before the bag moves
    on, so frame choices and answers do not depend on this machine's speed."""

    def __init__(self, bag, qf: QuestionsFile, model, base_params: GenerationParams, config: EngineConfig,
                 out, answers_bag: Optional[BagWriter] = None, progress: Optional[bool] = None):
        self.bag, self.qf, self.model = bag, qf, model
        self.out, self.answers_bag, self.progress = out, answers_bag, progress
        self.base = dataclasses.replace(base_params, **qf.defaults).validate()
        self.params = {e.index: dataclasses.replace(self.base, **e.gen).validate() for e in qf.entries}
        self.start_ns, self.end_ns = bag.start_ns, bag.end_ns
        self.clock = SimClock(self.start_ns)
        self.engine = Engine(model, config, clock=self.clock, simulated=True)
        self.config = config
        self.info: Dict[int, FrameInfo] = {}
        self.counts = {c: 0 for c in qf.cameras}
        self.rejected: Dict[str, List[str]] = {c: [] for c in qf.cameras}
        self.rejected_at: Dict[Tuple[str, int], str] = {}
        self.records: List[dict] = []
        self.encoded = 0
        self.reused = 0
        self.nth = [e for e in qf.entries if e.every_n_frames]

    # -------------------------------------------------------------- main loop
    def run(self) -> None:
        topic_cam = {t: c for c, t in self.qf.cameras.items()}
        pending = timed_asks(self.qf, self.start_ns, self.end_ns)
        nxt = 0
        total = self.bag.count(topic_cam)
        from tqdm import tqdm
        disable = (not self.progress) if self.progress is not None else (
            True if total < PROGRESS_MIN_MESSAGES else None)
        bar = tqdm(total=total, desc="replay", unit="msg", disable=disable, file=sys.stderr)
        try:
            for topic, msgtype, ts, msg in self.bag.iter_messages(topic_cam):
                while nxt < len(pending) and pending[nxt].at_ns < ts:
                    self.answer(pending[nxt])
                    nxt += 1
                self.clock.set(ts)
                camera = topic_cam[topic]
                index = self.counts[camera]
                self.counts[camera] += 1
                frame = self.offer(camera, msgtype, msg, index)
                if frame is not None:
                    self.info[frame.seq] = FrameInfo(topic, index, ts)
                self.engine.vision_step()
                for e in self.nth:
                    if e.camera != camera or index % e.every_n_frames:
                        continue
                    rel = (ts - self.start_ns) / NS
                    if rel < e.start_s - 1e-9 or (e.end_s is not None and rel > e.end_s + 1e-9):
                        continue
                    for k, text in enumerate(e.questions):
                        a = Ask(ts, (ts, e.index, index, k), e, text,
                                frame.stamp_ns if frame is not None else 0,
                                frame.seq if frame is not None else None)
                        if frame is None:
                            self.fail(a, f"frame {index} of camera '{camera}' was rejected: "
                                         f"{self.rejected_at[(camera, index)]}", "NO_FRAME",
                                      topic=topic, frame_index=index)
                        else:
                            self.answer(a)
                bar.update(1)
            for a in pending[nxt:]:
                self.answer(a)
        finally:
            bar.close()

    def offer(self, camera: str, msgtype: str, msg, index: int):
        """A bag message to the engine, as the node's image callbacks offer it; None if rejected."""
        stamp = stamp_ns(msg.header.stamp)
        try:
            if msgtype == IMAGE:
                return self.engine.offer_raw(camera, msg.header, stamp, raw_image(msg))
            return self.engine.offer_compressed(camera, msg.header, stamp, msg.format, msg.data)
        except ImageError as e:
            self.rejected[camera].append(f"frame {index} at bag time {self.clock()}: {e}")
            self.rejected_at[(camera, index)] = str(e)
            return None

    # -------------------------------------------------------------- one question
    def _base_record(self, a: Ask) -> dict:
        return {"id": a.entry.id, "t": round((a.at_ns - self.start_ns) / NS, 9), "bag_time_ns": a.at_ns,
                "camera": a.entry.camera, "topic": self.qf.cameras[a.entry.camera], "question": a.question,
                "requested_stamp": _stamp_dict(a.stamp_ns)}

    def _frame_fields(self, r: Result) -> dict:
        info = self.info.get(r.frame_seq)
        header = r.header
        return {"frame_stamp": {"sec": int(header.stamp.sec), "nanosec": int(header.stamp.nanosec)},
                "frame_id": str(header.frame_id),
                "frame_index": info.index if info else None,
                "frame_bag_time_ns": info.bag_ns if info else None}

    def emit(self, rec: dict) -> None:
        self.records.append(rec)
        self.out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.out.flush()

    def fail(self, a: Ask, error: str, status: str, result: Optional[Result] = None, **extra) -> None:
        rec = self._base_record(a)
        if result is not None and result.header is not None:
            rec.update(self._frame_fields(result))
            rec["frame_age_ms"] = round(result.frame_age_ms, 3)
        rec.update(extra)
        rec.update({"error": error, "error_type": status})
        self.emit(rec)

    def request(self, a: Ask) -> Request:
        p = self.params[a.entry.index]
        return Request(a.question, camera=a.entry.camera, stamp_ns=a.stamp_ns, max_new_tokens=p.max_new_tokens,
                       temperature=p.temperature, top_p=p.top_p, seed=-2 if p.seed is None else p.seed,
                       kind="replay")

    def answer(self, a: Ask) -> None:
        self.clock.set(a.at_ns)
        ticket = self.engine.submit(self.request(a))
        self.engine.run_pending()
        r = ticket.result(0)
        if not r.success:
            self.fail(a, r.error, r.status.name, r)
            return
        computed = r.vision_ms > 0
        self.encoded += int(computed)
        self.reused += int(not computed)
        rec = self._base_record(a)
        rec.update(self._frame_fields(r))
        rec.update({
            "frame_age_ms": round(r.frame_age_ms, 3),
            "answer": r.answer, "answer_ids": list(r.answer_ids), "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "embedding_reused": not computed,
            "timings_ms": {"vision": round(r.vision_ms, 3), "prefill": round(r.prefill_ms, 3),
                           "decode": round(r.decode_ms, 3), "first_token": round(r.first_token_ms, 3),
                           "total": round(r.total_ms, 3)},
        })
        self.emit(rec)
        if self.answers_bag is not None:
            h = r.header
            msg = self.answers_bag.answer(
                stamp_ns=stamp_ns(h.stamp), frame_id=str(h.frame_id), camera=a.entry.camera, question=a.question,
                answer=r.answer, model_id=self.model.model_id, prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens, finish_reason=r.finish_reason,
                vision_ms=r.vision_ms, prefill_ms=r.prefill_ms, decode_ms=r.decode_ms,
                first_token_ms=r.first_token_ms, total_ms=r.total_ms, answered_at_ns=a.at_ns,
                status=int(r.status))
            self.answers_bag.write(ANSWERS_TOPIC, ANSWER, a.at_ns, msg)
            bgr = annotate.annotate(r, a.question)      # the node's ~/annotated image of this answer
            if bgr is not None:
                self.answers_bag.write(ANNOTATED_TOPIC, COMPRESSED, a.at_ns, self.answers_bag.compressed(
                    stamp_ns(h.stamp), str(h.frame_id), annotate.encode_jpeg(bgr), JPEG_FORMAT))

    # -------------------------------------------------------------- summary
    def summary(self) -> dict:
        answers = [r for r in self.records if "error" not in r]
        failures = [r for r in self.records if "error" in r]

        def pct(values):
            if not values:
                return None
            v = np.asarray(values, dtype=np.float64)
            return {f"p{p}": round(float(np.percentile(v, p)), 3) for p in (50, 90, 99)} | {
                "mean": round(float(v.mean()), 3), "max": round(float(v.max()), 3)}

        return {
            "questions": len(self.records), "answers": len(answers), "failures": len(failures),
            "failure_kinds": dict(Counter(r["error_type"] for r in failures)),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in answers)),
            "frames_encoded": self.encoded, "embeddings_reused": self.reused,
            "cameras": {c: {"topic": self.qf.cameras[c], "frames": self.counts[c],
                            "rejected": len(self.rejected[c]), "first_rejects": self.rejected[c][:5]}
                        for c in self.qf.cameras},
            "latency_ms": {"total": pct([r["timings_ms"]["total"] for r in answers]),
                           "first_token": pct([r["timings_ms"]["first_token"] for r in answers])},
        }


# ------------------------------------------------------------------------------------ --expect
def _key(rec: dict) -> Tuple:
    return (rec.get("camera"), rec.get("bag_time_ns"), rec.get("question"))


def _keyed(records: List[dict]) -> "OrderedDict[Tuple, dict]":
    out: "OrderedDict[Tuple, dict]" = OrderedDict()
    seen: Counter = Counter()
    for r in records:
        k = _key(r)
        out[k + (seen[k],)] = r
        seen[k] += 1
    return out


def read_jsonl(path) -> List[dict]:
    recs = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise QuestionsError(f"cannot read {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuestionsError(f"{path}:{n}: not a JSON line: {e}") from None
        if not isinstance(rec, dict) or "question" not in rec:
            raise QuestionsError(f"{path}:{n}: not a mobilevlm-replay answer line")
        recs.append(rec)
    return recs


def _describe(k: Tuple, rec: dict) -> str:
    camera, at, question, dup = k
    t = rec.get("t")
    when = f"t={t:.3f} s" if isinstance(t, (int, float)) else f"{at} ns"
    return f"{camera} @ {when}: {question!r}" + (f" (#{dup + 1})" if dup else "")


def _outcome(r: dict) -> str:
    return f"error: {r['error']}" if "error" in r else repr(r.get("answer"))


def compare(previous: List[dict], current: List[dict]) -> dict:
    """Differences by (camera, bag time, question): added, missing, changed (answer text, ids, error,
    frame stamp)."""
    old, new = _keyed(previous), _keyed(current)
    added = [k for k in new if k not in old]
    missing = [k for k in old if k not in new]
    changed = []
    for k in new:
        if k not in old:
            continue
        a, b = old[k], new[k]
        what = []
        if ("error" in a) != ("error" in b) or a.get("error") != b.get("error"):
            what.append(f"{_outcome(a)} -> {_outcome(b)}")
        else:
            if a.get("answer") != b.get("answer"):
                what.append(f"answer {a.get('answer')!r} -> {b.get('answer')!r}")
            if a.get("answer_ids") != b.get("answer_ids"):
                ia, ib = a.get("answer_ids") or [], b.get("answer_ids") or []
                at = next((i for i, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
                what.append(f"answer_ids differ from token {at} ({len(ia)} -> {len(ib)} tokens)")
        if a.get("frame_stamp") != b.get("frame_stamp"):
            what.append(f"frame_stamp {a.get('frame_stamp')} -> {b.get('frame_stamp')}")
        if what:
            changed.append((k, "; ".join(what)))
    lines = ([f"added: {_describe(k, new[k])}: {_outcome(new[k])}" for k in added]
             + [f"missing: {_describe(k, old[k])}: was {_outcome(old[k])}" for k in missing]
             + [f"changed: {_describe(k, new[k])}: {w}" for k, w in changed])
    return {"same": len(new) - len(added) - len(changed), "added": len(added), "missing": len(missing),
            "changed": len(changed), "differences": lines}


# ------------------------------------------------------------------------------------ CLI
def summary_path(out: Path) -> Path:
    return out.with_name(out.name[: -len(out.suffix)] + ".summary.json" if out.suffix else out.name + ".summary.json")


def _check_topics(bag, qf: QuestionsFile) -> None:
    topics = bag.topics()
    images = bag.image_topics()
    for cam, topic in qf.cameras.items():
        if topic not in topics:
            raise BagError(f"{bag.path}: camera '{cam}': topic {topic} is not in the bag (image topics: "
                           f"{', '.join(f'{t} [{m}]' for t, m in images.items()) or 'none'})")
        if topic not in images:
            raise BagError(f"{bag.path}: camera '{cam}': topic {topic} has type {topics[topic]}; "
                           f"expected {IMAGE} or {COMPRESSED}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mobilevlm-replay", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("bag", help="rosbag2 folder (sqlite3 or mcap) or a .mcap / .db3 file")
    ap.add_argument("--questions", required=True, help="questions file (YAML, see docs/replay.md)")
    ap.add_argument("--out", required=True, help="answers, one JSON line each")
    add_model_args(ap)
    add_generation_args(ap)
    ap.add_argument("--max-frame-age", type=float, default=None, metavar="S",
                    help="frames older than S at question time are not used; 0 = no limit (default: the "
                         "questions file's max_frame_age_s, else the parameters file's, else the node's "
                         f"default: auto, which is {AUTO_AGE_MIN_S:g} s when encoding takes no time)")
    ap.add_argument("--params", default=None, metavar="FILE",
                    help="a node parameters file (config/mobilevlm.yaml style): the engine settings "
                         "(vision_rate_hz, frame_cache_size, max_frame_age_s, ...) the node ran with")
    ap.add_argument("--vision-rate-hz", type=float, default=None, metavar="HZ",
                    help="frame batches the simulated vision worker caches per second of bag time "
                         "(default: the parameters file's, else the node's default; 0 = every frame)")
    ap.add_argument("--frame-cache-size", type=int, default=None, metavar="N",
                    help="encoded frames kept per camera (default: as --vision-rate-hz)")
    ap.add_argument("--answers-bag", default=None, metavar="PATH",
                    help=f"also write the answers as {ANSWER} on {ANSWERS_TOPIC}, and drawn on their frames "
                         f"on {ANNOTATED_TOPIC}, into a new mcap bag")
    ap.add_argument("--expect", default=None, metavar="PREVIOUS.jsonl",
                    help="compare with a previous output; exit 3 listing what changed")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _err(msg: str, code: int) -> int:
    print(f"mobilevlm-replay: {msg}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    out_path = Path(a.out)
    try:
        qf = load_questions(a.questions)
        base = params_from_args(a)
        expected = read_jsonl(a.expect) if a.expect else None
        if a.max_frame_age is not None and not (math.isfinite(a.max_frame_age) and a.max_frame_age >= 0):
            raise QuestionsError(f"--max-frame-age must be >= 0, got {a.max_frame_age}")
        max_age = a.max_frame_age if a.max_frame_age is not None else qf.max_frame_age_s
        config = engine_config(qf, a.params, max_frame_age_s=max_age, vision_rate_hz=a.vision_rate_hz,
                               frame_cache_size=a.frame_cache_size)
        if a.answers_bag and Path(a.answers_bag).exists():
            raise BagError(f"{a.answers_bag}: exists already; choose a new path for the answers bag")
    except MobileVLMError as e:
        return _err(str(e), EXIT_INPUT)

    with_bag = None
    try:
        with BagReader(a.bag) as bag:
            _check_topics(bag, qf)
            try:
                t0 = time.perf_counter()
                model = load_from_args(a)
                load_ms = (time.perf_counter() - t0) * 1e3
                model_desc = model.describe()
            except ModelLoadError as e:
                return _err(f"cannot load model: {e}", EXIT_MODEL)
            try:
                out_path.parent.mkdir(parents=True, exist_ok=True)
                with open(out_path, "w", encoding="utf-8") as out:
                    if a.answers_bag:
                        with_bag = BagWriter(a.answers_bag, "mcap", with_answer=True)
                        with_bag.__enter__()
                    rp = Replay(bag, qf, model, base, config, out, with_bag,
                                progress=False if a.no_progress else None)
                    error = None
                    try:
                        rp.run()
                    except BagError as e:       # corrupt in the middle: keep what was answered
                        error = str(e)
            finally:
                if with_bag is not None:
                    with_bag.__exit__(None, None, None)
                model.close()
            summary = {
                "bag": str(a.bag), "storage": bag.storage, "questions_file": str(a.questions),
                "out": str(out_path), "answers_bag": a.answers_bag,
                "model": {"path": str(a.model), **model_desc},
                "generation": dataclasses.asdict(rp.base), "engine": dataclasses.asdict(config),
                "max_frame_age_s": rp.engine.max_frame_age_s(),
                "bag_start_ns": rp.start_ns, "bag_end_ns": rp.end_ns,
                **rp.summary(),
                "load_ms": round(load_ms, 1), "wall_s": round(time.perf_counter() - t_start, 3),
                "error": error,
            }
    except (BagError, QuestionsError) as e:
        return _err(str(e), EXIT_INPUT)
    except OSError as e:
        return _err(f"{e.filename or ''}: {e.strerror or e}", EXIT_INPUT)

    code = EXIT_OK
    if expected is not None:
        diff = compare(expected, rp.records)
        summary["expect"] = {"file": a.expect, **{k: v for k, v in diff.items() if k != "differences"},
                             "differences": diff["differences"][:1000]}
    summary_path(out_path).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    lat = summary["latency_ms"]["total"]
    print(f"mobilevlm-replay: {summary['answers']} answers, {summary['failures']} failures, "
          f"{summary['frames_encoded']} frames encoded ({summary['embeddings_reused']} reuses); latency "
          + (f"p50 {lat['p50']:.0f} / p90 {lat['p90']:.0f} / p99 {lat['p99']:.0f} ms" if lat else "-")
          + f"; {out_path} and {summary_path(out_path).name}", file=sys.stderr)
    if error:
        return _err(error + " (answers up to there are written)", EXIT_INPUT)
    if expected is not None:
        diff = summary["expect"]
        if diff["added"] or diff["missing"] or diff["changed"]:
            print(f"mobilevlm-replay: differs from {a.expect}: {diff['changed']} changed, {diff['added']} added, "
                  f"{diff['missing']} missing ({diff['same']} same)", file=sys.stderr)
            for line in diff["differences"][:LIST_LIMIT]:
                print(f"  {line}", file=sys.stderr)
            if len(diff["differences"]) > LIST_LIMIT:
                print(f"  ... and {len(diff['differences']) - LIST_LIMIT} more (see the summary)", file=sys.stderr)
            code = EXIT_CHANGED
        else:
            print(f"mobilevlm-replay: same as {a.expect} ({diff['same']} answers)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

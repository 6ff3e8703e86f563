"""Replaying one bag: the node's engine on the bag's clock, one JSON line per question.

`replay_bag` is the one path from a bag to its answers, for a single `mobilevlm-replay` and for
every bag of a fleet run alike (so a fleet's answers equal single replays' by construction)."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .bagio import ANSWER, COMPRESSED, IMAGE, BagError, BagReader, BagWriter
from .questions import Ask, QuestionsError, QuestionsFile, timed_asks
from ..core.errors import ImageError
from ..core.generation import GenerationParams
from ..engine import annotate
from ..engine.config import RENAMED_PARAMETERS, ConfigError, EngineConfig
from ..engine.engine import Engine, SimClock
from ..engine.frames import NS
from ..engine.model import Model
from ..engine.requests import Request, Result
from ..ros.conversion import JPEG_FORMAT, raw_image, stamp_ns

ANSWERS_TOPIC = "/mobilevlm/answers"
ANNOTATED_TOPIC = "/mobilevlm/annotated/compressed"   # as the node's ~/annotated/compressed
PROGRESS_MIN_MESSAGES = 200


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
        renamed = [f"{old} is now called {new}" for old, new in RENAMED_PARAMETERS.items() if old in section]
        if renamed:
            raise QuestionsError(f"{params_file}: parameter {'; '.join(renamed)} (CHANGELOG.md)")
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

    def __init__(self, bag, qf: QuestionsFile, model: Model, base_params: GenerationParams, config: EngineConfig,
                 out, answers_bag: Optional[BagWriter] = None, progress: Optional[bool] = None,
                 on_record: Optional[Callable[[dict], None]] = None):
        self.bag, self.qf, self.model = bag, qf, model
        self.out, self.answers_bag, self.progress = out, answers_bag, progress
        self.on_record = on_record
        self.base = dataclasses.replace(base_params, **qf.defaults)     # RequestError if out of range
        self.params = {e.index: dataclasses.replace(self.base, **e.gen) for e in qf.entries}
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
        if self.on_record is not None:
            self.on_record(rec)

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




def check_topics(bag, qf: QuestionsFile) -> None:
    topics = bag.topics()
    images = bag.image_topics()
    for cam, topic in qf.cameras.items():
        if topic not in topics:
            raise BagError(f"{bag.path}: camera '{cam}': topic {topic} is not in the bag (image topics: "
                           f"{', '.join(f'{t} [{m}]' for t, m in images.items()) or 'none'})")
        if topic not in images:
            raise BagError(f"{bag.path}: camera '{cam}': topic {topic} has type {topics[topic]}; "
                           f"expected {IMAGE} or {COMPRESSED}")




def replay_bag(bag_path, qf: QuestionsFile, model_source: Callable[[], Model], base: GenerationParams,
               config: EngineConfig, out, answers_bag=None, progress: Optional[bool] = None,
               on_record: Optional[Callable[[dict], None]] = None) -> Tuple[dict, List[dict]]:
    """Replay one bag into `out` (a text stream, or a path: created once the model is loaded):
    (summary, records). `model_source()` gives the model; it is called once the bag opened and has
    the cameras' topics, so a bad bag is reported before a model is loaded and makes no output. BagError / QuestionsError before the first answer propagate; a bag
    damaged half-way keeps what was answered and sets the summary's "error"."""
    with BagReader(bag_path) as bag:
        check_topics(bag, qf)
        t0 = time.perf_counter()
        model = model_source()
        load_ms = (time.perf_counter() - t0) * 1e3
        with_bag = None
        stream = None
        try:
            if isinstance(out, (str, Path)):
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                out = stream = open(out, "w", encoding="utf-8")
            if answers_bag:
                with_bag = BagWriter(answers_bag, "mcap", with_answer=True)
                with_bag.__enter__()
            rp = Replay(bag, qf, model, base, config, out, with_bag, progress=progress, on_record=on_record)
            error = None
            try:
                rp.run()
            except BagError as e:       # corrupt in the middle: keep what was answered
                error = str(e)
        finally:
            if with_bag is not None:
                with_bag.__exit__(None, None, None)
            if stream is not None:
                stream.close()
        summary = {
            "bag": str(bag_path), "storage": bag.storage, "model": model.describe(),
            "generation": dataclasses.asdict(rp.base), "engine": dataclasses.asdict(config),
            "max_frame_age_s": rp.engine.max_frame_age_s(),
            "bag_start_ns": rp.start_ns, "bag_end_ns": rp.end_ns,
            **rp.summary(),
            "load_ms": round(load_ms, 1), "error": error,
        }
    return summary, rp.records

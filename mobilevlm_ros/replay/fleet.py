"""Many bags in one run: an output folder with one JSONL per bag and a summary, resumable.

A run is a list of `Job`s (a bag, its questions, its engine settings). Each is replayed by a
`BagWorker` (the model loaded once, then `runner.replay_bag` per bag: the very path of a single
replay), either in this process (`workers=0`) or as Ray actors (`ray_pool.py`). The driver writes a
bag's files only once the bag is finished, atomically, so an interrupted run leaves finished bags
finished and nothing half-written; a later run with the same model files, questions and settings
skips them (`Job.key`). A bag that cannot be read gets an error record; the others go on.

Output folder:
    <name>.jsonl          the bag's answers, as `mobilevlm-replay BAG --out <name>.jsonl` writes them
    <name>.summary.json   the bag's summary (counts, model files' hashes, engine, CPU flags, worker,
                          host) with its status and resume key
    summary.json          the run: per bag status and counts, totals
    report.html           with --expect: the comparison with a previous output folder (report.py)
"""
from __future__ import annotations

import dataclasses
import enum
import glob as globlib
import hashlib
import io
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .bagio import BagError
from .questions import QuestionsError, QuestionsFile, load_questions

BAG_SUFFIXES = (".mcap", ".db3")
LIST_SUFFIXES = (".txt", ".list")
OWN_QUESTIONS = "questions.yaml"     # a bag folder may carry its own questions file
MAX_ATTEMPTS = 3                     # a bag whose worker died this often is given up (an error record)


class BagStatus(enum.Enum):
    DONE = "done"                    # replayed in this run
    SKIPPED = "skipped"              # complete from an earlier run with the same key
    FAILED = "failed"                # the bag (or its questions file) could not be read: error record
    PENDING = "pending"              # not finished when the run stopped (Ctrl-C): redone next time


@dataclass
class Job:
    name: str                        # output file stem, unique in the run
    bag: str
    questions: Optional[QuestionsFile] = None
    config: object = None            # EngineConfig
    key: str = ""                    # resume key: model files, questions, settings
    error: Optional[str] = None      # known bad before any replay (its questions file)


@dataclass
class Settings:
    """What every bag is replayed with (from the command line)."""
    model: str
    load: dict                       # LoadOptions fields: vision_backend, decoder, quant, ...
    generation: object               # GenerationParams
    threads: int = 0


# ------------------------------------------------------------------------------------ bags
def _is_bag(p: Path) -> bool:
    return (p.is_dir() and (p / "metadata.yaml").is_file()) or (p.is_file() and p.suffix in BAG_SUFFIXES)


def _bags_in(folder: Path) -> List[Path]:
    """Bags under a folder: bag folders (metadata.yaml; not entered) and bare .mcap / .db3 files."""
    out = []
    for root, dirs, files in os.walk(folder):
        r = Path(root)
        if (r / "metadata.yaml").is_file():
            out.append(r)
            dirs[:] = []
            continue
        dirs.sort()
        out += [r / f for f in sorted(files) if Path(f).suffix in BAG_SUFFIXES]
    return sorted(out)


def expand_bags(items: List[str]) -> List[tuple]:
    """[(bag path, its own questions file or None)] from paths, globs, folders of bags and list
    files (one bag a line, optionally followed by its questions file; '#' comments; paths relative
    to the list file). A path that is not there stays in the list: it gets an error record."""
    out: List[tuple] = []
    for item in items:
        p = Path(item)
        if any(c in item for c in "*?[") and not p.exists():
            found = sorted(Path(x) for x in globlib.glob(item, recursive=True))
            if not found:
                raise QuestionsError(f"{item}: matches no file")
            for f in found:
                out += [(b, None) for b in ([f] if _is_bag(f) else _bags_in(f) if f.is_dir() else [])]
        elif p.is_file() and p.suffix in LIST_SUFFIXES:
            for n, line in enumerate(p.read_text().splitlines(), 1):
                words = line.split("#", 1)[0].split()
                if not words:
                    continue
                if len(words) > 2:
                    raise QuestionsError(f"{p}:{n}: expected 'BAG [QUESTIONS]', got {line.strip()!r}")
                rel = [Path(os.path.normpath(p.parent / w)) for w in words]
                out.append((rel[0], rel[1] if len(rel) == 2 else None))
        elif p.is_dir() and not _is_bag(p):
            found = _bags_in(p)
            if not found:
                raise QuestionsError(f"{p}: no bags in this folder (bag folders with metadata.yaml, "
                                     f".mcap or .db3 files)")
            out += [(b, None) for b in found]
        else:
            out.append((p, None))
    return out


def unique_names(paths: List[Path]) -> List[str]:
    """Output stems: the bag's name, or where two bags share it, its path below their common parent."""
    stems = [p.name[: -len(p.suffix)] if p.suffix in BAG_SUFFIXES else p.name for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    absolute = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(a.parent) for a in absolute]))
    names = [str(a.relative_to(common)).replace(os.sep, "__") for a in absolute]
    for i, (a, n) in enumerate(zip(absolute, names)):
        if names.count(n) > 1:                       # the same bag listed twice
            names[i] = f"{n}__{i}"
    return names


# ------------------------------------------------------------------------------------ keys
_HASHES: Dict[tuple, str] = {}


def model_files(model: str) -> Dict[str, str]:
    """sha256 of every file of the model folder (by path relative to it); cached per process."""
    root = Path(model)
    out = {}
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        st = p.stat()
        k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if k not in _HASHES:
            from ..core.artifacts import sha256_file
            _HASHES[k] = sha256_file(p)
        out[str(p.relative_to(root))] = _HASHES[k]
    return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cpu_flags() -> List[str]:
    from ..tools.bench.common import cpu_features
    return cpu_features()


def arithmetic(summary: dict) -> dict:
    """What decides a bag's numbers under the determinism contract: the model files, the engine
    (backends, dtype, quant, threads) and the CPU's vector extensions. Identical answers are
    promised only between runs where this is equal."""
    m = summary.get("model") or {}
    engine = {k: m.get(k) for k in ("vision_backend", "provider", "dtype", "decoder", "library", "quant")}
    engine["threads"] = m.get("threads") or summary.get("threads")
    return {"model_files": summary.get("model_files_sha256"), "engine": engine, "cpu_flags": summary.get("cpu_flags")}


# ------------------------------------------------------------------------------------ worker
class BagWorker:
    """Loads the model once and replays bags with it (in this process, or as a Ray actor)."""

    def __init__(self, settings: Settings):
        from ..core.pipeline import LoadOptions, load_model
        self.settings = settings
        t0 = time.perf_counter()
        self.model = load_model(settings.model, LoadOptions(**settings.load, threads=settings.threads))
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.node_id = None          # the Ray node, on Ray
        self.cpu_flags = cpu_flags()
        self.bags = 0

    def where(self) -> dict:
        return {"host": self.host, "pid": self.pid, "node_id": self.node_id}

    def replay(self, job: Job, on_record: Optional[Callable[[dict], None]] = None) -> dict:
        """One bag: {"name", "status", "jsonl" (text), "summary"}; a bag that cannot be read is a
        FAILED result with its error (and the lines answered before a damage half-way)."""
        from .runner import replay_bag
        t0 = time.perf_counter()
        out = io.StringIO()
        where = {"worker": f"{self.host}:{self.pid}", **self.where(),
                 "threads": self.settings.threads, "cpu_flags": self.cpu_flags, "worker_load_ms": round(self.load_ms, 1),
                 "worker_bags_before": self.bags}
        self.bags += 1
        try:
            if job.error:
                raise QuestionsError(job.error)
            summary, _ = replay_bag(job.bag, job.questions, lambda: self.model, self.settings.generation,
                                    job.config, out, progress=False, on_record=on_record)
        except (BagError, QuestionsError) as e:
            return {"name": job.name, "status": BagStatus.FAILED.value, "jsonl": out.getvalue(),
                    "summary": {"bag": job.bag, "error": str(e), **where,
                                "wall_s": round(time.perf_counter() - t0, 3)}}
        summary.update(where)
        summary["wall_s"] = round(time.perf_counter() - t0, 3)
        status = BagStatus.FAILED if summary.get("error") else BagStatus.DONE
        return {"name": job.name, "status": status.value, "jsonl": out.getvalue(), "summary": summary}

    def close(self) -> None:
        self.model.close()


# ------------------------------------------------------------------------------------ run
@dataclass
class Fleet:
    """A run: jobs, the output folder, what happened to each bag."""
    jobs: List[Job]
    settings: Settings
    out: Path
    status: Dict[str, BagStatus] = field(default_factory=dict)
    summaries: Dict[str, dict] = field(default_factory=dict)
    model_files_sha256: Dict[str, str] = field(default_factory=dict)
    on_event: Optional[Callable[..., None]] = None     # ("record", name, worker) / ("bag", name, status)
    attempts: Dict[str, int] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)   # s: ray_start, first_worker_ready

    def __post_init__(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.model_files_sha256 = model_files(self.settings.model)
        model_key = digest(self.model_files_sha256)
        load = {k: v for k, v in self.settings.load.items()}
        for j in self.jobs:
            j.key = digest({"model": model_key, "load": load,
                            "questions": j.questions.sha256 if j.questions else j.error,
                            "generation": dataclasses.asdict(self.settings.generation),
                            "engine": dataclasses.asdict(j.config) if j.config is not None else None})

    # ------------------------------------------------------------ files
    def jsonl_path(self, name: str) -> Path:
        return self.out / f"{name}.jsonl"

    def summary_path(self, name: str) -> Path:
        return self.out / f"{name}.summary.json"

    def complete(self, job: Job) -> Optional[dict]:
        """The bag's summary when an earlier run finished it with the same key, else None."""
        try:
            s = json.loads(self.summary_path(job.name).read_text())
        except (OSError, ValueError):
            return None
        if s.get("status") != BagStatus.DONE.value or s.get("key") != job.key or not self.jsonl_path(job.name).is_file():
            return None
        return s

    def todo(self) -> List[Job]:
        """The jobs not complete from an earlier run (those are marked SKIPPED)."""
        left = []
        for j in self.jobs:
            s = self.complete(j)
            if s is None:
                self.status[j.name] = BagStatus.PENDING
                left.append(j)
            else:
                self.status[j.name], self.summaries[j.name] = BagStatus.SKIPPED, s
        return left

    def finish(self, job: Job, result: dict) -> None:
        """A worker's result into the output folder: the JSONL, then the summary (the summary is
        what marks a bag complete, so a crash between the two redoes the bag)."""
        status = BagStatus(result["status"])
        summary = {"name": job.name, "status": status.value, "key": job.key,
                   "questions_file": job.questions.path if job.questions else None,
                   "model_path": self.settings.model, "model_files_sha256": digest(self.model_files_sha256),
                   **result["summary"]}
        _write_atomic(self.jsonl_path(job.name), result["jsonl"])
        _write_atomic(self.summary_path(job.name), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        self.status[job.name], self.summaries[job.name] = status, summary
        if self.on_event:
            self.on_event("bag", job.name, status)

    def gave_up(self, job: Job, error: str) -> None:
        self.finish(job, {"status": BagStatus.FAILED.value, "jsonl": "", "summary": {"bag": job.bag, "error": error}})

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        bags = []
        for j in self.jobs:
            s = self.summaries.get(j.name, {})
            bags.append({"name": j.name, "bag": j.bag, "status": self.status.get(j.name, BagStatus.PENDING).value,
                         **{k: s.get(k) for k in ("questions", "answers", "failures", "frames_encoded", "error",
                                                  "worker", "host", "wall_s")},
                         "frames": sum(c.get("frames", 0) for c in (s.get("cameras") or {}).values()) or None,
                         "arithmetic": arithmetic(s) if s.get("model") else None})
        counts = {st.value: sum(b["status"] == st.value for b in bags) for st in BagStatus}
        run = {"bags": len(bags), **counts,
               "questions": sum(b["questions"] or 0 for b in bags if b["status"] in ("done", "skipped")),
               "answers": sum(b["answers"] or 0 for b in bags if b["status"] in ("done", "skipped")),
               "model": {"path": self.settings.model, "load": self.settings.load,
                         "files_sha256": self.model_files_sha256},
               "generation": dataclasses.asdict(self.settings.generation),
               "timings_s": {k: round(v, 3) for k, v in self.timings.items()}, **(extra or {}), "per_bag": bags}
        _write_atomic(self.out / "summary.json", json.dumps(run, indent=2, ensure_ascii=False) + "\n")
        return run


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def make_jobs(items: List[str], questions: Optional[str], config_for: Callable) -> List[Job]:
    """Jobs for the bags named by `items` (see expand_bags). A bag's own questions file (a list
    file's second column, or questions.yaml inside its folder) wins over `questions`. A bad own
    questions file is that bag's error record; a bad shared one raises QuestionsError."""
    pairs = expand_bags(items)
    if not pairs:
        raise QuestionsError("no bags given")
    shared = load_questions(questions) if questions else None
    loaded: Dict[str, object] = {}
    jobs = []
    for (bag, own), name in zip(pairs, unique_names([b for b, _ in pairs])):
        if own is None and bag.is_dir() and (bag / OWN_QUESTIONS).is_file():
            own = bag / OWN_QUESTIONS
        job = Job(name=name, bag=str(bag))
        try:
            if own is not None:
                if str(own) not in loaded:
                    try:
                        loaded[str(own)] = load_questions(own)
                    except QuestionsError as e:
                        loaded[str(own)] = e
                if isinstance(loaded[str(own)], QuestionsError):
                    raise loaded[str(own)]
                job.questions = loaded[str(own)]
            elif shared is not None:
                job.questions = shared
            else:
                raise QuestionsError(f"{bag}: no questions file (give --questions, or put {OWN_QUESTIONS} "
                                     f"in the bag folder)")
            job.config = config_for(job.questions)
        except QuestionsError as e:
            job.error = str(e)
        jobs.append(job)
    return jobs


def run_serial(fleet: Fleet, jobs: List[Job], progress=None) -> None:
    """Replay `jobs` one after another in this process (no Ray)."""
    if not jobs:
        return
    worker = BagWorker(fleet.settings)
    try:
        for job in jobs:
            def on_record(rec, name=job.name):
                if progress is not None:
                    progress.record(name)
                if fleet.on_event:
                    fleet.on_event("record", name, worker.where())
            result = worker.replay(job, on_record)
            fleet.finish(job, result)
            if progress is not None:
                progress.bag(job.name, fleet.summaries[job.name])
    finally:
        worker.close()


class Progress:
    """One bar over the run's bags with the ETA, the questions answered and their rate beside it,
    and a line per finished bag (a bag's question count is known only once it is read)."""

    def __init__(self, bags: int, enabled: Optional[bool]):
        from tqdm import tqdm
        self.bar = tqdm(total=bags, desc="bags", unit="bag", file=sys.stderr, dynamic_ncols=True,
                        disable=(not enabled) if enabled is not None else None)
        self.questions, self.t0, self.shown = 0, time.monotonic(), 0.0

    def record(self, name: str, n: int = 1) -> None:
        self.questions += n
        now = time.monotonic()
        if now - self.shown >= 0.5:
            self.shown = now
            self.bar.set_postfix_str(self._rate(), refresh=True)

    def _rate(self) -> str:
        return f"{self.questions} questions, {self.questions / max(time.monotonic() - self.t0, 1e-9):.2f} q/s"

    def bag(self, name: str, summary: dict) -> None:
        s = summary
        what = (f"{s.get('answers', 0)} answers, {s.get('failures', 0)} failures, {s.get('wall_s') or 0:.1f} s"
                if s.get("status") == BagStatus.DONE.value else f"FAILED: {s.get('error')}")
        self.bar.write(f"{name}: {what} ({s.get('worker') or '-'})", file=sys.stderr)
        self.bar.set_postfix_str(self._rate(), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

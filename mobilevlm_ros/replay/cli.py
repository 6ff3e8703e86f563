"""mobilevlm-replay: answer questions about the camera frames of rosbag2 bags, offline, as the node would.

    mobilevlm-replay BAG --questions FILE --out answers.jsonl --model PATH
                     [--vision-backend B] [--decoder D] [--quant Q] [--max-new-tokens N] [--temperature T]
                     [--top-p P] [--seed S] [--max-frame-age S] [--params NODE.yaml]
                     [--vision-rate-hz HZ] [--embedding-cache-size N] [--answers-bag PATH]
                     [--expect PREVIOUS.jsonl] [--no-progress]
    mobilevlm-replay BAGS... --out-dir DIR [--questions FILE] --model PATH [--workers N] [--threads T]
                     [--address HOST:PORT] [--expect PREVIOUS_DIR] [... the options above]

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

Many bags (--out-dir): BAGS are paths, globs, folders of bags or list files (.txt: a bag a line,
optionally followed by its questions file); a bag folder with its own questions.yaml uses it. One
<name>.jsonl and <name>.summary.json per bag and a summary.json go into DIR; bags run on Ray
workers (the `ray` extra; a local Ray on 127.0.0.1 unless --address or RAY_ADDRESS names a
cluster), or one by one in this process with --workers 0. A bag that cannot be read gets an error
record and the others go on; the same command again skips the bags already complete for the same
model files, questions and settings. --expect PREVIOUS_DIR compares bag by bag and writes
DIR/report.html. See docs/fleet.md.

Exit codes: 0 done; 1 the model cannot be loaded; 2 bad input (bag missing, corrupt or unsupported,
bad questions file or arguments; many bags: some bag failed); 3 --expect found differences (many
bags: a regression); 130 interrupted (Ctrl-C; the bags finished are kept).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from .bagio import ANSWER, BagError
from .compare import compare, read_jsonl
from .questions import QuestionsError, load_questions, parse_questions, timed_asks  # noqa: F401 (tests use cli.*)
from .runner import ANNOTATED_TOPIC, ANSWERS_TOPIC, engine_config, replay_bag  # noqa: F401
from ..core.errors import MobileVLMError, ModelLoadError
from ..engine.config import AUTO_AGE_MIN_S
from ..tools.ask import add_generation_args, add_model_args, load_from_args, params_from_args

log = logging.getLogger("mobilevlm-replay")

LIST_LIMIT = 50                    # --expect differences printed
EXIT_OK, EXIT_MODEL, EXIT_INPUT, EXIT_CHANGED = 0, 1, 2, 3


def summary_path(out: Path) -> Path:
    return out.with_name(out.name[: -len(out.suffix)] + ".summary.json" if out.suffix else out.name + ".summary.json")




def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mobilevlm-replay", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("bag", nargs="+", help="rosbag2 folder (sqlite3 or mcap) or a .mcap / .db3 file; with "
                    "--out-dir also globs, folders of bags and list files")
    ap.add_argument("--questions", default=None, help="questions file (YAML, see docs/replay.md)")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="one bag: its answers, one JSON line each")
    out.add_argument("--out-dir", help="many bags: a folder for a JSONL per bag and the run's summary")
    add_model_args(ap)
    add_generation_args(ap)
    ap.add_argument("--max-frame-age", type=float, default=None, metavar="S",
                    help="frames older than S at question time are not used; 0 = no limit (default: the "
                         "questions file's max_frame_age_s, else the parameters file's, else the node's "
                         f"default: auto, which is {AUTO_AGE_MIN_S:g} s when encoding takes no time)")
    ap.add_argument("--params", default=None, metavar="FILE",
                    help="a node parameters file (config/mobilevlm.yaml style): the engine settings "
                         "(vision_rate_hz, embedding_cache_size, max_frame_age_s, ...) the node ran with")
    ap.add_argument("--vision-rate-hz", type=float, default=None, metavar="HZ",
                    help="frame batches the simulated vision worker caches per second of bag time "
                         "(default: the parameters file's, else the node's default; 0 = every frame)")
    ap.add_argument("--embedding-cache-size", type=int, default=None, metavar="N",
                    help="image embeddings (encoded frames) kept per camera (default: as --vision-rate-hz)")
    ap.add_argument("--answers-bag", default=None, metavar="PATH",
                    help=f"also write the answers as {ANSWER} on {ANSWERS_TOPIC}, and drawn on their frames "
                         f"on {ANNOTATED_TOPIC}, into a new mcap bag")
    ap.add_argument("--expect", default=None, metavar="PREVIOUS",
                    help="compare with a previous output (--out: its JSONL; --out-dir: its folder); exit 3 "
                         "listing what changed")
    ap.add_argument("--workers", type=int, default=None, metavar="N",
                    help="--out-dir: Ray workers, each loading the model once (default: as many as fit the "
                         "cores with --threads each); 0 = the bags one by one in this process, no Ray")
    ap.add_argument("--address", default=None, metavar="HOST:PORT",
                    help="--out-dir: the Ray cluster to join (default: RAY_ADDRESS, else a local Ray on "
                         "127.0.0.1)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _err(msg: str, code: int) -> int:
    print(f"mobilevlm-replay: {msg}", file=sys.stderr)
    return code




def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if a.out_dir:
        from .fleet_cli import main_fleet
        return main_fleet(a)
    if len(a.bag) != 1:
        ap.error(f"--out takes one bag ({len(a.bag)} given); for many bags give --out-dir")
    if not a.questions:
        ap.error("--questions is required with --out")
    a.bag = a.bag[0]
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
                               embedding_cache_size=a.embedding_cache_size)
        if a.answers_bag and Path(a.answers_bag).exists():
            raise BagError(f"{a.answers_bag}: exists already; choose a new path for the answers bag")
    except MobileVLMError as e:
        return _err(str(e), EXIT_INPUT)

    loaded = []

    def model_source():
        loaded.append(load_from_args(a))
        return loaded[0]

    try:
        summary, records = replay_bag(a.bag, qf, model_source, base, config, out_path,
                                      answers_bag=a.answers_bag, progress=False if a.no_progress else None)
    except ModelLoadError as e:
        return _err(f"cannot load model: {e}", EXIT_MODEL)
    except (BagError, QuestionsError) as e:
        return _err(str(e), EXIT_INPUT)
    except OSError as e:
        return _err(f"{e.filename or ''}: {e.strerror or e}", EXIT_INPUT)
    finally:
        for m in loaded:
            m.close()
    error = summary["error"]
    summary = {"bag": summary.pop("bag"), "storage": summary.pop("storage"), "questions_file": str(a.questions),
               "out": str(out_path), "answers_bag": a.answers_bag,
               "model": {"path": str(a.model), **summary.pop("model")}, **summary,
               "wall_s": round(time.perf_counter() - t_start, 3)}

    code = EXIT_OK
    if expected is not None:
        diff = compare(expected, records)
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

"""`mobilevlm-replay BAGS... --out-dir DIR`: the many-bags command (arguments parsed by cli.py)."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from .fleet import BagStatus, Fleet, Progress, Settings, make_jobs, run_serial
from .questions import QuestionsError
from ..core.errors import MobileVLMError, ModelLoadError

EXIT_OK, EXIT_MODEL, EXIT_INPUT, EXIT_CHANGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _err(msg: str, code: int) -> int:
    print(f"mobilevlm-replay: {msg}", file=sys.stderr)
    return code


def settings_from_args(a, threads: int) -> Settings:
    from ..tools.ask import params_from_args
    load = {"vision_backend": a.vision_backend, "decoder": a.decoder, "quant": a.quant,
            "vision_dtype": a.vision_dtype, "vision_tower": a.vision_tower, "device": a.device}
    return Settings(model=str(a.model), load=load, generation=params_from_args(a), threads=threads)


def main_fleet(a) -> int:
    from .runner import engine_config
    t_start = time.perf_counter()
    out = Path(a.out_dir)
    if a.answers_bag:
        return _err("--answers-bag is for one bag (--out)", EXIT_INPUT)
    if a.workers is not None and a.workers < 0:
        return _err(f"--workers must be >= 0, got {a.workers}", EXIT_INPUT)
    try:
        if a.max_frame_age is not None and not (math.isfinite(a.max_frame_age) and a.max_frame_age >= 0):
            raise QuestionsError(f"--max-frame-age must be >= 0, got {a.max_frame_age}")

        def config_for(qf):
            max_age = a.max_frame_age if a.max_frame_age is not None else qf.max_frame_age_s
            return engine_config(qf, a.params, max_frame_age_s=max_age, vision_rate_hz=a.vision_rate_hz,
                                 embedding_cache_size=a.embedding_cache_size)

        jobs = make_jobs(a.bag, a.questions, config_for)
        if a.expect and not (Path(a.expect) / "summary.json").is_file():
            raise QuestionsError(f"--expect {a.expect}: not an output folder of mobilevlm-replay --out-dir "
                                 f"(no summary.json)")
        if not Path(a.model).is_dir():
            raise ModelLoadError(f"model folder not found: {a.model}")
    except ModelLoadError as e:
        return _err(f"cannot load model: {e}", EXIT_MODEL)
    except (MobileVLMError, OSError) as e:
        return _err(str(e), EXIT_INPUT)

    use_ray = a.workers != 0
    if use_ray:
        from .ray_pool import RayMissing, cluster_cpus, connect, import_ray
        try:
            import_ray()
        except RayMissing as e:
            return _err(str(e), EXIT_INPUT)
    started = False
    interrupted = False
    fleet = None
    try:
        if use_ray:
            t0 = time.perf_counter()
            started = connect(a.address)
            ray_start = time.perf_counter() - t0
            cores = cluster_cpus()
            workers = a.workers or max(1, cores // max(1, a.threads or 2))
            threads = a.threads or max(1, cores // workers)
        else:
            workers, threads = 0, a.threads
        fleet = Fleet(jobs, settings_from_args(a, threads), out)
        if use_ray:
            fleet.timings["ray_start"] = ray_start
        todo = fleet.todo()
        skipped = len(jobs) - len(todo)
        print(f"mobilevlm-replay: {len(jobs)} bags, {skipped} complete from an earlier run, {len(todo)} to do"
              + (f", on {workers} Ray workers x {threads} threads" if use_ray else ", in this process")
              + f" -> {out}", file=sys.stderr)
        progress = Progress(len(todo), False if a.no_progress else None)
        try:
            if use_ray:
                from .ray_pool import run_ray
                run_ray(fleet, todo, workers, progress, a.address)
            else:
                run_serial(fleet, todo, progress)
        finally:
            progress.close()
    except KeyboardInterrupt:
        interrupted = True
    except ModelLoadError as e:
        return _err(f"cannot load model: {e}", EXIT_MODEL)
    finally:
        if started:
            import ray
            ray.shutdown()
    if fleet is None:
        return _err("interrupted", EXIT_INTERRUPTED)

    extra = {"interrupted": interrupted, "workers": workers, "threads_per_worker": threads,
             "ray": use_ray, "wall_s": round(time.perf_counter() - t_start, 3)}
    code = EXIT_OK
    if a.expect and not interrupted:
        from .compare import compare_runs
        from .report import write_report
        run = fleet.write_summary(extra)
        diff = compare_runs(Path(a.expect), out)
        extra["expect"] = {k: v for k, v in diff.items() if k != "bags"}
        write_report(out / "report.html", diff, jobs)
        if diff["regressions"]:
            code = EXIT_CHANGED
    run = fleet.write_summary(extra)
    st = {s: run[s.value] for s in BagStatus}
    print(f"mobilevlm-replay: {st[BagStatus.DONE]} bags done, {st[BagStatus.SKIPPED]} skipped (complete before), "
          f"{st[BagStatus.FAILED]} failed, {st[BagStatus.PENDING]} not done; {run['answers']} answers; "
          f"{out / 'summary.json'}", file=sys.stderr)
    for b in run["per_bag"]:
        if b["status"] == BagStatus.FAILED.value:
            print(f"  failed: {b['name']}: {b['error']}", file=sys.stderr)
    if interrupted:
        return _err("interrupted: the bags finished are kept; run the same command again to do the rest",
                    EXIT_INTERRUPTED)
    if a.expect:
        e = extra["expect"]
        print(f"mobilevlm-replay: against {a.expect}: {e['regressions']} regressions; "
              f"{e['identical_bags']} bags compared token for token, {e['agreement_bags']} by agreement "
              f"({e['agreement']}); {out / 'report.html'}", file=sys.stderr)
        for line in e["differences"][:50]:
            print(f"  {line}", file=sys.stderr)
    if code == EXIT_OK and st[BagStatus.FAILED]:
        code = EXIT_INPUT
    return code

"""A fleet run on Ray: a pool of actors, each a `fleet.BagWorker` (the model loaded once), one bag a task.

- No address: a local Ray on this machine, bound to the loopback address, dashboard and usage
  reporting off. `address` (or RAY_ADDRESS): join a cluster (`ray start --head` / `ray start
  --address=HEAD:6379` on the others, token authentication on: docs/replay.md).
- Nothing lost: an actor whose process or node dies is restarted by Ray (its constructor loads the
  model again, on whatever node has room) and the driver hands the bag it was on to the next free
  worker; a bag that killed its worker MAX_ATTEMPTS times gets an error record. A node that is gone
  is seen in Ray's node table: its bag is handed out again at once, not when its actor is back
  (which waits for a free CPU, maybe forever, while the other workers idle). Bags are read by the
  workers (the paths must be readable on every node: a shared file system); results come back to
  the driver, which alone writes the output folder.
- Ctrl-C: the driver stops handing out bags, writes what is finished, shuts Ray down and returns.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Dict, List, Optional

from .fleet import MAX_ATTEMPTS, BagWorker, Fleet, Job
from ..core.errors import ModelLoadError

INSTALL_HINT = "pip install 'mobilevlm_ros[fleet]'  (or: pip install 'ray==2.60.0')"
POLL_S = 0.5
NODE_CHECK_S = 2.0      # how often the driver reads Ray's node table for nodes that went away


class RayMissing(RuntimeError):
    pass


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing(f"a fleet run on Ray needs the 'ray' package: {INSTALL_HINT}; "
                         f"or run the bags here one by one with --workers 0") from None
    return ray


def local_env() -> None:
    """Ray on this machine only: the loopback address for every node, no usage reports."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray advertises the machine's network address on Linux unless told otherwise; with this the
    # processes it starts (read at their import of ray) take 127.0.0.1, as on a laptop; the driver
    # passes the address itself (ray is imported by then)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def connect(address: Optional[str], cpus: Optional[int] = None) -> bool:
    """ray.init: join `address` (or RAY_ADDRESS), else start a local Ray on 127.0.0.1. Returns
    whether this call started Ray (and so shuts it down at the end)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    else:
        local_env()
        # "local": a new Ray of its own, never one that another program started here
        ray.init(address="local", num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=True)
    return True


def _dead_nodes(ray) -> set:
    try:
        return {n["NodeID"] for n in ray.nodes() if not n.get("Alive", True)}
    except Exception:           # the table is an optimisation: actor errors still come through
        return set()


def _cause(e: BaseException) -> str:
    """The last line of a Ray error that carries a worker's traceback (its exception)."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else type(e).__name__


class _Progress:
    """Workers report each answered question here; the driver takes the counts when it polls."""

    def __init__(self):
        self.counts: Dict[tuple, int] = {}

    def add(self, name: str, where: tuple) -> None:
        self.counts[(name, where)] = self.counts.get((name, where), 0) + 1

    def take(self) -> Dict[tuple, int]:
        out, self.counts = self.counts, {}
        return out


class _Worker(BagWorker):
    """BagWorker as an actor: its answered questions go to the progress actor."""

    def __init__(self, settings, progress_name: str):
        import ray
        super().__init__(settings)
        # by name, not by handle: a handle argument would sit in the object store, where a restart
        # after the driver's reference is gone could not find it
        self.progress = ray.get_actor(progress_name)
        self.node_id = ray.get_runtime_context().get_node_id()

    def run(self, job: Job) -> dict:
        where = tuple(self.where().items())
        return self.replay(job, lambda rec: self.progress.add.remote(job.name, where))

    def ready(self) -> dict:
        return self.where()


def run_ray(fleet: Fleet, jobs: List[Job], workers: int, progress=None, address: Optional[str] = None) -> None:
    """Replay `jobs` on `workers` Ray actors (each settings.threads CPUs). KeyboardInterrupt
    propagates after the pool is torn down; bags finished before it are in the output folder."""
    if not jobs:
        return
    ray = import_ray()
    from ray.exceptions import RayActorError
    t0 = time.perf_counter()
    started = connect(address)
    spawned = []
    try:
        cpus = max(1, fleet.settings.threads)
        # the progress counter lives beside the driver (a node that goes away must not take it along)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        progress_name = f"mobilevlm-replay-progress-{uuid.uuid4().hex}"
        tracker = ray.remote(num_cpus=0, max_restarts=-1)(_Progress).options(
            name=progress_name, scheduling_strategy=here).remote()
        spawned.append(tracker)                 # killed with the workers at the end
        # max_restarts=-1: an actor whose process or node died comes back (model loaded again);
        # its task is not retried by Ray (max_task_retries=0): the driver hands the bag out again
        Actor = ray.remote(num_cpus=cpus, max_restarts=-1, max_task_retries=0)(_Worker)
        actors = [Actor.remote(fleet.settings, progress_name) for _ in range(max(1, min(workers, len(jobs))))]
        spawned += actors
        queue = list(jobs)
        busy: Dict[object, tuple] = {}          # future -> (actor index, job)
        waking: Dict[object, int] = {}          # ready() future -> actor index
        node_of: Dict[int, str] = {}            # actor index -> its node, from ready()
        idle: List[int] = []                    # ready workers with nothing to do (the queue was empty)
        for i in range(len(actors)):
            waking[actors[i].ready.remote()] = i
        next_node_check = time.monotonic() + NODE_CHECK_S

        def rejoin(i: int) -> None:
            """Worker i is back in the pool once ready() answers (after Ray has restarted it)."""
            node_of.pop(i, None)
            waking[actors[i].ready.remote()] = i

        def lost(i: int, job: Job, why: str) -> None:
            """The bag's worker is gone: the bag goes back to the queue (or gets its error record),
            the worker back to the pool once Ray has restarted it."""
            fleet.attempts[job.name] = fleet.attempts.get(job.name, 0) + 1
            if fleet.attempts[job.name] >= MAX_ATTEMPTS:
                fleet.gave_up(job, f"its worker died {MAX_ATTEMPTS} times while replaying it (last: {why})")
                if progress is not None:
                    progress.bag(job.name, fleet.summaries[job.name])
            else:
                queue.insert(0, job)
            rejoin(i)

        while queue or busy:
            if time.monotonic() >= next_node_check:
                next_node_check = time.monotonic() + NODE_CHECK_S
                dead = _dead_nodes(ray)
                for fut, (i, job) in list(busy.items()):
                    if node_of.get(i) in dead:          # its future resolves only once the actor is back
                        del busy[fut]
                        lost(i, job, "its node left the cluster")
                for i in [i for i in idle if node_of.get(i) in dead]:
                    idle.remove(i)
                    rejoin(i)
            while queue and idle:                       # a bag handed back while others idled
                i = idle.pop(0)
                job = queue.pop(0)
                busy[actors[i].run.remote(job)] = (i, job)
            pending = list(busy) + list(waking)
            done, _ = ray.wait(pending, num_returns=1, timeout=POLL_S)
            try:
                counts = ray.get(tracker.take.remote())
            except RayActorError:                       # progress counts lost, not work
                counts = {}
            for (name, where), n in counts.items():
                if progress is not None:
                    progress.record(name, n)
                if fleet.on_event:
                    fleet.on_event("record", name, dict(where))
            for fut in done:
                if fut in waking:
                    i = waking.pop(fut)
                    try:
                        node_of[i] = ray.get(fut)["node_id"]
                    except RayActorError as e:
                        if "creation task" in str(e):  # its constructor raised: the model does not load
                            raise ModelLoadError(_cause(e)) from None
                        rejoin(i)                           # died while starting: it restarts
                        continue
                    fleet.timings.setdefault("first_worker_ready", time.perf_counter() - t0)
                    idle.append(i)
                    continue
                i, job = busy.pop(fut)
                try:
                    result = ray.get(fut)
                except RayActorError as e:              # the worker or its node died mid-bag
                    lost(i, job, type(e).__name__)
                    continue
                fleet.finish(job, result)
                if progress is not None:
                    progress.bag(job.name, fleet.summaries[job.name])
                idle.append(i)
    finally:
        for a in spawned:
            try:
                ray.kill(a)
            except Exception:
                pass
        if started:
            ray.shutdown()


def cluster_cpus() -> int:
    """The CPUs of the Ray this driver is connected to (this machine's for a local Ray)."""
    ray = import_ray()
    return int(ray.cluster_resources().get("CPU", 0)) or (os.cpu_count() or 1)

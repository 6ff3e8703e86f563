"""mobilevlm-replay on many bags (--out-dir): the bag list, one JSONL per bag equal to a single
replay's, nothing lost (bad bags, a worker killed, a node removed, Ctrl-C, resume), --expect across
runs and its report in a real headless browser.

Ray tests share one `ray.cluster_utils.Cluster` on 127.0.0.1 (a head without CPUs and two
one-CPU worker nodes), the tiny model and tiny bags, to keep Ray's cost on a small machine low.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mobilevlm_ros.replay import cli
from mobilevlm_ros.replay import fleet as fleet_mod
from mobilevlm_ros.replay.ray_pool import local_env

local_env()         # before anything imports ray: Ray reads it at import (nodes on 127.0.0.1)
from mobilevlm_ros.tools.make_bag import make_bag

TOKENS = 3
QUESTIONS = {"max_frame_age_s": 0.5, "defaults": {"max_new_tokens": TOKENS},
             "cameras": {"front": "/front/image_raw"},
             "questions": [{"id": "look", "question": ["What is in front?", "Is it red?"], "at": [0.3, 0.7]},
                           {"id": "nth", "question": "Describe the scene.", "every_n_frames": 2}]}
LONG = dict(QUESTIONS, questions=[{"id": "every", "question": ["What is in front?", "Where is the square?"],
                                   "every_n_frames": 1}], defaults={"max_new_tokens": 6})


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def untimed(path):
    """A JSONL's records without the measured durations (the only thing allowed to differ)."""
    return [{k: v for k, v in r.items() if k != "timings_ms"} for r in lines(path)]


def summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def statuses(out):
    return {b["name"]: b["status"] for b in summary(out)["per_bag"]}


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """Four good bags (mcap and sqlite3, raw and JPEG) in a folder, a questions file; a long bag."""
    root = tmp_path_factory.mktemp("fleet_bags")
    folder = root / "robot"
    for i, (storage, compressed) in enumerate((("mcap", None), ("sqlite3", "jpeg"), ("mcap", "jpeg"),
                                               ("sqlite3", None))):
        make_bag(folder / f"run{i}", storage=storage, seconds=1.0, rate=5.0, cameras=["front"],
                 compressed=compressed, size=(32, 24), start_s=1700000000 + 10 * i, progress=False)
        if compressed:       # the questions file names the topic; compressed bags have their own
            q = dict(QUESTIONS, cameras={"front": "/front/image_raw/compressed"})
            (folder / f"run{i}" / "questions.yaml").write_text(yaml.safe_dump(q))
    questions = root / "questions.yaml"
    questions.write_text(yaml.safe_dump(QUESTIONS))
    long_bag = root / "long" / "long0"
    make_bag(long_bag, storage="mcap", seconds=10.0, rate=5.0, cameras=["front"], size=(32, 24), progress=False)
    (long_bag / "questions.yaml").write_text(yaml.safe_dump(LONG))
    return {"folder": folder, "questions": questions, "good": sorted(folder.iterdir()), "long": long_bag,
            "root": root}


def fleet_args(items, out, model, *extra):
    return [*map(str, items), "--out-dir", str(out), "--model", str(model), "--threads", "1", "--no-progress",
            *map(str, extra)]


def single(bag, questions, out, model):
    return cli.main([str(bag), "--questions", str(questions), "--out", str(out), "--model", str(model),
                     "--threads", "1", "--no-progress"])


@pytest.fixture(scope="module")
def baseline(bags, tiny_v2, tmp_path_factory):
    """Each good bag (and the long one) replayed alone with `mobilevlm-replay --out`."""
    out = tmp_path_factory.mktemp("single")
    ref = {}
    for bag in bags["good"] + [bags["long"]]:
        own = bag / "questions.yaml"
        assert single(bag, own if own.is_file() else bags["questions"], out / f"{bag.name}.jsonl", tiny_v2) == 0
        ref[bag.name] = untimed(out / f"{bag.name}.jsonl")
        assert ref[bag.name] and all("error" not in r for r in ref[bag.name] if r["t"] > 0.25)
    return ref


# ------------------------------------------------------------------------------------ the bag list
def test_bags_from_paths_globs_folders_and_list_files(bags, tmp_path):
    good = bags["good"]
    got = fleet_mod.expand_bags([str(bags["folder"])])
    assert [b for b, _ in got] == good
    assert [b for b, _ in fleet_mod.expand_bags([str(bags["folder"] / "run[01]")])] == good[:2]
    lst = tmp_path / "bags.txt"
    lst.write_text(f"# two bags\n{good[3]}\n{os.path.relpath(good[0], tmp_path)}  {bags['questions']}\n"
                   f"no_such_bag\n")
    got = fleet_mod.expand_bags([str(lst)])
    assert got == [(good[3], None), (good[0], bags["questions"]), (tmp_path / "no_such_bag", None)]
    # names: the bag's own, or its path below the common parent where two share one
    assert fleet_mod.unique_names([good[0], good[1]]) == ["run0", "run1"]
    names = fleet_mod.unique_names([good[0], tmp_path / "b" / "run0"])
    assert len(set(names)) == 2 and all(n.endswith("run0") for n in names) and names[1].endswith("b__run0")
    with pytest.raises(fleet_mod.QuestionsError, match="matches no file"):
        fleet_mod.expand_bags([str(tmp_path / "nothing*")])


# ------------------------------------------------------------------------------------ in this process
def test_serial_run_equals_single_replays_keeps_going_and_resumes(bags, baseline, tiny_v2, tiny_v1, tmp_path):
    """--workers 0 (no Ray): each bag's JSONL equals its single replay; a missing and a truncated
    bag get error records and the others go on; the same command again skips the complete bags;
    another model redoes them all."""
    broken = tmp_path / "broken"
    shutil.copytree(bags["good"][0], broken)
    [f] = broken.glob("*.mcap")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    items = [bags["folder"], tmp_path / "missing_bag", broken]
    out = tmp_path / "out"
    args = fleet_args(items, out, tiny_v2, "--questions", bags["questions"], "--workers", 0)
    assert cli.main(args) == cli.EXIT_INPUT                    # some bags failed
    st = statuses(out)
    assert st == {"run0": "done", "run1": "done", "run2": "done", "run3": "done", "missing_bag": "failed",
                  "broken": "failed"}
    for bag in bags["good"]:
        assert untimed(out / f"{bag.name}.jsonl") == baseline[bag.name], bag.name
        s = json.loads((out / f"{bag.name}.summary.json").read_text())
        assert s["host"] and s["pid"] == os.getpid() and s["model_files_sha256"] and s["cpu_flags"] is not None
        assert s["model"]["decoder"] == "torch" and s["questions"] == len(baseline[bag.name])
    per_bag = {b["name"]: b for b in summary(out)["per_bag"]}
    assert "bag not found" in per_bag["missing_bag"]["error"]
    assert "cannot read bag" in per_bag["broken"]["error"]
    assert not list(out.glob("*.tmp"))

    # again: the complete bags are skipped, the failed ones tried again
    assert cli.main(args) == cli.EXIT_INPUT
    assert statuses(out) == {**st, **{b.name: "skipped" for b in bags["good"]}}
    # another model: everything is redone
    args_v1 = fleet_args([bags["folder"]], out, tiny_v1, "--questions", bags["questions"], "--workers", 0)
    assert cli.main(args_v1) == 0
    assert set(statuses(out).values()) == {"done"} and len(statuses(out)) == 4


def test_expect_identical_regression_and_agreement(bags, tiny_v2, tiny_v1, tmp_path, capsys):
    """--expect PREVIOUS_DIR: the same model, engine and CPU compare token for token (an edited
    previous answer is a regression, exit 3); another model's answers give an agreement figure."""
    items = [bags["good"][0], bags["good"][1]]
    first, again, v1 = tmp_path / "first", tmp_path / "again", tmp_path / "v1"
    common = ["--questions", bags["questions"], "--workers", 0]
    assert cli.main(fleet_args(items, first, tiny_v2, *common)) == 0
    assert cli.main(fleet_args(items, again, tiny_v2, *common, "--expect", first)) == 0
    e = summary(again)["expect"]
    assert (e["identical_bags"], e["agreement_bags"], e["regressions"]) == (2, 0, 0)

    # a previous answer edited: under the determinism contract that is a regression
    prev = lines(first / "run0.jsonl")
    k = next(i for i, r in enumerate(prev) if "error" not in r)
    prev[k]["answer"], prev[k]["answer_ids"] = "an older answer", [1, 2]
    (first / "run0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prev))
    capsys.readouterr()
    again2 = tmp_path / "again2"
    assert cli.main(fleet_args(items, again2, tiny_v2, *common, "--expect", first)) == cli.EXIT_CHANGED
    e = summary(again2)["expect"]
    assert e["regressions"] == 1 and e["regressed_bags"] == ["run0"]
    assert "changed: front @ t=" in capsys.readouterr().err
    assert (again2 / "report.html").is_file()

    # another model: not comparable token for token; an agreement figure, no regression
    assert cli.main(fleet_args(items, v1, tiny_v1, *common, "--expect", again)) == 0
    e = summary(v1)["expect"]
    assert (e["identical_bags"], e["agreement_bags"], e["regressions"]) == (0, 2, 0)
    assert "answers alike" in e["agreement"]


@pytest.fixture(scope="module", autouse=True)
def torch_threads():
    """--threads 1 in this process sets torch's threads for the session: give them back after."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ on Ray
@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray cluster on this machine, 127.0.0.1 only: a head without CPUs (the driver's side) and
    two one-CPU nodes, so each fleet worker (one CPU) runs on a node of its own."""
    from helpers.skips import skip_reason_if_missing
    if reason := skip_reason_if_missing("ray"):
        pytest.skip(reason)
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_run_equals_single_replays_in_any_order(bags, baseline, tiny_v2, ray_cluster, tmp_path):
    """Two Ray workers on two nodes, the bags in reverse order: each bag's JSONL equals its
    single replay; the summary names the worker and host of each bag, the model was loaded once
    per worker."""
    items = list(reversed(bags["good"]))
    out = tmp_path / "ray"
    assert cli.main(fleet_args(items, out, tiny_v2, "--questions", bags["questions"], "--workers", 2)) == 0
    workers = set()
    for bag in bags["good"]:
        assert untimed(out / f"{bag.name}.jsonl") == baseline[bag.name], bag.name
        s = json.loads((out / f"{bag.name}.summary.json").read_text())
        assert s["status"] == "done" and s["pid"] != os.getpid() and s["load_ms"] < 1.0   # model already loaded
        workers.add(s["worker"])
    assert 1 <= len(workers) <= 2      # a worker that loads its model late may find the queue empty
    run = summary(out)
    assert run["ray"] and run["workers"] == 2 and run["done"] == 4


def _disturbed_run(bags, model, out, disturb, good=None, others_done=False):
    """A Ray run of the long bag and the good ones with `disturb(event)` called once, on the
    first question the long bag answers (others_done: the first after every other bag is finished,
    so that the other worker is idle): returns the Fleet."""
    good = bags["good"] if good is None else good
    from mobilevlm_ros.replay.fleet import Fleet, make_jobs
    from mobilevlm_ros.replay.fleet_cli import settings_from_args
    from mobilevlm_ros.replay.ray_pool import run_ray
    from mobilevlm_ros.replay.runner import engine_config
    a = cli.build_parser().parse_args(fleet_args([bags["long"], *good], out, model,
                                                 "--questions", bags["questions"]))
    jobs = make_jobs(a.bag, a.questions, lambda qf: engine_config(qf, None, max_frame_age_s=qf.max_frame_age_s))
    hit = []

    def on_event(kind, name, what):
        if kind == "record" and name == "long0" and not hit:
            if others_done and any(fleet.status[b.name].value != "done" for b in good):
                return
            hit.append(what)
            disturb(what)

    fleet = Fleet(jobs, settings_from_args(a, 1), Path(out), on_event=on_event)
    run_ray(fleet, fleet.todo(), 2)
    assert hit, "the long bag was never seen running"
    return fleet, hit[0]


def _assert_undisturbed(fleet, bags, baseline, out, good=None):
    for bag in [bags["long"], *(bags["good"] if good is None else good)]:
        assert fleet.status[bag.name].value == "done"
        assert untimed(Path(out) / f"{bag.name}.jsonl") == baseline[bag.name], bag.name


def test_worker_killed_mid_bag_redoes_the_bag(bags, baseline, tiny_v2, ray_cluster, tmp_path):
    out = tmp_path / "killed"
    fleet, victim = _disturbed_run(bags, tiny_v2, out, lambda w: os.kill(w["pid"], signal.SIGKILL))
    assert fleet.attempts == {"long0": 1}                     # the bag was cut short once, and redone
    s = json.loads((out / "long0.summary.json").read_text())
    assert s["pid"] != victim["pid"]
    _assert_undisturbed(fleet, bags, baseline, out)


def test_node_removed_mid_bag_redoes_the_bag(bags, baseline, tiny_v2, ray_cluster, tmp_path):
    """A node leaves and none replaces it, while the other worker idles: the lost worker cannot
    come back (the other holds the only CPU left), so the driver must see the node gone and give
    the bag to the idle worker."""
    out = tmp_path / "node_gone"
    removed = []

    def remove_node(w):
        [node] = [n for n in ray_cluster.worker_nodes if n.node_id == w["node_id"]]
        ray_cluster.remove_node(node)
        removed.append(node)

    try:
        fleet, victim = _disturbed_run(bags, tiny_v2, out, remove_node, good=bags["good"][:1], others_done=True)
    finally:
        ray_cluster.add_node(num_cpus=1)        # the two-node cluster again, for the tests after
        ray_cluster.wait_for_nodes()
    assert removed and fleet.attempts == {"long0": 1}
    s = json.loads((out / "long0.summary.json").read_text())
    assert s["node_id"] != victim["node_id"]
    _assert_undisturbed(fleet, bags, baseline, out, good=bags["good"][:1])


# ------------------------------------------------------------------------------------ Ctrl-C, resume
def _connections(p):
    try:
        return p.net_connections(kind="inet")
    except Exception:                 # gone meanwhile
        return []


def test_ctrl_c_keeps_finished_bags_and_the_same_command_resumes(bags, baseline, tiny_v2, tmp_path):
    """SIGINT to a running `mobilevlm-replay --out-dir` (a local Ray of its own, one worker): it
    stops within seconds, exit 130, the bags finished are complete and nothing is half-written;
    the same command again skips them and does the rest (here in this process, --workers 0)."""
    from helpers.skips import skip_reason_if_missing
    if reason := skip_reason_if_missing("ray"):
        pytest.skip(reason)
    out = tmp_path / "out"
    items = [bags["good"][0], bags["good"][3], bags["long"], bags["good"][1], bags["good"][2]]
    args = fleet_args(items, out, tiny_v2, "--questions", bags["questions"])
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "mobilevlm_ros.replay.cli", *args, "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out / "run3.summary.json").exists():       # two bags done, the long one running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        # the local Ray listens on the loopback address only
        import psutil
        listening = [(c.laddr.ip, p.name()) for p in psutil.Process(proc.pid).children(recursive=True)
                     for c in _connections(p) if c.status == psutil.CONN_LISTEN]
        assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _ in listening), listening
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted" in log and "run the same command again" in log
    run = summary(out)
    assert run["interrupted"] and run["done"] >= 2 and run["pending"] >= 1
    finished = [b["name"] for b in run["per_bag"] if b["status"] == "done"]
    for name in finished:
        assert untimed(out / f"{name}.jsonl") == baseline[name]
    assert not list(out.glob("*.tmp"))
    assert all(not (out / f"{b['name']}.summary.json").exists() for b in run["per_bag"] if b["status"] == "pending")

    assert cli.main(args + ["--workers", "0"]) == 0
    st = statuses(out)
    assert {n for n, s in st.items() if s == "skipped"} == set(finished)
    assert {n for n, s in st.items() if s == "done"} == {p.name for p in items} - set(finished)
    for p in items:
        assert untimed(out / f"{p.name}.jsonl") == baseline[p.name]


def test_without_ray_the_command_says_how_to_install(bags, tiny_v2, tmp_path):
    """A Python where `import ray` fails: the many-bags command names the extra; one bag runs."""
    blocker = tmp_path / "noray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('ray is not installed here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "mobilevlm_ros.replay.cli",
                           *fleet_args([bags["good"][0]], tmp_path / "o", tiny_v2, "--questions", bags["questions"])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == cli.EXIT_INPUT and "mobilevlm_ros[fleet]" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mobilevlm_ros.replay.cli", str(bags["good"][0]), "--questions",
                           str(bags["questions"]), "--out", str(tmp_path / "one.jsonl"), "--model", str(tiny_v2),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------ the report
def browser():
    for name in ("chromium-headless-shell", "chrome-headless-shell", "chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


def test_report_in_a_headless_browser(bags, tiny_v2, tmp_path):
    """report.html of a run with a regression, opened in headless Chromium: the counts on top, the
    bag's changed question with its frame's thumbnail, the previous and the new answer side by
    side; self-contained (no http(s) reference) and rendered (the screenshot is not blank)."""
    exe = browser()
    if exe is None:
        pytest.skip("needs a headless Chromium (scripts/test.sh installs chromium-headless-shell when run "
                    "as root on Debian)")
    items = [bags["good"][0], bags["good"][1]]
    first, again = tmp_path / "first", tmp_path / "again"
    common = ["--questions", bags["questions"], "--workers", 0]
    assert cli.main(fleet_args(items, first, tiny_v2, *common)) == 0
    prev = lines(first / "run1.jsonl")
    k = next(i for i, r in enumerate(prev) if "error" not in r)
    new_answer = prev[k]["answer"]
    prev[k]["answer"], prev[k]["answer_ids"] = "a <b>previous</b> answer", [7]
    (first / "run1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prev))
    assert cli.main(fleet_args(items, again, tiny_v2, *common, "--expect", first)) == cli.EXIT_CHANGED
    report = again / "report.html"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text

    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<html" in dom.stdout, dom.stderr[-2000:]
    from html.parser import HTMLParser

    class Parse(HTMLParser):
        def __init__(self):
            super().__init__()
            self.counts, self.imgs, self.cells, self._count, self._td = {}, [], [], None, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if "data-count" in a:
                self._count = a["data-count"]
            if tag == "img":
                self.imgs.append(a.get("src", ""))
            if tag == "td":
                self._td = [a.get("class"), ""]
                self.cells.append(self._td)

        def handle_endtag(self, tag):
            if tag == "td":
                self._td = None

        def handle_data(self, data):
            if self._count is not None and data.strip():
                self.counts[self._count] = data.strip()
                self._count = None
            if self._td is not None:
                self._td[1] += data

    p = Parse()
    p.feed(dom.stdout)
    assert p.counts["regressions"] == "1" and p.counts["bags regressed"] == "1"
    assert p.counts["bags token for token"] == "2"
    assert len(p.imgs) == 1 and p.imgs[0].startswith("data:image/jpeg;base64,")
    old = [c for cls, c in p.cells if cls == "old"]
    new = [c for cls, c in p.cells if cls == "new"]
    assert old == ["a <b>previous</b> answer"] and new == [new_answer]      # escaped, side by side

    shot = tmp_path / "report.png"
    r = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1000,700", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    import numpy as np
    from PIL import Image
    px = np.asarray(Image.open(shot).convert("L"))
    assert px.shape == (700, 1000)
    assert (px < 128).mean() > 0.002          # text drawn
    assert px.std() > 10                      # not a blank page


# ------------------------------------------------------------------------------------ token auth
DRIVER = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
          "print('CONNECTED', ray.get(ray.remote(lambda: 41 + 1).remote()))")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cluster_with_token_auth_refuses_a_driver_without_the_token(bags, baseline, tiny_v2, tmp_path):
    """`ray start --head` with RAY_AUTH_MODE=token (as docs/fleet.md tells a cluster to run): a
    driver with the token connects and runs a task, and `mobilevlm-replay --address` with it
    replays a bag there; a driver without the token, or with another, is refused."""
    import secrets
    import socket
    import tempfile
    from helpers.skips import skip_reason_if_missing
    if reason := skip_reason_if_missing("ray"):
        pytest.skip(reason)
    ray_exe = Path(sys.executable).with_name("ray")
    port, token = _free_port(), secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")              # short: Ray's socket paths
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HOME=str(tmp_path))
    with_token = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen([str(ray_exe), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=false",
                             f"--temp-dir={temp}"], env=with_token, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, head.communicate()[0][-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(0.5)

        def driver(env):
            return subprocess.run([sys.executable, "-c", DRIVER, address], env=env, capture_output=True,
                                  text=True, timeout=180)

        ok = driver(with_token)
        assert ok.returncode == 0 and "CONNECTED 42" in ok.stdout, ok.stderr[-3000:]
        out = tmp_path / "on_cluster"
        run = subprocess.run([sys.executable, "-m", "mobilevlm_ros.replay.cli",
                              *fleet_args([bags["good"][0]], out, tiny_v2, "--questions", bags["questions"],
                                          "--address", address, "--workers", 1)],
                             env=with_token, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert untimed(out / "run0.jsonl") == baseline["run0"]
        # refused drivers: try the GCS for 3 s instead of 20 (Ray retries a failed connection)
        for env in (base, dict(with_token, RAY_AUTH_TOKEN=secrets.token_hex(16))):
            refused = driver(dict(env, RAY_gcs_server_port_wait_time_s="3"))
            out = refused.stdout + refused.stderr
            assert refused.returncode != 0 and "CONNECTED" not in refused.stdout, out[-3000:]
            assert "auth" in out.lower(), out[-3000:]
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)

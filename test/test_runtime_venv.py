"""The robot runtime set alone: requirements-ros.txt + requirements-runtime.txt (what a robot without
ROS 2 from apt installs; with apt, only the second) pip-installed into a fresh venv, the package
installed there from its wheel. In that venv, with no torch installed: the node on an exported
artifacts folder answers `mobilevlm-ask-node` over DDS about a frame this test publishes, and
`mobilevlm-replay` answers from a bag. And in the development venv (where torch is installed), the
node's and replay's code paths import no torch.

pip takes the packages from the machine's caches (llama-cpp-python's wheel was built once by
scripts/setup.sh), so making the venv takes about a minute. The generated interfaces
(mobilevlm_ros.msg/.srv/.action and their libraries), which a wheel of setup.py cannot hold, are
copied from the development venv, where scripts/setup.sh built them with CMake against the same
pinned ROS wheels: what a colcon install space gives a robot.
"""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.skips import skip_reason_if_missing
from helpers import REPO
from helpers.install import PIP, PY_DIR, build_wheel, run

DEV_PREFIX = Path(sys.prefix)
ACTIVE_LOG = "serving ~/ask and ~/ask_stream"      # what the node logs once it is active
QUESTION = "What is in the picture?"
# distributions of requirements.txt beyond the runtime set, none of which may be in the runtime venv
NOT_RUNTIME = ("torch", "transformers", "matplotlib", "onnx", "onnxscript", "gguf", "safetensors",
               "tokenizers", "pytest", "hypothesis")
# what the node, replay and the ask clients must not import (not even where it is installed)
HEAVY = ("torch", "transformers", "matplotlib", "onnx", "onnxscript", "gguf", "safetensors")

_reason = skip_reason_if_missing("mobilevlm_ros.msg") or skip_reason_if_missing("rclpy")
if _reason:
    pytest.skip(_reason, allow_module_level=True)


def _interfaces_dir() -> Path:
    """The sys.path folder the generated mobilevlm_ros.msg comes from."""
    return Path(importlib.import_module("mobilevlm_ros.msg").__file__).resolve().parents[2]


PROBE = r"""
import json, sys
heavy = %r
from mobilevlm_ros.core.pipeline import load_model
import mobilevlm_ros.ros.node, mobilevlm_ros.ros.ask_client, mobilevlm_ros.replay.cli
import mobilevlm_ros.tools.demo, mobilevlm_ros.tools.ask, mobilevlm_ros.tools.make_bag
model = load_model(sys.argv[1], threads=1)
import numpy as np
emb = model.encode([np.zeros((48, 64, 3), np.uint8)])[0]
model.ask("What is here?", emb)
model.close()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
""" % (HEAVY,)


def test_node_and_replay_paths_import_no_torch(tiny_v2_artifacts, tmp_path):
    """In the development venv, where torch is installed: importing the node, the ask clients and
    replay, loading an artifacts folder and answering a question loads none of HEAVY."""
    p = run([sys.executable, "-c", PROBE, tiny_v2_artifacts], dict(os.environ), tmp_path, 180)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [], p.stdout


class RuntimeVenv:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.prefix = tmp / "venv"
        self.bin = self.prefix / "bin"
        self.python = self.bin / "python"
        self.site = self.prefix / "lib" / PY_DIR / "site-packages"
        self.share = self.prefix / "share" / "mobilevlm_ros"
        self.work = tmp / "work"                  # the cwd of every command: outside the checkout
        self.work.mkdir()

    def env(self, **extra):
        """The environment of a fresh shell: nothing of the development venv (its python's ROS
        bootstrap and .pth exported LD_LIBRARY_PATH, AMENT_PREFIX_PATH, ...); the runtime venv's
        own bootstrap sets what it needs."""
        drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "LD_LIBRARY_PATH",
                "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "_ROS_WHEELS_BOOTSTRAP_COMPLETE")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != DEV_PREFIX / "bin"]
        env.update({
            "PATH": os.pathsep.join([str(self.bin)] + path),
            "ROS_LOG_DIR": str(self.tmp / "ros_log"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime_venv")
    rt = RuntimeVenv(tmp)
    env = rt.env()
    wheel = build_wheel(tmp, env)
    run([sys.executable, "-m", "venv", "--without-pip", rt.prefix], env, tmp, 60)
    # pip of the development venv installing for the new venv's python, from the machine's caches
    # (should llama-cpp-python build here after all: without AMX, as scripts/setup.sh builds it)
    pip_env = dict(env)
    if "CMAKE_ARGS" not in pip_env and " amx_int8" in Path("/proc/cpuinfo").read_text():
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        pip_env["CMAKE_ARGS"] = f"-DCMAKE_C_FLAGS='{no_amx}' -DCMAKE_CXX_FLAGS='{no_amx}'"
    t0 = time.monotonic()
    run(PIP + ["--python", rt.python, "install", "--progress-bar", "off", "-r", REPO / "requirements-ros.txt",
               "-r", REPO / "requirements-runtime.txt"], pip_env, REPO, 900)
    print(f"runtime set installed in {time.monotonic() - t0:.0f} s")
    run(PIP + ["--python", rt.python, "install", "--no-deps", "--no-index", wheel], env, tmp, 120)
    # the generated interfaces, as a colcon install space has them: the Python package beside ours
    # (both halves of mobilevlm_ros merge through pkgutil.extend_path) and the libraries in lib/,
    # which the ROS wheels' bootstrap puts on LD_LIBRARY_PATH
    iface = rt.prefix / "lib" / PY_DIR / "mobilevlm_ros-interfaces"
    shutil.copytree(_interfaces_dir(), iface, symlinks=True)
    libs = sorted((DEV_PREFIX / "lib").glob("libmobilevlm_ros__*.so"))
    assert libs, f"no interface libraries in {DEV_PREFIX / 'lib'}"
    for lib in libs:
        shutil.copy2(lib, rt.prefix / "lib" / lib.name)
    (rt.site / "mobilevlm_ros_interfaces.pth").write_text(f"{iface}\n")
    return rt


@pytest.mark.slow
def test_runtime_venv_holds_no_torch(runtime):
    p = run([runtime.python, "-c", "import importlib.metadata as m, json, re; print(json.dumps(sorted("
             "re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() for d in m.distributions())))"],
            runtime.env(), runtime.work, 60)
    installed = set(json.loads(p.stdout.strip().splitlines()[-1]))
    assert {"mobilevlm-ros", "ros-rclpy", "onnxruntime", "llama-cpp-python", "rosbags"} <= installed, installed
    assert not installed & set(NOT_RUNTIME), sorted(installed & set(NOT_RUNTIME))
    # and nothing of the development venv or the checkout is reachable from it
    p = run([runtime.python, "-c", "import sys, json; print(json.dumps(sys.path))"], runtime.env(), runtime.work, 60)
    for entry in json.loads(p.stdout.strip().splitlines()[-1]):
        assert not (entry and (Path(entry).resolve().is_relative_to(DEV_PREFIX)
                               or Path(entry).resolve() == REPO)), entry
    print(f"runtime venv: {_du(runtime.prefix)}; development venv: {_du(DEV_PREFIX)}")


def _seconds(header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def _du(path: Path) -> str:
    p = subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True)
    return p.stdout.split()[0] if p.returncode == 0 and p.stdout else "?"


@pytest.mark.slow
@pytest.mark.ros
def test_node_in_the_runtime_venv_answers_over_dds(runtime, tiny_v2_artifacts, rclpy_context):
    from helpers.frames import synthetic_frame
    from helpers.ros import Client
    name = f"runtime_venv_{os.getpid()}"
    node_name = f"/{name}"
    env = runtime.env()
    cmd = ["mobilevlm-node", "--ros-args", "--params-file", runtime.share / "config" / "mobilevlm.yaml",
           "-r", f"__node:={name}", "-p", f"model_path:={tiny_v2_artifacts}", "-p", "threads:=1",
           "-p", "diagnostics_period_s:=0.2"]
    proc = subprocess.Popen([str(runtime.bin / cmd[0])] + [str(c) for c in cmd[1:]], env=env, cwd=runtime.work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, active = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if ACTIVE_LOG in line:
                active.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    client = None
    try:
        deadline = time.monotonic() + 120
        while not active.is_set() and proc.poll() is None and time.monotonic() < deadline:
            active.wait(0.2)
        assert active.is_set(), f"the node did not become active (exit status {proc.poll()}):\n{''.join(lines)}"
        # the camera: this test's process (the development venv's rclpy), over DDS, publishing on
        # while the client asks (a frame must be fresh at question time; on a loaded machine the
        # client's start alone may take longer than the node's frame age limit)
        client = Client(rclpy_context, ns=node_name, name="runtime_venv_camera")
        stamps = [_seconds(client.publish_and_wait_encoded("front", synthetic_frame(),
                                                                        retry=True))]
        asking = threading.Event()

        def camera():
            while not asking.wait(0.2):
                stamps.append(_seconds(client.publish("front", synthetic_frame())))
        publisher = threading.Thread(target=camera, daemon=True)
        publisher.start()
        try:
            ask = run([runtime.bin / "mobilevlm-ask-node", QUESTION, "--node", node_name, "--json",
                       "--max-new-tokens", "4", "--temperature", "0", "--timeout", "60"], env, runtime.work, 120)
        finally:
            asking.set()
            publisher.join(5)
        res = json.loads(ask.stdout.strip().splitlines()[-1])
        assert res["success"] and isinstance(res["answer"], str), res
        assert res["camera"] == "front" and res["completion_tokens"] >= 1, res
        assert min(abs(res["stamp"] - s) for s in stamps) < 1e-6, (res["stamp"], stamps)   # a frame we sent
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node did not stop within 30 s of SIGINT:\n{''.join(lines)}")
        reader.join(5)
        assert code == 0, f"exit status {code}:\n{''.join(lines)}"
        print("".join(lines), end="")
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.ros
def test_demo_in_the_runtime_venv(runtime, tiny_v2_artifacts):
    """mobilevlm-demo (its own node, sample frames, ~/ask) runs on the runtime set, and says that the
    tiny model's answer is random text."""
    p = run([runtime.bin / "mobilevlm-demo", "--model", tiny_v2_artifacts, "--max-new-tokens", "4", "--quiet",
             "--namespace", f"/runtime_venv_demo_{os.getpid()}"], runtime.env(), runtime.work, 240)
    assert "frame stamp" in p.stdout and "node stopped cleanly" in p.stdout, p.stdout
    assert "the answer is random text" in p.stdout, p.stdout


@pytest.mark.slow
def test_replay_in_the_runtime_venv(runtime, tiny_v2_artifacts):
    import yaml
    env, work = runtime.env(), runtime.work
    bag = runtime.tmp / "bag"
    run([runtime.bin / "mobilevlm-make-bag", bag, "--seconds", "1.0", "--rate", "4", "--cameras", "front",
         "--size", "64x48", "--no-progress"], env, work, 120)
    questions = work / "questions.yaml"
    questions.write_text(yaml.safe_dump({
        "cameras": {"front": "/front/image_raw"}, "max_frame_age_s": 0.0,
        "defaults": {"max_new_tokens": 4, "temperature": 0.0},
        "questions": [{"id": "look", "camera": "front", "question": QUESTION, "at": [0.6]}]}))
    answers = work / "answers.jsonl"
    run([runtime.bin / "mobilevlm-replay", bag, "--questions", questions, "--out", answers,
         "--model", tiny_v2_artifacts, "--threads", "1", "--no-progress"], env, work, 180)
    lines = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" not in lines[0], lines
    assert lines[0]["finish_reason"] in ("stop", "length"), lines[0]


@pytest.mark.slow
def test_dev_tools_in_the_runtime_venv_say_what_to_install(runtime, tmp_path):
    """A tool that needs what the runtime set leaves out says so in one line, no traceback."""
    p = run([runtime.bin / "mobilevlm-make-tiny", tmp_path / "m"], runtime.env(), runtime.work, 60, check=False)
    assert p.returncode == 2, p.stdout
    assert "needs torch" in p.stdout and "pip install -r requirements.txt" in p.stdout, p.stdout
    assert "Traceback" not in p.stdout, p.stdout

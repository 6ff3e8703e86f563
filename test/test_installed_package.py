"""A non-editable install: the checkout built into a wheel and installed into a fresh venv, whose
console scripts then run from a folder outside the checkout with nothing of the checkout on sys.path
or PYTHONPATH. Catches code that finds its files relative to the source tree, and data files that
setup.py does not ship (share/mobilevlm_ros: config/, launch/, msg/ ..., the ament index marker).

The fresh venv borrows its dependencies from the running interpreter's venv (torch, rclpy and the
ROS wheels, onnxruntime, llama.cpp, ...; test_runtime_venv.py pip-installs the runtime set instead):
a .pth file in its site-packages adds that venv's site-packages and the generated interfaces
(mobilevlm_ros.msg/.srv/.action, built by CMake, which a wheel of setup.py cannot contain) as site
folders, then drops the checkout from sys.path, so that mobilevlm_ros's Python code comes from the
wheel only.
AMENT_PREFIX_PATH lists the new venv before the development venv, as an overlay over an underlay:
the development venv's share/mobilevlm_ros (symlinks into the checkout) must not be what is read.
"""
import glob
import importlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from helpers.skips import skip_reason_if_missing
from helpers import REPO
from helpers.install import PIP, PY_DIR, build_wheel, run

DEV_PREFIX = Path(sys.prefix)
DEV_SITE = Path(sysconfig.get_paths()["purelib"])
ACTIVE_LOG = "serving ~/ask and ~/ask_stream"      # what the node logs once it is active
QUESTION = "What is in the picture?"

pytestmark = pytest.mark.slow
_reason = skip_reason_if_missing("mobilevlm_ros.msg")
if _reason:
    pytest.skip(_reason, allow_module_level=True)


def _interfaces_dir() -> Path:
    """The sys.path folder the generated mobilevlm_ros.msg comes from."""
    return Path(importlib.import_module("mobilevlm_ros.msg").__file__).resolve().parents[2]


def _within(path, folder) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


class Installed:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.prefix = tmp / "venv"
        self.bin = self.prefix / "bin"
        self.python = self.bin / "python"
        self.site = self.prefix / "lib" / PY_DIR / "site-packages"
        self.share = self.prefix / "share" / "mobilevlm_ros"
        self.work = tmp / "work"                  # the cwd of every command: outside the checkout
        self.work.mkdir()
        self.interfaces = _interfaces_dir()

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
        libs = [str(DEV_PREFIX / "lib")] + sorted(glob.glob(str(DEV_SITE / "ros_*.libs")))
        env.update({
            "AMENT_PREFIX_PATH": os.pathsep.join([str(self.prefix), str(DEV_PREFIX)]),
            # what the ROS wheels' bootstrap (.pth) would set for DEV_PREFIX; it re-executes python
            # when _ROS_WHEELS_BOOTSTRAP_COMPLETE is unset, with the *new* prefix's folders only
            "LD_LIBRARY_PATH": os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
                                                       if p and p not in libs]),
            "_ROS_WHEELS_BOOTSTRAP_COMPLETE": "1",
            "PATH": os.pathsep.join([str(self.bin), env.get("PATH", "")]),
            "ROS_LOG_DIR": str(self.tmp / "ros_log"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("installed")
    inst = Installed(tmp)
    build_env = inst.env()
    wheel = build_wheel(tmp, build_env)
    run([sys.executable, "-m", "venv", "--without-pip", inst.prefix], build_env, tmp, 60)
    # pip of the development venv, installing for the new venv's python (console scripts then start
    # that python). Before the .pth below exists: this pip must not see the development venv's
    # packages, or it would take the editable mobilevlm_ros there for the one to replace.
    run(PIP + ["--python", inst.python, "install", "--no-deps", "--no-index", wheel], build_env, tmp, 120)
    assert inst.site.is_dir(), inst.site
    (inst.site / "zz_mobilevlm_ros_test_deps.pth").write_text(
        "import os, site, sys; "
        f"site.addsitedir({str(DEV_SITE)!r}); site.addsitedir({str(inst.interfaces)!r}); "
        f"sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != {str(REPO)!r}]\n")
    return inst


def test_the_wheel_ships_the_share_folder(installed):
    share = installed.share
    for rel in ("package.xml", "config/mobilevlm.yaml", "config/fastdds_large_frames.xml",
                "launch/mobilevlm.launch.py", "msg/Answer.msg", "msg/Status.msg", "srv/Ask.srv",
                "action/Ask.action"):
        path = share / rel
        assert path.is_file() and not path.is_symlink(), path
        assert path.read_bytes() == (installed.tmp / "src" / rel).read_bytes(), rel
    marker = installed.prefix / "share" / "ament_index" / "resource_index" / "packages" / "mobilevlm_ros"
    assert marker.is_file(), marker
    for script in ("mobilevlm-make-tiny", "mobilevlm-export", "mobilevlm-make-bag", "mobilevlm-replay",
                   "mobilevlm-node"):
        first = (installed.bin / script).read_text().splitlines()[0]
        assert first.startswith("#!") and Path(first[2:].strip()).parent == installed.bin, (script, first)


PROBE = r"""
import importlib, importlib.metadata, json, os, sys
import mobilevlm_ros, mobilevlm_ros.msg
from mobilevlm_ros.msg import Answer
from mobilevlm_ros.srv import Ask
from mobilevlm_ros.resources import share_file
from ament_index_python.packages import get_package_share_directory
for m in ("mobilevlm_ros.replay.cli", "mobilevlm_ros.tools.export", "mobilevlm_ros.tools.make_bag",
          "mobilevlm_ros.tools.demo", "mobilevlm_ros.ros.node"):
    importlib.import_module(m)
print(json.dumps({
    "package": mobilevlm_ros.__file__, "msg": mobilevlm_ros.msg.__file__, "path": sys.path,
    "modules": sorted(getattr(m, "__file__", None) or "" for n, m in list(sys.modules.items())
                      if n.split(".")[0] == "mobilevlm_ros"),
    "params": str(share_file("config", "mobilevlm.yaml")), "answer_msg": str(share_file("msg", "Answer.msg")),
    "ament_share": get_package_share_directory("mobilevlm_ros"),
    "version": importlib.metadata.version("mobilevlm_ros"), "answer": Answer().answer,
}))
"""


def test_imports_come_from_the_install(installed):
    p = run([installed.python, "-c", PROBE], installed.env(), installed.work, 120)
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert _within(info["package"], installed.site), info["package"]
    assert _within(info["msg"], installed.interfaces), info["msg"]
    assert not any(p and Path(p).resolve() == REPO for p in info["path"]), info["path"]
    ours = [m for m in info["modules"] if not _within(m, installed.interfaces)]
    assert ours and all(_within(m, installed.site) for m in ours), info["modules"]
    for key in ("params", "answer_msg", "ament_share"):
        assert _within(info[key], installed.share), (key, info[key])
    # with no AMENT_PREFIX_PATH at all, the package data is found under the interpreter's prefix
    p = run([installed.python, "-c", "from mobilevlm_ros.resources import share_file; "
             "print(share_file('config', 'mobilevlm.yaml'))"],
            {k: v for k, v in installed.env().items() if k != "AMENT_PREFIX_PATH"}, installed.work, 60)
    assert _within(p.stdout.strip().splitlines()[-1], installed.share), p.stdout


@pytest.fixture(scope="module")
def artifacts(installed):
    model, art = installed.tmp / "tiny-v2", installed.tmp / "tiny-v2-artifacts"
    env = installed.env()
    run(["mobilevlm-make-tiny", model, "--projector", "ldpnetv2", "--dims", "tiny"], env, installed.work, 180)
    assert (model / "config.json").is_file()
    run(["mobilevlm-export", "--model", model, "--out", art, "--vision-dtype", "fp32", "--quant", "q4_k_m", "-q"],
        env, installed.work, 300)
    assert (art / "manifest.json").is_file()
    return art


def test_replay_answers_with_the_exported_model(installed, artifacts):
    import yaml
    env, work = installed.env(), installed.work
    bag = installed.tmp / "bag"
    run(["mobilevlm-make-bag", bag, "--seconds", "1.0", "--rate", "4", "--cameras", "front", "--size", "64x48",
         "--no-progress"], env, work, 120)
    questions = work / "questions.yaml"
    questions.write_text(yaml.safe_dump({
        "cameras": {"front": "/front/image_raw"}, "max_frame_age_s": 0.0,
        "defaults": {"max_new_tokens": 4, "temperature": 0.0},
        "questions": [{"id": "look", "camera": "front", "question": QUESTION, "at": [0.6]}]}))
    answers = work / "answers.jsonl"
    run(["mobilevlm-replay", bag, "--questions", questions, "--out", answers, "--model", artifacts,
         "--threads", "1", "--answers-bag", installed.tmp / "answers_bag", "--no-progress"], env, work, 180)
    lines = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "error" not in lines[0], lines[0]
    assert lines[0]["id"] == "look" and isinstance(lines[0]["answer"], str), lines[0]
    assert lines[0]["finish_reason"] in ("stop", "length"), lines[0]
    # the answers bag carries mobilevlm_ros/msg/Answer, registered from the installed msg files
    assert any((installed.tmp / "answers_bag").iterdir())


@pytest.mark.ros
def test_node_starts_with_the_installed_params_file_and_stops_on_sigint(installed, artifacts):
    params = installed.share / "config" / "mobilevlm.yaml"
    cmd = ["mobilevlm-node", "--ros-args", "--params-file", params, "-r", "__ns:=/installed_package_test",
           "-p", f"model_path:={artifacts}", "-p", "threads:=1"]
    proc = subprocess.Popen([str(c) for c in cmd], env=installed.env(), cwd=installed.work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, active = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if ACTIVE_LOG in line:
                active.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not active.is_set() and proc.poll() is None and time.monotonic() < deadline:
            active.wait(0.2)
        assert active.is_set(), f"the node did not become active (exit status {proc.poll()}):\n{''.join(lines)}"
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node did not stop within 30 s of SIGINT:\n{''.join(lines)}")
        reader.join(5)
        assert code == 0, f"exit status {code}:\n{''.join(lines)}"
        print("".join(lines), end="")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

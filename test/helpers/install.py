"""What the tests that install the package into a fresh venv share (test_installed_package.py,
test_runtime_venv.py): a command run with its output shown on failure, and the checkout as a wheel."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO

PY_DIR = f"python{sys.version_info.major}.{sys.version_info.minor}"
# what a wheel of setup.py is built from (a copy: no build/ or *.egg-info in the checkout)
SOURCES = ["setup.py", "setup.cfg", "package.xml", "README.md", "mobilevlm_ros", "config", "launch",
           "msg", "srv", "action", "resource"]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def run(cmd, env, cwd, timeout, check=True):
    """Run a command; on failure (exit status, timeout) the assertion shows its output."""
    t0 = time.monotonic()
    try:
        p = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{out}")
    print(f"[{time.monotonic() - t0:5.1f} s] {' '.join(map(str, cmd))}")
    if check:
        assert p.returncode == 0, f"exit status {p.returncode}: {' '.join(map(str, cmd))}\n{p.stdout}"
    return p


def build_wheel(tmp: Path, env) -> Path:
    """The checkout's mobilevlm_ros wheel (no dependencies), built from a copy of SOURCES in tmp/src."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    run(PIP + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src], env, tmp, 180)
    wheels = list((tmp / "dist").glob("mobilevlm_ros-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]

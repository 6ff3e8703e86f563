"""Shared pytest set-up for mobilevlm_ros.

- Isolation for tests that start ROS nodes: a ROS_DOMAIN_ID of its own for this test session and
  discovery limited to this machine, unless the caller already set them.
- Markers (registered here; a marked test is skipped, with the reason printed under -ra, when what
  it needs is missing):
    ros       needs rclpy (and the generated mobilevlm_ros interfaces)
    gpu       needs a CUDA device visible to torch
    tensorrt  needs the tensorrt Python package
    launch    needs launch_pytest / launch_ros and ../shared/ros-launch (see launch_skip_reason)
    slow      takes long; runs by default, deselect with -m "not slow"
- rclpy_context: a session-wide rclpy Context of its own (not the default context); pass it as
  context= to nodes and executors.
- skip_reason_if_missing(module): None when the module imports, else a one-line reason.
  Import it in a test module with `from conftest import skip_reason_if_missing`.
- launch_skip_reason(): None when the launch tests can run here, else why not. LAUNCH_DIR: the
  folder of the ROS launch wheels and composition_interfaces (../shared/ros-launch beside the
  checkout, or MOBILEVLM_ROS_LAUNCH_DIR), which scripts/test.sh installs from.
- The fixtures of test/models_fixtures.py (tiny checkpoints) are available to every test.
"""

import importlib
import os
from pathlib import Path

import pytest

pytest_plugins = ["models_fixtures"]


def _unset(name):
    return not os.environ.get(name, "").strip()


if _unset("ROS_DOMAIN_ID"):
    # 1..101: never 0 (what every other ROS program on the machine uses by default), and inside the
    # range whose ports do not collide with the ephemeral ports of the machine.
    os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 101)
if _unset("ROS_AUTOMATIC_DISCOVERY_RANGE"):
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


_MISSING = {}


def skip_reason_if_missing(module):
    """Return None if `module` imports, else a short reason to skip a test that needs it."""
    if module not in _MISSING:
        try:
            importlib.import_module(module)
            _MISSING[module] = None
        except Exception as exc:  # ImportError, or a native library that fails to load
            _MISSING[module] = f"needs {module}, which does not import here: {type(exc).__name__}: {exc}"
    return _MISSING[module]


# where scripts/setup.sh --test (scripts/test.sh) takes the ROS launch packages from: the same rule
LAUNCH_DIR = Path(os.environ.get("MOBILEVLM_ROS_LAUNCH_DIR")
                  or Path(__file__).resolve().parent.parent.parent / "shared" / "ros-launch")


def launch_skip_reason():
    """None when the launch tests can run: the ROS launch packages are installed and the folder
    they came from (with composition_interfaces, which the tests build) is here."""
    if not (LAUNCH_DIR / "composition_interfaces" / "package.xml").is_file():
        return (f"no ROS launch packages here: {LAUNCH_DIR} does not exist (../shared/ros-launch beside "
                "the checkout, or set MOBILEVLM_ROS_LAUNCH_DIR); scripts/test.sh installs them from there")
    for module in ("launch_pytest", "launch_ros.actions", "rclpy", "mobilevlm_ros.srv"):
        reason = skip_reason_if_missing(module)
        if reason:
            return f"{reason} (scripts/test.sh installs it from {LAUNCH_DIR})"
    return None


def _gpu_skip_reason():
    reason = skip_reason_if_missing("torch")
    if reason:
        return reason
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False)"


# marker -> function returning None (run) or the reason to skip
_MARKER_CHECKS = {
    "ros": lambda: skip_reason_if_missing("rclpy") or skip_reason_if_missing("mobilevlm_ros.srv"),
    "gpu": _gpu_skip_reason,
    "tensorrt": lambda: skip_reason_if_missing("tensorrt"),
    "launch": launch_skip_reason,
}

_MARKER_HELP = {
    "ros": "needs rclpy and the generated mobilevlm_ros interfaces (skipped when missing)",
    "gpu": "needs a CUDA GPU (skipped when missing)",
    "tensorrt": "needs the TensorRT Python package (skipped when missing)",
    "launch": "needs launch_pytest/launch_ros, from a ROS 2 install or ../shared/ros-launch (skipped when missing)",
    "slow": "takes long; deselect with -m 'not slow'",
}


def pytest_configure(config):
    for name, text in _MARKER_HELP.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    reasons = {}
    for item in items:
        for name, check in _MARKER_CHECKS.items():
            if item.get_closest_marker(name) is None:
                continue
            if name not in reasons:
                reasons[name] = check()
            if reasons[name]:
                item.add_marker(pytest.mark.skip(reason=f"[{name}] {reasons[name]}"))
                break


@pytest.fixture(scope="session")
def rclpy_context():
    """An initialised rclpy Context for the whole session, shut down at the end."""
    reason = skip_reason_if_missing("rclpy")
    if reason:
        pytest.skip(reason)
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        context.try_shutdown()

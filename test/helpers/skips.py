"""Why a test cannot run here: None when it can, else a one-line reason for pytest.skip."""
import importlib
import os
from pathlib import Path

from helpers import REPO

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
LAUNCH_DIR = Path(os.environ.get("MOBILEVLM_ROS_LAUNCH_DIR") or REPO.parent / "shared" / "ros-launch")


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


def gpu_skip_reason():
    reason = skip_reason_if_missing("torch")
    if reason:
        return reason
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False)"

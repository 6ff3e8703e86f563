"""The test session's set-up, fixtures and hooks for mobilevlm_ros (shared helpers: the `helpers`
package beside this file).

- Isolation for tests that start ROS nodes: a ROS_DOMAIN_ID of its own for this test session and
  discovery limited to this machine, unless the caller already set them.
- Markers (registered here; a marked test is skipped, with the reason printed under -ra, when what
  it needs is missing):
    ros       needs rclpy (and the generated mobilevlm_ros interfaces)
    gpu       needs a CUDA device visible to torch
    tensorrt  needs the tensorrt Python package
    launch    needs launch_pytest / launch_ros and ../shared/ros-launch (helpers.skips.launch_skip_reason)
    slow      takes long; runs by default, deselect with -m "not slow"
- rclpy_context: a session-wide rclpy Context of its own (not the default context); pass it as
  context= to nodes and executors.
- tiny_v1, tiny_v2, tiny_ckpt (both): tiny random checkpoints in the published layout, made by the
  project's own tool; tiny_v2_artifacts: tiny_v2 exported as the product runs it.
"""

import os

import pytest

from mobilevlm_ros.tools.make_tiny import make_checkpoint
from helpers.skips import gpu_skip_reason, launch_skip_reason, skip_reason_if_missing


def _unset(name):
    return not os.environ.get(name, "").strip()


if _unset("ROS_DOMAIN_ID"):
    # 1..101: never 0 (what every other ROS program on the machine uses by default), and inside the
    # range whose ports do not collide with the ephemeral ports of the machine.
    os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 101)
if _unset("ROS_AUTOMATIC_DISCOVERY_RANGE"):
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


# marker -> function returning None (run) or the reason to skip
_MARKER_CHECKS = {
    "ros": lambda: skip_reason_if_missing("rclpy") or skip_reason_if_missing("mobilevlm_ros.srv"),
    "gpu": gpu_skip_reason,
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


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-v2", "ldpnetv2", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_v1(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-v1", "ldpnet", "tiny", seed=0)


@pytest.fixture(scope="session", params=["v1", "v2"])
def tiny_ckpt(request, tiny_v1, tiny_v2):
    return tiny_v1 if request.param == "v1" else tiny_v2


@pytest.fixture(scope="module")
def torch_model(tiny_v2):
    """tiny_v2 on the torch reference, loaded once per test module (its decoder's KV states stay
    within the module)."""
    from mobilevlm_ros.core.pipeline import load_model
    m = load_model(tiny_v2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def tiny_v2_artifacts(tiny_v2, tmp_path_factory):
    """tiny_v2 exported as the product runs it: ONNX vision graphs (fp32, int8) + GGUF decoders."""
    from mobilevlm_ros.tools.export import export
    out = tmp_path_factory.mktemp("models") / "tiny-v2-artifacts"
    export(tiny_v2, out, ["fp32", "int8"], ["f16", "q8_0", "q4_k_m"], quiet=True)
    return out

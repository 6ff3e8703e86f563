"""launch/mobilevlm.launch.py on a robot (a ROS 2 install with launch_pytest and the package built
with colcon): launch it with a camera remap, publish frames on the remapped topic, ask a question.

Here (ROS 2 from PyPI wheels: no launch, launch_ros, launch_pytest) the module is skipped with the
reason printed; test_node.py covers the same node and parameters file by starting the executable.
"""
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import skip_reason_if_missing

REPO = Path(__file__).resolve().parent.parent
LAUNCH_FILE = REPO / "launch" / "mobilevlm.launch.py"
PARAMS = REPO / "config" / "mobilevlm.yaml"
MODEL = REPO / "models" / "tiny-v2"
NS = "/launch_test"
CAMERA_TOPIC = f"{NS}/camera/image_raw"

# (the test carries launch_pytest's @pytest.mark.launch, which conftest.py also skips on when missing)
_reason = (skip_reason_if_missing("launch_pytest") or skip_reason_if_missing("launch_ros")
           or skip_reason_if_missing("rclpy") or skip_reason_if_missing("mobilevlm_ros.srv"))
if _reason:
    print(f"test_launch.py: skipped: {_reason}", file=sys.stderr)
    pytest.skip(_reason, allow_module_level=True)

import launch  # noqa: E402
import launch_pytest  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from mobilevlm_ros.srv import Ask  # noqa: E402


@launch_pytest.fixture
def launch_description():
    return launch.LaunchDescription([
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
            launch_arguments={"namespace": NS.strip("/"), "params_file": str(PARAMS),
                              "model_path": str(MODEL), "image": CAMERA_TOPIC}.items()),
        launch_pytest.actions.ReadyToTest(),
    ])


@pytest.mark.launch(fixture=launch_description)
def test_launch_file_serves_questions_about_the_remapped_camera():
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("launch_test_client", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        pub = node.create_publisher(Image, CAMERA_TOPIC, 10)
        client = node.create_client(Ask, f"{NS}/mobilevlm/ask")
        assert client.wait_for_service(timeout_sec=120), "the launched node never served ~/ask"
        msg = Image()
        msg.height, msg.width, msg.encoding, msg.step = 48, 64, "rgb8", 64 * 3
        msg.data = np.full((48, 64, 3), 128, np.uint8).tobytes()
        msg.header.frame_id = "launch_cam"
        request = Ask.Request()
        request.question, request.max_new_tokens, request.temperature = "What is this?", 4, 0.0
        deadline = time.monotonic() + 60
        while True:
            msg.header.stamp = node.get_clock().now().to_msg()
            pub.publish(msg)
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _f: done.set())
            assert done.wait(60)
            res = future.result()
            if res.success or "no frame" not in res.error or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert res.success, res.error
        assert res.header.frame_id == "launch_cam" and res.completion_tokens == 4
    finally:
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()

"""launch/mobilevlm.launch.py as a robot runs it: the package and composition_interfaces built with
`colcon build` into a scratch workspace (the non-develop CMake path), its install/setup.sh sourced,
and the launch file of the install space (share/mobilevlm_ros/launch) started with launch_pytest.

Needs the ROS launch packages, which no registry here carries: scripts/test.sh installs them from
../shared/ros-launch (or MOBILEVLM_ROS_LAUNCH_DIR) and colcon into build/colcon-venv. Without that
folder the module is skipped with the reason printed. The colcon build runs once per session.
"""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO
from helpers.skips import LAUNCH_DIR, launch_skip_reason

COLCON = REPO / "build" / "colcon-venv" / "bin" / "colcon"
# what the package is built from: a copy, as a robot's workspace holds it. The checkout itself holds
# .venv, and CMake refuses exported targets whose include folders (numpy's, in .venv) lie in the
# source folder; a copy also shows that nothing else of the checkout (build/, models/) is needed.
PACKAGE_SOURCES = ["CMakeLists.txt", "package.xml", "setup.py", "setup.cfg", "README.md", "mobilevlm_ros",
                   "config", "launch", "msg", "srv", "action", "resource"]
EXECUTABLE = Path("lib") / "mobilevlm_ros" / "mobilevlm_node"
LAUNCH_FILE = Path("share") / "mobilevlm_ros" / "launch" / "mobilevlm.launch.py"
QUESTION = "What is in the picture?"
TOKENS = 4
ACTIVE_LOG = "serving ~/ask and ~/ask_stream"      # what the node logs (info) once it is active

_reason = launch_skip_reason()
if not _reason and not COLCON.exists():
    _reason = f"colcon is not installed ({COLCON}): scripts/test.sh (scripts/setup.sh --test) installs it"
if _reason:
    print(f"test_launch.py: skipped: {_reason}", file=sys.stderr)
    pytest.skip(_reason, allow_module_level=True)

import launch  # noqa: E402
import launch_pytest  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from ament_index_python.packages import get_package_prefix  # noqa: E402
from launch.actions import IncludeLaunchDescription, RegisterEventHandler  # noqa: E402
from launch.event_handlers import OnProcessExit, OnProcessIO, OnProcessStart  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from rcl_interfaces.srv import GetParameters  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from mobilevlm_ros.ros.qos import ASK_SERVICE_QOS  # noqa: E402
from mobilevlm_ros.srv import Ask  # noqa: E402
from helpers.waiting import wait_for, wait_future  # noqa: E402

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------- colcon workspace
class Install:
    """A colcon install space and the environment its setup script makes."""

    def __init__(self, prefix: Path, env_changes: dict, log: Path):
        self.prefix, self.env_changes, self.log = prefix, env_changes, log
        self.package = prefix / "mobilevlm_ros"        # colcon's default isolated layout


def _tail(path: Path, lines=60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def colcon_install(tmp_path_factory):
    ws = tmp_path_factory.mktemp("colcon_ws")
    pkg = ws / "src" / "mobilevlm_ros"
    pkg.mkdir(parents=True)
    for name in PACKAGE_SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, pkg / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, pkg / name)
    (ws / "src" / "composition_interfaces").symlink_to(LAUNCH_DIR / "composition_interfaces")

    # the underlay is .venv (the ROS wheels), as /opt/ros/<distro> is on a robot
    venv = Path(sys.prefix)
    env = dict(os.environ, AMENT_PREFIX_PATH=str(venv), CMAKE_PREFIX_PATH=str(venv),
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    log = ws / "colcon-build.log"
    cmd = [str(COLCON), "--log-base", str(ws / "log"), "build", "--base-paths", str(ws / "src"),
           "--build-base", str(ws / "build"), "--install-base", str(ws / "install"),
           "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"]
    t0 = time.monotonic()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        try:
            rc = subprocess.run(cmd, cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=840).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout (840 s)"
    if rc != 0:
        pytest.fail(f"colcon build failed ({rc}); its log: {log} (and {ws / 'log'}), last lines:\n{_tail(log)}")
    print(f"colcon build of mobilevlm_ros and composition_interfaces: {time.monotonic() - t0:.0f} s ({ws})")

    # source install/setup.sh in a shell and take the environment it leaves
    install = ws / "install"
    p = subprocess.run(["sh", "-c", '. "$1/setup.sh" && env -0', "sh", str(install)], env=dict(os.environ),
                       capture_output=True, timeout=60)
    assert p.returncode == 0, f". {install}/setup.sh failed:\n{p.stderr.decode(errors='replace')}"
    sourced = dict(item.split("=", 1) for item in p.stdout.decode().split("\0") if "=" in item)
    changes = {k: v for k, v in sourced.items()
               if os.environ.get(k) != v and k not in ("_", "SHLVL", "PWD", "OLDPWD")}
    return Install(install, changes, log)


@pytest.fixture(scope="module")
def sourced(colcon_install):
    """This process's environment as after `. install/setup.sh`, for the module's tests: launch and
    ament_index_python (the launch file's package lookups, launch_ros's executable lookup) read it,
    and the launched node inherits it."""
    mp = pytest.MonkeyPatch()
    for key, value in colcon_install.env_changes.items():
        mp.setenv(key, value)
    yield colcon_install
    mp.undo()


def test_colcon_install_has_the_ros_layout(colcon_install):
    pkg = colcon_install.package
    for exe in ("mobilevlm_node", "mobilevlm-node", "mobilevlm-ask-node", "mobilevlm-replay"):
        assert os.access(pkg / "lib" / "mobilevlm_ros" / exe, os.X_OK), exe
    for f in (LAUNCH_FILE, Path("share/mobilevlm_ros/config/mobilevlm.yaml"), Path("share/mobilevlm_ros/package.xml"),
              Path("share/ament_index/resource_index/packages/mobilevlm_ros")):
        assert (pkg / f).is_file(), f
    py = pkg / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "mobilevlm_ros"
    assert (py / "ros" / "node.py").is_file() and (py / "srv" / "_ask.py").is_file()
    changes = colcon_install.env_changes
    assert changes["AMENT_PREFIX_PATH"].split(os.pathsep)[0] == str(pkg), changes
    assert str(py.parent) in changes["PYTHONPATH"].split(os.pathsep), changes


def test_every_launch_argument_has_a_description_and_is_in_the_docstring(sourced):
    """What `ros2 launch mobilevlm_ros mobilevlm.launch.py --show-args` prints, and the file's own
    usage text, cover every argument; the default parameters file is the install space's."""
    from launch.launch_description_sources import get_launch_description_from_python_launch_file
    path = sourced.package / LAUNCH_FILE
    declared = get_launch_description_from_python_launch_file(str(path)).get_launch_arguments()
    doc = path.read_text().split('"""')[1]
    assert {a.name for a in declared} >= {"namespace", "node_name", "params_file", "model_path", "image"}
    for a in declared:
        assert a.description.strip() and a.description != "no description given", a.name
        assert f"\n  {a.name} " in doc, f"{a.name} is not in the launch file's docstring"
    default = "".join(s.perform(None) for s in next(a for a in declared if a.name == "params_file").default_value)
    assert default == str(sourced.package / "share" / "mobilevlm_ros" / "config" / "mobilevlm.yaml")


# ---------------------------------------------------------------------------------- launching it
class Launched:
    """What the launch service saw of the node's process: pid, command line, exit code, output.
    Its handlers are registered before the launch file is included, so nothing is missed."""

    def __init__(self):
        self.pid = self.cmd = self.returncode = None
        self.exited = threading.Event()
        self._out = []

    def _on_start(self, event, _context):
        self.pid, self.cmd = event.pid, list(event.cmd)

    def _on_exit(self, event, _context):
        self.returncode = event.returncode
        self.exited.set()

    def _on_output(self, event):
        self._out.append(event.text.decode(errors="replace"))

    def output(self):
        return "".join(self._out)

    def handlers(self):
        return [RegisterEventHandler(OnProcessStart(on_start=self._on_start)),
                RegisterEventHandler(OnProcessIO(on_stdout=self._on_output, on_stderr=self._on_output)),
                RegisterEventHandler(OnProcessExit(on_exit=self._on_exit))]


def launch_installed(install: Install, **arguments):
    """(LaunchDescription, Launched): the install space's launch file with these launch arguments."""
    launched = Launched()
    return launch.LaunchDescription([
        *launched.handlers(),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(install.package / LAUNCH_FILE)),
                                 launch_arguments={k: str(v) for k, v in arguments.items()}.items()),
        launch_pytest.actions.ReadyToTest(),
    ]), launched


@pytest.fixture(scope="session")
def artifacts(request):
    """The tiny model's export (ONNX vision graph + GGUF decoder) that scripts/setup.sh makes, else
    the same made by the session fixture."""
    made = REPO / "models" / "tiny-v2-artifacts"
    return made if (made / "manifest.json").is_file() else request.getfixturevalue("tiny_v2_artifacts")


class Graph:
    """The test's side of the ROS graph: one node of its own, spun by a thread."""

    def __init__(self, context, name):
        self.node = rclpy.create_node(name, context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()

    def call(self, client, request, timeout, attempt_s=5.0):
        """A reply to `request`, sent again while none comes: a reply can be lost while the
        service's reader of it is still being matched (see helpers.ros.match_service)."""
        deadline = time.monotonic() + timeout
        assert client.wait_for_service(timeout_sec=timeout), f"no server for {client.srv_name}"
        while True:
            future = client.call_async(request)
            done = threading.Event()
            future.add_done_callback(lambda _f: done.set())
            if done.wait(min(attempt_s, max(0.1, deadline - time.monotonic()))):
                return future.result()
            client.remove_pending_request(future)
            assert time.monotonic() < deadline, f"{client.srv_name}: no reply within {timeout} s"

    def parameters(self, node, names, timeout=120):
        client = self.node.create_client(GetParameters, f"{node}/get_parameters")
        res = self.call(client, GetParameters.Request(names=names), timeout)
        return dict(zip(names, res.values))


def assert_runs_the_install(launched: Launched, install: Install):
    """The node's process runs the colcon install's executable, with the install's generated
    interfaces loaded (not those of .venv, which the development set-up built)."""
    assert launched.pid is not None, "the launch file started no process"
    assert str(install.package / EXECUTABLE) in launched.cmd, launched.cmd
    assert Path(get_package_prefix("mobilevlm_ros")) == install.package
    maps = Path(f"/proc/{launched.pid}/maps").read_text()
    typesupport = {line.split()[-1] for line in maps.splitlines() if "mobilevlm_ros" in line and ".so" in line}
    assert typesupport and all(p.startswith(str(install.package)) for p in typesupport), typesupport


UNIQUE = f"launch_{os.getpid()}"       # names of this session's nodes (other sessions share DDS domains)


@launch_pytest.fixture
def default_launch(sourced, artifacts):
    """Defaults but for the model and the camera remap: the params file of the install space."""
    return launch_installed(sourced, namespace=UNIQUE, model_path=artifacts, image=f"/{UNIQUE}/camera/image_raw")


@pytest.mark.launch(fixture=default_launch)
def test_answers_about_a_frame_on_the_remapped_camera_topic(default_launch, sourced, rclpy_context):
    _, launched = default_launch
    node = f"/{UNIQUE}/mobilevlm"
    graph = Graph(rclpy_context, "launch_test_client")
    try:
        pub = graph.node.create_publisher(Image, f"/{UNIQUE}/camera/image_raw", 10)
        ask = graph.node.create_client(Ask, f"{node}/ask", qos_profile=ASK_SERVICE_QOS)
        assert ask.wait_for_service(timeout_sec=120), f"{node}/ask never appeared:\n{launched.output()}"
        assert wait_for(lambda: pub.get_subscription_count() > 0, 30), "nobody subscribes the remapped topic"
        assert_runs_the_install(launched, sourced)
        frame = Image(height=48, width=64, encoding="rgb8", step=64 * 3)
        frame.data = np.full((48, 64, 3), 128, np.uint8).tobytes()
        frame.header.frame_id = "launch_cam"
        request = Ask.Request(question=QUESTION, max_new_tokens=TOKENS, temperature=0.0)
        deadline = time.monotonic() + 60
        while True:      # best-effort frames: publish until one has arrived and been encoded
            frame.header.stamp = graph.node.get_clock().now().to_msg()
            pub.publish(frame)
            res = wait_future(ask.call_async(request), 60)
            if res.success or "no frame" not in res.error or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert res.success, res.error
        assert res.header.frame_id == "launch_cam" and res.completion_tokens == TOKENS, res
        assert wait_for(lambda: ACTIVE_LOG in launched.output(), 10), launched.output()   # log_level info
        assert not launched.exited.is_set(), launched.output()
    finally:
        graph.close()


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    """A robot's own parameters file: a model that does not exist (the model_path launch argument
    must win) and distinctive values to read back."""
    path = tmp_path_factory.mktemp("params") / "robot.yaml"
    path.write_text("/**:\n  ros__parameters:\n    model_path: /nonexistent/from-the-params-file\n"
                    "    cameras: [left, right]\n    max_question_chars: 1234\n"
                    "    caption_prompt: \"launch test 7f3a\"\n")
    return path


@launch_pytest.fixture
def arguments_launch(sourced, artifacts, params_file):
    return launch_installed(sourced, namespace=f"{UNIQUE}_robot", node_name="vlm", params_file=params_file,
                            model_path=artifacts, camera="right", image=f"/{UNIQUE}/right/image_raw",
                            log_level="warn")


@pytest.mark.launch(fixture=arguments_launch)
def test_namespace_name_params_file_and_model_path_take_effect(arguments_launch, sourced, artifacts,
                                                               rclpy_context):
    _, launched = arguments_launch
    node = f"/{UNIQUE}_robot/vlm"            # namespace and node_name
    graph = Graph(rclpy_context, "launch_test_params")
    try:
        values = graph.parameters(node, ["model_path", "cameras", "max_question_chars", "caption_prompt"])
        assert values["model_path"].string_value == str(artifacts)       # the argument over the file
        assert list(values["cameras"].string_array_value) == ["left", "right"]
        assert values["max_question_chars"].integer_value == 1234
        assert values["caption_prompt"].string_value == "launch test 7f3a"
        ask = graph.node.create_client(Ask, f"{node}/ask", qos_profile=ASK_SERVICE_QOS)
        assert ask.wait_for_service(timeout_sec=120), f"{node}/ask never appeared:\n{launched.output()}"
        # the camera argument picks which camera the image remap applies to
        def topics():
            return dict(graph.node.get_topic_names_and_types())
        assert wait_for(lambda: f"/{UNIQUE}/right/image_raw" in topics() and f"{node}/left/image" in topics(), 30), \
            topics()
        assert f"{node}/right/image" not in topics()
        assert_runs_the_install(launched, sourced)
        assert ACTIVE_LOG not in launched.output(), launched.output()                    # log_level warn
    finally:
        graph.close()


@launch_pytest.fixture
def missing_model_launch(sourced):
    return launch_installed(sourced, namespace=f"{UNIQUE}_missing", model_path="/nonexistent/MobileVLM_V2-1.7B")


@pytest.mark.launch(fixture=missing_model_launch)
def test_a_missing_model_ends_the_launched_process_with_the_reason(missing_model_launch):
    _, launched = missing_model_launch
    assert launched.exited.wait(120), f"the node did not exit:\n{launched.output()}"
    assert launched.returncode == 1, (launched.returncode, launched.output())
    assert "configure failed" in launched.output() and "/nonexistent/MobileVLM_V2-1.7B" in launched.output()

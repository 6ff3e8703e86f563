"""The generated interface types: their fields, defaults, serialization and use over DDS."""

import re
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import REPO
from helpers.skips import skip_reason_if_missing


pytestmark = pytest.mark.ros

_reason = skip_reason_if_missing("rclpy") or skip_reason_if_missing("mobilevlm_ros.srv")
if _reason:  # the marker skips each test; this keeps the module-level imports below from failing
    pytest.skip(_reason, allow_module_level=True)

from builtin_interfaces.msg import Time  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from mobilevlm_ros.action import Ask as AskAction  # noqa: E402
from mobilevlm_ros.msg import Answer  # noqa: E402
from mobilevlm_ros.srv import Ask  # noqa: E402

QUESTION_FIELDS = {
    "question": "string",
    "camera": "string",
    "stamp": "builtin_interfaces/Time",
    "max_new_tokens": "int32",
    "temperature": "float",
    "top_p": "float",
    "seed": "int64",
    "max_frame_age_ms": "double",
}
RESULT_FIELDS = {
    "status": "mobilevlm_ros/Status",
    "success": "boolean",
    "answer": "string",
    "error": "string",
    "header": "std_msgs/Header",
    "camera": "string",
    "prompt_tokens": "int32",
    "completion_tokens": "int32",
    "finish_reason": "string",
    "vision_ms": "double",
    "prefill_ms": "double",
    "decode_ms": "double",
    "first_token_ms": "double",
    "total_ms": "double",
    "frame_age_ms": "double",
}
ACTION_RESULT_FIELDS = {**RESULT_FIELDS, "tokens_after_cancel": "int32"}     # a service call has no cancel
FEEDBACK_FIELDS = {"text": "string", "tokens": "int32"}
ANSWER_FIELDS = {
    "status": "mobilevlm_ros/Status",
    "header": "std_msgs/Header",
    "camera": "string",
    "question": "string",
    "answer": "string",
    "model_id": "string",
    "prompt_tokens": "int32",
    "completion_tokens": "int32",
    "finish_reason": "string",
    "vision_ms": "double",
    "prefill_ms": "double",
    "decode_ms": "double",
    "first_token_ms": "double",
    "total_ms": "double",
    "answered_at": "builtin_interfaces/Time",
}


def _question(cls):
    return cls(question="What colour is the cube? «ünïcode»", camera="front",
               stamp=Time(sec=1700000000, nanosec=123456789), max_new_tokens=64,
               temperature=0.25, top_p=0.875, seed=1234567890123)  # exact in float32


def _result(cls):
    from mobilevlm_ros.msg import Status
    return cls(status=Status(code=Status.OK), success=True, answer="A red cube.", error="",
               header=Header(stamp=Time(sec=12, nanosec=34), frame_id="camera_optical"),
               camera="front", prompt_tokens=190, completion_tokens=5, finish_reason="stop",
               vision_ms=1.5, prefill_ms=2.5, decode_ms=3.5, first_token_ms=2.75, total_ms=8.25,
               frame_age_ms=40.0)


def _answer():
    return Answer(header=Header(stamp=Time(sec=5, nanosec=6), frame_id="cam"), camera="front",
                  question="What is this?", answer="A robot.", model_id="tiny-v2",
                  prompt_tokens=150, completion_tokens=3, finish_reason="length",
                  vision_ms=10.0, prefill_ms=20.0, decode_ms=30.0, total_ms=61.0,
                  answered_at=Time(sec=7, nanosec=8))


# ------------------------------------------------------------------------------------------ types

@pytest.mark.parametrize("cls, fields", [
    (Ask.Request, QUESTION_FIELDS),
    (Ask.Response, RESULT_FIELDS),
    (AskAction.Goal, QUESTION_FIELDS),
    (AskAction.Result, ACTION_RESULT_FIELDS),
    (AskAction.Feedback, FEEDBACK_FIELDS),
    (Answer, ANSWER_FIELDS),
], ids=lambda v: getattr(v, "__qualname__", "fields"))
def test_fields_are_the_agreed_ones(cls, fields):
    assert cls.get_fields_and_field_types() == fields


def test_type_names():
    assert Ask.__module__ == "mobilevlm_ros.srv._ask"
    assert AskAction.__module__ == "mobilevlm_ros.action._ask"
    assert Answer.__module__ == "mobilevlm_ros.msg._answer"


@pytest.mark.parametrize("cls", [Ask.Request, AskAction.Goal], ids=["srv", "action"])
def test_an_empty_question_means_node_defaults(cls):
    q = cls()
    assert (q.question, q.camera) == ("", "")
    assert (q.stamp.sec, q.stamp.nanosec) == (0, 0)  # latest frame
    assert q.max_new_tokens == 0
    assert q.temperature < 0 and q.top_p < 0 and q.seed == -1


def test_every_field_is_documented():
    """Each field line of the definition files has a comment right above it."""
    for rel in ("msg/Answer.msg", "msg/Status.msg", "srv/Ask.srv", "action/Ask.action"):
        lines = (REPO / rel).read_text().splitlines()
        fields = 0
        for i, line in enumerate(lines):
            if re.match(r"^[A-Za-z_][\w/]*(\[\d*\])?\s+\w+", line):
                fields += 1
                assert lines[i - 1].startswith("#"), f"{rel}:{i + 1} undocumented field: {line}"
        assert fields >= (1 if rel == "msg/Status.msg" else 6), rel


def test_status_constants_are_the_engines():
    """Clients branch on status.code: the definition file's constants are the engine's Status."""
    from mobilevlm_ros.engine.requests import Status as EngineStatus
    from mobilevlm_ros.msg import Status
    constants = {name: getattr(Status, name) for name in EngineStatus.__members__}
    assert constants == {s.name: int(s) for s in EngineStatus}
    text = (REPO / "msg" / "Status.msg").read_text()
    assert set(re.findall(r"^uint8 ([A-Z_]+)=", text, re.M)) == set(EngineStatus.__members__)


def test_python_package_merges_code_and_generated_types():
    import mobilevlm_ros

    version = re.search(r"<version>([^<]+)</version>", (REPO / "package.xml").read_text()).group(1)
    assert mobilevlm_ros.__version__ == version
    # our own sub-packages and the rosidl-generated ones are found through one package
    import mobilevlm_ros.msg
    assert Path(mobilevlm_ros.msg.__file__).parent.parent in {Path(p) for p in mobilevlm_ros.__path__}


# -------------------------------------------------------------------------------- serialization

@pytest.mark.parametrize("make", [
    lambda: _question(Ask.Request),
    lambda: _result(Ask.Response),
    lambda: _question(AskAction.Goal),
    lambda: _result(AskAction.Result),
    lambda: AskAction.Feedback(text="A red", tokens=2),
    _answer,
], ids=["srv-request", "srv-response", "goal", "result", "feedback", "answer"])
def test_round_trip_serialization(make):
    msg = make()
    assert msg != type(msg)()  # the values are not the defaults
    data = serialize_message(msg)
    assert isinstance(data, bytes) and len(data) > 16
    back = deserialize_message(data, type(msg))
    assert back == msg
    assert back is not msg


def test_float32_fields_are_float32():
    data = serialize_message(Ask.Request(temperature=0.1))
    assert deserialize_message(data, Ask.Request).temperature == pytest.approx(0.1, abs=1e-7)


# ------------------------------------------------------------------------------------- over DDS

def _unique(name):
    return f"/test_{uuid.uuid4().hex[:10]}/{name}"


@pytest.fixture
def nodes(rclpy_context):
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node

    created = []

    def make(name):
        node = Node(f"{name}_{uuid.uuid4().hex[:6]}", context=rclpy_context)
        created.append(node)
        return node

    executor = MultiThreadedExecutor(num_threads=4, context=rclpy_context)
    yield make, executor
    executor.shutdown(timeout_sec=5)
    for node in created:
        node.destroy_node()


def _spin_until(executor, future, timeout=20.0):
    executor.spin_until_future_complete(future, timeout_sec=timeout)
    assert future.done(), f"no answer within {timeout} s"
    return future.result()


def test_service_answers_over_dds(nodes):
    make, executor = nodes
    server, client_node = make("ask_server"), make("ask_client")
    name = _unique("ask")
    seen = []

    def handle(request, response):
        seen.append(request)
        response.success = True
        response.answer = f"echo: {request.question}"
        response.camera = request.camera or "default"
        response.header.stamp = request.stamp
        response.completion_tokens = request.max_new_tokens
        response.finish_reason = "stop"
        response.total_ms = 1.25
        return response

    server.create_service(Ask, name, handle)
    client = client_node.create_client(Ask, name)
    executor.add_node(server)
    executor.add_node(client_node)
    assert client.wait_for_service(timeout_sec=20), "service not discovered"

    request = _question(Ask.Request)
    response = _spin_until(executor, client.call_async(request))
    assert seen == [request]
    assert response.success and response.answer == f"echo: {request.question}"
    assert response.camera == "front" and response.header.stamp == request.stamp
    assert (response.completion_tokens, response.finish_reason, response.total_ms) == (64, "stop", 1.25)


@pytest.fixture
def ask_action(nodes):
    """An action server of type Ask that streams one word per feedback, and a client for it.

    A goal whose question is "forever" streams until it is cancelled.
    """
    from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
    from rclpy.callback_groups import ReentrantCallbackGroup

    make, executor = nodes
    server, client_node = make("ask_action_server"), make("ask_action_client")
    name = _unique("ask")

    def execute(goal_handle):
        words = "a red cube on a table".split()
        text, tokens = "", 0
        while True:
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
                return AskAction.Result(success=False, answer=text, error="cancelled",
                                        completion_tokens=tokens, finish_reason="cancelled")
            if goal_handle.request.question != "forever" and tokens == len(words):
                break
            text = (text + " " + words[tokens % len(words)]).strip()
            tokens += 1
            goal_handle.publish_feedback(AskAction.Feedback(text=text, tokens=tokens))
            time.sleep(0.02)
        goal_handle.succeed()
        return AskAction.Result(success=True, answer=text, camera=goal_handle.request.camera,
                                completion_tokens=tokens, finish_reason="stop")

    group = ReentrantCallbackGroup()
    action_server = ActionServer(server, AskAction, name, execute_callback=execute,
                                 goal_callback=lambda goal: GoalResponse.ACCEPT,
                                 cancel_callback=lambda handle: CancelResponse.ACCEPT,
                                 callback_group=group)
    client = ActionClient(client_node, AskAction, name, callback_group=group)
    executor.add_node(server)
    executor.add_node(client_node)
    assert client.wait_for_server(timeout_sec=20), "action server not discovered"
    yield client, executor
    client.destroy()
    action_server.destroy()


def test_action_feedback_and_result(ask_action):
    from action_msgs.msg import GoalStatus

    client, executor = ask_action
    feedback = []
    goal = _question(AskAction.Goal)
    handle = _spin_until(executor, client.send_goal_async(
        goal, feedback_callback=lambda fb: feedback.append(fb.feedback)))
    assert handle.accepted
    outcome = _spin_until(executor, handle.get_result_async())

    assert outcome.status == GoalStatus.STATUS_SUCCEEDED
    result = outcome.result
    assert result.success and result.finish_reason == "stop"
    assert result.answer == "a red cube on a table" and result.completion_tokens == 6
    assert result.camera == "front"
    assert feedback, "no feedback arrived"
    # feedback grows monotonically and ends with the full answer (delivery is not guaranteed for
    # every message, but order is)
    counts = [fb.tokens for fb in feedback]
    assert counts == sorted(counts) and counts[-1] <= 6
    assert all(result.answer.startswith(fb.text) for fb in feedback)


def test_action_cancel(ask_action):
    from action_msgs.msg import GoalStatus

    client, executor = ask_action
    feedback = []
    got_feedback = threading.Event()

    def on_feedback(msg):
        feedback.append(msg.feedback)
        got_feedback.set()

    handle = _spin_until(executor, client.send_goal_async(
        AskAction.Goal(question="forever"), feedback_callback=on_feedback))
    assert handle.accepted
    result_future = handle.get_result_async()
    deadline = time.monotonic() + 20
    while not got_feedback.is_set() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.1)
    assert got_feedback.is_set(), "no feedback before cancelling"

    cancel = _spin_until(executor, handle.cancel_goal_async())
    assert len(cancel.goals_canceling) == 1
    outcome = _spin_until(executor, result_future)
    assert outcome.status == GoalStatus.STATUS_CANCELED
    assert not outcome.result.success
    assert outcome.result.finish_reason == "cancelled"
    assert outcome.result.completion_tokens >= 1

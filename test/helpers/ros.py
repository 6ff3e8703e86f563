"""What the ROS-level tests share: the test's side of the graph (publishers, service/action clients,
diagnostics listener) and matching a service client with its server. Import after checking that
rclpy and the generated interfaces import (the test modules skip first)."""
import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from sensor_msgs.msg import CompressedImage, Image

from mobilevlm_ros.action import Ask as AskAction
from mobilevlm_ros.msg import Answer
from mobilevlm_ros.ros.qos import ASK_SERVICE_QOS
from mobilevlm_ros.srv import Ask as AskService
from helpers.waiting import wait_for, wait_future

NODE = "/mobilevlm"
QUESTION = "What is in the picture?"
TOKENS = 12


# requests that change nothing, one per service type a test calls: answered, they show that both
# directions of the service have matched (see match_service)
NO_OP_REQUESTS = {
    GetState: GetState.Request,
    ChangeState: lambda: ChangeState.Request(transition=Transition(label="no_such_transition")),
    SetParameters: lambda: SetParameters.Request(parameters=[]),
}


def match_service(client, timeout=60.0, attempt_s=2.0):
    """Wait until `client` gets replies from its server. wait_for_service only says that the server
    reads our requests; Fast DDS drops a reply whose reader the server has not matched within 100 ms
    (rmw_fastrtps#390, #467: "client will not receive response"), which on a loaded CI machine lost
    the first get_state of a test. So send a request that changes nothing until one is answered."""
    deadline = time.monotonic() + timeout
    assert client.wait_for_service(timeout_sec=timeout), f"no server for {client.srv_name}"
    make = NO_OP_REQUESTS[client.srv_type]
    while True:
        done = threading.Event()
        future = client.call_async(make())
        future.add_done_callback(lambda _f: done.set())
        if done.wait(min(attempt_s, max(0.0, deadline - time.monotonic()))):
            return future.result()
        client.remove_pending_request(future)
        assert time.monotonic() < deadline, f"{client.srv_name}: no reply to any request within {timeout} s"


class Client:
    """This test's side of the graph: publishers, the service/action clients and listeners."""

    def __init__(self, context, ns=NODE, name="mobilevlm_test_client"):
        self.ns = ns
        self.node = rclpy.create_node(name, context=context)
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.executor.add_node(self.node)
        self.ask_client = self.node.create_client(AskService, f"{self.ns}/ask", qos_profile=ASK_SERVICE_QOS)
        self.action = ActionClient(self.node, AskAction, f"{self.ns}/ask_stream")
        self.set_params = self.node.create_client(SetParameters, f"{self.ns}/set_parameters")
        self.change_state = self.node.create_client(ChangeState, f"{self.ns}/change_state")
        self.get_state = self.node.create_client(GetState, f"{self.ns}/get_state")
        self.pubs = {}
        self.matched = set()
        self.diag, self.diag_count = {}, 0
        self.answers, self.captions = [], []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.node.create_subscription(Answer, f"{self.ns}/answers", self.answers.append, 10)
        self.node.create_subscription(Answer, f"{self.ns}/captions", self.captions.append, 10)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()

    def _on_diag(self, msg):
        ours = [st for st in msg.status if st.name.startswith(self.ns.strip("/") + ":")]
        for st in ours:
            self.diag[st.name.split(": ", 1)[1]] = {"level": st.level, "message": st.message,
                                                    **{kv.key: kv.value for kv in st.values}}
        self.diag_count += bool(ours)       # messages from this node (other nodes publish there too)

    def wait_diagnostics(self, n, timeout=10.0):
        """Wait for n more /diagnostics messages from the node (one every diagnostics_period_s):
        then self.diag holds what it counted before the call, and its timers have run n times."""
        target = self.diag_count + n
        assert wait_for(lambda: self.diag_count >= target, timeout), \
            f"{n - (target - self.diag_count)} of {n} diagnostics messages within {timeout} s"

    def camera(self, cam):
        return self.diag.get(f"camera {cam}", {})

    def counter(self, cam, key):
        return int(self.camera(cam).get(key, 0))

    def now(self):
        return self.node.get_clock().now()

    def _matched(self, client):
        if client.srv_name not in self.matched:
            match_service(client, timeout=20)
            self.matched.add(client.srv_name)

    def publisher(self, cam, compressed=False):
        key = (cam, compressed)
        if key not in self.pubs:
            topic = f"{self.ns}/{cam}/image" + ("/compressed" if compressed else "")
            pub = self.node.create_publisher(CompressedImage if compressed else Image, topic, 10)
            assert wait_for(lambda: pub.get_subscription_count() > 0, 15), f"nobody subscribes {topic}"
            self._check_link(cam, pub, CompressedImage if compressed else Image)
            self.pubs[key] = pub
        return self.pubs[key]

    def _check_link(self, cam, pub, msg_type):
        """Discovery is asymmetric: the publisher can see the node's subscription before the node's
        reader has matched this writer, and a best-effort sample sent then is lost (seen in CI as a
        first frame that never arrived). Send empty frames, which the node rejects without touching
        its latest frame, until one is counted: then both sides have matched."""
        before = self.counter(cam, "frames_rejected")
        for _ in range(60):
            msg = msg_type()
            msg.header.stamp = self.now().to_msg()
            msg.header.frame_id = "link_check"
            pub.publish(msg)
            if wait_for(lambda: self.counter(cam, "frames_rejected") > before, 0.5):
                return
        raise AssertionError(f"the node never received a frame on {pub.topic_name}: {self.camera(cam)}")

    def publish(self, cam, pixels=None, encoding="rgb8", stamp=None, frame_id="test_cam", **override):
        msg = Image()
        msg.header.stamp = (stamp or self.now()).to_msg()
        msg.header.frame_id = frame_id
        if pixels is not None:
            msg.height, msg.width = pixels.shape[:2]
            msg.step = pixels.shape[1] * (pixels.shape[2] if pixels.ndim == 3 else 1) * pixels.itemsize
            msg.data = pixels.tobytes()
        msg.encoding = encoding
        for k, v in override.items():
            setattr(msg, k, v)
        self.publisher(cam).publish(msg)
        return msg.header

    def publish_compressed(self, cam, data, fmt, frame_id="test_cam"):
        msg = CompressedImage()
        msg.header.stamp = self.now().to_msg()
        msg.header.frame_id = frame_id
        msg.format, msg.data = fmt, data
        self.publisher(cam, compressed=True).publish(msg)
        return msg.header

    def publish_and_wait_encoded(self, cam, pixels, retry=False, **kw):
        """Publish one frame and wait until the node has encoded it. retry: publish again every
        second (for a subscription that was just re-created and may not have matched yet)."""
        before = self.counter(cam, "frames_encoded")
        for _ in range(20 if retry else 1):
            header = self.publish(cam, pixels, **kw)
            if wait_for(lambda: self.counter(cam, "frames_encoded") > before, 1 if retry else 20):
                return header
        raise AssertionError(f"frame not encoded: {self.camera(cam)}")

    @staticmethod
    def _request(msg, question, fields):
        """An Ask request or goal: the question, greedy TOKENS tokens unless `fields` say otherwise."""
        msg.question = question
        msg.max_new_tokens, msg.temperature = TOKENS, 0.0
        for k, v in fields.items():
            setattr(msg, k, v)
        return msg

    def ask(self, question=QUESTION, timeout=60, **fields):
        req = self._request(AskService.Request(), question, fields)
        assert self.ask_client.wait_for_service(timeout_sec=20)
        return wait_future(self.ask_client.call_async(req), timeout)

    def goal(self, question=QUESTION, feedback=None, **fields):
        goal = self._request(AskAction.Goal(), question, fields)
        assert self.action.wait_for_server(timeout_sec=20)
        handle = wait_future(self.action.send_goal_async(goal, feedback_callback=feedback), 20)
        assert handle.accepted
        return handle

    def set_param(self, name, value):
        p = Parameter(name=name, value=ParameterValue())
        if isinstance(value, bool):
            p.value.type, p.value.bool_value = ParameterType.PARAMETER_BOOL, value
        elif isinstance(value, int):
            p.value.type, p.value.integer_value = ParameterType.PARAMETER_INTEGER, value
        elif isinstance(value, float):
            p.value.type, p.value.double_value = ParameterType.PARAMETER_DOUBLE, value
        else:
            p.value.type, p.value.string_value = ParameterType.PARAMETER_STRING, value
        req = SetParameters.Request(parameters=[p])
        self._matched(self.set_params)
        return wait_future(self.set_params.call_async(req), 20).results[0]

    def transition(self, transition_id):
        self._matched(self.change_state)
        req = ChangeState.Request()
        req.transition.id = transition_id
        return wait_future(self.change_state.call_async(req), 60).success

    def state(self):
        self._matched(self.get_state)
        return wait_future(self.get_state.call_async(GetState.Request()), 10).current_state.label


def stamp_of(header):
    return (header.stamp.sec, header.stamp.nanosec)

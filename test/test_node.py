"""The node, the ROS adapter over the engine, over real DDS: started as its own process exactly as a
user runs it (`python -m mobilevlm_ros.ros.node --ros-args --params-file config/mobilevlm.yaml -p ...`),
driven from this process with rclpy: frames on topics, questions through the service and the action,
parameters and lifecycle through the standard services. The engine's behaviour (validation, queue,
frame policy, prefill, cancellation) is tested in-process in test_engine.py; these tests check what
the adapter adds. One node serves the tests that leave it as they found it; each of them starts
from a known state (active, nothing queued, nothing in progress: the `client` fixture checks);
tests that stop or reconfigure a node start their own. conftest.py gives the session its own
ROS_DOMAIN_ID and localhost-only discovery.
"""
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO
from helpers.skips import skip_reason_if_missing

PARAMS = REPO / "config" / "mobilevlm.yaml"
NODE = "/mobilevlm"
MAX_QUESTION_CHARS = 200

pytestmark = pytest.mark.ros
_reason = skip_reason_if_missing("rclpy") or skip_reason_if_missing("mobilevlm_ros.srv")
if _reason:
    pytest.skip(_reason, allow_module_level=True)

import rclpy  # noqa: E402
from action_msgs.msg import GoalStatus  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402

from mobilevlm_ros.tools.traffic import NodeUnderTest  # noqa: E402

from mobilevlm_ros.msg import Status  # noqa: E402
from mobilevlm_ros.srv import Ask as AskService  # noqa: E402

from helpers.frames import synthetic_frame  # noqa: E402
from helpers.ros import QUESTION, TOKENS, Client, match_service, stamp_of  # noqa: E402
from helpers.waiting import wait_for, wait_future  # noqa: E402


def start(model, name, cameras=("front",), **params):
    """The node as a user starts it, with the repository's parameters file and these overrides."""
    return NodeUnderTest(model, cameras, name=name, params_file=PARAMS,
                         params={"diagnostics_period_s": "0.2", "threads": "1", **params})


def test_params_file_matches_the_parameter_table():
    """config/mobilevlm.yaml sets every parameter of node.PARAMS, with the table's type and default."""
    import yaml

    from mobilevlm_ros.ros import node as node_module
    values = yaml.safe_load(PARAMS.read_text())["/**"]["ros__parameters"]
    table = {p.name: p for p in node_module.PARAMS}
    assert set(values) == set(table)
    for name, value in values.items():
        default = table[name].default
        assert type(value) is type(default), (name, value, default)
        assert table[name].check(value) is None, name
        assert value == default, f"{name}: the file says {value!r}, the table {default!r}"


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def frame_png(tmp_path_factory):
    from PIL import Image as PILImage
    path = tmp_path_factory.mktemp("frames") / "frame.png"
    PILImage.fromarray(synthetic_frame()).save(path)
    return path


@pytest.fixture(scope="module")
def reference(frame_png, tiny_v2):
    """What `mobilevlm-ask-image --json` answers for the frame (run while the node starts)."""
    cmd = [sys.executable, "-m", "mobilevlm_ros.tools.ask", "--model", str(tiny_v2), "--image", str(frame_png),
           "--question", QUESTION, "--max-new-tokens", str(TOKENS), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)

    def result():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        return json.loads(out)
    return result


@pytest.fixture(scope="module")
def node(reference, tiny_v2):
    proc = start(tiny_v2, NODE.strip("/"), ("front", "rear", "left"), max_queue="2", vision_rate_hz="0.0",
                 max_frame_age_s="20.0", max_question_chars=str(MAX_QUESTION_CHARS))
    yield proc
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait()


@pytest.fixture(scope="module")
def shared_client(node, rclpy_context):
    c = Client(rclpy_context)
    ok = c.ask_client.wait_for_service(timeout_sec=120)
    assert ok, f"{NODE}/ask never appeared; node log:\n{node.log()}"
    assert wait_for(lambda: c.camera("front"), 10), "no diagnostics from the node"
    for cam, compressed in (("front", False), ("front", True), ("rear", False)):
        c.publisher(cam, compressed)        # matched both ways before any test counts frames
    yield c
    c.close()


def idle(c):
    req = c.diag.get("requests", {})
    return c.diag.get("model", {}).get("state") == "active" and req.get("queue_depth") == "0" \
        and req.get("in_progress") == "0"


@pytest.fixture
def client(shared_client, node):
    """The shared node in a known state: active, nothing waiting or in progress (a test that left
    it otherwise fails here, naming the state, instead of breaking the next test)."""
    assert node.proc.poll() is None, node.log()
    assert wait_for(lambda: idle(shared_client), 30), shared_client.diag
    yield shared_client
    assert wait_for(lambda: idle(shared_client), 30), f"the test left the node busy: {shared_client.diag}"


# ----------------------------------------------------------------------------------------- tests
def test_diagnostics_report_model_cameras_and_requests(client):
    assert wait_for(lambda: client.camera("left"), 10)
    model = client.diag["model"]
    assert model["state"] == "active" and model["model_id"] == "tiny-v2"
    assert model["vision_backend"] == "torch" and model["decoder"] == "torch"
    left = client.camera("left")
    assert left["frames_received"] == "0" and left["message"] == "no frame received yet"
    assert "/mobilevlm/left/image" in left["topics"] and "/mobilevlm/left/image/compressed" in left["topics"]
    req = client.diag["requests"]
    assert req["queue_depth"] == "0" and req["max_queue"] == "2"


def test_service_answer_matches_mobilevlm_ask_and_carries_the_frame_stamp(client, reference):
    header = client.publish_and_wait_encoded("front", synthetic_frame(), frame_id="camera_optical")
    n_answers = len(client.answers)
    res = client.ask()
    ref = reference()
    assert res.success, res.error
    assert res.answer == ref["answer"]
    assert res.completion_tokens == len(ref["answer_ids"]) == ref["completion_tokens"]
    assert res.prompt_tokens == ref["prompt_tokens"]
    assert res.finish_reason == ref["finish_reason"]
    assert stamp_of(res.header) == stamp_of(header) and res.header.frame_id == "camera_optical"
    assert res.camera == "front"
    assert res.vision_ms == 0.0                     # the vision worker had encoded it: from the cache
    assert res.decode_ms > 0 and res.total_ms >= res.decode_ms and res.frame_age_ms >= 0
    assert wait_for(lambda: len(client.answers) > n_answers, 5)
    ans = client.answers[-1]
    assert ans.answer == res.answer and ans.question == QUESTION and ans.model_id == "tiny-v2"
    assert stamp_of(ans.header) == stamp_of(header)


def test_action_streams_the_same_answer_token_by_token(client):
    header = client.publish_and_wait_encoded("front", synthetic_frame())
    feedback = []
    handle = client.goal(feedback=lambda fb: feedback.append((fb.feedback.tokens, fb.feedback.text)))
    wrapped = wait_future(handle.get_result_async(), 60)
    res = wrapped.result
    assert wrapped.status == GoalStatus.STATUS_SUCCEEDED and res.success, res.error
    assert stamp_of(res.header) == stamp_of(header)
    assert res.answer == client.ask().answer
    # feedback and result travel on different DDS topics: the last feedback can arrive after the
    # result, and rclpy's action client drops feedback of a goal whose result it has (seen here once
    # in ~20 runs); every earlier token arrives, in order, each with the answer so far
    wait_for(lambda: len(feedback) >= res.completion_tokens, 5)
    n = len(feedback)
    assert n >= res.completion_tokens - 1 and n > 1
    assert [k for k, _ in feedback] == list(range(1, n + 1))
    assert all(res.answer.startswith(text) for _, text in feedback)
    if n == res.completion_tokens:
        assert feedback[-1][1] == res.answer


def test_idle_node_prefills_the_newest_frame(client):
    """With no request waiting, the newest fresh frame's image tokens go into the decoder (counted in
    /diagnostics), so its first question pays only for its text; prefill_frames false turns that off."""
    def prefilled():
        return int(client.diag.get("requests", {}).get("frames_prefilled", 0))
    before = prefilled()
    client.publish_and_wait_encoded("front", synthetic_frame(seed=11))
    assert wait_for(lambda: prefilled() > before, 10), client.diag.get("requests")
    assert client.set_param("prefill_frames", False).successful
    try:
        n = prefilled()
        client.publish_and_wait_encoded("front", synthetic_frame(seed=12))
        client.wait_diagnostics(5)      # the idle worker has had five diagnostics periods to prefill
        assert prefilled() == n
        assert client.ask().success
    finally:
        assert client.set_param("prefill_frames", True).successful


def test_cancel_stops_generation_between_tokens(client):
    client.publish_and_wait_encoded("front", synthetic_frame())
    feedback = []
    handle = client.goal(max_new_tokens=400, feedback=lambda fb: feedback.append(fb.feedback.tokens))
    assert wait_for(lambda: len(feedback) >= 2, 60)
    t0 = time.monotonic()
    wait_future(handle.cancel_goal_async(), 10)
    wrapped = wait_future(handle.get_result_async(), 30)
    assert time.monotonic() - t0 < 10
    assert wrapped.status == GoalStatus.STATUS_CANCELED
    res = wrapped.result
    assert not res.success and res.finish_reason == "cancelled" and "cancelled" in res.error
    assert 2 <= res.completion_tokens < 400


def test_burst_of_frames_during_long_answers(client, node):
    """Image callbacks keep taking frames while the decoder generates, and memory stays flat.
    The generation worker is kept busy for the whole burst: a new long goal as soon as one ends.
    (320x240 rgb8 frames: larger raw frames over best-effort DDS can be lost to UDP fragmentation
    whatever the node does, see config/mobilevlm.yaml.)"""
    client.publish_and_wait_encoded("front", synthetic_frame())
    frame = synthetic_frame(240, 320)

    def burst():
        start = client.counter("front", "frames_received")
        for _ in range(60):
            client.publish("front", frame)
            time.sleep(1 / 30)
        time.sleep(0.6)
        return client.counter("front", "frames_received") - start

    # Best-effort UDP loses frames on a loaded machine whatever the node does, so the same burst
    # sent to the idle node is the yardstick, measured in the same attempt; a shared CI machine can
    # stall for a second or two, so the best of three attempts is judged.
    def attempt():
        received_idle = burst()
        rss_before = node.rss_mb()
        stop, answers, generating = threading.Event(), [], threading.Event()

        def keep_busy():
            while not stop.is_set():
                handle = client.goal(max_new_tokens=1800, feedback=lambda fb: generating.set())
                result = handle.get_result_async()
                while not result.done() and not stop.is_set():
                    time.sleep(0.01)
                if not result.done():
                    handle.cancel_goal_async()
                answers.append(wait_future(result, 60).result)

        busy = threading.Thread(target=keep_busy, daemon=True)
        busy.start()
        try:
            assert generating.wait(60)
            diag0 = client.diag_count
            received = burst()
            diags = client.diag_count - diag0
        finally:
            stop.set()
            busy.join(60)
        return received_idle, received, answers, diags, rss_before

    for n in range(3):
        received_idle, received, answers, diags, rss_before = attempt()
        good = (received_idle + received >= 20 and received >= 0.3 * received_idle
                and sum(a.completion_tokens for a in answers) > 50)
        if good:
            break
        print(f"burst attempt {n + 1}: {received_idle} frames idle, {received} while generating, "
              f"{sum(a.completion_tokens for a in answers)} tokens: machine stalled? trying again")
    assert answers and all(a.success or a.finish_reason == "cancelled" for a in answers), answers
    assert sum(a.completion_tokens for a in answers) > 50
    # DDS itself works: a third of the frames of both bursts arrive. (The "idle" node is not idle:
    # it encodes and prefills each new frame, which in the full suite on a 2-core VM left its
    # callbacks 6-17 of 60 frames, fewer than while generating, when encoding waits.)
    assert received_idle + received >= 20, f"only {received_idle} + {received} of 2 x 60 frames arrived"
    # The tiny model decodes ~1000 tokens/s, so the per-token Python work (feedback, text) keeps both
    # cores and the GIL busy, and with depth 1 a frame not taken before the next one is replaced
    # (measured 24-40 of 60 vs 50-60 idle). A callback blocked by generation would see a frame or two.
    assert received >= 0.3 * received_idle, (f"{received} of 60 frames reached the image callback while "
                                              f"generating, {received_idle} while idle")
    assert diags >= 5, f"{diags} diagnostics messages in 2.6 s of generation"
    assert node.rss_mb() - rss_before < 100, f"RSS grew from {rss_before:.0f} to {node.rss_mb():.0f} MB"
    cam = client.camera("front")
    assert int(cam["frames_dropped"]) + int(cam["frames_encoded"]) <= int(cam["frames_received"])


def test_bad_frames_are_rejected_and_the_node_keeps_answering(client):
    from PIL import Image as PILImage
    rejected0 = client.counter("front", "frames_rejected")
    good = synthetic_frame()
    bad = [
        (lambda: client.publish("front", np.zeros((4, 4), np.float32), encoding="32FC1"),
         "unsupported encoding '32FC1'"),
        (lambda: client.publish("front", good, encoding="8UC3"), "unsupported encoding '8UC3'"),
        (lambda: client.publish("front", good, step=10), "step 10 is smaller than a row"),
        (lambda: client.publish("front", good, data=good.tobytes()[:-100]), "truncated image"),
        (lambda: client.publish_compressed("front", b"\xff\xd8\xff\xe0" + b"\0" * 64, "jpeg"),
         "cannot decode jpeg"),                                        # decoded in the vision worker
        (lambda: client.publish_compressed("front", b"not an image", "jpeg"), "neither JPEG nor PNG"),
    ]
    for i, (publish, message) in enumerate(bad, 1):
        publish()
        assert wait_for(lambda: client.counter("front", "frames_rejected") >= rejected0 + i, 10), message
        assert message in client.camera("front")["last_reject"]
    # a good JPEG on the compressed topic is used
    buf = io.BytesIO()
    PILImage.fromarray(good).save(buf, "JPEG", quality=95)
    before = client.counter("front", "frames_encoded")
    header = client.publish_compressed("front", buf.getvalue(), "rgb8; jpeg compressed bgr8", frame_id="jpeg_cam")
    assert wait_for(lambda: client.counter("front", "frames_encoded") > before, 20)
    res = client.ask()
    assert res.success, res.error
    assert res.header.frame_id == "jpeg_cam" and stamp_of(res.header) == stamp_of(header)


def _errors_cases(client):
    now = client.now()
    from rclpy.duration import Duration
    future = (now + Duration(seconds=60)).to_msg()
    ancient = (now - Duration(seconds=3600)).to_msg()
    return [
        (dict(question=""), "question is empty"),
        (dict(question="   \n\t "), "question is empty"),
        (dict(question="x" * (MAX_QUESTION_CHARS + 1)),
         f"question is too long: {MAX_QUESTION_CHARS + 1} characters, the limit is {MAX_QUESTION_CHARS}"),
        (dict(question="what\x07is this"), "non-printable character U+0007 at position 4"),
        (dict(question="\x01\x02binary"), "non-printable character U+0001 at position 0"),
        (dict(question="look at <image> please"), "special token '<image>'"),
        (dict(max_new_tokens=-1), "max_new_tokens must be 0 (node default, 128) or in 1..2048, got -1"),
        (dict(max_new_tokens=100000), "got 100000"),
        (dict(temperature=math.nan), "temperature must be a finite number"),
        (dict(temperature=math.inf), "temperature must be a finite number"),
        (dict(temperature=11.0), "temperature must be a finite number in [0, 10], got 11.0"),
        (dict(top_p=math.nan), "top_p must be a finite number"),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(seed=2 ** 40), "seed must be in 0..2^32-1"),
        (dict(camera="back"), "unknown camera 'back' (cameras: front, rear, left)"),
        (dict(camera="left"), "no frame received yet from camera 'left' (topics: /mobilevlm/left/image, "
                              "/mobilevlm/left/image/compressed)"),
        (dict(stamp=future), "is in the future"),
        (dict(stamp=ancient), "is too old: 3600"),
        (dict(camera="rear"), "no frame newer than 20 s from camera 'rear' (latest is 10"),
    ]


def test_every_encoding_on_the_live_topic_is_answered(client):
    """A frame of each raw encoding the node converts (Bayer, YUV, 16-bit, ...), published on the
    camera topic as a driver would send it (make-bag's renderer), is encoded and answered about."""
    from mobilevlm_ros.engine.images import ENCODINGS
    from mobilevlm_ros.tools.make_bag import render_raw
    rgb = synthetic_frame(48, 64, seed=5)
    for enc in ENCODINGS:
        raw = render_raw(rgb, enc)
        header = client.publish_and_wait_encoded("front", None, encoding=raw.encoding, width=raw.width,
                                                 height=raw.height, step=raw.step, is_bigendian=raw.is_bigendian,
                                                 data=bytes(raw.data))
        # by its stamp: "the latest frame" may be the previous one while this one is being prefilled
        # (the policy prefers a fresh frame already in the decoder)
        res = client.ask(stamp=header.stamp)
        assert res.success and res.status.code == Status.OK, (enc, res.error)
        assert stamp_of(res.header) == stamp_of(header), enc


def test_bad_requests_are_answered_at_once_and_the_node_keeps_answering(client):
    from rclpy.duration import Duration
    before = client.counter("rear", "frames_encoded")
    client.publish("rear", synthetic_frame(), stamp=client.now() - Duration(seconds=100))
    assert wait_for(lambda: client.counter("rear", "frames_encoded") > before, 10)
    errors0 = int(client.diag["requests"]["errors"])
    cases = _errors_cases(client)
    for fields, message in cases:
        t0 = time.monotonic()
        res = client.ask(**fields)
        elapsed = time.monotonic() - t0
        assert not res.success, fields
        assert message in res.error, (fields, res.error)
        assert res.finish_reason == "error" and res.answer == ""
        assert elapsed < 2.0, f"{fields}: answered in {elapsed:.2f} s"
    # the action reports the same errors as an aborted goal
    handle = client.goal(question="")
    wrapped = wait_future(handle.get_result_async(), 10)
    assert wrapped.status == GoalStatus.STATUS_ABORTED and wrapped.result.error == "question is empty"
    assert wait_for(lambda: int(client.diag["requests"]["errors"]) >= errors0 + len(cases) + 1, 5)
    assert client.diag["requests"]["last_error"] == "question is empty"
    client.publish_and_wait_encoded("front", synthetic_frame())
    assert client.ask().success


def test_busy_when_the_queue_is_full_and_every_request_gets_one_answer(client):
    client.publish_and_wait_encoded("front", synthetic_frame())
    first = []
    handles = [client.goal(max_new_tokens=300, feedback=first.append)]
    assert wait_for(lambda: first, 60)                                # generating: the queue is empty
    handles += [client.goal(max_new_tokens=300) for _ in range(4)]   # 2 wait (max_queue), 2 are busy
    results = [handle.get_result_async() for handle in handles]
    busy = wait_for(lambda: [r for r in results if r.done() and r.result().result.status.code == Status.BUSY], 20)
    assert len(busy) == 2, [r.result().result.error for r in results if r.done()]
    assert "max_queue 2" in busy[0].result().result.error
    for handle in handles:
        handle.cancel_goal_async()
    finals = [wait_future(r, 60).result for r in results]
    assert sum(r.status.code == Status.BUSY for r in finals) == 2
    assert sum(r.status.code == Status.CANCELLED and r.finish_reason == "cancelled" for r in finals) == 3
    assert client.ask().success                      # and it still answers


def test_parameters_at_run_time(client):
    bad = {"temperature": math.nan, "top_p": 0.0, "max_new_tokens": 0, "vision_rate_hz": -1.0,
           "decoder": "tensorflow"}
    for name, value in bad.items():
        r = client.set_param(name, value)
        assert not r.successful, name
    r = client.set_param("model_path", "/elsewhere")
    assert not r.successful and "configured" in r.reason, r.reason
    r = client.set_param("max_queue", 8)
    assert not r.successful and "configured" in r.reason, r.reason
    r = client.set_param("autostart", False)
    assert not r.successful and "start-up" in r.reason, r.reason
    r = client.set_param("image_transport", "raw")
    assert not r.successful and "activated" in r.reason, r.reason
    assert client.set_param("max_new_tokens", 5).successful
    client.publish_and_wait_encoded("front", synthetic_frame())
    res = client.ask(max_new_tokens=0)
    assert res.success and res.completion_tokens <= 5
    # periodic captions, switched on at run time
    assert client.set_param("caption_prompt", "Describe it.").successful
    assert client.set_param("caption_period_s", 0.3).successful
    client.publish("front", synthetic_frame())
    try:
        assert wait_for(lambda: client.captions, 30), client.diag["requests"]
    finally:
        assert client.set_param("caption_period_s", 0.0).successful
        assert client.set_param("max_new_tokens", 128).successful
    cap = client.captions[-1]
    assert cap.question == "Describe it." and cap.camera == "front" and cap.completion_tokens <= 5


def test_ask_client_command(client):
    client.publish_and_wait_encoded("front", synthetic_frame(), frame_id="cli_cam")
    base = [sys.executable, "-m", "mobilevlm_ros.ros.ask_client", QUESTION, "--node", NODE,
            "--max-new-tokens", "4", "--temperature", "0", "--timeout", "60"]
    out = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["success"] and d["frame_id"] == "cli_cam" and d["completion_tokens"] == 4
    out = subprocess.run(base + ["--stream"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert "frame stamp" in out.stdout and "cli_cam" in out.stdout
    out = subprocess.run(base + ["--camera", "nope"], capture_output=True, text=True, timeout=90)
    assert out.returncode == 1 and "unknown camera 'nope'" in out.stdout


@pytest.fixture
def own_node(tiny_v2, rclpy_context):
    """A node of this test's own (it will be stopped or reconfigured), with its client."""
    ns = f"/mobilevlm_own_{os.getpid()}"
    proc = start(tiny_v2, ns.strip("/"), vision_rate_hz="0.0", max_frame_age_s="20.0")
    c = Client(rclpy_context, ns=ns, name="own_node_client")
    assert c.ask_client.wait_for_service(timeout_sec=120), proc.log()
    assert wait_for(lambda: c.camera("front"), 10), "no diagnostics from the node"
    c.publisher("front")
    yield proc, c
    c.close()
    if proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait()


def test_deactivate_and_activate(own_node):
    _, client = own_node
    client.publish_and_wait_encoded("front", synthetic_frame())
    assert client.state() == "active"
    assert client.transition(Transition.TRANSITION_DEACTIVATE)
    assert client.state() == "inactive"
    assert wait_for(lambda: not client.ask_client.service_is_ready(), 10)
    assert wait_for(lambda: client.diag["model"]["state"] == "inactive", 5)
    assert client.transition(Transition.TRANSITION_ACTIVATE)
    assert client.state() == "active"
    client.publish_and_wait_encoded("front", synthetic_frame(), retry=True)
    assert client.ask().success


def test_sigint_shuts_the_node_down_cleanly(own_node):
    node, client = own_node
    client.publish_and_wait_encoded("front", synthetic_frame())
    generating = threading.Event()
    handle = client.goal(max_new_tokens=1500, feedback=lambda fb: generating.set())
    wrapped = handle.get_result_async()
    assert generating.wait(60), "generation did not start"     # SIGINT in the middle of an answer
    node.proc.send_signal(signal.SIGINT)
    assert node.proc.wait(30) == 0, node.log()
    if wrapped.done():                     # answered before the signal, or cancelled by the shutdown
        assert wrapped.result().result.status.code in (Status.OK, Status.CANCELLED)


def test_replay_and_the_live_node_pick_the_same_frames_and_answer_alike(client, node, tiny_v2, tmp_path):
    """The node and `mobilevlm-replay` run the same engine: the bag's frames published to the node
    and asked about after each one, and the same bag replayed with questions at the same points,
    give the same frame (stamp) and the same answer for every question (the determinism contract:
    the answer does not depend on what else was cached, prefilled or asked before)."""
    import yaml
    from rclpy.time import Time

    from mobilevlm_ros.replay import cli as replay
    from mobilevlm_ros.replay.bagio import BagReader
    from mobilevlm_ros.tools.make_bag import make_bag
    questions = ["What is in front?", QUESTION]
    info = make_bag(tmp_path / "bag", storage="mcap", seconds=2.0, rate=2.0, cameras=("front",),
                    encoding="rgb8", size=(160, 120), start_s=time.time(), progress=False)
    topic = info["topics"]["front"]
    frames = info["frames"][topic]                              # (bag ns, stamp ns, k)
    first = frames[0][0]
    doc = {"cameras": {"front": topic}, "max_frame_age_s": 20.0,       # as the shared node
           "defaults": {"max_new_tokens": TOKENS, "temperature": 0.0},
           "questions": [{"id": f"q{i}", "camera": "front", "question": q,
                          "at": [round((bag_ns - first) / 1e9 + 0.25, 3) for bag_ns, _, _ in frames]}
                         for i, q in enumerate(questions)]}
    qfile = tmp_path / "questions.yaml"
    qfile.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "replay.jsonl"
    assert replay.main([str(info["path"]), "--questions", str(qfile), "--out", str(out), "--model", str(tiny_v2),
                        "--vision-rate-hz", "0", "--no-progress"]) == 0
    replayed = {}
    for line in out.read_text().splitlines():
        r = json.loads(line)
        assert "error" not in r, r
        stamp = r["frame_stamp"]["sec"] * 10**9 + r["frame_stamp"]["nanosec"]
        replayed[(stamp, r["question"])] = (r["answer"], r["completion_tokens"], r["finish_reason"])
    assert len(replayed) == len(frames) * len(questions)

    live = {}
    with BagReader(info["path"]) as bag:
        msgs = [m for _, _, _, m in bag.iter_messages([topic])]
    for msg in msgs:
        pixels = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        prefilled = int(client.diag.get("requests", {}).get("frames_prefilled", 0))
        client.publish_and_wait_encoded("front", pixels, stamp=Time(nanoseconds=stamp))
        # replay's vision worker and prefill take no time; live, a question that comes before the
        # new frame is in the decoder takes the newest frame already there: ask once it is
        assert wait_for(lambda: int(client.diag.get("requests", {}).get("frames_prefilled", 0)) > prefilled,
                        20), client.diag.get("requests")
        for q in questions:
            res = client.ask(q)
            assert res.success, res.error
            got = res.header.stamp.sec * 10**9 + res.header.stamp.nanosec
            assert got == stamp                                # the frame just published
            live[(got, q)] = (res.answer, res.completion_tokens, res.finish_reason)
    assert live == replayed


def test_ros_threads_run_below_the_engine_workers(client, node):
    """ros_threads_nice (10 in the parameters file): the node's Python thread (main, which runs the
    single-threaded executor) runs at nice 10; the engine's workers and DDS's own receive threads keep the node's priority (0
    here), so a camera driver on the same cores cannot starve the sockets."""
    pid = node.proc.pid
    threads = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        threads.append((comm, int(stat.rsplit(")", 1)[1].split()[16])))      # field 19: nice
    print("\n[threads]", sorted(threads))
    nice = [n for _, n in threads]
    assert nice.count(10) >= 1, threads                  # the main thread: the executor
    main_nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    assert main_nice == 10, threads
    assert nice.count(0) >= 2 + 1, threads               # the two workers and DDS
    assert set(nice) <= {0, 10}, threads
    assert all(n == 0 for comm, n in threads if comm.startswith("dds.")), threads


def test_status_codes_reach_the_client(client):
    """The status travels with the response: clients branch on it, never on the error text."""
    client.publish_and_wait_encoded("front", synthetic_frame())
    assert client.ask().status.code == Status.OK
    assert client.ask(question="").status.code == Status.INVALID_REQUEST
    assert client.ask(camera="left").status.code == Status.NO_FRAME
    assert client.ask(max_frame_age_ms=-1.0, camera="front").status.code == Status.OK
    answer = client.answers[-1] if wait_for(lambda: client.answers, 5) else None
    assert answer is not None and answer.status.code == Status.OK and answer.first_token_ms > 0


def test_annotated_image_is_the_answered_frame_drawn_only_while_watched(client):
    """~/annotated: with no subscriber an answer is not drawn (diagnostics count it); with one, the
    answer comes as a bgr8 image with the frame's header whose pixels above the text band are the
    frame's (published rgb8: the colours reversed), and as a JPEG on ~/annotated/compressed; an
    error answer (NO_FRAME) is drawn on nothing and published on nothing."""
    from sensor_msgs.msg import CompressedImage, Image

    def annotated():
        return client.diag.get("annotated", {})

    def count(key):
        return int(annotated().get(f"annotated_{key}", 0))
    assert wait_for(lambda: annotated(), 10), client.diag
    assert annotated()["subscribers_raw"] == "0" and annotated()["subscribers_compressed"] == "0"
    client.publish_and_wait_encoded("front", synthetic_frame())
    drawn, skipped = count("drawn"), count("no_subscriber")
    assert client.ask().success
    assert wait_for(lambda: count("no_subscriber") > skipped, 5), annotated()
    assert count("drawn") == drawn

    images, jpegs = [], []
    subs = [client.node.create_subscription(Image, f"{NODE}/annotated", images.append, 10),
            client.node.create_subscription(CompressedImage, f"{NODE}/annotated/compressed", jpegs.append, 10)]
    try:
        assert wait_for(lambda: annotated().get("subscribers_raw") == "1"
                        and annotated().get("subscribers_compressed") == "1", 15), annotated()
        frame = synthetic_frame(240, 320, seed=21)
        header = client.publish_and_wait_encoded("front", frame, frame_id="annotated_cam")
        res = client.ask(stamp=header.stamp)        # not the older frame the decoder may hold already
        assert res.success and stamp_of(res.header) == stamp_of(header)

        def arrived(msgs):
            return next((m for m in msgs if stamp_of(m.header) == stamp_of(header)), None)
        img = wait_for(lambda: arrived(images), 10)
        assert img is not None, annotated()
        assert (img.encoding, img.height, img.width, img.step) == ("bgr8", 240, 320, 960)
        assert img.header.frame_id == "annotated_cam"
        bgr = np.frombuffer(bytes(img.data), np.uint8).reshape(240, 320, 3)
        want = frame[:, :, ::-1]
        changed = np.flatnonzero((bgr != want).any(axis=(1, 2)))
        assert changed.size and changed[0] >= 120, "text drawn outside the band at the bottom"
        assert np.array_equal(bgr[:changed[0]], want[:changed[0]])
        jpeg = wait_for(lambda: arrived(jpegs), 10)
        assert jpeg is not None and jpeg.header.frame_id == "annotated_cam" and "jpeg" in jpeg.format
        from mobilevlm_ros.engine.annotate import encode_jpeg
        assert bytes(jpeg.data) == encode_jpeg(bgr, 80)     # the same image (annotated_jpeg_quality 80)
        assert wait_for(lambda: count("drawn") == drawn + 1, 5), annotated()

        n_images, n_jpegs = len(images), len(jpegs)
        offered = count("offered")
        assert client.ask(camera="left").status.code == Status.NO_FRAME
        client.wait_diagnostics(5)      # five diagnostics periods in which nothing is drawn or published
        assert (len(images), len(jpegs)) == (n_images, n_jpegs)
        assert count("drawn") == drawn + 1 and count("offered") == offered and count("errors") == 0
    finally:
        for sub in subs:
            client.node.destroy_subscription(sub)


def test_waiting_requests_hold_no_executor_thread(tiny_v2, rclpy_context):
    """Service callbacks await the engine: with 12 long requests waiting, the node answers its
    parameter service at once and has no more threads than before they arrived."""
    ns = f"/mobilevlm_async_{os.getpid()}"
    proc = start(tiny_v2, ns.strip("/"), vision_rate_hz="0.0", max_queue="16", max_frame_age_s="0.0")
    c = Client(rclpy_context, ns=ns, name="async_client")
    try:
        assert c.ask_client.wait_for_service(timeout_sec=120), proc.log()
        c.publish_and_wait_encoded("front", synthetic_frame())
        assert c.ask().success                          # warm: the backends' and the executor's threads
        threads0 = proc_threads(proc)
        futures = []
        for _ in range(12):
            req = AskService.Request(question=QUESTION, max_new_tokens=1000, temperature=0.0)
            futures.append(c.ask_client.call_async(req))
        assert wait_for(lambda: int(c.diag.get("requests", {}).get("queue_depth", 0)) >= 8, 20), c.diag
        t0 = time.monotonic()
        assert c.set_param("max_new_tokens", 64).successful
        assert time.monotonic() - t0 < 2.0
        # one executor thread: 12 callbacks waiting on threads would add 12
        assert proc_threads(proc) <= threads0 + 2, (threads0, proc_threads(proc))
        assert c.transition(Transition.TRANSITION_DEACTIVATE)          # answers every waiting request
        results = [wait_future(f, 60) for f in futures]
        assert all(r.status.code in (Status.OK, Status.CANCELLED, Status.UNAVAILABLE) for r in results)
        assert sum(r.status.code == Status.UNAVAILABLE for r in results) >= 8
    finally:
        c.close()
        proc.proc.kill()
        proc.proc.wait()


def proc_threads(proc) -> int:
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def test_configure_failure_exits_non_zero_naming_the_file():
    missing = "/nonexistent/MobileVLM_V2-1.7B"
    proc = subprocess.run([sys.executable, "-m", "mobilevlm_ros.ros.node", "--ros-args", "--params-file",
                           str(PARAMS), "-p", f"model_path:={missing}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1
    assert "configure failed" in proc.stderr and missing in proc.stderr


def test_invalid_parameters_exit_non_zero():
    proc = subprocess.run([sys.executable, "-m", "mobilevlm_ros.ros.node", "--ros-args", "--params-file",
                           str(PARAMS), "-p", "decoder:=tensorflow", "-p", "cameras:=[front, front]",
                           "-p", "llamacpp_engine:=llama.cpp"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "decoder must be one of auto, torch, llamacpp" in proc.stderr
    assert "camera names must be unique" in proc.stderr
    assert "parameter llamacpp_engine is now called llama_library" in proc.stderr     # renamed: not ignored


@pytest.mark.slow
def test_demo(tmp_path, tiny_v2_artifacts):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "mobilevlm_ros.tools.demo", "--max-new-tokens", "4", "--quiet",
                           "--namespace", f"/demo_{os.getpid()}", "--model", str(tiny_v2_artifacts),
                           "--annotated-png", "answer.png"],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "frame stamp" in proc.stdout and "sample frames published" in proc.stdout
    # the tiny model's answer is random text, and the demo says so in one line
    assert "the answer is random text" in proc.stdout and "The real-model path" in proc.stdout
    from PIL import Image as PILImage
    with PILImage.open(tmp_path / "answer.png") as im:      # the demo's 640x480 frame, the answer on it
        assert im.size == (640, 480) and im.mode == "RGB"
    assert "node stopped cleanly" in proc.stderr


def test_manual_lifecycle_without_autostart(rclpy_context, tiny_v2):
    """autostart false: the node waits unconfigured; configure, activate, deactivate, clean up and
    shut down through the standard lifecycle services; the shutdown transition ends the process."""
    name = "/mobilevlm_lc"
    proc = start("/not/yet", name.strip("/"), autostart="false")
    node = rclpy.create_node("mobilevlm_lc_client", context=rclpy_context)
    executor = MultiThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        change = node.create_client(ChangeState, f"{name}/change_state")
        get = node.create_client(GetState, f"{name}/get_state")
        setp = node.create_client(SetParameters, f"{name}/set_parameters")
        ask = node.create_client(AskService, f"{name}/ask")
        # each client is matched on its own, both ways: a request or a reply sent before is lost
        for client in (change, get, setp):
            match_service(client)

        def transition(tid):
            req = ChangeState.Request()
            req.transition.id = tid
            return wait_future(change.call_async(req), 60).success

        def state():
            return wait_future(get.call_async(GetState.Request()), 10).current_state.label

        def set_model(path):
            p = Parameter(name="model_path", value=ParameterValue(type=ParameterType.PARAMETER_STRING,
                                                                  string_value=path))
            return wait_future(setp.call_async(SetParameters.Request(parameters=[p])), 10).results[0]

        assert state() == "unconfigured"
        assert not transition(Transition.TRANSITION_CONFIGURE)          # /not/yet: the load fails
        assert state() == "unconfigured"
        assert wait_for(lambda: any("/not/yet" in line for line in proc.lines), 5), proc.log()   # read by a thread
        assert set_model(str(tiny_v2)).successful                          # allowed while unconfigured
        assert transition(Transition.TRANSITION_CONFIGURE)
        assert state() == "inactive"
        assert not set_model("/elsewhere").successful
        assert not ask.service_is_ready()
        assert transition(Transition.TRANSITION_ACTIVATE)
        assert ask.wait_for_service(timeout_sec=10)
        req = AskService.Request()
        req.question = "Anything?"
        res = wait_future(ask.call_async(req), 10)
        assert not res.success and "no frame received yet from camera 'front'" in res.error
        assert transition(Transition.TRANSITION_DEACTIVATE)
        assert transition(Transition.TRANSITION_CLEANUP)
        assert state() == "unconfigured"
        assert transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        assert proc.proc.wait(30) == 0, proc.log()
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()

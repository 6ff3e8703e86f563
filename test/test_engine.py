"""The engine in-process, no ROS: the request queue, validation, frame policy, prefill, captions,
cancellation and stop, with the tiny model (torch reference, and llama.cpp where the decoder's
cache matters). Every request gets exactly one Result with its Status."""
import time
from types import SimpleNamespace

import numpy as np
import pytest

from mobilevlm_ros.core.generation import GenerationParams
from mobilevlm_ros.core.pipeline import LoadOptions, load_model
from mobilevlm_ros.engine.config import AUTO_AGE_MIN_S, ConfigError, EngineConfig
from mobilevlm_ros.engine.engine import Engine, SimClock
from mobilevlm_ros.engine.frames import NS
from mobilevlm_ros.engine.images import RawImage
from mobilevlm_ros.engine.requests import Request, Status

from helpers.frames import synthetic_frame
from helpers.waiting import wait_for

T0 = 1_700_000_000 * NS
Q = "What is in the picture?"


def header(stamp_ns, frame_id="cam"):
    return SimpleNamespace(stamp=SimpleNamespace(sec=stamp_ns // NS, nanosec=stamp_ns % NS), frame_id=frame_id)


def raw(rgb):
    return RawImage("rgb8", rgb.shape[1], rgb.shape[0], rgb.shape[1] * 3, 0, rgb.reshape(-1))


@pytest.fixture(scope="module")
def cpp_model(tiny_v2_artifacts):
    m = load_model(tiny_v2_artifacts, LoadOptions(quant="f16", threads=2))
    yield m
    m.close()


def stepped(model, **cfg):
    clock = SimClock(T0)
    cfg.setdefault("max_new_tokens", 6)
    cfg.setdefault("vision_rate_hz", 0.0)
    return Engine(model, EngineConfig(**cfg), clock=clock, simulated=True), clock


def offer(engine, clock, t_ns, camera="front", seed=0):
    clock.set(t_ns)
    f = engine.offer_raw(camera, header(t_ns), t_ns, raw(synthetic_frame(120, 160, seed)))
    engine.vision_step()
    return f


def ask(engine, request):
    ticket = engine.submit(request)
    engine.run_pending()
    return ticket.result(0)


# ------------------------------------------------------------------------------------ config
def test_config_is_validated_once_with_every_problem_named():
    with pytest.raises(ConfigError) as e:
        EngineConfig(cameras=("front", "9bad"), max_queue=0, top_p=0.0, temperature=float("nan")).validate()
    msg = str(e.value)
    for part in ("9bad", "max_queue", "top_p", "temperature"):
        assert part in msg
    assert EngineConfig().replace(temperature=0.5).temperature == 0.5
    with pytest.raises(ConfigError, match="unknown"):
        EngineConfig().replace(nonsense=1)


def test_runtime_updates_and_fixed_settings(torch_model):
    engine, _ = stepped(torch_model)
    assert engine.update(max_new_tokens=9).max_new_tokens == 9
    with pytest.raises(ConfigError, match="max_queue"):
        engine.update(max_queue=8)
    with pytest.raises(ConfigError, match="vision_rate_hz"):
        engine.update(vision_rate_hz=-1.0)
    assert engine.config.max_new_tokens == 9


# ------------------------------------------------------------------------------------ answers
def test_answer_carries_the_frame_and_equals_the_pipeline(torch_model):
    engine, clock = stepped(torch_model)
    f = offer(engine, clock, T0)
    clock.set(T0 + NS // 10)
    r = ask(engine, Request(Q, max_new_tokens=6))
    assert r.status == Status.OK and r.success and r.error == ""
    assert (r.camera, r.frame_seq, r.stamp_ns, r.header.frame_id) == ("front", f.seq, T0, "cam")
    assert r.frame_age_ms == pytest.approx(100.0)
    [emb] = torch_model.encode([synthetic_frame(120, 160, 0)])
    gen = torch_model.ask(Q, emb, GenerationParams(max_new_tokens=6))
    assert (r.answer_ids, r.answer, r.prompt_tokens) == (gen.ids, gen.text, gen.prompt_tokens)
    assert r.vision_ms > 0 and not r.encoded_on_demand          # cached by the (simulated) worker


BAD = [
    (dict(question=""), Status.INVALID_REQUEST, "question is empty"),
    (dict(question="x" * 2001), Status.INVALID_REQUEST, "too long"),
    (dict(question="a\x00b"), Status.INVALID_REQUEST, "non-printable"),
    (dict(question="<image> here"), Status.INVALID_REQUEST, "special token"),
    (dict(camera="side"), Status.INVALID_REQUEST, "unknown camera 'side'"),
    (dict(max_new_tokens=5000), Status.INVALID_REQUEST, "max_new_tokens"),
    (dict(temperature=float("nan")), Status.INVALID_REQUEST, "temperature"),
    (dict(top_p=2.0), Status.INVALID_REQUEST, "top_p"),
    (dict(seed=2 ** 40), Status.INVALID_REQUEST, "seed"),
    (dict(max_frame_age_ms=float("inf")), Status.INVALID_REQUEST, "max_frame_age_ms"),
    (dict(camera="rear"), Status.NO_FRAME, "no frame received yet from camera 'rear'"),
    (dict(stamp_ns=T0 + 60 * NS), Status.NO_FRAME, "in the future"),
    (dict(stamp_ns=T0 - 3600 * NS), Status.NO_FRAME, "too old"),
    (dict(max_frame_age_ms=1.0), Status.NO_FRAME, "no frame newer than 0.001 s"),
]


def test_bad_requests_get_their_status_at_once_and_the_next_one_an_answer(torch_model):
    engine, clock = stepped(torch_model, cameras=("front", "rear"))
    offer(engine, clock, T0)
    clock.set(T0 + NS)
    for fields, status, message in BAD:
        ticket = engine.submit(Request(**{"question": Q, **fields}))
        assert ticket.done(), fields                       # validation answers before any queueing
        r = ticket.result(0)
        assert (r.status, r.success, r.finish_reason) == (status, False, "error"), (fields, r)
        assert message in r.error, (fields, r.error)
        assert ask(engine, Request(Q)).success
    counts = engine.stats().counts
    assert counts["errors"] == len(BAD) and counts["answers"] == len(BAD)
    assert counts["requests"] == 2 * len(BAD)


def test_queue_full_is_busy_and_every_request_gets_exactly_one_result(torch_model):
    engine, clock = stepped(torch_model, max_queue=3)
    offer(engine, clock, T0)
    results = []
    tickets = [engine.submit(Request(Q, max_new_tokens=2)) for _ in range(5)]
    for t in tickets:
        t.add_done_callback(results.append)
    assert [t.done() for t in tickets] == [False, False, False, True, True]
    assert tickets[3].result(0).status == Status.BUSY and "busy" in tickets[3].result(0).error
    assert engine.run_pending() == 3
    assert [r.status for r in (t.result(0) for t in tickets)] == [Status.OK] * 3 + [Status.BUSY] * 2
    assert len(results) == 5                                  # one callback each
    for t in tickets:
        assert not t.finish(t.result(0))                       # a second finish is refused
    assert engine.stats().counts["busy"] == 2


def test_frame_age_policy_auto_fixed_and_per_request(torch_model):
    engine, clock = stepped(torch_model, vision_rate_hz=2.0)
    assert engine.config.max_frame_age_s < 0                  # the default is auto
    assert engine.max_frame_age_s() == AUTO_AGE_MIN_S        # nothing measured (simulated: never)
    threaded = Engine(torch_model, EngineConfig(vision_rate_hz=2.0))
    threaded.frames.cameras["front"].stats.vision_ms_avg = 1500.0
    threaded._prefill_ms_avg = 2000.0
    assert threaded.max_frame_age_s() == pytest.approx(0.5 + 3 * 3.5)  # period + 3 cycles
    threaded._answer_ms_avg = 1200.0
    assert threaded.max_frame_age_s() == pytest.approx(0.5 + 3 * 3.5 + 1.2)  # + one answer
    assert threaded.update(max_frame_age_s=3.0) and threaded.max_frame_age_s() == 3.0
    offer(engine, clock, T0)
    clock.set(T0 + 10 * NS)
    r = ask(engine, Request(Q))
    assert r.status == Status.NO_FRAME and "no frame newer than 2 s" in r.error
    assert r.frame_age_ms == pytest.approx(10_000.0)                    # the newest frame's age: why
    assert ask(engine, Request(Q, max_frame_age_ms=-1)).success          # any cached frame
    assert ask(engine, Request(Q, max_frame_age_ms=10_500)).success
    assert ask(engine, Request(Q, max_frame_age_ms=9_500)).status == Status.NO_FRAME
    assert engine.max_frame_age_s() == AUTO_AGE_MIN_S        # stepped answers are not timed (replay)


def test_pending_frame_is_encoded_on_demand_and_counted(torch_model):
    engine, clock = stepped(torch_model, vision_rate_hz=1.0)
    a = offer(engine, clock, T0, seed=1)                          # cached (the first encode is due)
    b = offer(engine, clock, T0 + NS // 10, seed=2)              # pending: the next encode is due at T0 + 1 s
    clock.set(T0 + NS // 2)
    r = ask(engine, Request(Q, stamp_ns=T0 + NS // 10))
    assert r.success and r.frame_seq == b.seq and r.encoded_on_demand and r.vision_ms > 0
    assert ask(engine, Request(Q, stamp_ns=T0)).frame_seq == a.seq
    assert engine.stats().counts["encoded_on_demand"] == 1


def test_undecodable_frame_fails_its_question_with_no_frame(torch_model):
    engine, clock = stepped(torch_model)
    clock.set(T0)
    engine.offer_compressed("front", header(T0), T0, "jpeg", b"\xff\xd8\xff" + b"\x00" * 64)
    engine.vision_step()
    r = ask(engine, Request(Q))
    assert r.status == Status.NO_FRAME and "could not be encoded" in r.error
    assert engine.stats().cameras["front"].rejected == 1


def test_offer_rejects_and_counts(torch_model):
    engine, clock = stepped(torch_model)
    clock.set(T0)
    bad = RawImage("rgb8", 4, 4, 12, 0, np.zeros(10, np.uint8))
    with pytest.raises(Exception, match="truncated"):
        engine.offer_raw("front", header(T0), T0, bad)
    with pytest.raises(Exception, match="ahead of the node clock"):
        engine.offer_raw("front", header(T0 + 3600 * NS), T0 + 3600 * NS, raw(synthetic_frame(8, 8)))
    with pytest.raises(Exception, match="unknown camera"):
        engine.offer_raw("side", header(T0), T0, raw(synthetic_frame(8, 8)))
    st = engine.stats().cameras["front"]
    assert (st.received, st.rejected) == (2, 2)


# ------------------------------------------------------------------------------------ threaded
def test_threaded_prefill_then_question_about_that_frame(cpp_model, tiny_v2_artifacts):
    """The worker encodes and prefills the newest frame while idle; the question then pays only for
    its text, and answers as a fresh decoder would (the determinism contract)."""
    engine = Engine(cpp_model, EngineConfig(vision_rate_hz=0.0, max_new_tokens=6))
    engine.start()
    try:
        now = time.time_ns()
        f = engine.offer_raw("front", header(now), now, raw(synthetic_frame(120, 160, 3)))
        assert wait_for(lambda: engine.stats().counts["frames_prefilled"] >= 1)
        r = engine.submit(Request(Q)).result(30)
        assert r.success and r.frame_seq == f.seq and not r.encoded_on_demand and r.vision_ms == 0.0
    finally:
        engine.stop("test over")
    fresh = load_model(tiny_v2_artifacts, LoadOptions(quant="f16", threads=2))
    try:
        [emb] = fresh.encode([synthetic_frame(120, 160, 3)])
        assert fresh.ask(Q, emb, GenerationParams(max_new_tokens=6)).ids == r.answer_ids
    finally:
        fresh.close()


def test_threaded_prefill_interrupted_by_a_question_is_tried_again(cpp_model, monkeypatch):
    """A question about an older frame interrupts the newest frame's prefill; once the decoder is idle
    the newest frame is prefilled after all (not left for a later question to evaluate)."""
    engine = Engine(cpp_model, EngineConfig(vision_rate_hz=0.0, max_new_tokens=4))
    engine.start()
    try:
        now = time.time_ns()
        a = engine.offer_raw("front", header(now), now, raw(synthetic_frame(120, 160, 5)))
        assert wait_for(lambda: engine.stats().counts["frames_prefilled"] >= 1)
        real_prefill, calls = cpp_model.prefill, []

        def prefill(image, interrupt=None):
            calls.append(image.key)
            if len(calls) == 1:             # the tiny model's prefill is too quick to catch: hold the
                assert wait_for(interrupt, 30)  # first one until the question interrupts it
                return False
            return real_prefill(image, interrupt)
        monkeypatch.setattr(cpp_model, "prefill", prefill)
        now = time.time_ns()
        b = engine.offer_raw("front", header(now), now, raw(synthetic_frame(120, 160, 6)))
        assert wait_for(lambda: calls)
        r = engine.submit(Request(Q, stamp_ns=a.stamp_ns)).result(30)
        assert r.success and r.frame_seq == a.seq
        assert wait_for(lambda: engine.stats().counts["frames_prefilled"] >= 2)
        assert calls[0] == calls[-1] and len(calls) == 2          # the same frame, tried again once
        assert calls[0] in cpp_model.decoder.kv_state_keys()
        r = engine.submit(Request(Q)).result(30)
        assert r.success and r.frame_seq == b.seq
    finally:
        engine.stop("test over")


def test_threaded_cancel_stop_and_one_result_each(torch_model):
    engine = Engine(torch_model, EngineConfig(vision_rate_hz=0.0, max_queue=4))
    engine.start()
    try:
        now = time.time_ns()
        engine.offer_raw("front", header(now), now, raw(synthetic_frame(120, 160, 4)))
        assert wait_for(lambda: engine.stats().cameras["front"].encoded >= 1)
        seen = []
        cancel_at = {}

        def on_token(n, text):
            seen.append(n)
            if n == 2:
                cancel_at["t"] = ticket.tokens
                ticket.cancel()
        ticket = engine.submit(Request(Q, max_new_tokens=400), on_token)
        queued = [engine.submit(Request(Q, max_new_tokens=400)) for _ in range(3)]
        r = ticket.result(60)
        assert r.status == Status.CANCELLED and r.finish_reason == "cancelled"
        assert "cancelled by the client" in r.error and "tokens after the cancel request" in r.error
        assert r.tokens_after_cancel == r.completion_tokens - cancel_at["t"] <= 1
        queued[2].cancel()                                        # cancelled while waiting
    finally:
        engine.stop("the node was deactivated")
    results = [t.result(10) for t in queued]
    # whatever ran when stop came is cancelled, the rest was never started: each has one result
    assert all(res.status in (Status.CANCELLED, Status.UNAVAILABLE, Status.OK) for res in results)
    assert results[2].status in (Status.CANCELLED, Status.UNAVAILABLE)
    assert any("the node was deactivated" in res.error for res in results)
    late = engine.submit(Request(Q))
    assert late.result(0).status == Status.UNAVAILABLE


def test_captions_are_published_when_idle(torch_model, monkeypatch):
    got = []
    engine = Engine(torch_model, EngineConfig(vision_rate_hz=0.0, caption_period_s=0.05, max_new_tokens=3,
                                              prefill_frames=False))
    engine.on_answer = lambda req, res: got.append((req.kind, res.status))
    # count the caption ticks that were due (each moves the next one on), to wait for them below
    due_ticks, real_tick = [], engine._caption_tick

    def tick():
        before = engine._next_caption_ns
        real_tick()
        if engine._next_caption_ns != before:
            due_ticks.append(before)
    monkeypatch.setattr(engine, "_caption_tick", tick)
    engine.start()
    try:
        now = time.time_ns()
        engine.offer_raw("front", header(now), now, raw(synthetic_frame(120, 160, 5)))
        assert wait_for(lambda: got)
        assert got[0] == ("caption", Status.OK)
        n = len(due_ticks)
        assert wait_for(lambda: len(due_ticks) >= n + 5)      # five more due ticks saw the same frame
        assert engine.stats().counts["captions"] == 1          # one caption per new frame
    finally:
        engine.stop("test over")


@pytest.mark.parametrize("modules,forbidden", [
    # the runtime and the inference core: nothing of ROS, not even the adapter's modules
    ("mobilevlm_ros.engine.engine, mobilevlm_ros.core.pipeline",
     ("rclpy", "rosidl_runtime_py", "sensor_msgs", "std_msgs", "builtin_interfaces", "mobilevlm_ros.msg",
      "mobilevlm_ros.srv", "mobilevlm_ros.ros")),
    # replay reads bags with rosbags and shares the adapter's field conversion, never rclpy
    ("mobilevlm_ros.replay.cli", ("rclpy", "rosidl_runtime_py", "mobilevlm_ros.msg", "mobilevlm_ros.srv")),
])
def test_engine_and_core_import_no_ros(modules, forbidden):
    """Checked in a fresh interpreter: importing these loads none of the forbidden packages."""
    import subprocess
    import sys
    code = (f"import sys, {modules}; bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') "
            f"for f in {forbidden!r})); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

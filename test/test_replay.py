"""mobilevlm-replay and mobilevlm-make-bag on real rosbag2 bags (written with rosbags, no ROS needed).

End to end: bags in both storage formats (mcap raw bgr8, sqlite3 JPEG), replayed with questions at
given bag times, every N seconds, every Nth frame and near requested stamps. With a vision worker
that keeps up (--vision-rate-hz 0) each answer's frame is checked against the frame the node's
policy must pick (computed here from the bag's schedule), and its answer against the same pipeline
run on that frame's pixels (rendered again, or JPEG-decoded with Pillow) and once against
`mobilevlm-ask-image`; with the node's default schedule, against the frames that schedule caches. Replay
is repeatable to the byte. Then --expect, the Answer bag, and corrupt bags.
"""
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from mobilevlm_ros.replay import bagio
from mobilevlm_ros.core.generation import GenerationParams
from mobilevlm_ros.engine.frames import NS
from mobilevlm_ros.ros.conversion import stamp_ns
from mobilevlm_ros.tools import ask as ask_tool
from mobilevlm_ros.tools import make_bag as make_bag_tool
from mobilevlm_ros.replay import cli as replay
from mobilevlm_ros.tools.make_bag import make_bag, render_frame

SIZE = (64, 48)
RATE = 5.0
SECONDS = 2.0
LATENCY_MS = 30.0
MAX_AGE = 0.5
TOKENS = 3
CAMERAS = ("front", "rear")

QUESTIONS = {
    "max_frame_age_s": MAX_AGE,
    "defaults": {"max_new_tokens": TOKENS},
    "questions": [
        # two questions on the same frames: one encode, reused
        {"id": "look", "camera": "front", "question": ["What is in front?", "What color is the disc?"],
         "at": [0.55, 1.3]},
        # near a requested stamp (relative to the bag start), and too late for any fresh frame
        {"id": "near", "camera": "front", "question": "Where is the square?",
         "at": [{"t": 1.5, "stamp_s": 1.15}, 4.0]},
        {"id": "tick", "camera": "rear", "question": "Is the path clear?", "every_s": 0.7},
        {"id": "nth", "camera": "rear", "question": "Describe the scene.", "every_n_frames": 4,
         "start_s": 0.5},
    ],
}


# ------------------------------------------------------------------------------------ helpers
class SharedModel:
    """The test's model for replay.main (no second load); close() leaves it open."""

    def __init__(self, model):
        self._m = model

    def __getattr__(self, name):
        return getattr(self._m, name)

    def close(self):
        pass


@pytest.fixture
def shared(monkeypatch, torch_model):
    """replay.main gets the already loaded model instead of loading --model again."""
    monkeypatch.setattr(replay, "load_from_args", lambda a: SharedModel(torch_model))
    return torch_model


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    out = {}
    for name, storage, compressed, encoding in (("raw_mcap", "mcap", None, "bgr8"),
                                                 ("jpeg_sqlite3", "sqlite3", "jpeg", "rgb8")):
        out[name] = make_bag(root / name, storage=storage, seconds=SECONDS, rate=RATE, cameras=CAMERAS,
                             compressed=compressed, encoding=encoding, size=SIZE, latency_ms=LATENCY_MS,
                             progress=False)
    return out


def questions_for(info, tmp_path, doc=QUESTIONS, name="questions.yaml"):
    d = dict(doc)
    d["cameras"] = dict(info["topics"])
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def run(bag, questions, out, *extra, model_path="unused"):
    return replay.main([str(bag), "--questions", str(questions), "--out", str(out), "--model", str(model_path),
                        "--no-progress", *map(str, extra)])


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def expected_frame(info, camera, at_ns, stamp_ns=0):
    """The frame the node's policy must pick, from make_bag's schedule: (stamp ns, k) or None.
    Newest frame received by at_ns and at most MAX_AGE old; or the one closest to stamp_ns."""
    frames = [(stamp, k) for bag_ns, stamp, k in info["frames"][info["topics"][camera]] if bag_ns <= at_ns]
    if not frames:
        return None
    fresh = lambda s: (at_ns - s) / NS <= MAX_AGE  # noqa: E731
    if stamp_ns:
        if (at_ns - stamp_ns) / NS > MAX_AGE:
            return None
        best = min(frames, key=lambda f: (abs(f[0] - stamp_ns), -f[1]))
    else:
        best = max(frames)
    return best if fresh(best[0]) else None


def frame_pixels(info, bag_path, camera, k):
    """RGB pixels of frame k of `camera`: rendered again for raw bags, Pillow-decoded for JPEG."""
    ci = CAMERAS.index(camera)
    if not info["compressed"]:
        return render_frame(ci, k, RATE, *SIZE)
    from PIL import Image
    with bagio.BagReader(bag_path) as bag:
        topic = info["topics"][camera]
        msgs = [m for _, _, _, m in bag.iter_messages([topic])]
    with Image.open(io.BytesIO(bytes(msgs[k].data))) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("which", ["raw_mcap", "jpeg_sqlite3"])
def test_replay_picks_the_nodes_frame_and_answers_as_the_pipeline(which, bags, shared, tmp_path):
    info = bags[which]
    bag = Path(info["path"])
    out = tmp_path / "answers.jsonl"
    assert run(bag, questions_for(info, tmp_path), out, "--vision-rate-hz", 0, "--embedding-cache-size", 100) == 0
    recs = lines(out)
    summary = json.loads((tmp_path / "answers.summary.json").read_text())

    # the schedule (t from the first message, front frame 0 at bag time +30 ms; the bag lasts 1.9 s):
    # 2 x 2 'look', 2 'near', 'tick' at 0, 0.7, 1.4; 'nth': rear frames 0, 4, 8 (t = 0.1, 0.9, 1.7),
    # of which 4 and 8 are past start_s 0.5
    assert [r["id"] for r in recs].count("look") == 4
    assert [r["id"] for r in recs].count("near") == 2
    assert [r["t"] for r in recs if r["id"] == "tick"] == [0.0, 0.7, 1.4]
    assert [r["frame_index"] for r in recs if r["id"] == "nth"] == [4, 8]
    assert [r["bag_time_ns"] for r in recs] == sorted(r["bag_time_ns"] for r in recs)

    checked = {}
    for r in recs:
        stamp_req = 0 if r["requested_stamp"] is None else \
            r["requested_stamp"]["sec"] * NS + r["requested_stamp"]["nanosec"]
        want = expected_frame(info, r["camera"], r["bag_time_ns"], stamp_req)
        if want is None:
            assert "error" in r and r["error_type"] == "NO_FRAME", r
            continue
        assert "error" not in r, r
        got = r["frame_stamp"]["sec"] * NS + r["frame_stamp"]["nanosec"]
        assert (got, r["frame_index"]) == want, r
        assert r["frame_id"] == f"{r['camera']}_camera_optical_frame"
        assert r["frame_age_ms"] == pytest.approx((r["bag_time_ns"] - got) / 1e6)
        # the same pipeline on the same pixels gives the same answer
        key = (r["camera"], r["frame_index"])
        if key not in checked:
            checked[key] = shared.encode([frame_pixels(info, bag, r["camera"], r["frame_index"])])[0]
        gen = shared.ask(r["question"], checked[key], GenerationParams(max_new_tokens=TOKENS))
        assert (r["answer_ids"], r["answer"], r["finish_reason"]) == (gen.ids, gen.text, gen.finish_reason)
        assert r["completion_tokens"] == len(gen.ids) and r["prompt_tokens"] == gen.prompt_tokens

    # known outcomes: the 'near' question at 1.5 s gets the frame stamped 1.2 s (closest to 1.15 + 0.03),
    # the one at 4.0 s has no fresh frame; rear has no frame at t=0 (it is stamped half a period later)
    near = [r for r in recs if r["id"] == "near"]
    assert near[0]["frame_index"] == 6 and "no frame newer than 0.5 s" in near[1]["error"]
    assert "no frame received yet from camera 'rear'" in recs[[r["id"] for r in recs].index("tick")]["error"]

    # only used frames are encoded, each once; both 'look' questions share an embedding
    answered = [r for r in recs if "error" not in r]
    frames_used = {(r["camera"], r["frame_index"]) for r in answered}
    assert summary["frames_encoded"] == len(frames_used) < sum(len(v) for v in info["frames"].values())
    assert summary["embeddings_reused"] == len(answered) - len(frames_used)
    assert sum(not r["embedding_reused"] for r in answered) == len(frames_used)
    assert summary["answers"] == len(answered) and summary["failures"] == len(recs) - len(answered)
    assert summary["storage"] == ("mcap" if which == "raw_mcap" else "sqlite3")
    assert set(summary["latency_ms"]["total"]) >= {"p50", "p90", "p99"}


def test_answer_equals_mobilevlm_ask_and_answers_bag_reads_back(bags, tiny_v2, tmp_path, capsys):
    """The real CLI path (model loaded from --model), against `mobilevlm-ask-image` on the frame as PNG;
    the answers bag holds mobilevlm_ros/msg/Answer with the frame's header."""
    info = bags["raw_mcap"]
    doc = {"questions": [{"camera": "front", "question": "What is in front?", "at": [0.55, 1.3]}]}
    out, abag = tmp_path / "a.jsonl", tmp_path / "answers_bag"
    assert run(info["path"], questions_for(info, tmp_path, doc), out, "--max-new-tokens", TOKENS,
               "--answers-bag", abag, model_path=tiny_v2) == 0
    recs = lines(out)
    assert len(recs) == 2 and all("error" not in r for r in recs)
    capsys.readouterr()

    from PIL import Image
    png = tmp_path / "frame.png"
    Image.fromarray(render_frame(0, recs[0]["frame_index"], RATE, *SIZE)).save(png)
    assert ask_tool.main(["--model", str(tiny_v2), "--image", str(png), "--question", "What is in front?",
                          "--max-new-tokens", str(TOKENS), "--json"]) == 0
    asked = json.loads(capsys.readouterr().out)
    assert (asked["answer_ids"], asked["answer"]) == (recs[0]["answer_ids"], recs[0]["answer"])

    # the answers bag: mcap, one Answer per answer, header = the frame's, bag time = question time
    assert list(abag.glob("*.mcap"))
    with bagio.BagReader(abag) as bag:
        got = [(t, ts, m) for t, _, ts, m in bag.iter_messages([replay.ANSWERS_TOPIC])]
    assert [t for t, _, _ in got] == [replay.ANSWERS_TOPIC] * 2
    for (topic, ts, msg), r in zip(got, recs):
        assert ts == r["bag_time_ns"] == msg.answered_at.sec * NS + msg.answered_at.nanosec
        assert {"sec": msg.header.stamp.sec, "nanosec": msg.header.stamp.nanosec} == r["frame_stamp"]
        assert msg.header.frame_id == r["frame_id"]
        assert (msg.camera, msg.question, msg.answer) == (r["camera"], r["question"], r["answer"])
        assert (msg.prompt_tokens, msg.completion_tokens, msg.finish_reason) == (
            r["prompt_tokens"], r["completion_tokens"], r["finish_reason"])
        assert msg.model_id == tiny_v2.name and msg.total_ms > 0 and msg.status.code == 0
    # and each answer drawn on its frame (JPEG), with the frame's header, at the answer's bag time
    with bagio.BagReader(abag) as bag:
        images = [(ts, m) for _, _, ts, m in bag.iter_messages([replay.ANNOTATED_TOPIC])]
    assert len(images) == len(recs)
    for (ts, img), r in zip(images, recs):
        assert ts == r["bag_time_ns"]
        assert {"sec": img.header.stamp.sec, "nanosec": img.header.stamp.nanosec} == r["frame_stamp"]
        assert img.header.frame_id == r["frame_id"] and "jpeg" in img.format
        with Image.open(io.BytesIO(bytes(img.data))) as im:
            assert im.format == "JPEG" and im.size == SIZE
    # the bag carries the package's own definition of the type
    with bagio.BagReader(abag) as bag:
        [conn] = [c for c in bag.reader.connections if c.topic == replay.ANSWERS_TOPIC]
        assert conn.msgtype == bagio.ANSWER
        assert "float64 vision_ms" in conn.msgdef.data and "builtin_interfaces/Time answered_at" in conn.msgdef.data


# ------------------------------------------------------------------------------------ --expect
def test_expect_passes_on_identical_run_and_lists_changes(bags, shared, tiny_v1, tmp_path, capsys,
                                                          monkeypatch):
    info = bags["raw_mcap"]
    doc = {"max_frame_age_s": MAX_AGE,
           "questions": [{"camera": "front", "question": "What is in front?", "at": [0.55, 4.0]},
                         {"camera": "rear", "question": "Is the path clear?", "at": [1.0]}]}
    q = questions_for(info, tmp_path, doc)
    first = tmp_path / "first.jsonl"
    assert run(info["path"], q, first, "--max-new-tokens", TOKENS) == 0
    assert run(info["path"], q, tmp_path / "again.jsonl", "--expect", first, "--max-new-tokens", TOKENS) == 0
    assert "same as" in capsys.readouterr().err
    s = json.loads((tmp_path / "again.summary.json").read_text())["expect"]
    assert (s["same"], s["changed"], s["added"], s["missing"]) == (3, 0, 0, 0)

    # a changed question: one added, one missing
    doc2 = json.loads(json.dumps(doc))
    doc2["questions"][1]["question"] = "Is the road clear?"
    assert run(info["path"], questions_for(info, tmp_path, doc2, "q2.yaml"), tmp_path / "q2.jsonl",
               "--expect", first, "--max-new-tokens", TOKENS) == replay.EXIT_CHANGED
    err = capsys.readouterr().err
    assert "1 added, 1 missing" in err
    assert "added: rear @ t=1.000 s: 'Is the road clear?'" in err
    assert "missing: rear @ t=1.000 s: 'Is the path clear?'" in err

    # another model (loaded from --model): the answers are listed as changed
    monkeypatch.setattr(replay, "load_from_args", ask_tool.load_from_args)
    assert run(info["path"], q, tmp_path / "v1.jsonl", "--expect", first, "--max-new-tokens", TOKENS,
               model_path=tiny_v1) == replay.EXIT_CHANGED
    err = capsys.readouterr().err
    assert "2 changed, 0 added, 0 missing (1 same)" in err, err
    assert "changed: front @ t=0.550 s: 'What is in front?': answer" in err
    assert "changed: rear @ t=1.000 s: 'Is the path clear?': answer" in err
    monkeypatch.setattr(replay, "load_from_args", lambda a: SharedModel(shared))

    # a changed generation setting: answers and ids listed as changed, with the first differing token;
    # the command line sets what the questions file leaves open
    assert run(info["path"], q, tmp_path / "longer.jsonl", "--expect", first,
               "--max-new-tokens", TOKENS + 2) == replay.EXIT_CHANGED
    err = capsys.readouterr().err
    assert re.search(r"[12] changed, 0 added, 0 missing \([12] same\)", err), err
    assert re.search(r"changed: (front @ t=0.550|rear @ t=1.000) s: '[^']+': answer '.*' -> '.*'; "
                     r"answer_ids differ from token 3 \(3 -> [45] tokens\)", err), err


def test_compare_reports_errors_and_frames():
    base = {"camera": "c", "bag_time_ns": 5, "t": 0.0, "question": "q", "answer": "a", "answer_ids": [1],
            "frame_stamp": {"sec": 1, "nanosec": 0}}
    same = replay.compare([base], [dict(base)])
    assert (same["same"], same["differences"]) == (1, [])
    err = {k: v for k, v in base.items() if k not in ("answer", "answer_ids", "frame_stamp")} | {"error": "gone"}
    d = replay.compare([base], [err])
    assert d["changed"] == 1 and "'a' -> error: gone" in d["differences"][0]
    moved = dict(base, frame_stamp={"sec": 2, "nanosec": 0})
    assert "frame_stamp" in replay.compare([base], [moved])["differences"][0]
    # the same question twice at the same time is matched by occurrence
    d = replay.compare([base, dict(base, answer="b")], [base, dict(base, answer="c")])
    assert d["changed"] == 1 and "(#2)" in d["differences"][0]


# ------------------------------------------------------------------------------------ frames
def test_rejected_frames_are_skipped_and_reported(tmp_path, shared):
    """A float frame is rejected as the node rejects it: 'at' questions get the previous frame,
    an every_n_frames question on the rejected frame fails naming why."""
    path = tmp_path / "mixed"
    with bagio.BagWriter(path, "mcap") as w:
        for k in range(3):
            stamp = 1_000 * NS + k * NS // 10
            if k == 1:
                msg = w.image(stamp, "cam", np.zeros((4, 4), np.float32).view(np.uint8).reshape(4, 16), "32FC1")
                msg.width, msg.step = 4, 16
            else:
                msg = w.image(stamp, "cam", render_frame(0, k, 10, 32, 24), "rgb8")
            w.write("/cam/image", bagio.IMAGE, stamp, msg)
    doc = {"cameras": {"cam": "/cam/image"}, "defaults": {"max_new_tokens": 2},
           "questions": [{"question": "What?", "at": [0.15]},
                         {"question": "Which?", "every_n_frames": 1, "end_s": 0.1}]}
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump(doc))
    out = tmp_path / "o.jsonl"
    assert run(path, q, out) == 0
    recs = lines(out)
    assert [(r["question"], r.get("frame_index"), "error" in r) for r in recs] == [
        ("Which?", 0, False), ("Which?", 1, True), ("What?", 0, False)]
    assert "32FC1" in recs[1]["error"] and recs[1]["error_type"] == "NO_FRAME"
    s = json.loads((tmp_path / "o.summary.json").read_text())
    assert s["cameras"]["cam"]["rejected"] == 1 and s["cameras"]["cam"]["frames"] == 3
    assert recs[0]["answer_ids"] and recs[2]["embedding_reused"]


def test_default_schedule_caches_frames_as_the_node_and_replays_byte_for_byte(bags, shared, tmp_path):
    """With the node's defaults (vision_rate_hz 2, embedding_cache_size 4) the simulated vision worker
    caches a frame when an encode is due on the bag's clock (at most every 0.5 s), and a question
    about the latest frame gets the newest cached one, even when a newer frame is pending (as the
    live node answers from its newest encoded frame). Two runs write identical lines."""
    info = bags["raw_mcap"]
    doc = {"defaults": {"max_new_tokens": TOKENS},
           "questions": [{"id": "every", "camera": "front", "question": "What is in front?", "every_s": 0.25}]}
    q = questions_for(info, tmp_path, doc)
    outs = [tmp_path / "one.jsonl", tmp_path / "two.jsonl"]
    for out in outs:
        assert run(info["path"], q, out) == 0
    drop = ("timings_ms",)          # measured durations are the only thing allowed to differ
    one, two = ([{k: v for k, v in r.items() if k not in drop} for r in lines(o)] for o in outs)
    assert one == two and len(one) == 8
    # the schedule (front frames k at 0.03 + 0.2 k s, rear ones 0.1 s later): at any camera's message
    # at least 0.5 s after the last encode, every camera's newest frame not yet encoded is cached
    messages = sorted((bag_ns, cam, k) for cam in CAMERAS for bag_ns, _, k in info["frames"][info["topics"][cam]])
    cached, pending, next_due = [], {}, 0
    for bag_ns, cam, k in messages:
        pending[cam] = k
        if bag_ns >= next_due:
            if "front" in pending:
                cached.append((bag_ns, pending["front"]))
            pending.clear()
            next_due = bag_ns + NS // 2
    for r in one:
        newest = max(k for bag_ns, k in cached if bag_ns <= r["bag_time_ns"]) \
            if any(bag_ns <= r["bag_time_ns"] for bag_ns, _ in cached) else None
        if newest is None:
            assert r["error_type"] == "NO_FRAME" and "pending" not in r["error"], r
            continue
        assert r["frame_index"] == newest, (r["t"], cached)
    # at t = 0.25 frame 1 had arrived, but the newest cached frame was 0: the node would answer about 0
    assert [r["frame_index"] for r in one if r["t"] == 0.25] == [0]


# ------------------------------------------------------------------------------------ questions file
def test_schedule_every_s_and_at():
    qf = replay.parse_questions({"cameras": {"a": "/a"}, "questions": [
        {"question": ["x", "y"], "every_s": 0.5, "start_s": 0.25, "end_s": 1.3},
        {"question": "z", "at": [0.0, {"t": 0.5, "stamp": {"sec": 7, "nanosec": 5}}, {"t": 0.6, "stamp_s": 0.1}]},
    ]})
    asks = replay.timed_asks(qf, 10 * NS, 12 * NS)
    got = [((a.at_ns - 10 * NS) / NS, a.question, a.stamp_ns) for a in asks]
    assert got == [(0.0, "z", 0), (0.25, "x", 0), (0.25, "y", 0), (0.5, "z", 7 * NS + 5),
                   (0.6, "z", 10 * NS + NS // 10), (0.75, "x", 0), (0.75, "y", 0), (1.25, "x", 0), (1.25, "y", 0)]


@pytest.mark.parametrize("doc, message", [
    ([], "expected a mapping"),
    ({"questions": [{"question": "q", "at": 1}]}, "'cameras' must map"),
    ({"cameras": {"a": "/a"}, "questions": [], "extra": 1}, "unknown key(s) extra"),
    ({"cameras": {"a b": "/a"}, "questions": [{"question": "q", "at": 1}]}, "camera name 'a b'"),
    ({"cameras": {"a": "a"}, "questions": [{"question": "q", "at": 1}]}, "absolute topic"),
    ({"cameras": {"a": "/t", "b": "/t"}, "questions": [{"question": "q", "at": 1}]}, "more than one camera"),
    ({"cameras": {"a": "/a"}, "questions": []}, "non-empty list"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "", "at": 1}]}, "questions[0].question"),
    ({"cameras": {"a": "/a", "b": "/b"}, "questions": [{"question": "q", "at": 1}]}, "camera is required"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "camera": "z", "at": 1}]}, "'z' is not one"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q"}]}, "exactly one of"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "at": 1, "every_s": 2}]}, "has at, every_s"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "every_s": 0}]}, "every_s must be > 0"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "at": -1}]}, "at[0] must be >= 0"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "every_n_frames": 1.5}]}, "positive integer"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "at": 1, "end_s": 3}]}, "start_s/end_s go with"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "every_s": 1, "start_s": 3, "end_s": 2}]},
     "before start_s"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "at": [{"t": 1, "stamp": {"sec": -1}}]}]},
     "stamp must be"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "at": 1, "temperature": 11}]}, "temperature"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "at": 1, "max_new_tokens": 0}]}, "max_new_tokens"),
    ({"cameras": {"a": "/a"}, "defaults": {"top_k": 3}, "questions": [{"question": "q", "at": 1}]}, "top_k"),
    ({"cameras": {"a": "/a"}, "questions": [{"question": "q", "at": 1, "when": 2}]}, "unknown key(s) when"),
])
def test_questions_file_errors_name_the_key(doc, message):
    with pytest.raises(replay.QuestionsError) as e:
        replay.parse_questions(doc, "q.yaml")
    assert message in str(e.value) and str(e.value).startswith("q.yaml")


def test_bad_questions_file_and_unknown_topic_exit_2(bags, tmp_path, capsys):
    info = bags["raw_mcap"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("cameras: [unclosed\n")
    assert run(info["path"], bad, tmp_path / "o.jsonl") == 2
    assert "bad.yaml: not valid YAML" in capsys.readouterr().err
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump({"cameras": {"front": "/nope"}, "questions": [{"question": "q", "at": 1}]}))
    assert run(info["path"], q, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err
    assert "topic /nope is not in the bag" in err and "/front/image_raw [sensor_msgs/msg/Image]" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_params_file_with_a_renamed_parameter_exits_2_naming_the_new_one(bags, tmp_path, capsys):
    """A node parameters file from before the renames: refused, not replayed with the default."""
    q = tmp_path / "q.yaml"
    q.write_text(yaml.safe_dump({"cameras": {"front": "/front/image_raw"},
                                 "questions": [{"question": "q", "at": 1}]}))
    params = tmp_path / "node.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"frame_cache_size": 2}}}))
    assert run(bags["raw_mcap"]["path"], q, tmp_path / "o.jsonl", "--params", params) == 2
    err = capsys.readouterr().err
    assert "parameter frame_cache_size is now called embedding_cache_size" in err, err
    assert not (tmp_path / "o.jsonl").exists()
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"embedding_cache_size": 2}}}))
    assert replay.engine_config(replay.load_questions(q), str(params)).embedding_cache_size == 2


# ------------------------------------------------------------------------------------ bad bags
def _corrupt(kind, bags, tmp_path):
    import shutil
    if kind == "missing":
        return tmp_path / "no_such_bag"
    if kind == "not_a_bag":
        p = tmp_path / "plain"
        p.mkdir()
        return p
    if kind == "metadata":
        p = tmp_path / "meta"
        shutil.copytree(bags["raw_mcap"]["path"], p)
        (p / "metadata.yaml").write_text("rosbag2_bagfile_information: [1, 2\n")
        return p
    if kind == "ros1":
        p = tmp_path / "old.bag"
        p.write_bytes(b"#ROSBAG V2.0\n")
        return p
    if kind == "truncated_mcap":
        p = tmp_path / "tm"
        shutil.copytree(bags["raw_mcap"]["path"], p)
        [f] = p.glob("*.mcap")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return p
    if kind == "truncated_db3":
        p = tmp_path / "td"
        shutil.copytree(bags["jpeg_sqlite3"]["path"], p)
        [f] = p.glob("*.db3")
        f.write_bytes(f.read_bytes()[:5000])
        return p
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, message", [
    ("missing", "bag not found"), ("not_a_bag", "no metadata.yaml"), ("metadata", "cannot read bag"),
    ("ros1", "ROS 1 bags are not supported"), ("truncated_mcap", "cannot read bag"),
    ("truncated_db3", "cannot read bag"),
])
def test_corrupt_or_unsupported_bag_exits_2_naming_the_file(kind, message, bags, tmp_path, capsys):
    path = _corrupt(kind, bags, tmp_path)
    q = questions_for(bags["raw_mcap"], tmp_path)
    assert run(path, q, tmp_path / "o.jsonl", model_path=tmp_path / "no_model") == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err


def test_damaged_chunk_in_the_middle_is_an_error_not_a_short_read(bags, tmp_path):
    """rosbags' mcap reader stops quietly at a damaged chunk; bagio counts and says so."""
    import shutil
    p = tmp_path / "mid"
    shutil.copytree(bags["raw_mcap"]["path"], p)
    [f] = p.glob("*.mcap")
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 20000] = bytes(20000)
    f.write_bytes(bytes(data))
    with bagio.BagReader(p) as bag, pytest.raises(bagio.BagError, match=r"only \d+ of the 20 messages"):
        for _ in bag.iter_messages(bag.image_topics()):
            pass


# ------------------------------------------------------------------------------------ make-bag
def test_make_bag_cli_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys):
    args = ["--seconds", "0.4", "--rate", "5", "--cameras", "a", "--size", "16x12", "--compressed", "png",
            "--storage", "sqlite3"]
    assert make_bag_tool.main([str(tmp_path / "b1"), *args]) == 0
    assert make_bag_tool.main([str(tmp_path / "b2"), *args]) == 0
    read = []
    for b in ("b1", "b2"):
        with bagio.BagReader(tmp_path / b) as bag:
            assert bag.topics() == {"/a/image_raw/compressed": bagio.COMPRESSED}
            read.append([(ts, stamp_ns(m.header.stamp), m.format, bytes(m.data))
                         for _, _, ts, m in bag.iter_messages(["/a/image_raw/compressed"])])
    assert read[0] == read[1] and len(read[0]) == 2 and read[0][0][2] == "rgb8; png compressed rgb8"
    assert make_bag_tool.main([str(tmp_path / "b1"), *args]) == 2
    assert "b1: exists already" in capsys.readouterr().err
    assert make_bag_tool.main([str(tmp_path / "b3"), "--cameras", "a/b"]) == 2


def test_make_bag_encodings_decode_to_the_rendered_frame(tmp_path):
    """Every encoding make_bag writes, read back and converted as the node does, is the rendered frame:
    exactly for the lossless ones; for YUV within the 8-bit rounding of Y, U and V (2 levels) plus
    what chroma subsampling moves (the chroma of a pixel's 2x1 or 2x2 block: at most 1.77 x the
    largest RGB difference inside it, counted as 2 x that over the pixel's 3x3 neighbourhood); for
    Bayer within the integer rounding (1) plus what bilinear demosaicing moves (the neighbours'
    values of each channel: the spread of that channel over 3x3, 5x5 at the border that OpenCV fills
    from the next row or column in)."""
    import cv2
    from mobilevlm_ros.engine.images import ENCODINGS, raw_to_rgb
    from mobilevlm_ros.ros.conversion import raw_image

    def spread(img, r):
        """Per pixel and channel, the largest |img[q] - img[p]| over q within r pixels of p."""
        img = img.astype(int)
        h, w = img.shape[:2]
        pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
        return np.max([np.abs(pad[r + dy:r + dy + h, r + dx:r + dx + w] - img)
                       for dy in range(-r, r + 1) for dx in range(-r, r + 1)], axis=0)

    for size in ((64, 48), (33, 25)):
        rgb = render_frame(1, 3, RATE, *size)
        for enc, spec in ENCODINGS.items():
            if spec.layout in ("yuv422", "nv21") and size[0] % 2:
                continue                                  # needs an even size (test_images checks the error)
            path = tmp_path / f"{enc}-{size[0]}"
            make_bag(path, seconds=0.8, rate=RATE, cameras=["x", "y"], encoding=enc, size=size, storage="mcap",
                     progress=False)
            with bagio.BagReader(path) as bag:
                msgs = [m for _, _, _, m in bag.iter_messages(["/y/image_raw"])]
            assert (msgs[3].encoding, msgs[3].width, msgs[3].height) == (enc, *size)
            got = raw_to_rgb(raw_image(msgs[3])).astype(int)
            err = np.abs(got - rgb)
            if enc.startswith("mono"):
                assert np.array_equal(got, np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None], 3, 2)), enc
            elif spec.layout == "packed":
                assert np.array_equal(got, rgb), enc
            elif spec.layout == "bayer":
                bound = 1 + spread(rgb, 1)
                bound[[0, -1]], bound[:, [0, -1]] = 1 + spread(rgb, 2)[[0, -1]], 1 + spread(rgb, 2)[:, [0, -1]]
                assert (err <= bound).all(), (enc, size, np.argwhere(err > bound)[:3])
                assert np.median(err) <= 1, enc               # the bounds are loose only at edges
            else:
                block = 0 if spec.layout == "nv24" else 2 * spread(rgb, 1).max(axis=2, keepdims=True)
                assert (err <= 2 + block).all(), (enc, size, np.argwhere(err > 2 + block)[:3])
                assert np.median(err) <= 1, enc

"""Answers drawn on their frames (engine/annotate.py), no ROS: the text band leaves every other pixel
of the frame as it was, the text fits the width and ends with an ellipsis when it is cut, non-ASCII
text is transliterated or shown as '?', any frame size draws, and the engine hands the answered
frame's own pixels (not a newer frame's) to the drawing; errors carry no frame. The node's topics
are tested in test_node.py, replay's answers bag in test_replay.py."""
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from mobilevlm_ros.engine import annotate
from mobilevlm_ros.engine.config import EngineConfig
from mobilevlm_ros.engine.engine import Engine, SimClock
from mobilevlm_ros.engine.frames import NS, Frame
from mobilevlm_ros.engine.images import RawImage
from mobilevlm_ros.engine.requests import Request, Result, Status
from helpers.frames import synthetic_frame

T0 = 1_700_000_000 * NS
LONG = " ".join(f"word{i}" for i in range(400))


def header(stamp_ns):
    return SimpleNamespace(stamp=SimpleNamespace(sec=stamp_ns // NS, nanosec=stamp_ns % NS), frame_id="cam")


def overlay(answer="A red square on a grey floor.", ok=True):
    return annotate.Overlay("What is in the picture?", answer, "front", 420.0, "OK" if ok else "CANCELLED", ok, 1234.0)


def band_top(before_bgr, after_bgr):
    """The first row that the drawing changed (the frame's height if none)."""
    changed = np.flatnonzero((before_bgr != after_bgr).any(axis=(1, 2)))
    return int(changed[0]) if changed.size else before_bgr.shape[0]


# ------------------------------------------------------------------------------------ text
def test_printable_transliterates_or_marks_every_non_ascii_character():
    assert annotate.printable("Café naïve Ünïcode") == "Cafe naive Unicode"
    assert annotate.printable("“quoted” – it’s… straße") == '"quoted" - it\'s... strasse'
    assert annotate.printable("e\u0301") == "e"                     # decomposed accent: NFC, then dropped
    assert annotate.printable("日本 🙂!") == "?? ?!"                  # one '?' per character drawn
    assert annotate.printable("a\nb\tc\x00d") == "a b c?d"
    assert annotate.printable("plain ASCII ~") == "plain ASCII ~"


@pytest.mark.parametrize("width", [160, 640, 1920])
def test_wrap_fits_the_width_and_ends_a_cut_text_with_an_ellipsis(width):
    scale, thick, _, _ = annotate.font_for(width)
    max_w = width - 20
    lines = annotate.wrap(LONG, max_w, scale, thick, 4)
    assert len(lines) == 4 and lines[-1].endswith(annotate.ELLIPSIS)
    assert all(annotate._width(t, scale, thick) <= max_w for t in lines)
    assert " ".join(lines)[:-len(annotate.ELLIPSIS)].startswith("word0 word1 word2")
    short = annotate.wrap("two words", max_w, scale, thick, 4)
    assert short == ["two words"]
    # a word wider than the line is broken, not drawn past the edge
    broken = annotate.wrap("x" * 500, max_w, scale, thick, 50)
    assert len(broken) > 1 and "".join(broken) == "x" * 500
    assert all(annotate._width(t, scale, thick) <= max_w for t in broken)


# ------------------------------------------------------------------------------------ drawing
@pytest.mark.parametrize("h,w", [(480, 640), (1080, 1920), (120, 160)])
def test_text_band_at_the_bottom_leaves_every_other_pixel(h, w):
    frame = synthetic_frame(h, w, seed=3)[:, :, ::-1].copy()         # any BGR picture
    out = frame.copy()
    top = annotate.draw(out, overlay(LONG))
    line_h = annotate.font_for(w)[2]
    assert 0 < top and h - top <= max(annotate.MAX_BAND * h, 3 * line_h) + line_h
    assert band_top(frame, out) >= top                               # nothing drawn above the band
    assert np.array_equal(out[:top], frame[:top])
    darkened = (out[top:] == frame[top:] >> 2).all(axis=2)          # a quarter of the brightness ...
    assert 0.5 < darkened.mean() < 0.98                              # ... under the text
    assert (out[top:] >= 200).all(axis=2).any()                      # white letters


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (3000, 4000), (40, 2000), (2000, 40)])
def test_any_frame_size_draws(h, w):
    rgb = np.full((h, w, 3), 77, np.uint8)
    result = Result(status=Status.OK, answer=LONG, camera="front", header=header(T0), frame_age_ms=12.0,
                    finish_reason="length", image=Frame("front", header(T0), T0, T0, pixels=rgb))
    bgr = annotate.annotate(result, "Q?")
    assert bgr.shape == (h, w, 3) and bgr.dtype == np.uint8
    top = band_top(rgb, bgr)
    assert np.all(bgr[:top] == 77)
    if h >= 1000:
        assert top > h // 2


def test_frames_in_every_form_are_drawn_on_their_own_pixels():
    rgb = synthetic_frame(240, 320, seed=5)
    hd = header(T0)
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    forms = {
        "rgb pixels": Frame("front", hd, T0, T0, pixels=rgb),
        "bgr pixels": Frame("front", hd, T0, T0, pixels=rgb[:, :, ::-1].copy(), channel_order="bgr"),
        "raw rgb8": Frame("front", hd, T0, T0, raw=RawImage("rgb8", 320, 240, 960, 0, rgb.reshape(-1))),
        "raw bgr8": Frame("front", hd, T0, T0, raw=RawImage("bgr8", 320, 240, 960, 0,
                                                              rgb[:, :, ::-1].copy().reshape(-1))),
        "png": Frame("front", hd, T0, T0, compressed=png.tobytes(), fmt="png"),
        "mono": Frame("front", hd, T0, T0, pixels=rgb[:, :, 0].copy()),
    }
    for name, frame in forms.items():
        before = annotate.frame_bgr(frame)
        want = cv2.cvtColor(rgb[:, :, 0], cv2.COLOR_GRAY2BGR) if name == "mono" else rgb[:, :, ::-1]
        assert np.array_equal(before, want), name
        bgr = annotate.annotate(Result(status=Status.OK, answer="yes", camera="front", header=hd, image=frame), "Q?")
        top = band_top(before, bgr)
        assert top > 120 and np.array_equal(bgr[:top], want[:top]), name
    assert annotate.annotate(Result(status=Status.NO_FRAME, error="no frame"), "Q?") is None
    jpeg = annotate.encode_jpeg(bgr, 80)
    assert jpeg[:3] == b"\xff\xd8\xff" and cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == bgr.shape


# ------------------------------------------------------------------------------------ the engine
def test_engine_results_carry_the_answered_frame_not_a_newer_one(torch_model):
    clock = SimClock(T0)
    engine = Engine(torch_model, EngineConfig(max_new_tokens=3, vision_rate_hz=0.0, max_frame_age_s=0.0),
                    clock=clock, simulated=True)
    assert engine.submit(Request("Q?")).result(0).image is None                  # NO_FRAME: nothing to draw on
    frames = [synthetic_frame(120, 160, seed=s) for s in (1, 2)]
    for i, rgb in enumerate(frames):
        clock.set(T0 + i * NS)
        engine.offer_raw("front", header(T0 + i * NS), T0 + i * NS,
                         RawImage("rgb8", 160, 120, 480, 0, rgb.reshape(-1)))
        engine.vision_step()
    ticket = engine.submit(Request("Q?", stamp_ns=T0))      # about the first frame, the second is newer
    engine.run_pending()
    r = ticket.result(0)
    assert r.success and r.stamp_ns == T0
    bgr = annotate.annotate(r, "Q?")
    top = band_top(frames[0][:, :, ::-1], bgr)
    assert top > 40 and np.array_equal(bgr[:top], frames[0][:top, :, ::-1])
    # without keep_frame_images the engine keeps no pixels, and nothing is drawn
    lean = Engine(torch_model, EngineConfig(max_new_tokens=3, vision_rate_hz=0.0, keep_frame_images=False),
                  clock=clock, simulated=True)
    lean.offer_raw("front", header(clock()), clock(), RawImage("rgb8", 160, 120, 480, 0, frames[1].reshape(-1)))
    lean.vision_step()
    ticket = lean.submit(Request("Q?"))
    lean.run_pending()
    r = ticket.result(0)
    assert r.success and r.image is None and annotate.annotate(r, "Q?") is None

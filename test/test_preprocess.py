"""Preprocessing: reference semantics (pad with the mean colour, PIL bicubic, normalise)."""
import numpy as np
import pytest
from PIL import Image

from mobilevlm_ros.core.errors import ImageError
from mobilevlm_ros.core.preprocess import (CLIP_MEAN, CLIP_STD, PAD_RGB, as_rgb, pad_to_square,
                                           preprocess, preprocess_uint8)
from helpers.frames import FRAMES, synthetic_frame


def reference_pixels(rgb: np.ndarray) -> np.ndarray:
    """The reference pipeline spelled out with PIL: expand2square, resize shortest edge, centre crop."""
    img = Image.fromarray(rgb)
    w, h = img.size
    if w != h:
        side = max(w, h)
        sq = Image.new("RGB", (side, side), PAD_RGB)
        sq.paste(img, ((side - w) // 2, (side - h) // 2))
        img = sq
    img = img.resize((336, 336), resample=Image.BICUBIC)
    x = np.asarray(img).astype(np.float64) / 255.0
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


@pytest.mark.parametrize("name", list(FRAMES))
def test_matches_reference_semantics(name):
    frame = synthetic_frame(*FRAMES[name])
    ours = preprocess(frame)
    ref = reference_pixels(frame)
    diff = np.abs(ours - ref).max()
    print(f"{name}: max |ours - reference| = {diff:.2e}")
    assert ours.shape == (3, 336, 336) and ours.dtype == np.float32
    assert diff < 1e-5


def test_pad_colour_and_centering():
    frame = np.full((100, 300, 3), 255, np.uint8)
    sq = pad_to_square(frame)
    assert sq.shape == (300, 300, 3)
    assert tuple(sq[0, 0]) == PAD_RGB == (122, 116, 104)
    assert (sq[100:200] == 255).all() and tuple(sq[99, 150]) == PAD_RGB and tuple(sq[200, 150]) == PAD_RGB


def test_bgr_and_mono_and_alpha():
    rgb = synthetic_frame(50, 80)
    np.testing.assert_array_equal(preprocess(rgb[:, :, ::-1].copy(), "bgr"), preprocess(rgb))
    rgba = np.concatenate([rgb, np.full((50, 80, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(as_rgb(rgba), rgb)
    mono = rgb[:, :, 0].copy()
    assert (as_rgb(mono) == mono[:, :, None]).all()
    assert preprocess_uint8(rgb).dtype == np.uint8


@pytest.mark.parametrize("bad", [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10, 2), np.uint8),
                                 np.zeros((10, 10, 3), np.float32), np.zeros((2, 2, 2, 3), np.uint8),
                                 "not an array"])
def test_rejects_bad_frames(bad):
    with pytest.raises(ImageError):
        preprocess(bad)

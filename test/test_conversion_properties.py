"""Property-based tests of the image conversion: for any message, conversion either returns the
exact pixels or raises ImageError; it never crashes with anything else."""
from types import SimpleNamespace

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobilevlm_ros.core.errors import ImageError
from mobilevlm_ros.engine.images import ENCODINGS, compressed_to_rgb, raw_to_rgb
from mobilevlm_ros.ros.conversion import raw_image


def image_to_rgb(msg):
    return raw_to_rgb(raw_image(msg))

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_images(draw):
    enc = draw(st.sampled_from(sorted(ENCODINGS)))
    channels = ENCODINGS[enc][0]
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    pad = draw(st.integers(0, 7))
    seed = draw(st.integers(0, 2 ** 31))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    rows = np.zeros((h, w * channels + pad), np.uint8)
    rows[:, : w * channels] = pixels.reshape(h, -1)
    msg = SimpleNamespace(encoding=enc, width=w, height=h, step=w * channels + pad,
                          is_bigendian=draw(st.sampled_from([0, 1])), data=rows.tobytes())
    return msg, pixels


def expected_rgb(enc, pixels):
    if ENCODINGS[enc][0] == 1:
        return np.repeat(pixels, 3, axis=2)
    rgb = pixels[:, :, :3]
    return rgb[:, :, ::-1] if ENCODINGS[enc][1] == "bgr" else rgb


@SETTINGS
@given(valid_images())
def test_valid_images_convert_exactly(case):
    msg, pixels = case
    out = image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (msg.height, msg.width, 3)
    np.testing.assert_array_equal(out, expected_rgb(msg.encoding, pixels))


@SETTINGS
@given(encoding=st.one_of(st.sampled_from(sorted(ENCODINGS) + ["mono16", "16UC1", "bayer_rggb8",
                                                               "yuv422", "32FC1", "", "RGB8 "]),
                          st.text(max_size=12)),
       width=st.integers(-3, 70000), height=st.integers(-3, 70000), step=st.integers(-5, 300),
       is_bigendian=st.integers(-2, 3), data=st.binary(max_size=600))
def test_arbitrary_messages_never_crash(encoding, width, height, step, is_bigendian, data):
    msg = SimpleNamespace(encoding=encoding, width=width, height=height, step=step,
                          is_bigendian=is_bigendian, data=data)
    try:
        out = image_to_rgb(msg)
    except ImageError as e:
        assert str(e)
        return
    assert out.shape == (height, width, 3)            # accepted only when everything is consistent
    assert step * height == len(data)


@SETTINGS
@given(fmt=st.sampled_from(["jpeg", "png", "rgb8; jpeg compressed bgr8", "", "tiff", "png16"]),
       data=st.binary(max_size=400))
def test_arbitrary_compressed_bytes_never_crash(fmt, data):
    try:
        out = compressed_to_rgb(fmt, data)
    except ImageError as e:
        assert str(e)
        return
    assert out.ndim == 3 and out.shape[2] == 3

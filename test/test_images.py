"""engine/images.py: every raw encoding to RGB as cv_bridge converts it, compressed frames decoded
with OpenCV, and every malformed case with its message.

The reference for raw frames is `cv_bridge_rgb8` below: cv_bridge's `toCvCopy(msg, "rgb8")` step by
step (cv_bridge/src/cv_bridge.cpp: matFromImage, getConversionCodes, the 16 -> 8 bit convertTo),
written here independently of images.py. Semantic tests pin what the OpenCV codes mean (which
Bayer pattern is which, U/V order) so that a table copied wrongly on both sides cannot pass.
"""
import io
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from helpers.skips import skip_reason_if_missing
from mobilevlm_ros.core.errors import ImageError
from mobilevlm_ros.engine import images
from mobilevlm_ros.engine.images import (ENCODINGS, MAX_DIM, SUPPORTED, RawImage, check_compressed, check_raw,
                                         compressed_to_rgb, raw_to_rgb)
from mobilevlm_ros.ros.conversion import raw_image, stamp_ns

RNG = np.random.default_rng(0)
H, W = 5, 7
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W, 1), dtype=np.uint8)
MONO = RNG.integers(0, 256, (H, W), dtype=np.uint8)

# ---------------------------------------------------------------------------- cv_bridge reference
# cv_bridge.cpp getConversionCodes(): the entries X -> RGB (None: SAME_FORMAT, no colour conversion).
CV_BRIDGE_TO_RGB = {
    "mono": cv2.COLOR_GRAY2RGB, "rgb": None, "bgr": cv2.COLOR_BGR2RGB,
    "rgba": cv2.COLOR_RGBA2RGB, "bgra": cv2.COLOR_BGRA2RGB,
    "yuv422": cv2.COLOR_YUV2RGB_UYVY, "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2,
    "bayer_rggb": cv2.COLOR_BayerBG2RGB, "bayer_bggr": cv2.COLOR_BayerRG2RGB,
    "bayer_gbrg": cv2.COLOR_BayerGR2RGB, "bayer_grbg": cv2.COLOR_BayerGB2RGB,
}
# sensor_msgs image_encodings: numChannels() and bitDepth() of the packed encodings
CHANNELS = {"mono": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4, "yuv422": 2, "yuv422_yuy2": 2,
            "bayer_rggb": 1, "bayer_bggr": 1, "bayer_gbrg": 1, "bayer_grbg": 1}
ALIASES = {"uyvy": "yuv422", "yuyv": "yuv422_yuy2"}
PATTERNS = ("rggb", "bggr", "gbrg", "grbg")


def split(encoding):
    """'bgra16' -> ('bgra', 16); 'yuv422' -> ('yuv422', 8)."""
    e = ALIASES.get(encoding, encoding)
    if e.startswith("yuv422"):
        return e, 8
    return (e[:-2], 16) if e.endswith("16") else (e[:-1], 8)


def cv_bridge_rgb8(msg):
    """cv_bridge::toCvCopy(msg, "rgb8") for the encodings cv_bridge converts (not nv21/nv24)."""
    base, bits = split(msg.encoding)
    c, size = CHANNELS[base], bits // 8
    buf = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)[:, :msg.width * c * size]
    if bits == 16:      # matFromImage: swapped into this machine's order when the message's differs
        buf = buf.view(">u2" if msg.is_bigendian else "<u2").astype(np.uint16)
    mat = buf.reshape(msg.height, msg.width, c) if c > 1 else buf.reshape(msg.height, msg.width)
    code = CV_BRIDGE_TO_RGB[base]
    out = mat.copy() if code is None else cv2.cvtColor(mat, code)
    if bits == 16:
        # convertTo(CV_8U, 255. / 65535.) rounds v / 257 to nearest; v / 257 is never k + 1/2, so this
        # is (v + 128) // 257 exactly
        out = ((out.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return out


def nv_reference(msg):
    """nv21: OpenCV's NV21 code on the planes. nv24 (no OpenCV code): each pixel made a 2x2 block of
    an NV12 frame (same chroma), converted with OpenCV's NV12 code and sampled back."""
    data = np.frombuffer(bytes(msg.data), np.uint8)
    h, w, step = msg.height, msg.width, msg.step
    if msg.encoding == "nv21":
        return cv2.cvtColor(data.reshape(h * 3 // 2, step)[:, :w], cv2.COLOR_YUV2RGB_NV21)
    y = data[:h * step].reshape(h, step)[:, :w]
    uv = data[h * step:].reshape(h, 2 * step)[:, :2 * w]
    nv12 = np.concatenate([np.repeat(np.repeat(y, 2, 0), 2, 1), uv])
    return cv2.cvtColor(nv12, cv2.COLOR_YUV2RGB_NV12)[::2, ::2]


def reference_rgb8(msg):
    return nv_reference(msg) if msg.encoding in ("nv21", "nv24") else cv_bridge_rgb8(msg)


# ------------------------------------------------------------------------------------ messages
def msg(encoding, samples, pad=0, bigendian=0, **override):
    """A sensor_msgs/Image (its fields) of packed `samples` (HxW or HxWxC, uint8 or uint16 written in
    the byte order of `bigendian`), each row followed by `pad` bytes 0xEE; `override` sets fields."""
    samples = np.asarray(samples)
    h, w = samples.shape[:2]
    if samples.dtype == np.uint16:
        samples = samples.astype(">u2" if bigendian else "<u2")
    rows = np.frombuffer(samples.tobytes(), np.uint8).reshape(h, -1)
    rows = np.concatenate([rows, np.full((h, pad), 0xEE, np.uint8)], axis=1)
    fields = dict(encoding=encoding, width=w, height=h, step=rows.shape[1], is_bigendian=bigendian,
                  data=rows.tobytes())
    return SimpleNamespace(**{**fields, **override})


def planar_msg(encoding, luma, chroma, pad=0, **override):
    """nv21 (chroma: the (H/2)xW VU plane) or nv24 (chroma: the Hx2W UV plane): Y rows of step =
    W + pad bytes, chroma rows of step (nv21) or 2 x step (nv24) bytes."""
    h, w = luma.shape
    step = w + pad
    chroma_step = step if encoding == "nv21" else 2 * step

    def padded(a, width):
        return np.concatenate([a, np.full((a.shape[0], width - a.shape[1]), 0xEE, np.uint8)], axis=1)

    data = padded(luma, step).tobytes() + padded(chroma, chroma_step).tobytes()
    return SimpleNamespace(**{**dict(encoding=encoding, width=w, height=h, step=step, is_bigendian=0,
                                     data=data), **override})


def random_msg(encoding, h, w, pad=0, bigendian=0, seed=0):
    rng = np.random.default_rng(seed)
    if encoding in ("nv21", "nv24"):
        chroma = (h // 2, w) if encoding == "nv21" else (h, 2 * w)
        return planar_msg(encoding, rng.integers(0, 256, (h, w), dtype=np.uint8),
                          rng.integers(0, 256, chroma, dtype=np.uint8), pad)
    base, bits = split(encoding)
    c = CHANNELS[base]
    dtype = np.uint16 if bits == 16 else np.uint8
    shape = (h, w) if c == 1 else (h, w, c)
    return msg(encoding, rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype), pad, bigendian)


def fits(encoding, h, w):
    """Whether an encoding can have this size (images.check_geometry's rules, written again)."""
    layout = ENCODINGS[encoding].layout
    return not ((layout == "yuv422" and w % 2) or (layout == "nv21" and (w % 2 or h % 2))
                or (layout == "bayer" and (w < 3 or h < 3)))


def to_rgb(m):
    return raw_to_rgb(raw_image(m))


# ------------------------------------------------------------------- every encoding vs cv_bridge
SIZES = [(5, 7), (6, 8), (3, 3), (8, 1), (1, 10)]
GOLDEN = [(e, h, w, pad, be) for e in ENCODINGS for (h, w) in SIZES if fits(e, h, w)
          for pad in (0, 4) for be in ((0, 1) if ENCODINGS[e].bits == 16 else (0,))]


def test_the_encodings_are_those_cv_bridge_converts_plus_nv21_nv24():
    bridge = {f"{b}{n}" for b in ("mono", "rgb", "bgr", "rgba", "bgra") for n in (8, 16)}
    bridge |= {f"bayer_{p}{n}" for p in PATTERNS for n in (8, 16)} | {"yuv422", "yuv422_yuy2"}
    assert set(ENCODINGS) == bridge | {"nv21", "nv24"} | set(ALIASES)
    assert SUPPORTED == ", ".join(ENCODINGS)


@pytest.mark.parametrize("encoding, h, w, pad, bigendian", GOLDEN,
                         ids=[f"{e}-{h}x{w}-pad{p}{'-be' if b else ''}" for e, h, w, p, b in GOLDEN])
def test_every_encoding_equals_the_reference(encoding, h, w, pad, bigendian):
    m = random_msg(encoding, h, w, pad, bigendian, seed=h * 100 + w + pad)
    check_raw(raw_image(m))
    rgb = to_rgb(m)
    assert rgb.dtype == np.uint8 and rgb.shape == (h, w, 3) and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, reference_rgb8(m))


@pytest.mark.parametrize("encoding", [e for e in ENCODINGS if ENCODINGS[e].bits == 16])
def test_big_endian_16_bit_is_honoured(encoding):
    little = random_msg(encoding, 6, 9, pad=2, bigendian=0, seed=5)
    big = random_msg(encoding, 6, 9, pad=2, bigendian=1, seed=5)       # the same samples
    assert little.data != big.data
    np.testing.assert_array_equal(to_rgb(big), to_rgb(little))
    wrong = SimpleNamespace(**{**vars(big), "is_bigendian": 0})
    assert not np.array_equal(to_rgb(wrong), to_rgb(little))


def test_16_bit_scaling_is_cv_bridges_rounding():
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    rgb = to_rgb(msg("mono16", v))
    np.testing.assert_array_equal(rgb[..., 0], np.round(v / 257.0).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all()
    flat = v.reshape(-1)
    for value, expected in ((0, 0), (128, 0), (129, 1), (257, 1), (385, 1), (386, 2), (65535, 255)):
        assert rgb.reshape(-1, 3)[flat == value, 0].tolist() == [expected], value


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bayer_pattern_names_the_top_left_2x2_block(pattern, bits):
    """A uniform colour sampled through the named mosaic comes back exactly (inside the border):
    a wrong OpenCV code would swap red and blue or take green for them."""
    colour = {"r": 200, "g": 110, "b": 30}
    h, w = 9, 7                                     # odd sizes: the mosaic is cut mid-pattern
    mosaic = np.empty((h, w), np.uint16 if bits == 16 else np.uint8)
    for i, ch in enumerate(pattern):
        mosaic[i // 2::2, i % 2::2] = colour[ch] * (257 if bits == 16 else 1)
    rgb = to_rgb(msg(f"bayer_{pattern}{bits}", mosaic))
    assert (rgb[1:-1, 1:-1] == [200, 110, 30]).all(), rgb[1:-1, 1:-1].reshape(-1, 3)[:4]


def bt601_video(rgb):
    """Y'CbCr of RGB, ITU-R BT.601 video range (Y 16..235, Cb/Cr 16..240), by the formula."""
    r, g, b = (np.asarray(rgb, float)[..., i] / 255 for i in range(3))
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    return [np.clip(np.round(c), 0, 255).astype(np.uint8) for c in (y, cb, cr)]


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (128, 128, 128), (230, 180, 40)]


@pytest.mark.parametrize("encoding", ["yuv422", "uyvy", "yuv422_yuy2", "yuyv", "nv21", "nv24"])
@pytest.mark.parametrize("colour", COLOURS)
def test_yuv_byte_order_and_colours(encoding, colour):
    """Frames written from the BT.601 formula decode to the colour: U/V or Y/chroma order mistakes
    would turn red into blue or grey. 2 levels: the rounding of Y, Cb and Cr to integers."""
    h, w = 4, 6
    y, u, v = (np.full((h, w), c, np.uint8) for c in bt601_video(colour))
    if encoding in ("yuv422", "uyvy"):
        m = msg(encoding, np.stack([u, y, v, y], -1)[:, ::2].reshape(h, w, 2))
    elif encoding in ("yuv422_yuy2", "yuyv"):
        m = msg(encoding, np.stack([y, u, y, v], -1)[:, ::2].reshape(h, w, 2))
    elif encoding == "nv21":
        m = planar_msg("nv21", y, np.stack([v, u], -1)[::2, ::2].reshape(h // 2, w))
    else:
        m = planar_msg("nv24", y, np.stack([u, v], -1).reshape(h, 2 * w))
    got = to_rgb(m).astype(int)
    assert np.abs(got - colour).max() <= 2, (got[0, 0], colour)


# ------------------------------------------------------------ 8-bit encodings, exact expectations
@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding, pixels, expected", [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[:, :, ::-1], RGB),
    ("rgba8", np.concatenate([RGB, ALPHA], axis=2), RGB),
    ("bgra8", np.concatenate([RGB[:, :, ::-1], ALPHA], axis=2), RGB),
    ("mono8", MONO, np.repeat(MONO[:, :, None], 3, axis=2)),
    ("RGB8 ", RGB, RGB),                            # case and surrounding spaces are forgiven
])
def test_8_bit_encodings(encoding, pixels, expected, pad):
    rgb = to_rgb(msg(encoding, np.ascontiguousarray(pixels), pad=pad))
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    np.testing.assert_array_equal(rgb, expected)


def test_raw_to_rgb_returns_a_copy():
    data = np.ascontiguousarray(RGB).reshape(-1).copy()
    rgb = raw_to_rgb(RawImage("rgb8", W, H, W * 3, 0, data))
    assert not np.shares_memory(rgb, data)


def test_big_endian_flag_is_irrelevant_for_8_bit():
    np.testing.assert_array_equal(to_rgb(msg("rgb8", RGB, bigendian=1)), RGB)


@pytest.mark.parametrize("encoding", ["rgb8", "bgra16", "bayer_gbrg16", "yuv422_yuy2", "nv21", "nv24"])
def test_validation_only_makes_views_of_the_message_data(encoding):
    """check_raw's work is O(1): the checks, then views of the data (what raw_to_rgb converts)."""
    raw = raw_image(random_msg(encoding, 6, 8, pad=2))
    assert check_raw(raw) is None
    _, views = images._layout(raw)
    for view in views if isinstance(views, tuple) else (views,):
        assert not view.flags.owndata and np.shares_memory(view, raw.data)


@pytest.mark.parametrize("bigendian", [0, 1])
def test_real_sensor_msgs_image(bigendian):
    reason = skip_reason_if_missing("sensor_msgs.msg")
    if reason:
        pytest.skip(reason)
    from sensor_msgs.msg import Image
    for encoding in ("bgr8", "rgb16", "bayer_rggb16", "nv21"):
        fields = random_msg(encoding, 6, 8, pad=2, bigendian=bigendian if "16" in encoding else 0)
        m = Image(encoding=fields.encoding, width=fields.width, height=fields.height, step=fields.step,
                  is_bigendian=fields.is_bigendian, data=fields.data)
        np.testing.assert_array_equal(to_rgb(m), reference_rgb8(fields))


def test_stamp_ns():
    assert stamp_ns(SimpleNamespace(sec=12, nanosec=345)) == 12_000_000_345


# --------------------------------------------------------------------------- rejected encodings
@pytest.mark.parametrize("encoding, why", [
    ("16UC1", "depth and float images"), ("32FC1", "depth and float images"), ("64FC3", "depth and float"),
    ("16SC1", "depth and float images"), ("8UC3", "the channel order of generic 8UCn"), ("8SC1", "the channel order"),
    ("", "empty encoding"), ("jpeg", "unknown encoding"), ("rgb32", "unknown encoding"),
    ("bayer_rggb12", "not one of the Bayer encodings"), ("bayer_xyzw8", "not one of the Bayer"),
    ("nv12", "this YUV layout is not converted"), ("i420", "this YUV layout is not converted"),
    ("yvyu", "this YUV layout is not converted"),
])
def test_unsupported_encodings_are_rejected_with_the_reason(encoding, why):
    with pytest.raises(ImageError) as e:
        check_raw(raw_image(msg(encoding, RGB)))
    assert f"unsupported encoding '{encoding}': {why}" in str(e.value)
    assert f"(supported: {SUPPORTED})" in str(e.value)
    assert "bayer_grbg16" in SUPPORTED and "nv24" in SUPPORTED and "rgb8, bgr8, rgba8, bgra8, mono8" in SUPPORTED


def _esc(text):
    return text.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")


@pytest.mark.parametrize("override, message", [
    ({"width": 0, "step": 0, "data": b""}, "zero size: width 0, height 5"),
    ({"height": 0, "data": b""}, "zero size: width 7, height 0"),
    ({"width": MAX_DIM + 1}, "too large"),
    ({"width": 20000, "height": 20000}, "too large"),
    ({"step": 20}, "step 20 is smaller than a row: width 7 x 3 bytes per pixel (rgb8) = 21"),
    ({"is_bigendian": 2}, "is_bigendian must be 0 or 1, got 2"),
])
def test_malformed_images(override, message):
    with pytest.raises(ImageError, match=_esc(message)):
        to_rgb(msg("rgb8", RGB, **override))


def test_truncated_and_oversized_data():
    m = msg("rgb8", RGB)
    m.data = m.data[:-1]
    with pytest.raises(ImageError, match=r"truncated image: data has 104 bytes, expected step x height = "
                                         r"21 x 5 = 105"):
        check_raw(raw_image(m))
    m.data = bytes(105 + 4)
    with pytest.raises(ImageError, match=r"data has 109 bytes, more than step x height = 21 x 5 = 105"):
        check_raw(raw_image(m))


@pytest.mark.parametrize("m, message", [
    (random_msg("yuv422_yuy2", 4, 8, pad=0), None),
    (msg("yuv422_yuy2", np.zeros((4, 7, 2), np.uint8)),
     "yuv422_yuy2 needs an even width (two pixels share one U and one V sample), got width 7"),
    (msg("uyvy", np.zeros((4, 3, 2), np.uint8)), "uyvy needs an even width"),
    (msg("yuv422", np.zeros((4, 8, 2), np.uint8), step=8),
     "step 8 is smaller than a row: width 8 x 2 bytes per pixel (yuv422) = 16"),
    (planar_msg("nv21", np.zeros((4, 7), np.uint8), np.zeros((2, 7), np.uint8)),
     "nv21 needs an even width and height (2x2 pixels share one V and one U sample), got 7x4"),
    (planar_msg("nv21", np.zeros((5, 8), np.uint8), np.zeros((2, 8), np.uint8)),
     "nv21 needs an even width and height"),
    (planar_msg("nv21", np.zeros((4, 8), np.uint8), np.zeros((2, 8), np.uint8), step=6),
     "step 6 is smaller than a row: width 8 x 1 bytes per pixel (nv21 Y plane) = 8"),
    (planar_msg("nv21", np.zeros((4, 8), np.uint8), np.zeros((1, 8), np.uint8)),
     "truncated image: data has 40 bytes, expected step x height x 3/2 = 8 x 4 x 3/2 = 48"),
    (planar_msg("nv24", np.zeros((3, 5), np.uint8), np.zeros((3, 10), np.uint8), data=bytes(46)),
     "data has 46 bytes, more than step x height x 3 = 5 x 3 x 3 = 45"),
    (msg("bayer_rggb8", np.zeros((2, 8), np.uint8)), "bayer_rggb8 needs at least 3x3 pixels to demosaic, got 8x2"),
    (msg("bayer_bggr16", np.zeros((6, 2), np.uint16)), "bayer_bggr16 needs at least 3x3 pixels"),
    (msg("mono16", np.zeros((4, 6), np.uint16), pad=1),
     "step 13 is odd: rows of 16-bit samples (mono16) must start on a 2-byte boundary"),
    (msg("mono16", np.zeros((4, 6), np.uint8)),
     "step 6 is smaller than a row: width 6 x 2 bytes per pixel (mono16) = 12"),
    (msg("rgba16", np.zeros((4, 6, 4), np.uint16), data=bytes(4 * 48 - 2)),
     "truncated image: data has 190 bytes, expected step x height = 48 x 4 = 192"),
])
def test_geometry_of_the_new_formats(m, message):
    if message is None:
        assert to_rgb(m).shape == (4, 8, 3)
        return
    with pytest.raises(ImageError, match=_esc(message)):
        check_raw(raw_image(m))
    with pytest.raises(ImageError, match=_esc(message)):
        to_rgb(m)


# ------------------------------------------------------------------------------------ compressed
def encoded(pixels, fmt, **save):
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, fmt, **save)
    return buf.getvalue()


def pillow_rgb(data):
    """What the Pillow decoder before OpenCV returned: the reference for lossless PNG."""
    with PILImage.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("fmt", ["png", "rgb8; png compressed rgb8", ""])
def test_png_is_lossless(fmt):
    np.testing.assert_array_equal(compressed_to_rgb(fmt, encoded(RGB, "PNG")), RGB)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "1"])
def test_png_modes_decode_as_pillow_decoded_them(mode):
    if mode == "RGBA":
        data = encoded(np.concatenate([RGB, ALPHA], axis=2), "PNG")
    elif mode == "LA":
        data = encoded(np.concatenate([MONO[..., None], ALPHA], axis=2), "PNG")
    elif mode == "P":
        buf = io.BytesIO()
        PILImage.fromarray(RGB).convert("P").save(buf, "PNG")
        data = buf.getvalue()
    elif mode == "1":
        buf = io.BytesIO()
        PILImage.fromarray(MONO).convert("1").save(buf, "PNG")
        data = buf.getvalue()
    else:
        data = encoded(MONO, "PNG")
    rgb = compressed_to_rgb("png", data)
    assert rgb.shape == (H, W, 3)
    np.testing.assert_array_equal(rgb, pillow_rgb(data))


@pytest.mark.parametrize("fmt", ["jpeg", "bgr8; jpeg compressed bgr8"])
def test_jpeg(fmt):
    flat = np.full((32, 48, 3), (200, 40, 10), np.uint8)
    rgb = compressed_to_rgb(fmt, encoded(flat, "JPEG", quality=95))
    assert rgb.shape == (32, 48, 3)
    assert np.abs(rgb.astype(int) - flat).max() <= 4          # colours kept, channel order right


@pytest.mark.parametrize("save", [{}, {"progressive": True}, {"subsampling": 0}, {"mode": "L"}, {"mode": "CMYK"}])
def test_jpeg_variants_decode_close_to_pillow(save):
    save = dict(save)
    im = PILImage.fromarray(RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    if "mode" in save:
        im = im.convert(save.pop("mode"))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **save)
    rgb = compressed_to_rgb("jpeg", buf.getvalue())
    assert rgb.shape == (24, 40, 3)
    # the same libjpeg decoder underneath: equal but for IDCT/upsampling rounding and CMYK inversion
    assert np.abs(rgb.astype(int) - pillow_rgb(buf.getvalue())).mean() <= 2


def test_jpeg_with_a_big_exif_segment_and_fill_bytes_before_the_frame():
    data = encoded(RGB, "JPEG", quality=95)
    app1 = b"\xff\xe1" + (2 + 60000).to_bytes(2, "big") + b"Exif\0\0" + bytes(59994)
    data = data[:2] + app1 + b"\xff\xff" + data[2:]         # fill bytes 0xFF before a marker are legal
    assert compressed_to_rgb("jpeg", data).shape == (H, W, 3)


def test_exif_orientation_is_not_applied():
    exif = PILImage.Exif()
    exif[0x0112] = 6                                         # "rotate 90 degrees"
    data = encoded(np.zeros((10, 30, 3), np.uint8), "JPEG", exif=exif.tobytes())
    assert compressed_to_rgb("jpeg", data).shape == (10, 30, 3)


def _with_sof(data, precision=None, height=None):
    data = bytearray(data)
    i = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    if precision is not None:
        data[i + 4] = precision
    if height is not None:
        struct.pack_into(">H", data, i + 5, height)
    return bytes(data)


@pytest.mark.parametrize("data, fmt, message", [
    (b"", "jpeg", "compressed image has no data"),
    (b"GIF89a......", "gif", "neither JPEG nor PNG"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "png", "cannot decode png image (48 bytes): no IHDR chunk"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 40, "jpeg", "cannot decode jpeg image (44 bytes): marker segment of length 0"),
    (b"\xff\xd8\xff", "jpeg", "cannot decode jpeg image (3 bytes): the data ends before the frame header"),
    (b"\xff\xd8\xff\xda\x00\x08" + bytes(20), "jpeg", "no frame header before the scan"),
    (b"\xff\xd8\xff\xe0\x00\x04\x00\x00\x12", "jpeg", "no marker at byte 8"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "16UC1; compressedDepth png", "compressedDepth"),
    (_with_sof(encoded(RGB, "JPEG"), precision=12), "jpeg",
     "jpeg image has 12 bits per sample: only 8-bit images are supported"),
    (_with_sof(encoded(RGB, "JPEG"), height=0), "jpeg", "the frame header gives no height (DNL)"),
    (_with_sof(encoded(RGB, "JPEG"), height=30000), "jpeg", "jpeg image is too large: 7x30000"),
])
def test_bad_compressed_data(data, fmt, message):
    with pytest.raises(ImageError, match=_esc(message)):
        compressed_to_rgb(fmt, data)


def test_check_compressed_sniffs_the_container():
    assert check_compressed("whatever", encoded(RGB, "PNG")) == "png"
    assert check_compressed("png", encoded(RGB, "JPEG")) == "jpeg"


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_truncated_compressed_data(kind, keep):
    data = encoded(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), kind)
    cut = data[:int(len(data) * keep)] if keep > 0 else data[:keep]
    with pytest.raises(ImageError, match=f"cannot decode {kind.lower()} image"):
        compressed_to_rgb(kind.lower(), cut)


@pytest.mark.parametrize("pixels", [np.full((4, 4), 40000, np.uint16), np.full((4, 4, 3), 300, np.uint16)])
def test_16_bit_png_is_rejected(pixels):
    data = cv2.imencode(".png", pixels)[1].tobytes()
    with pytest.raises(ImageError, match="png image has 16 bits per sample: 16-bit and float images are not supported"):
        compressed_to_rgb("mono16; png compressed mono16", data)


def _png_claiming(width, height):
    data = bytearray(encoded(RGB, "PNG"))
    # IHDR: 8-byte signature, 4 length, 4 type, then width and height; fix its CRC after patching
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("width, height, message", [
    (20_000, 100, "png image is too large: 20000x100"),
    (100_000, 100_000, "png image is too large: 100000x100000"),
    (0, 5, "png image has zero size: width 0, height 5"),
])
def test_png_dimensions_are_refused_from_the_header_before_decoding(width, height, message, monkeypatch):
    def imdecode(*_):
        raise AssertionError("decoded a frame whose header is out of limits")
    monkeypatch.setattr(images.cv2, "imdecode", imdecode)
    with pytest.raises(ImageError, match=message):
        compressed_to_rgb("png", _png_claiming(width, height))


# ---------------------------------------------------------------------------- property tests
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_messages(draw):
    enc = draw(st.sampled_from(sorted(ENCODINGS)))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    if ENCODINGS[enc].layout in ("yuv422", "nv21"):
        w += w % 2
    if ENCODINGS[enc].layout == "nv21":
        h += h % 2
    if ENCODINGS[enc].layout == "bayer":
        h, w = max(h, 3), max(w, 3)
    pad = draw(st.integers(0, 7)) * (2 if ENCODINGS[enc].bits == 16 else 1)
    return random_msg(enc, h, w, pad, draw(st.sampled_from([0, 1])), seed=draw(st.integers(0, 2 ** 31)))


@SETTINGS
@given(valid_messages())
def test_valid_messages_convert_exactly(m):
    out = to_rgb(m)
    assert out.dtype == np.uint8 and out.shape == (m.height, m.width, 3)
    np.testing.assert_array_equal(out, reference_rgb8(m))


@SETTINGS
@given(encoding=st.one_of(st.sampled_from(sorted(ENCODINGS) + ["16UC1", "bayer_rggb12", "nv12", "32FC1", "",
                                                               "RGB8 ", "Mono16"]),
                          st.text(max_size=12)),
       width=st.integers(-3, 70000), height=st.integers(-3, 70000), step=st.integers(-5, 300),
       is_bigendian=st.integers(-2, 3), data=st.binary(max_size=600))
def test_arbitrary_messages_never_crash(encoding, width, height, step, is_bigendian, data):
    m = SimpleNamespace(encoding=encoding, width=width, height=height, step=step, is_bigendian=is_bigendian,
                        data=data)
    try:
        out = to_rgb(m)
    except ImageError as e:
        assert str(e)
        return
    assert out.shape == (height, width, 3)            # accepted only when everything is consistent
    layout = ENCODINGS[encoding.strip().lower()].layout
    assert len(data) == step * height * {"nv21": 3 / 2, "nv24": 3}.get(layout, 1)


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


VALID_FILES = [encoded(RGB, "JPEG"), encoded(RGB, "PNG"), encoded(MONO, "PNG"),
               encoded(RGB, "JPEG", progressive=True)]


@SETTINGS
@given(which=st.integers(0, len(VALID_FILES) - 1), cut=st.integers(0, 4000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6))
def test_damaged_jpeg_and_png_files_never_crash(which, cut, flips):
    """Real files with bytes changed and the end cut off: decoded within the header's size, or an ImageError."""
    data = bytearray(VALID_FILES[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[:max(1, len(data) - cut % len(data))])
    try:
        out = compressed_to_rgb("", data)
    except ImageError as e:
        assert str(e)
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[0] <= MAX_DIM and out.shape[1] <= MAX_DIM


# ------------------------------------------------------------------------ the reliability corpus
def _corpus_frames():
    from helpers import malformed_corpus
    return [c for c in malformed_corpus.FRAMES if not {"stamp_offset_s", "stamp_sec"} & set(c[2])]


@pytest.mark.parametrize("case", _corpus_frames(), ids=[c[0] for c in _corpus_frames()])
def test_corpus_frames_get_their_documented_error_without_a_node(case):
    """test_reliability sends these to a live node; here the same fields meet images.py directly
    (raw frames must be refused by check_raw, in the image callback, not later)."""
    from helpers import malformed_corpus
    _, topic, fields, expected = case
    fields = dict(fields)
    with pytest.raises(ImageError) as e:
        if topic == "compressed":
            check_compressed(fields["format"], fields["data"])
            compressed_to_rgb(fields["format"], fields["data"])
        else:       # what helpers.ros.Client.publish makes of the fields
            pixels = fields.pop("pixels", malformed_corpus.GOOD)
            m = SimpleNamespace(encoding="rgb8", height=pixels.shape[0], width=pixels.shape[1],
                                step=pixels.shape[1] * (pixels.shape[2] if pixels.ndim == 3 else 1) * pixels.itemsize,
                                is_bigendian=0, data=pixels.tobytes())
            for k, v in fields.items():
                setattr(m, k, v)
            check_raw(raw_image(m))
    assert expected in str(e.value)


def test_bench_images_writes_its_tables(tmp_path):
    """The benchmark command runs end to end (tiny frames, one repeat: no timing is judged)."""
    import json
    from mobilevlm_ros.tools.bench import SUBCOMMANDS, main
    assert SUBCOMMANDS["images"] == "mobilevlm_ros.tools.bench.images"
    assert main(["images", "--sizes", "16x12", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "images.json").read_text())
    assert {r["encoding"] for r in result["raw"]} == set(ENCODINGS) - {"uyvy", "yuyv"}
    assert [r["format"] for r in result["compressed"]] == ["jpeg", "png"]
    assert "| bayer_rggb16 |" in (tmp_path / "images.md").read_text() and (tmp_path / "images.png").is_file()
    assert main(["images", "--sizes", "15x12", "--encodings", "yuyv", "--out", str(tmp_path / "odd")]) == 2


def test_readme_lists_exactly_the_encodings_the_code_converts():
    """The README's encoding list is the code's (ENCODINGS), no more, no less."""
    import re
    from pathlib import Path

    from mobilevlm_ros.engine.images import ENCODINGS
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("Raw encodings, converted to RGB")
    listed = set(re.findall(r"`([a-z0-9_]+)`", text[start:text.index("Depth and float images", start)]))
    assert listed == set(ENCODINGS), (sorted(listed - set(ENCODINGS)), sorted(set(ENCODINGS) - listed))

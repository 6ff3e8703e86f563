"""conversion.py: sensor_msgs Image / CompressedImage -> RGB pixels, every encoding and malformed case.

Pure functions on real message objects (sensor_msgs from the ROS 2 wheels); no node, no graph.
"""
import io
import struct
import zlib

import numpy as np
import pytest

from conftest import skip_reason_if_missing

pytestmark = pytest.mark.ros
_reason = skip_reason_if_missing("sensor_msgs.msg")
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from PIL import Image as PILImage  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from mobilevlm_ros.core.errors import ImageError  # noqa: E402
from mobilevlm_ros.engine.images import MAX_DIM, _pixels, compressed_to_rgb, raw_to_rgb  # noqa: E402
from mobilevlm_ros.ros.conversion import raw_image, stamp_ns  # noqa: E402


def image_to_rgb(msg):
    return raw_to_rgb(raw_image(msg))


def image_to_array(msg):
    return _pixels(raw_image(msg))


def compressed_msg_to_rgb(msg):
    return compressed_to_rgb(msg.format, msg.data)

H, W = 5, 7
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (H, W, 1), dtype=np.uint8)
MONO = RNG.integers(0, 256, (H, W), dtype=np.uint8)


def make_image(pixels, encoding, pad=0, **override):
    """A sensor_msgs/Image of `pixels`, rows padded by `pad` bytes; `override` sets fields afterwards."""
    rows = pixels.reshape(pixels.shape[0], -1)
    if pad:
        rows = np.concatenate([rows, np.full((rows.shape[0], pad), 0xEE, np.uint8)], axis=1)
    msg = Image()
    msg.height, msg.width = pixels.shape[:2]
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = rows.shape[1]
    msg.data = rows.tobytes()
    for k, v in override.items():
        setattr(msg, k, v)
    return msg


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding, pixels, expected", [
    ("rgb8", RGB, RGB),
    ("bgr8", RGB[:, :, ::-1], RGB),
    ("rgba8", np.concatenate([RGB, ALPHA], axis=2), RGB),
    ("bgra8", np.concatenate([RGB[:, :, ::-1], ALPHA], axis=2), RGB),
    ("mono8", MONO, np.repeat(MONO[:, :, None], 3, axis=2)),
])
def test_every_supported_encoding(encoding, pixels, expected, pad):
    msg = make_image(np.ascontiguousarray(pixels), encoding, pad=pad)
    rgb = image_to_rgb(msg)
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    np.testing.assert_array_equal(rgb, expected)


def test_image_to_array_is_a_view_of_the_message_data():
    msg = make_image(RGB, "rgb8", pad=2)
    pixels, order = image_to_array(msg)
    assert order == "rgb" and pixels.shape == (H, W, 3)
    assert not pixels.flags.owndata


def test_big_endian_flag_is_irrelevant_for_8_bit():
    np.testing.assert_array_equal(image_to_rgb(make_image(RGB, "rgb8", is_bigendian=1)), RGB)


@pytest.mark.parametrize("encoding, why", [
    ("mono16", "16-bit"), ("16UC1", "16-bit"), ("rgb16", "16-bit"), ("32FC1", "float"),
    ("bayer_rggb8", "debayered"), ("yuv422", "YUV"), ("yuv422_yuy2", "YUV"),
    ("8UC3", "channel order"), ("", "empty encoding"), ("jpeg", "unknown encoding"),
])
def test_unsupported_encodings_are_rejected_with_the_reason(encoding, why):
    msg = make_image(RGB, encoding)
    with pytest.raises(ImageError) as e:
        image_to_rgb(msg)
    assert f"unsupported encoding '{encoding}'" in str(e.value)
    assert why in str(e.value)
    assert "supported: rgb8, bgr8, rgba8, bgra8, mono8" in str(e.value)


@pytest.mark.parametrize("override, message", [
    ({"width": 0, "step": 0, "data": b""}, "zero size: width 0, height 5"),
    ({"height": 0, "data": b""}, "zero size: width 7, height 0"),
    ({"width": MAX_DIM + 1}, "too large"),
    ({"width": 20000, "height": 20000}, "too large"),
    ({"step": 20}, "step 20 is smaller than a row: width 7 x 3 bytes per pixel (rgb8) = 21"),
    ({"is_bigendian": 2}, "is_bigendian must be 0 or 1, got 2"),
])
def test_malformed_images(override, message):
    msg = make_image(RGB, "rgb8", **override)
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        image_to_rgb(msg)


def test_truncated_and_oversized_data():
    msg = make_image(RGB, "rgb8")
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(ImageError, match=r"truncated image: data has 104 bytes, expected step x height = "
                                         r"21 x 5 = 105"):
        image_to_rgb(msg)
    msg.data = bytes(105 + 4)
    with pytest.raises(ImageError, match=r"data has 109 bytes, more than step x height = 21 x 5 = 105"):
        image_to_rgb(msg)


def test_stamp_ns():
    msg = make_image(RGB, "rgb8")
    msg.header.stamp.sec, msg.header.stamp.nanosec = 12, 345
    assert stamp_ns(msg.header.stamp) == 12_000_000_345


# ----------------------------------------------------------------------------- compressed
def encoded(pixels, fmt, **save):
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, fmt, **save)
    return buf.getvalue()


def compressed(data, fmt="jpeg"):
    msg = CompressedImage()
    msg.format = fmt
    msg.data = data
    return msg


@pytest.mark.parametrize("fmt", ["png", "rgb8; png compressed rgb8", ""])
def test_png_is_lossless(fmt):
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed(encoded(RGB, "PNG"), fmt)), RGB)


def test_png_mono_palette_and_alpha():
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed(encoded(MONO, "PNG"), "png")),
                                  np.repeat(MONO[:, :, None], 3, axis=2))
    rgba = np.concatenate([RGB, ALPHA], axis=2)
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed(encoded(rgba, "PNG"), "png")), RGB)
    pal = PILImage.fromarray(RGB).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed(buf.getvalue(), "png")),
                                  np.asarray(pal.convert("RGB")))


@pytest.mark.parametrize("fmt", ["jpeg", "bgr8; jpeg compressed bgr8"])
def test_jpeg(fmt):
    flat = np.full((32, 48, 3), (200, 40, 10), np.uint8)
    rgb = compressed_msg_to_rgb(compressed(encoded(flat, "JPEG", quality=95), fmt))
    assert rgb.shape == (32, 48, 3)
    assert np.abs(rgb.astype(int) - flat).max() <= 4          # colours kept, channel order right


@pytest.mark.parametrize("data, fmt, message", [
    (b"", "jpeg", "compressed image has no data"),
    (b"GIF89a......", "gif", "neither JPEG nor PNG"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "png", "cannot decode png"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 40, "jpeg", "cannot decode jpeg"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "16UC1; compressedDepth png", "compressedDepth"),
])
def test_bad_compressed_data(data, fmt, message):
    with pytest.raises(ImageError, match=message):
        compressed_msg_to_rgb(compressed(data, fmt))


def test_truncated_jpeg():
    data = encoded(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(ImageError, match="cannot decode jpeg"):
        compressed_msg_to_rgb(compressed(data[: len(data) // 2]))


def test_16_bit_png_is_rejected():
    data = encoded(np.full((4, 4), 40000, np.uint16), "PNG")
    with pytest.raises(ImageError, match="16-bit"):
        compressed_msg_to_rgb(compressed(data, "mono16; png compressed mono16"))


def test_huge_png_header_is_rejected_before_decoding():
    data = bytearray(encoded(RGB, "PNG"))
    # IHDR: 8-byte signature, 4 length, 4 type, then width and height; fix its CRC after patching
    struct.pack_into(">II", data, 16, 20_000, 100)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    with pytest.raises(ImageError, match="too large: 20000x100"):
        compressed_msg_to_rgb(compressed(bytes(data), "png"))


def test_decompression_bomb_is_rejected():
    data = bytearray(encoded(RGB, "PNG"))
    # IHDR: 8-byte signature, 4 length, 4 type, then width and height; fix its CRC after patching
    struct.pack_into(">II", data, 16, 100_000, 100_000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    with pytest.raises(ImageError, match="png image is too large"):
        compressed_msg_to_rgb(compressed(bytes(data), "png"))

"""sensor_msgs/Image and sensor_msgs/CompressedImage -> numpy pixels, with full validation.

Pure functions: they read the message fields only (no rclpy import, no graph), so they run on
messages from a live subscription, from a rosbag reader or built in a test.

Supported `sensor_msgs/Image` encodings (8 bits per channel): rgb8, bgr8, rgba8, bgra8, mono8.
Everything else is rejected with an ImageError that says why and what to do: 16-bit and float
images (mono16, 16UC1, 32FC1, ... depth images are not camera frames for this model), Bayer
patterns (debayer first, e.g. image_proc), YUV (convert to rgb8), and the generic 8UC3/8UC4 types
(channel order unknown: publish rgb8/bgr8).

`sensor_msgs/CompressedImage`: JPEG and PNG (as compressed_image_transport writes them, format
e.g. "jpeg", "png", "bgr8; jpeg compressed bgr8"), decoded with Pillow. compressedDepth and 16-bit
PNGs are rejected. The container is recognised from the data's magic bytes, not from the format
string alone.
"""
from __future__ import annotations

import io
from typing import Tuple

import numpy as np

from ..core.errors import ImageError
from ..core.preprocess import as_rgb

# encoding -> (channels, channel order of the first three channels)
ENCODINGS = {
    "rgb8": (3, "rgb"),
    "bgr8": (3, "bgr"),
    "rgba8": (4, "rgb"),
    "bgra8": (4, "bgr"),
    "mono8": (1, "rgb"),
}
SUPPORTED = ", ".join(ENCODINGS)

MAX_DIM = 16384                     # pixels per side
MAX_PIXELS = 64 * 1024 * 1024       # per frame (a 8192x8192 frame is 64 Mpx)
MAX_COMPRESSED_BYTES = 64 * 1024 * 1024

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _why_unsupported(encoding: str) -> str:
    e = encoding.lower()
    if not e:
        return "empty encoding"
    if "16" in e or "32" in e or "64" in e:
        return "16-bit, 32-bit and float images (depth, thermal) are not supported"
    if e.startswith("bayer"):
        return "Bayer images must be debayered first (e.g. with image_proc)"
    if e.startswith(("yuv", "uyvy", "yuyv", "nv21", "nv24", "i420")):
        return "YUV images must be converted to rgb8 first"
    if e.startswith("8uc") or e.startswith("8sc"):
        return "the channel order of generic 8UCn images is unknown: publish rgb8 or bgr8"
    return "unknown encoding"


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _check_dims(width: int, height: int, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has zero size: width {width}, height {height}")
    if width > MAX_DIM or height > MAX_DIM or width * height > MAX_PIXELS:
        raise ImageError(f"{what} is too large: {width}x{height} (limits: {MAX_DIM} pixels per side, "
                         f"{MAX_PIXELS} pixels)")


def _buffer(data) -> np.ndarray:
    """The message's uint8[] field as a 1-D uint8 array, without a copy where possible."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype == np.uint8 else data.astype(np.uint8).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)       # bytes, bytearray, array.array('B'), memoryview
    except (TypeError, ValueError):
        return np.asarray(data, dtype=np.uint8).reshape(-1)  # a list of ints


def image_to_array(msg) -> Tuple[np.ndarray, str]:
    """Validate a sensor_msgs/Image and view its pixels.

    Returns (pixels, channel_order): a uint8 array HxW (mono8) or HxWxC (C = 3 or 4) that shares
    memory with msg.data (row padding skipped through strides), and "rgb" or "bgr". Raises
    ImageError with the exact fault: unsupported encoding, zero or huge dimensions, a step smaller
    than a row, data shorter (truncated) or longer than step x height, is_bigendian not 0/1.
    """
    encoding = str(msg.encoding).strip()
    key = encoding.lower()
    if key not in ENCODINGS:
        raise ImageError(f"unsupported encoding '{encoding}': {_why_unsupported(encoding)} "
                         f"(supported: {SUPPORTED})")
    channels, order = ENCODINGS[key]
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_dims(width, height)
    if int(msg.is_bigendian) not in (0, 1):
        raise ImageError(f"is_bigendian must be 0 or 1, got {int(msg.is_bigendian)}")
    # is_bigendian does not matter for 8-bit channels, so 0 and 1 are both accepted.
    row = width * channels
    if step < row:
        raise ImageError(f"step {step} is smaller than a row: width {width} x {channels} bytes per pixel "
                         f"({encoding}) = {row}")
    data = _buffer(msg.data)
    expected = step * height
    if data.size < expected:
        raise ImageError(f"truncated image: data has {data.size} bytes, expected step x height = "
                         f"{step} x {height} = {expected}")
    if data.size > expected:
        raise ImageError(f"data has {data.size} bytes, more than step x height = {step} x {height} = "
                         f"{expected}")
    rows = data.reshape(height, step)[:, :row]
    pixels = rows.reshape(height, width) if channels == 1 else rows.reshape(height, width, channels)
    return pixels, order


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image -> contiguous uint8 HxWx3 RGB (a copy). Raises ImageError."""
    pixels, order = image_to_array(msg)
    return as_rgb(np.ascontiguousarray(pixels), order)


def check_compressed(fmt: str, data) -> str:
    """Cheap checks of a sensor_msgs/CompressedImage before it is queued for decoding.

    Returns the container ("jpeg" or "png") found from the magic bytes. Raises ImageError for
    empty or oversized data, compressedDepth, and data that is neither JPEG nor PNG.
    """
    fmt_l = str(fmt).lower()
    buf = _buffer(data)
    if buf.size == 0:
        raise ImageError("compressed image has no data")
    if buf.size > MAX_COMPRESSED_BYTES:
        raise ImageError(f"compressed image is too large: {buf.size} bytes (limit {MAX_COMPRESSED_BYTES})")
    if "compresseddepth" in fmt_l:
        raise ImageError(f"compressedDepth images are not supported (format '{fmt}')")
    head = buf[:8].tobytes()
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    raise ImageError(f"compressed data is neither JPEG nor PNG (format '{fmt}', first bytes "
                     f"{head.hex(' ')})")


def compressed_to_rgb(fmt: str, data) -> np.ndarray:
    """Decode JPEG/PNG bytes of a sensor_msgs/CompressedImage to uint8 HxWx3 RGB with Pillow.

    Raises ImageError for everything check_compressed rejects, dimensions out of limits (checked
    from the header, before decoding), truncated or corrupt data, and 16-bit / float PNGs.
    """
    from PIL import Image

    container = check_compressed(fmt, data)
    raw = _buffer(data).tobytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            _check_dims(im.width, im.height, f"{container} image")
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                raise ImageError(f"{container} image has pixel mode {im.mode}: 16-bit and float images "
                                 f"are not supported")
            im.load()
            rgb = im.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own size check, at open()
        raise ImageError(f"{container} image is too large: {e}") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageError(f"cannot decode {container} image ({len(raw)} bytes): {e}") from None
    return np.asarray(rgb)


def compressed_msg_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage -> uint8 HxWx3 RGB. Raises ImageError."""
    return compressed_to_rgb(msg.format, msg.data)

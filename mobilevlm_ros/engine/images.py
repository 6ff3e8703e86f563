"""Camera pixel formats -> RGB: what the engine encodes, from what a camera driver publishes.

Pure numpy (no rclpy): the same functions serve a live subscription, a rosbag reader and tests.
Two steps, so that the image callback stays cheap and frames that are replaced before they are
encoded are never converted:

    check_raw(img)        in the image callback: the encoding is one we convert, the dimensions,
                          step and data length are consistent (raises ImageError with the fault)
    raw_to_rgb(img)       when the frame is about to be encoded: contiguous uint8 HxWx3 RGB

`RawImage` carries a sensor_msgs/Image's fields (mobilevlm_ros.ros.conversion builds it from a
message without copying its data). Compressed frames (JPEG, PNG): `check_compressed` sniffs the
container from the magic bytes, `compressed_to_rgb` decodes, each with the same limits.

Supported encodings (8 bits per channel): rgb8, bgr8, rgba8, bgra8, mono8. Everything else is
rejected with the reason: 16-bit and float images, Bayer patterns, YUV, generic 8UCn.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import ImageError

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


@dataclass(frozen=True)
class RawImage:
    """The fields of a sensor_msgs/Image; `data` is a 1-D uint8 array (a view where possible)."""
    encoding: str
    width: int
    height: int
    step: int
    is_bigendian: int
    data: Any


def as_bytes(data) -> np.ndarray:
    """A message's uint8[] field as a 1-D uint8 array, without a copy where possible."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype == np.uint8 else data.astype(np.uint8).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)       # bytes, bytearray, array.array('B'), memoryview
    except (TypeError, ValueError):
        return np.asarray(data, dtype=np.uint8).reshape(-1)  # a list of ints


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


def check_dims(width: int, height: int, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has zero size: width {width}, height {height}")
    if width > MAX_DIM or height > MAX_DIM or width * height > MAX_PIXELS:
        raise ImageError(f"{what} is too large: {width}x{height} (limits: {MAX_DIM} pixels per side, "
                         f"{MAX_PIXELS} pixels)")


def _pixels(img: RawImage):
    """Validated (HxW or HxWxC uint8 view of the data, channel order)."""
    encoding = str(img.encoding).strip()
    key = encoding.lower()
    if key not in ENCODINGS:
        raise ImageError(f"unsupported encoding '{encoding}': {_why_unsupported(encoding)} "
                         f"(supported: {SUPPORTED})")
    channels, order = ENCODINGS[key]
    width, height, step = int(img.width), int(img.height), int(img.step)
    check_dims(width, height)
    if int(img.is_bigendian) not in (0, 1):
        raise ImageError(f"is_bigendian must be 0 or 1, got {int(img.is_bigendian)}")
    # is_bigendian does not matter for 8-bit channels, so 0 and 1 are both accepted.
    row = width * channels
    if step < row:
        raise ImageError(f"step {step} is smaller than a row: width {width} x {channels} bytes per pixel "
                         f"({encoding}) = {row}")
    data = as_bytes(img.data)
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


def check_raw(img: RawImage) -> None:
    """Cheap validation (no pixel is touched): raises ImageError naming the fault."""
    _pixels(img)


def raw_to_rgb(img: RawImage) -> np.ndarray:
    """Contiguous uint8 HxWx3 RGB (a copy). Raises ImageError."""
    pixels, order = _pixels(img)
    if pixels.ndim == 2:
        return np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, axis=2))
    if order == "bgr":
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    return np.ascontiguousarray(pixels[:, :, :3])


def check_compressed(fmt: str, data) -> str:
    """Cheap checks of a sensor_msgs/CompressedImage before it is queued for decoding.

    Returns the container ("jpeg" or "png") found from the magic bytes. Raises ImageError for
    empty or oversized data, compressedDepth, and data that is neither JPEG nor PNG.
    """
    fmt_l = str(fmt).lower()
    buf = as_bytes(data)
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
    raw = as_bytes(data).tobytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            check_dims(im.width, im.height, f"{container} image")
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

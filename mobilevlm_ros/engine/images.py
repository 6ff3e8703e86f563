"""Camera pixel formats -> RGB: what the engine encodes, from what a camera driver publishes.

No rclpy: the same functions serve a live subscription, a rosbag reader and tests. Two steps, so
that the image callback stays cheap and frames that are replaced before they are encoded are never
converted:

    check_raw(img)        in the image callback: the encoding is one we convert, the dimensions,
                          step and data length are consistent (O(1), no pixel is read; raises
                          ImageError with the fault)
    raw_to_rgb(img)       when the frame is about to be encoded: contiguous uint8 HxWx3 RGB

`RawImage` carries a sensor_msgs/Image's fields (mobilevlm_ros.ros.conversion builds it from a
message without copying its data). Compressed frames (JPEG, PNG): `check_compressed` sniffs the
container from the magic bytes, `compressed_to_rgb` checks the header and decodes with OpenCV.

Raw encodings (ENCODINGS): the pixels are those of cv_bridge's conversion of the message to rgb8
(`cv_bridge::toCvCopy(msg, "rgb8")`), with the same OpenCV colour conversion codes, 16-bit samples
scaled to 8 bits as cv_bridge scales them (x 255/65535, rounded) after the colour conversion, and
is_bigendian honoured. cv_bridge does not convert nv21 and nv24; they use OpenCV's BT.601
video-range YUV conversion, the one cv_bridge applies to yuv422. Depth and float images (16UC1,
32FC1, ...) and anything else are rejected with the reason.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np

from ..core.errors import ImageError

# A bad frame is reported as an ImageError; OpenCV's own log line for it would only repeat that on
# stderr for every malformed frame. OPENCV_LOG_LEVEL still overrides this.
if "OPENCV_LOG_LEVEL" not in os.environ:
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


@dataclass(frozen=True)
class Encoding:
    """How one sensor_msgs/Image encoding is laid out and converted to RGB.

    layout: "packed" (rows of `channels` samples per pixel), "bayer" (one sample per pixel),
    "yuv422" (rows of 2 bytes per pixel), "nv21" (Y plane, then a half-height VU plane) or
    "nv24" (Y plane, then a full-size UV plane). code: the cv2.cvtColor code to RGB, None when the
    samples are RGB already.
    """
    layout: str
    channels: int
    bits: int
    code: Optional[int]

    @property
    def bytes_per_pixel(self) -> int:
        """Bytes of one pixel in a row of the first (or only) plane."""
        return self.channels * self.bits // 8


def _family(bits: int) -> dict:
    return {
        f"rgb{bits}": Encoding("packed", 3, bits, None),
        f"bgr{bits}": Encoding("packed", 3, bits, cv2.COLOR_BGR2RGB),
        f"rgba{bits}": Encoding("packed", 4, bits, cv2.COLOR_RGBA2RGB),
        f"bgra{bits}": Encoding("packed", 4, bits, cv2.COLOR_BGRA2RGB),
        f"mono{bits}": Encoding("packed", 1, bits, cv2.COLOR_GRAY2RGB),
        # cv_bridge's table: OpenCV names a Bayer pattern after the second row's 2nd and 3rd pixel,
        # so the mosaic that starts R G / G B (bayer_rggb) is OpenCV's "BayerBG".
        f"bayer_rggb{bits}": Encoding("bayer", 1, bits, cv2.COLOR_BayerBG2RGB),
        f"bayer_bggr{bits}": Encoding("bayer", 1, bits, cv2.COLOR_BayerRG2RGB),
        f"bayer_gbrg{bits}": Encoding("bayer", 1, bits, cv2.COLOR_BayerGR2RGB),
        f"bayer_grbg{bits}": Encoding("bayer", 1, bits, cv2.COLOR_BayerGB2RGB),
    }


_UYVY = Encoding("yuv422", 2, 8, cv2.COLOR_YUV2RGB_UYVY)
_YUYV = Encoding("yuv422", 2, 8, cv2.COLOR_YUV2RGB_YUY2)

# encoding -> Encoding, every raw encoding raw_to_rgb converts (lower case; "uyvy" and "yuyv" are
# sensor_msgs' current names of the deprecated "yuv422" and "yuv422_yuy2")
ENCODINGS = {
    **_family(8), **_family(16),
    "yuv422": _UYVY, "uyvy": _UYVY, "yuv422_yuy2": _YUYV, "yuyv": _YUYV,
    "nv21": Encoding("nv21", 1, 8, cv2.COLOR_YUV2RGB_NV21),
    "nv24": Encoding("nv24", 1, 8, cv2.COLOR_YUV2RGB_UYVY),    # see _nv24_to_rgb
}
SUPPORTED = ", ".join(ENCODINGS)

MAX_DIM = 16384                     # pixels per side
MAX_PIXELS = 64 * 1024 * 1024       # per frame (a 8192x8192 frame is 64 Mpx)
MAX_COMPRESSED_BYTES = 64 * 1024 * 1024

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SCALE_16_TO_8 = 255.0 / 65535.0    # cv_bridge: convertTo(CV_8U, 255. / 65535.)
_GENERIC = re.compile(r"(8|16|32|64)[usf]c\d*")


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
    if _GENERIC.fullmatch(e):
        if e.startswith("8"):
            return "the channel order of generic 8UCn images is unknown: publish rgb8 or bgr8"
        return "depth and float images (16UC1, 32FC1, ...) have no colour to convert"
    if e.startswith("bayer"):
        return "not one of the Bayer encodings bayer_rggb, bayer_bggr, bayer_gbrg, bayer_grbg in 8 or 16 bits"
    if e.startswith(("yuv", "uyvy", "yuyv", "yvyu", "nv", "i420", "yv12")):
        return "this YUV layout is not converted (YUV: yuv422 = uyvy, yuv422_yuy2 = yuyv, nv21, nv24)"
    return "unknown encoding"


def check_dims(width: int, height: int, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has zero size: width {width}, height {height}")
    if width > MAX_DIM or height > MAX_DIM or width * height > MAX_PIXELS:
        raise ImageError(f"{what} is too large: {width}x{height} (limits: {MAX_DIM} pixels per side, "
                         f"{MAX_PIXELS} pixels)")


def check_geometry(encoding: str, width: int, height: int) -> None:
    """What the sampling of an encoding (one of ENCODINGS) needs of the frame size."""
    layout = ENCODINGS[encoding.strip().lower()].layout
    if layout == "yuv422" and width % 2:
        raise ImageError(f"{encoding} needs an even width (two pixels share one U and one V sample), "
                         f"got width {width}")
    if layout == "nv21" and (width % 2 or height % 2):
        raise ImageError(f"{encoding} needs an even width and height (2x2 pixels share one V and one U "
                         f"sample), got {width}x{height}")
    if layout == "bayer" and (width < 3 or height < 3):
        # OpenCV's demosaicing returns an all-black image below 3x3
        raise ImageError(f"{encoding} needs at least 3x3 pixels to demosaic, got {width}x{height}")


# planar layouts: their data has step x height x num / den bytes (the Y plane, then the chroma plane)
_PLANE_ROWS = {"nv21": (3, 2, " x 3/2"), "nv24": (3, 1, " x 3")}


def _layout(img: RawImage):
    """Validate a RawImage (O(1): no pixel is read) -> (Encoding, views of the data).

    The views: packed, bayer and yuv422: one HxW or HxWxC array (16-bit samples in the message's
    byte order); nv21: the (3/2 H)xW planes as one array, as cv2.cvtColor takes them; nv24: the
    HxW Y plane and the HxWx2 UV plane.
    """
    encoding = str(img.encoding).strip()
    enc = ENCODINGS.get(encoding.lower())
    if enc is None:
        raise ImageError(f"unsupported encoding '{encoding}': {_why_unsupported(encoding)} "
                         f"(supported: {SUPPORTED})")
    width, height, step = int(img.width), int(img.height), int(img.step)
    check_dims(width, height)
    check_geometry(encoding, width, height)
    if int(img.is_bigendian) not in (0, 1):
        raise ImageError(f"is_bigendian must be 0 or 1, got {int(img.is_bigendian)}")
    # is_bigendian does not matter for 8-bit channels, so 0 and 1 are both accepted.
    row = width * enc.bytes_per_pixel
    if step < row:
        plane = " Y plane" if enc.layout in _PLANE_ROWS else ""
        raise ImageError(f"step {step} is smaller than a row: width {width} x {enc.bytes_per_pixel} bytes "
                         f"per pixel ({encoding}{plane}) = {row}")
    if enc.bits == 16 and step % 2:
        raise ImageError(f"step {step} is odd: rows of 16-bit samples ({encoding}) must start on a "
                         f"2-byte boundary")
    num, den, times = _PLANE_ROWS.get(enc.layout, (1, 1, ""))
    formula, sizes = f"step x height{times}", f"{step} x {height}{times}"
    data = as_bytes(img.data)
    expected = step * height * num // den
    if data.size < expected:
        raise ImageError(f"truncated image: data has {data.size} bytes, expected {formula} = {sizes} = "
                         f"{expected}")
    if data.size > expected:
        raise ImageError(f"data has {data.size} bytes, more than {formula} = {sizes} = {expected}")

    if enc.layout == "nv21":
        return enc, data.reshape(height * 3 // 2, step)[:, :width]
    if enc.layout == "nv24":
        luma, chroma = data[:step * height], data[step * height:]
        uv = chroma.reshape(height, 2 * step)[:, :2 * width].reshape(height, width, 2)
        return enc, (luma.reshape(height, step)[:, :width], uv)
    rows = data.reshape(height, step)[:, :row]
    if enc.bits == 16:
        rows = rows.view(">u2" if int(img.is_bigendian) else "<u2")
    return enc, rows.reshape(height, width) if enc.channels == 1 else rows.reshape(height, width, enc.channels)


def check_raw(img: RawImage) -> None:
    """Cheap validation (no pixel is touched): raises ImageError naming the fault."""
    _layout(img)


def _native(samples: np.ndarray) -> np.ndarray:
    """The samples in this machine's byte order, aligned, as OpenCV reads them."""
    if not samples.dtype.isnative:
        return samples.astype(samples.dtype.newbyteorder("="))
    return samples if samples.flags.aligned else samples.copy()


def _nv24_to_rgb(luma: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """NV24 (4:4:4) has no OpenCV code. Written as UYVY of twice the width (U Y V Y per pixel) it
    converts with the BT.601 video-range arithmetic of nv21 and yuv422, both pixels of each pair
    being the same pixel; OpenCV's packed YUV 4:4:4 code uses other (full-range) coefficients."""
    h, w = luma.shape
    u, v = cv2.split(uv)
    pairs = cv2.merge([u, luma, v, luma]).reshape(h, 2 * w, 2)
    rgb = cv2.cvtColor(pairs, cv2.COLOR_YUV2RGB_UYVY)
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_NEAREST)     # one of each equal pair


def raw_to_rgb(img: RawImage) -> np.ndarray:
    """Contiguous uint8 HxWx3 RGB (a copy), the pixels of cv_bridge's rgb8 conversion. Raises ImageError."""
    enc, pixels = _layout(img)
    try:
        if enc.layout == "nv24":
            rgb = _nv24_to_rgb(*pixels)
        else:
            # cv_bridge's order: the colour conversion at the source depth, then 16 -> 8 bits
            rgb = _native(pixels)
            if enc.code is not None:
                rgb = cv2.cvtColor(rgb, enc.code)
            if enc.bits == 16:
                rgb = cv2.convertScaleAbs(rgb, alpha=_SCALE_16_TO_8)
            elif rgb is pixels:
                rgb = rgb.copy()
    except cv2.error as e:      # not expected after _layout's checks; an ImageError all the same
        raise ImageError(f"cannot convert {img.encoding} image: {str(e).strip().splitlines()[-1]}") from None
    return np.ascontiguousarray(rgb)


# ----------------------------------------------------------------------------------- compressed
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


class _BadHeader(Exception):
    """The header cannot be read: compressed_to_rgb reports it as data it cannot decode."""


def _png_header(buf: memoryview):
    """(width, height, bits per sample) from the IHDR chunk, which must come first."""
    if len(buf) < 33 or buf[12:16] != b"IHDR":
        raise _BadHeader("no IHDR chunk after the signature")
    return int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big"), buf[24]


# start-of-frame markers (baseline, progressive, lossless, arithmetic ...): not DHT C4, JPG C8, DAC CC
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(buf: memoryview):
    """(width, height, bits per sample) from the frame header, walking the marker segments."""
    i, n = 2, len(buf)
    while True:
        if i >= n:
            raise _BadHeader("the data ends before the frame header")
        if buf[i] != 0xFF:
            raise _BadHeader(f"no marker at byte {i}")
        while i < n and buf[i] == 0xFF:       # fill bytes
            i += 1
        if i >= n:
            raise _BadHeader("the data ends before the frame header")
        marker = buf[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:      # TEM, RSTn: no length
            continue
        if marker in (0xD9, 0xDA):
            raise _BadHeader("no frame header before the scan")
        if i + 2 > n:
            raise _BadHeader("the data ends before the frame header")
        length = int.from_bytes(buf[i:i + 2], "big")
        if length < 2:
            raise _BadHeader(f"marker segment of length {length} at byte {i}")
        if marker in _SOF:
            if length < 8 or i + 7 > n:
                raise _BadHeader("the data ends inside the frame header")
            height = int.from_bytes(buf[i + 3:i + 5], "big")
            if height == 0:
                raise _BadHeader("the frame header gives no height (DNL)")
            return int.from_bytes(buf[i + 5:i + 7], "big"), height, buf[i + 2]
        i += length


def compressed_to_rgb(fmt: str, data) -> np.ndarray:
    """Decode JPEG/PNG bytes of a sensor_msgs/CompressedImage to uint8 HxWx3 RGB with OpenCV.

    Raises ImageError for everything check_compressed rejects, dimensions out of limits (read from
    the header, before anything is decoded or allocated), 16-bit samples, and truncated or corrupt
    data. Alpha is dropped; palette and grey images are expanded; EXIF orientation is not applied
    (neither does compressed_image_transport).
    """
    container = check_compressed(fmt, data)
    buf = as_bytes(data)
    try:
        width, height, bits = (_png_header if container == "png" else _jpeg_header)(memoryview(buf))
    except _BadHeader as e:
        raise ImageError(f"cannot decode {container} image ({buf.size} bytes): {e}") from None
    check_dims(width, height, f"{container} image")
    if bits == 16:
        raise ImageError(f"{container} image has 16 bits per sample: 16-bit and float images are not supported")
    if bits not in ((1, 2, 4, 8) if container == "png" else (8,)):     # PNG: 1, 2, 4-bit grey and palette
        raise ImageError(f"{container} image has {bits} bits per sample: only 8-bit images are supported")
    try:
        rgb = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        raise ImageError(f"cannot decode {container} image ({buf.size} bytes): "
                         f"{str(e).strip().splitlines()[-1]}") from None
    if rgb is None or rgb.shape != (height, width, 3):
        raise ImageError(f"cannot decode {container} image ({buf.size} bytes): truncated or corrupt data")
    return rgb

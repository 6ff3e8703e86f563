"""mobilevlm-make-bag: write a rosbag2 bag of synthetic camera frames (deterministic moving shapes).

    mobilevlm-make-bag OUT [--storage sqlite3|mcap] [--seconds S] [--rate HZ] [--cameras front,rear]
                       [--compressed [jpeg|png]] [--encoding rgb8|bayer_rggb8|yuv422_yuy2|mono16|...]
                       [--size 640x480] [--start SEC] [--latency-ms MS]

One topic per camera: /<camera>/image_raw (sensor_msgs/msg/Image) or, with --compressed,
/<camera>/image_raw/compressed (sensor_msgs/msg/CompressedImage, format "rgb8; jpeg compressed bgr8"
or "rgb8; png compressed rgb8"). Frame k of camera i has header.stamp = start + k/rate + i/(rate x
cameras) (the cameras interleave) and is recorded latency-ms later (the bag time). Frames show a
per-camera gradient, a moving disc, a bouncing square and the frame number as a 16-bit bar code on the
top rows. Same arguments, same bytes. Errors: exit code 2 with the reason.

--encoding is any raw encoding the node converts (mobilevlm_ros.engine.images.ENCODINGS): the RGB
frame is rendered into it as a camera would send it: 16-bit samples x 257 (little-endian), Bayer as
the mosaic of the named pattern, YUV with OpenCV's BT.601 video-range conversion (4:2:2 for
yuv422/uyvy and yuv422_yuy2/yuyv, 4:2:0 for nv21, 4:4:4 for nv24), mono as OpenCV's luma. YUV 4:2:2
needs an even width, nv21 an even width and height, Bayer at least 3x3 pixels.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..replay.bagio import COMPRESSED, IMAGE, STORAGES, BagError, BagWriter
from ..core.errors import ImageError, MobileVLMError
from ..engine import images
from ..engine.config import check_cameras
from ..engine.frames import NS
from .synthetic import render_frame

DEFAULT_START_S = 1_700_000_000.0      # a fixed, plausible wall-clock time: same args, same bag
ENCODINGS = tuple(images.ENCODINGS)   # every raw encoding the node converts
PROGRESS_MIN_FRAMES = 200              # a progress bar from this many frames on (on a terminal)


def topic_for(camera: str, compressed: bool) -> str:
    return f"/{camera}/image_raw" + ("/compressed" if compressed else "")


def frame_id_for(camera: str) -> str:
    return f"{camera}_camera_optical_frame"


def _samples(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The 8-bit samples of a packed or Bayer encoding: HxW or HxWxC."""
    import cv2
    base = encoding.rstrip("0123456789")
    if base.startswith("bayer_"):           # the pattern names the top-left 2x2 block, row by row
        mosaic = np.empty(rgb.shape[:2], np.uint8)
        for i, colour in enumerate(base[len("bayer_"):]):
            mosaic[i // 2::2, i % 2::2] = rgb[i // 2::2, i % 2::2, "rgb".index(colour)]
        return mosaic
    if base == "mono":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)          # what cv_bridge's rgb8 -> mono8 does
    colour = rgb[:, :, ::-1] if base.startswith("bgr") else rgb
    if base.endswith("a"):
        return np.concatenate([colour, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return colour


def _yuv(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The bytes of a YUV encoding as rows of the Y plane's width: HxWx2 (4:2:2), (3/2 H)xW (nv21)
    or (3 H)xW (nv24)."""
    import cv2
    h, w = rgb.shape[:2]
    layout = images.ENCODINGS[encoding].layout
    if layout == "yuv422":
        uyvy = images.ENCODINGS[encoding].code == cv2.COLOR_YUV2RGB_UYVY
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_UYVY if uyvy else cv2.COLOR_RGB2YUV_YUY2)
    if layout == "nv21":
        yv12 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_YV12)      # Y plane, V plane, U plane
        v, u = yv12[h:].reshape(2, h // 2, w // 2)
        return np.concatenate([yv12[:h], np.stack([v, u], axis=-1).reshape(h // 2, w)])
    # nv24: each pixel twice, as UYVY, keeps its own U and V (both pixels of a pair are the same)
    pairs = cv2.cvtColor(np.repeat(rgb, 2, axis=1), cv2.COLOR_RGB2YUV_UYVY)
    uv = np.stack([pairs[:, 0::2, 0], pairs[:, 1::2, 0]], axis=-1).reshape(h, 2 * w)
    return np.concatenate([pairs[:, 0::2, 1], uv.reshape(2 * h, w)])


def render_raw(rgb: np.ndarray, encoding: str) -> images.RawImage:
    """An RGB frame in a raw encoding, as a camera driver would publish it (rows packed)."""
    h, w = rgb.shape[:2]
    spec = images.ENCODINGS[encoding]
    if spec.layout in ("yuv422", "nv21", "nv24"):
        images.check_geometry(encoding, w, h)         # OpenCV's YUV codes need it too
        data = _yuv(rgb, encoding)
    else:
        data = _samples(rgb, encoding)
        if spec.bits == 16:                 # cv_bridge's 8 -> 16 bits: x 65535/255
            data = (data.astype(np.uint16) * 257).astype("<u2").view(np.uint8)
    data = np.ascontiguousarray(data).reshape(-1)
    step = w * spec.bytes_per_pixel
    return images.RawImage(encoding=encoding, width=w, height=h, step=step, is_bigendian=0, data=data)


def compress(rgb: np.ndarray, kind: str, quality: int = 90) -> tuple:
    """(bytes, format string) as compressed_image_transport writes them."""
    from PIL import Image
    buf = io.BytesIO()
    if kind == "png":
        Image.fromarray(rgb).save(buf, format="PNG")
        return buf.getvalue(), "rgb8; png compressed rgb8"
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "rgb8; jpeg compressed bgr8"


def frame_times(cameras, seconds: float, rate: float, start_ns: int, latency_ns: int = 0):
    """[(bag time ns, stamp ns, camera index, k)] in bag time order."""
    n = max(1, int(round(seconds * rate)))
    period = NS / rate
    out = []
    for ci in range(len(cameras)):
        for k in range(n):
            stamp = start_ns + int(round(k * period + ci * period / len(cameras)))
            out.append((stamp + latency_ns, stamp, ci, k))
    out.sort()
    return out


def make_bag(out, *, storage: str = "mcap", seconds: float = 5.0, rate: float = 10.0,
             cameras=("front", "rear"), compressed: Optional[str] = None, encoding: str = "rgb8",
             size=(640, 480), start_s: float = DEFAULT_START_S, latency_ms: float = 0.0,
             jpeg_quality: int = 90, progress: Optional[bool] = None) -> dict:
    """Write the bag; returns {topic: [(bag time ns, stamp ns, k), ...]} plus the arguments used.
    progress: None = a bar on a terminal for long bags, False = never, True = always."""
    cameras = list(cameras)
    if (why := check_cameras(cameras)):
        raise BagError(why)
    if not (seconds > 0 and rate > 0 and math.isfinite(seconds) and math.isfinite(rate)):
        raise BagError(f"--seconds and --rate must be positive, got {seconds} and {rate}")
    width, height = size
    if not (1 <= width <= 8192 and 1 <= height <= 8192):
        raise BagError(f"--size must be within 1x1..8192x8192, got {width}x{height}")
    if encoding not in ENCODINGS:
        raise BagError(f"unknown encoding '{encoding}' (choose from {', '.join(ENCODINGS)})")
    if compressed is None:
        try:
            images.check_raw(render_raw(np.zeros((height, width, 3), np.uint8), encoding))
        except ImageError as e:
            raise BagError(f"--size {width}x{height} does not fit --encoding {encoding}: {e}") from None
    if compressed not in (None, "jpeg", "png"):
        raise BagError(f"unknown compression '{compressed}' (choose jpeg or png)")
    if latency_ms < 0:
        raise BagError(f"--latency-ms must be >= 0, got {latency_ms}")
    start_ns = int(round(start_s * NS))
    times = frame_times(cameras, seconds, rate, start_ns, int(round(latency_ms * 1e6)))
    topics = {c: topic_for(c, compressed is not None) for c in cameras}
    written = {t: [] for t in topics.values()}

    from tqdm import tqdm
    disable = (not progress) if progress is not None else (True if len(times) < PROGRESS_MIN_FRAMES else None)
    with BagWriter(out, storage) as bag:
        for cam in cameras:                # connections in camera order
            bag.connection(topics[cam], COMPRESSED if compressed else IMAGE)
        for bag_ns, stamp, ci, k in tqdm(times, desc=f"writing {Path(out).name}", unit="frame",
                                         disable=disable, file=sys.stderr):
            cam = cameras[ci]
            rgb = render_frame(ci, k, rate, width, height)
            if compressed:
                data, fmt = compress(rgb, compressed, jpeg_quality)
                msg = bag.compressed(stamp, frame_id_for(cam), data, fmt)
                bag.write(topics[cam], COMPRESSED, bag_ns, msg)
            else:
                raw = render_raw(rgb, encoding)
                msg = bag.image(stamp, frame_id_for(cam), raw.data.reshape(-1, raw.step), encoding)
                # written as rows of step bytes: the fields of the frame itself
                msg = dataclasses.replace(msg, width=raw.width, height=raw.height)
                bag.write(topics[cam], IMAGE, bag_ns, msg)
            written[topics[cam]].append((bag_ns, stamp, k))
    return {"path": str(out), "storage": storage, "topics": topics, "frames": written,
            "rate": rate, "size": [width, height], "compressed": compressed, "encoding": encoding}


def _size(text: str):
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got '{text}'") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-make-bag", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("out", help="bag folder to create (must not exist)")
    ap.add_argument("--storage", choices=STORAGES, default="mcap")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=10.0, help="frames per second per camera")
    ap.add_argument("--cameras", default="front,rear", help="comma-separated camera names")
    ap.add_argument("--compressed", nargs="?", const="jpeg", choices=("jpeg", "png"), default=None,
                    help="write sensor_msgs/CompressedImage (default jpeg)")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--encoding", choices=ENCODINGS, default="rgb8", metavar="ENCODING",
                    help="raw image encoding: " + ", ".join(ENCODINGS))
    ap.add_argument("--size", type=_size, default=(640, 480), help="WIDTHxHEIGHT")
    ap.add_argument("--start", type=float, default=DEFAULT_START_S, help="stamp of the first frame, s")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="bag time minus header stamp")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        info = make_bag(a.out, storage=a.storage, seconds=a.seconds, rate=a.rate,
                        cameras=[c.strip() for c in a.cameras.split(",") if c.strip()],
                        compressed=a.compressed, encoding=a.encoding, size=a.size, start_s=a.start,
                        latency_ms=a.latency_ms, jpeg_quality=a.jpeg_quality,
                        progress=False if a.no_progress else None)
    except MobileVLMError as e:
        print(f"mobilevlm-make-bag: {e}", file=sys.stderr)
        return 2
    n = sum(len(v) for v in info["frames"].values())
    print(f"wrote {a.out} ({a.storage}): {n} frames on " + ", ".join(info["topics"].values()),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

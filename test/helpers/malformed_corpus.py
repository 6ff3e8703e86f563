"""The bad input the node must survive: malformed camera frames and bad requests, each with the error
it gets. docs/reliability.md documents every message here (test_reliability checks that it does).

FRAMES: (case id, topic, fields, expected error). topic "raw" is sensor_msgs/Image: fields override
those of a valid 160x120 rgb8 frame (`pixels` replaces the pixels first: height and width from its
shape, step = width x channels x bytes per sample). topic "compressed" is
sensor_msgs/CompressedImage: fields are format and data.
REQUESTS: (case id, request fields, expected error); `stamp_offset_s` becomes a stamp relative to now.
"""
import io
import zlib

import numpy as np
from PIL import Image as PILImage

W, H = 160, 120


def _pattern(h=H, w=W):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


def _encode(pixels, fmt, **kw):
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


GOOD = _pattern()
ROW = W * 3
JPEG = _encode(GOOD, "JPEG", quality=90)
PNG = _encode(GOOD, "PNG")
PNG16 = _encode(np.full((8, 8), 40000, np.uint16), "PNG")
# a PNG whose header claims 100000 x 100000 pixels (a decompression bomb): refused before decoding
_IHDR = b"IHDR" + (100000).to_bytes(4, "big") * 2 + PNG[24:29]
PNG_HUGE = PNG[:12] + _IHDR + zlib.crc32(_IHDR).to_bytes(4, "big") + PNG[33:]


def _jpeg_frame_header(precision=8, height=H):
    """JPEG with its frame header (SOF0) patched: sample precision and number of rows."""
    sof = JPEG.index(b"\xff\xc0")
    return JPEG[:sof + 4] + bytes([precision]) + height.to_bytes(2, "big") + JPEG[sof + 7:]


JPEG_12BIT = _jpeg_frame_header(precision=12)
JPEG_TALL = _jpeg_frame_header(height=30000)
U16 = np.zeros((H, W), np.uint16)

FRAMES = [
    # encodings
    ("empty encoding", "raw", dict(encoding=""), "unsupported encoding '': empty encoding"),
    ("16UC1 depth", "raw", dict(pixels=U16, encoding="16UC1"),
     "unsupported encoding '16UC1': depth and float images"),
    ("32FC1 depth", "raw", dict(pixels=np.zeros((H, W), np.float32), encoding="32FC1"),
     "unsupported encoding '32FC1': depth and float images"),
    ("8UC3", "raw", dict(encoding="8UC3"), "the channel order of generic 8UCn images is unknown"),
    ("bayer_rggb12", "raw", dict(pixels=U16, encoding="bayer_rggb12"),
     "unsupported encoding 'bayer_rggb12': not one of the Bayer encodings"),
    ("nv12", "raw", dict(pixels=np.zeros((H * 3 // 2, W), np.uint8), encoding="nv12", height=H),
     "unsupported encoding 'nv12': this YUV layout is not converted"),
    ("unknown encoding", "raw", dict(encoding="jpeg"), "unsupported encoding 'jpeg': unknown encoding"),
    # 16-bit, Bayer and YUV frames that do not add up
    ("mono16 with 8-bit rows", "raw", dict(pixels=GOOD[:, :, 0], encoding="mono16"),
     f"step {W} is smaller than a row: width {W} x 2 bytes per pixel (mono16) = {2 * W}"),
    ("rgb16 with rgb8 data", "raw", dict(encoding="rgb16", step=2 * ROW),
     f"truncated image: data has {ROW * H} bytes, expected step x height = {2 * ROW} x {H} = {2 * ROW * H}"),
    ("mono16 odd step", "raw", dict(pixels=U16, encoding="mono16", step=2 * W + 1, data=bytes((2 * W + 1) * H)),
     f"step {2 * W + 1} is odd: rows of 16-bit samples (mono16) must start on a 2-byte boundary"),
    ("bayer_grbg16 with 8-bit rows", "raw", dict(pixels=GOOD[:, :, 0], encoding="bayer_grbg16"),
     f"step {W} is smaller than a row: width {W} x 2 bytes per pixel (bayer_grbg16) = {2 * W}"),
    ("bayer_rggb8 two rows", "raw", dict(pixels=GOOD[:2, :, 0], encoding="bayer_rggb8"),
     f"bayer_rggb8 needs at least 3x3 pixels to demosaic, got {W}x2"),
    ("yuv422_yuy2 odd width", "raw", dict(pixels=np.zeros((H, W - 1, 2), np.uint8), encoding="yuv422_yuy2"),
     f"yuv422_yuy2 needs an even width (two pixels share one U and one V sample), got width {W - 1}"),
    ("yuv422_yuy2 step of a mono row", "raw", dict(pixels=GOOD[:, :, 0], encoding="yuv422_yuy2"),
     f"step {W} is smaller than a row: width {W} x 2 bytes per pixel (yuv422_yuy2) = {2 * W}"),
    ("yuv422 odd width", "raw", dict(pixels=np.zeros((H, W + 1, 2), np.uint8), encoding="yuv422"),
     "yuv422 needs an even width"),
    ("nv21 odd height", "raw", dict(pixels=np.zeros((H * 3 // 2, W), np.uint8), encoding="nv21", height=H - 1),
     f"nv21 needs an even width and height (2x2 pixels share one V and one U sample), got {W}x{H - 1}"),
    ("nv21 without its chroma plane", "raw", dict(pixels=GOOD[:, :, 0], encoding="nv21"),
     f"truncated image: data has {W * H} bytes, expected step x height x 3/2 = {W} x {H} x 3/2 = {W * H * 3 // 2}"),
    ("nv24 with nv21 data", "raw", dict(pixels=np.zeros((H * 3 // 2, W), np.uint8), encoding="nv24", height=H),
     f"truncated image: data has {W * H * 3 // 2} bytes, expected step x height x 3 = {W} x {H} x 3 = {W * H * 3}"),
    # dimensions, step and size
    ("zero width", "raw", dict(width=0), "image has zero size: width 0, height 120"),
    ("zero height", "raw", dict(height=0), "image has zero size: width 160, height 0"),
    ("huge width", "raw", dict(width=2 ** 32 - 1), "image is too large: 4294967295x120"),
    ("huge both, no data", "raw", dict(width=20000, height=20000, step=60000, data=b""),
     "image is too large: 20000x20000"),
    ("step smaller than a row", "raw", dict(step=ROW - 1), f"step {ROW - 1} is smaller than a row"),
    ("truncated data", "raw", dict(data=GOOD.tobytes()[:-ROW]), "truncated image: data has"),
    ("no data", "raw", dict(data=b""), "truncated image: data has 0 bytes"),
    ("extra data", "raw", dict(data=GOOD.tobytes() + b"\0" * 7), f"data has {ROW * H + 7} bytes, more than"),
    ("huge step", "raw", dict(step=2 ** 31), "truncated image: data has"),
    ("is_bigendian 7", "raw", dict(is_bigendian=7), "is_bigendian must be 0 or 1, got 7"),
    # headers
    ("stamp an hour ahead", "raw", dict(stamp_offset_s=3600.0), "ahead of the node clock"),
    ("negative stamp", "raw", dict(stamp_sec=-5), "header stamp is negative"),
    # compressed
    ("empty compressed", "compressed", dict(format="jpeg", data=b""), "compressed image has no data"),
    ("not an image", "compressed", dict(format="jpeg", data=b"hello, camera"), "neither JPEG nor PNG"),
    ("compressedDepth", "compressed", dict(format="16UC1; compressedDepth png", data=PNG),
     "compressedDepth images are not supported"),
    ("JPEG header only", "compressed", dict(format="jpeg", data=JPEG[:20]), "cannot decode jpeg image"),
    ("truncated JPEG", "compressed", dict(format="jpeg", data=JPEG[:len(JPEG) // 2]),
     "cannot decode jpeg image"),
    ("JPEG magic then garbage", "compressed", dict(format="jpeg", data=b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
     "cannot decode jpeg image"),
    ("PNG magic only", "compressed", dict(format="png", data=PNG[:8]), "cannot decode png image"),
    ("truncated PNG", "compressed", dict(format="png", data=PNG[:len(PNG) // 2]), "cannot decode png image"),
    ("16-bit PNG", "compressed", dict(format="png", data=PNG16),
     "png image has 16 bits per sample: 16-bit and float images are not supported"),
    ("PNG claiming 100000x100000", "compressed", dict(format="png", data=PNG_HUGE), "png image is too large"),
    ("12-bit JPEG", "compressed", dict(format="jpeg", data=JPEG_12BIT),
     "jpeg image has 12 bits per sample: only 8-bit images are supported"),
    ("JPEG claiming 30000 rows", "compressed", dict(format="jpeg", data=JPEG_TALL),
     f"jpeg image is too large: {W}x30000"),
]

MAX_QUESTION_CHARS = 200

REQUESTS = [
    ("empty question", dict(question=""), "question is empty"),
    ("whitespace question", dict(question="   \n\t "), "question is empty"),
    ("over-long question", dict(question="x" * (MAX_QUESTION_CHARS + 1)),
     f"question is too long: {MAX_QUESTION_CHARS + 1} characters, the limit is {MAX_QUESTION_CHARS}"),
    ("binary question", dict(question="\x01\x02binary\x7f"), "non-printable character U+0001 at position 0"),
    ("bell in question", dict(question="what\x07is this"), "non-printable character U+0007 at position 4"),
    ("<image> in question", dict(question="look at <image> please"), "special token '<image>'"),
    ("max_new_tokens -1", dict(max_new_tokens=-1), "max_new_tokens must be 0 (node default"),
    ("max_new_tokens 100000", dict(max_new_tokens=100000), "or in 1..2048, got 100000"),
    ("NaN temperature", dict(temperature=float("nan")), "temperature must be a finite number"),
    ("infinite temperature", dict(temperature=float("inf")), "temperature must be a finite number"),
    ("temperature 11", dict(temperature=11.0), "temperature must be a finite number in [0, 10], got 11.0"),
    ("NaN top_p", dict(top_p=float("nan")), "top_p must be a finite number"),
    ("top_p 0", dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    ("top_p 1.5", dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    ("seed 2^40", dict(seed=2 ** 40), "seed must be in 0..2^32-1"),
    ("unknown camera", dict(camera="back"), "unknown camera 'back' (cameras: front, rear, quiet)"),
    ("camera never seen", dict(camera="quiet"), "no frame received yet from camera 'quiet'"),
    ("future stamp", dict(stamp_offset_s=60.0), "is in the future"),
    ("ancient stamp", dict(stamp_offset_s=-3600.0), "is too old: 3600"),
]

"""ROS messages <-> the engine's inputs and results, field by field.

No rclpy import: the functions read and fill message fields only, so they serve messages of a live
subscription, of a rosbag reader (rosbags' classes have the same fields) and of tests alike.
"""
from __future__ import annotations

import array

import numpy as np

from ..engine.frames import NS
from ..engine.images import RawImage, as_bytes
from ..engine.requests import Request, Result


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * NS + int(stamp.nanosec)


def raw_image(msg) -> RawImage:
    """sensor_msgs/Image -> RawImage sharing the message's data (validated later: images.check_raw)."""
    return RawImage(encoding=str(msg.encoding), width=int(msg.width), height=int(msg.height),
                    step=int(msg.step), is_bigendian=int(msg.is_bigendian), data=as_bytes(msg.data))


def request_from_msg(msg, kind: str = "service") -> Request:
    """An Ask request / goal -> the engine's Request (the same fields, the same defaults)."""
    return Request(question=str(msg.question), camera=str(msg.camera), stamp_ns=stamp_ns(msg.stamp),
                   max_new_tokens=int(msg.max_new_tokens), temperature=float(msg.temperature),
                   top_p=float(msg.top_p), seed=int(msg.seed), max_frame_age_ms=float(msg.max_frame_age_ms),
                   kind=kind)


def copy_header(dst, src) -> None:
    """Copy a std_msgs/Header field by field (src: an rclpy or rosbags message)."""
    dst.stamp.sec = int(src.stamp.sec)
    dst.stamp.nanosec = int(src.stamp.nanosec)
    dst.frame_id = str(src.frame_id)


def fill_image(msg, header, bgr):
    """A sensor_msgs/Image (bgr8) of uint8 HxWx3 BGR pixels, with `header` (the frame's)."""
    copy_header(msg.header, header)
    msg.height, msg.width = int(bgr.shape[0]), int(bgr.shape[1])
    msg.encoding, msg.is_bigendian, msg.step = "bgr8", 0, int(bgr.shape[1]) * 3
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(bgr).data)     # one copy; bytes would be copied twice (rclpy)
    msg.data = data
    return msg


# image_transport's compressed plugin writes "<encoding>; jpeg compressed <encoding>"; Foxglove and
# rqt_image_view read it (and this package's own subscriber sniffs the bytes)
JPEG_FORMAT = "bgr8; jpeg compressed bgr8"


def fill_compressed(msg, header, jpeg: bytes):
    """A sensor_msgs/CompressedImage of JPEG bytes (from BGR pixels), with `header`."""
    copy_header(msg.header, header)
    msg.format = JPEG_FORMAT
    msg.data = jpeg
    return msg


_TIMES = ("vision_ms", "prefill_ms", "decode_ms", "first_token_ms", "total_ms", "frame_age_ms")


def fill_result(msg, result: Result):
    """Copy a Result into an Ask response, action result or Answer message (the fields it has)."""
    if hasattr(msg, "success"):
        msg.success = result.success
    if hasattr(msg, "error"):
        msg.error = result.error
    msg.status.code = int(result.status)
    msg.answer = result.answer
    msg.camera = result.camera
    if result.header is not None:           # the frame's header as the camera sent it
        copy_header(msg.header, result.header)
    msg.prompt_tokens = int(result.prompt_tokens)
    msg.completion_tokens = int(result.completion_tokens)
    msg.finish_reason = result.finish_reason
    if hasattr(msg, "tokens_after_cancel"):
        msg.tokens_after_cancel = int(result.tokens_after_cancel)
    for k in _TIMES:
        if hasattr(msg, k):
            setattr(msg, k, float(getattr(result, k)))
    return msg

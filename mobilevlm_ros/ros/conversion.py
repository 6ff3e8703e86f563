"""ROS messages <-> the engine's inputs and results, field by field.

No rclpy import: the functions read and fill message fields only, so they serve messages of a live
subscription, of a rosbag reader (rosbags' classes have the same fields) and of tests alike.
"""
from __future__ import annotations

from ..engine.images import RawImage, as_bytes
from ..engine.requests import Request, Result

NS = 1_000_000_000


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
        msg.header.stamp.sec = int(result.header.stamp.sec)
        msg.header.stamp.nanosec = int(result.header.stamp.nanosec)
        msg.header.frame_id = str(result.header.frame_id)
    msg.prompt_tokens = int(result.prompt_tokens)
    msg.completion_tokens = int(result.completion_tokens)
    msg.finish_reason = result.finish_reason
    for k in _TIMES:
        if hasattr(msg, k):
            setattr(msg, k, float(getattr(result, k)))
    return msg

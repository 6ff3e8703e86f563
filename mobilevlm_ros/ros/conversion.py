"""ROS messages <-> the engine's inputs and results, field by field.

No rclpy import: the functions read and fill message fields only, so they serve messages of a live
subscription, of a rosbag reader (rosbags' classes have the same fields) and of tests alike.
"""
from __future__ import annotations

from ..engine.images import RawImage, as_bytes

NS = 1_000_000_000


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * NS + int(stamp.nanosec)


def raw_image(msg) -> RawImage:
    """sensor_msgs/Image -> RawImage sharing the message's data (validated later: images.check_raw)."""
    return RawImage(encoding=str(msg.encoding), width=int(msg.width), height=int(msg.height),
                    step=int(msg.step), is_bigendian=int(msg.is_bigendian), data=as_bytes(msg.data))

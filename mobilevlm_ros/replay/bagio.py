"""rosbag2 reading and writing on `rosbags` (pure Python: no ROS install needed).

- `BagReader(path)`: a rosbag2 folder (sqlite3 or mcap storage) or a bare .db3 / .mcap file, read with
  rosbags' AnyReader; every failure (missing, corrupt, truncated, unsupported) becomes a `BagError`
  that names the file, also when it happens while messages are read (`iter_messages`).
- `image_topics(reader)`: topic -> message type for the sensor_msgs Image / CompressedImage topics.
- `BagWriter`: writes a new rosbag2 folder (sqlite3 or mcap) of sensor_msgs images and of
  mobilevlm_ros/msg/Answer messages, the latter type registered from the installed msg/*.msg
  definitions (`msg_definition`), so the bag carries the very definition the node publishes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Tuple

import numpy as np

from ..core.errors import MobileVLMError
from ..resources import share_file

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED)
ANSWER = "mobilevlm_ros/msg/Answer"
STATUS = "mobilevlm_ros/msg/Status"
STORAGES = ("sqlite3", "mcap")
BAG_VERSION = 8              # rosbag2 metadata version of the bags we write (Jazzy writes 8)
INSTALL_HINT = "pip install 'rosbags==0.11.9'"


class BagError(MobileVLMError):
    """A bag is missing, corrupt, truncated or not a supported rosbag2 bag. The message names it."""


def _rosbags():
    try:
        import rosbags  # noqa: F401
    except ImportError:
        raise BagError(f"reading and writing bags needs the 'rosbags' package: {INSTALL_HINT}") from None


# ------------------------------------------------------------------------------------------- types
MSG_TYPES = (STATUS, ANSWER)     # Answer nests Status: register both, in this order


def msg_definition(msgtype: str) -> Tuple[Path, str]:
    """(path, text) of one of our message definitions, as installed (share/mobilevlm_ros/msg)."""
    try:
        path = share_file("msg", msgtype.rsplit("/", 1)[1] + ".msg")
    except FileNotFoundError as e:
        raise BagError(f"cannot find the {msgtype} definition: {e}") from None
    return path, path.read_text()


def typestore(with_answer: bool = False):
    """A rosbags typestore of the ROS 2 Jazzy types, plus mobilevlm_ros/msg/Answer when asked."""
    _rosbags()
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore
    store = get_typestore(Stores.ROS2_JAZZY)
    if with_answer:
        for msgtype in MSG_TYPES:
            path, text = msg_definition(msgtype)
            try:
                store.register(get_types_from_msg(text, msgtype))
            except Exception as e:
                raise BagError(f"{path}: cannot parse the message definition: {e}") from None
    return store


# ------------------------------------------------------------------------------------------ reading
def _bag_error(path, err: BaseException) -> BagError:
    text = " ".join(str(a) for a in getattr(err, "args", ()) if a) or type(err).__name__
    return BagError(f"{path}: cannot read bag: {text}")


class BagReader:
    """A rosbag2 bag opened for reading (context manager). `.reader` is the rosbags AnyReader."""

    def __init__(self, path):
        _rosbags()
        self.path = Path(path)
        self.reader = None

    def __enter__(self) -> "BagReader":
        from rosbags.highlevel import AnyReader
        p = self.path
        if not p.exists():
            raise BagError(f"{p}: bag not found")
        if p.is_file() and p.suffix == ".bag":
            raise BagError(f"{p}: ROS 1 bags are not supported; convert it with `rosbags-convert --src {p}`")
        if p.is_file() and p.suffix not in (".mcap", ".db3"):
            raise BagError(f"{p}: not a rosbag2 bag (expected a bag folder with metadata.yaml, "
                           f"or a .mcap / .db3 file)")
        if p.is_dir() and not (p / "metadata.yaml").is_file():
            raise BagError(f"{p}: not a rosbag2 bag folder (no metadata.yaml)")
        try:
            reader = AnyReader([p])
            reader.open()
        except Exception as e:      # AnyReaderError, ReaderError, sqlite/mcap/yaml errors, ...
            raise _bag_error(p, e) from None
        self.reader = reader
        return self

    def __exit__(self, *exc) -> bool:
        if self.reader is not None:
            try:
                self.reader.close()
            except Exception:
                pass
            self.reader = None
        return False

    @property
    def start_ns(self) -> int:
        return int(self.reader.start_time) if self.reader.message_count else 0

    @property
    def end_ns(self) -> int:
        """Time of the last message (rosbags' end_time is one past it)."""
        return max(self.start_ns, int(self.reader.end_time) - 1) if self.reader.message_count else 0

    @property
    def storage(self) -> str:
        """'sqlite3', 'mcap', or '?' when rosbags does not say."""
        p = self.path
        if p.is_file():
            return {".db3": "sqlite3", ".mcap": "mcap"}.get(p.suffix, "?")
        try:
            import yaml
            meta = yaml.safe_load((p / "metadata.yaml").read_text())
            return str(meta["rosbag2_bagfile_information"]["storage_identifier"])
        except Exception:
            return "?"

    def topics(self) -> dict:
        """topic -> message type (or None when connections disagree)."""
        return {name: info.msgtype for name, info in self.reader.topics.items()}

    def image_topics(self) -> dict:
        return {t: m for t, m in self.topics().items() if m in IMAGE_TYPES}

    def count(self, topics: Iterable[str]) -> int:
        topics = set(topics)
        return sum(c.msgcount for c in self.reader.connections if c.topic in topics)

    def iter_messages(self, topics: Iterable[str]) -> Iterator[Tuple[str, str, int, object]]:
        """(topic, msgtype, bag time ns, deserialized message) in bag time order. Reader errors
        (truncated chunk, corrupt database page, undecodable message) raise BagError."""
        topics = set(topics)
        conns = [c for c in self.reader.connections if c.topic in topics]
        if not conns:
            return
        expected = sum(c.msgcount for c in conns)
        read = 0
        it = self.reader.messages(connections=conns)
        while True:
            try:
                conn, ts, raw = next(it)
                msg = self.reader.deserialize(raw, conn.msgtype)
            except StopIteration:
                break
            except Exception as e:
                raise _bag_error(self.path, e) from None
            read += 1
            yield conn.topic, conn.msgtype, int(ts), msg
        if read < expected:     # rosbags' mcap reader stops quietly at a damaged chunk
            raise BagError(f"{self.path}: cannot read bag: only {read} of the {expected} messages on "
                           f"{', '.join(sorted(topics))} could be read (the file is corrupt or truncated)")


# ------------------------------------------------------------------------------------------ writing
class BagWriter:
    """A new rosbag2 bag folder (context manager): images and Answer messages.

    The folder must not exist. On an exception inside the `with` block the partial bag is closed
    (it stays readable up to the last message written)."""

    def __init__(self, path, storage: str = "mcap", with_answer: bool = False):
        _rosbags()
        if storage not in STORAGES:
            raise BagError(f"unknown storage '{storage}' (choose from {', '.join(STORAGES)})")
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"{self.path}: exists already; choose a new path for the bag")
        self.storage = storage
        self.store = typestore(with_answer)
        self.writer = None
        self._conns: dict = {}

    def __enter__(self) -> "BagWriter":
        from rosbags.rosbag2 import StoragePlugin, Writer
        plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3
        try:
            self.writer = Writer(self.path, version=BAG_VERSION, storage_plugin=plugin)
            self.writer.open()
        except Exception as e:
            raise BagError(f"{self.path}: cannot create bag: {e}") from None
        return self

    def __exit__(self, *exc) -> bool:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return False

    def connection(self, topic: str, msgtype: str):
        if topic not in self._conns:
            self._conns[topic] = self.writer.add_connection(topic, msgtype, typestore=self.store)
        return self._conns[topic]

    def write(self, topic: str, msgtype: str, bag_time_ns: int, msg) -> None:
        conn = self.connection(topic, msgtype)
        self.writer.write(conn, int(bag_time_ns), self.store.serialize_cdr(msg, msgtype))

    # -------------------------------------------------------------- message builders
    def time(self, ns: int):
        Time = self.store.types["builtin_interfaces/msg/Time"]
        return Time(sec=int(ns) // 1_000_000_000, nanosec=int(ns) % 1_000_000_000)

    def header(self, stamp_ns: int, frame_id: str):
        Header = self.store.types["std_msgs/msg/Header"]
        return Header(stamp=self.time(stamp_ns), frame_id=str(frame_id))

    def image(self, stamp_ns: int, frame_id: str, pixels: np.ndarray, encoding: str):
        """sensor_msgs/Image from uint8 HxW (mono8) or HxWxC pixels, rows packed (step = width x C)."""
        Image = self.store.types[IMAGE]
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        h, w = pixels.shape[:2]
        c = 1 if pixels.ndim == 2 else pixels.shape[2]
        return Image(header=self.header(stamp_ns, frame_id), height=h, width=w, encoding=encoding,
                     is_bigendian=0, step=w * c, data=pixels.reshape(-1))

    def compressed(self, stamp_ns: int, frame_id: str, data: bytes, fmt: str):
        Compressed = self.store.types[COMPRESSED]
        return Compressed(header=self.header(stamp_ns, frame_id), format=fmt,
                          data=np.frombuffer(bytes(data), dtype=np.uint8))

    def answer(self, *, stamp_ns: int, frame_id: str, camera: str, question: str, answer: str,
               model_id: str, prompt_tokens: int, completion_tokens: int, finish_reason: str,
               vision_ms: float, prefill_ms: float, decode_ms: float, first_token_ms: float,
               total_ms: float, answered_at_ns: int, status: int = 0):
        Answer, Status = self.store.types[ANSWER], self.store.types[STATUS]
        return Answer(status=Status(code=int(status)), header=self.header(stamp_ns, frame_id), camera=camera,
                      question=question, answer=answer, model_id=model_id, prompt_tokens=int(prompt_tokens),
                      completion_tokens=int(completion_tokens), finish_reason=finish_reason,
                      vision_ms=float(vision_ms), prefill_ms=float(prefill_ms),
                      decode_ms=float(decode_ms), first_token_ms=float(first_token_ms),
                      total_ms=float(total_ms), answered_at=self.time(answered_at_ns))


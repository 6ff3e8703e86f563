"""mobilevlm-node: a managed (lifecycle) ROS 2 node that answers questions about camera frames.

    mobilevlm-node --ros-args --params-file config/mobilevlm.yaml -p model_path:=models/tiny-v2

Lifecycle: configure loads the model (a failed load fails the transition, naming the file),
activate subscribes to the cameras and serves, deactivate stops serving (pending requests are
answered with an error), cleanup releases the model. With `autostart` (default) the node configures
and activates itself; if that fails the process exits with status 1 and the reason on stderr.

Interfaces (relative to the node, `/mobilevlm/...` by default):
  subscribes  ~/<camera>/image              sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8)
              ~/<camera>/image/compressed   sensor_msgs/CompressedImage (JPEG, PNG)
  services    ~/ask                         mobilevlm_ros/srv/Ask
  actions     ~/ask_stream                  mobilevlm_ros/action/Ask (per-token feedback, cancel)
  publishes   ~/answers, ~/captions         mobilevlm_ros/msg/Answer
              /diagnostics                  diagnostic_msgs/DiagnosticArray

Threads: image callbacks only validate and keep the newest frame per camera; a vision worker
encodes the newest frames (all cameras in one batch) at most `vision_rate_hz` times a second and
caches the embeddings; one generation worker runs the (not thread-safe) decoder on requests taken
from a bounded queue. Service and action callbacks wait for their request in a reentrant callback
group, and the executor has enough threads for every request that can wait, so image callbacks,
timers and validation are never held up by generation.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import queue
import re
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from mobilevlm_ros.action import Ask as AskAction
from mobilevlm_ros.msg import Answer
from mobilevlm_ros.srv import Ask as AskService

from ..core.errors import ImageError, MobileVLMError, RequestError
from ..core.generation import MAX_NEW_TOKENS_LIMIT, GenerationParams
from ..engine.images import check_compressed, check_raw
from .conversion import raw_image, stamp_ns
from .qos import ASK_SERVICE_QOS
from ..engine.frames import NS, AnyFrame, Frame, FrameStore, FrameUnavailable, check_stamp

NODE_NAME = "mobilevlm"
# Finished goals' results are kept this long for clients that ask late (rclpy's default is 900 s):
# a client that disappears mid-goal must not leave its result behind for a quarter of an hour.
ACTION_RESULT_KEEP_S = 60


# ---------------------------------------------------------------------------------------------------
# Parameters: every parameter of the node, declared from this one table.
# `when` says when a value takes effect:
#   runtime   - at once, also while active (validated by the on-set-parameters callback)
#   activate  - read by the activate transition: change it while the node is not active
#   configure - read by the configure transition: change it while the node is unconfigured
#   startup   - read once when the process starts
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    when: str = "runtime"
    choices: tuple = ()
    low: Optional[float] = None         # inclusive bounds, None = unbounded
    high: Optional[float] = None
    above: Optional[float] = None       # exclusive lower bound

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(name=self.name, description=self.description,
                                additional_constraints=f"takes effect: {self.when}"
                                + (f"; one of: {', '.join(self.choices)}" if self.choices else ""))
        lo = self.low if self.low is not None else self.above
        if isinstance(self.default, bool) or (lo is None and self.high is None):
            return d
        if isinstance(self.default, int):
            d.integer_range = [IntegerRange(from_value=int(lo if lo is not None else -2 ** 63),
                                            to_value=int(self.high if self.high is not None else 2 ** 63 - 1),
                                            step=1)]
        elif isinstance(self.default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(lo if lo is not None else -math.inf),
                                                         to_value=float(self.high if self.high is not None else math.inf),
                                                         step=0.0)]
        return d

    def check(self, value) -> Optional[str]:
        """Why `value` is not acceptable, or None."""
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got '{value}'"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{self.name} must be a finite number, got {value}"
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            lo = self.low if self.low is not None else "-inf"
            hi = self.high if self.high is not None else "inf"
            return f"{self.name} must be in [{lo}, {hi}], got {value}"
        if self.above is not None and value <= self.above:
            hi = f", {self.high}]" if self.high is not None else ", inf)"
            return f"{self.name} must be in ({self.above}{hi}, got {value}"
        return None


PARAMS = (
    # model (read by configure)
    Param("model_path", "", "checkpoint folder or exported artifacts folder (manifest.json)", "configure"),
    Param("vision_backend", "auto", "vision encoder backend; auto = torch for a checkpoint, onnxruntime "
          "for artifacts", "configure", choices=("auto", "torch", "onnxruntime", "tensorrt")),
    Param("decoder", "auto", "language decoder; auto = torch for a checkpoint, llamacpp for artifacts",
          "configure", choices=("auto", "torch", "llamacpp")),
    Param("quant", "q4_k_m", "GGUF file the llamacpp decoder loads", "configure",
          choices=("f16", "q8_0", "q4_k_m")),
    Param("vision_dtype", "fp32", "ONNX vision graph the onnxruntime/tensorrt backends load", "configure",
          choices=("fp32", "fp16", "int8")),
    Param("threads", 0, "CPU threads for the backends; 0 = library default", "configure", low=0, high=1024),
    Param("device", "cpu", "torch backends: cpu, cuda or cuda:N", "configure"),
    Param("gpu_layers", 0, "llama.cpp layers offloaded to the GPU; -1 = all", "configure", low=-1, high=100000),
    # cameras (read by activate)
    Param("cameras", ["front"], "camera names; topics ~/<name>/image and ~/<name>/image/compressed; "
          "the first is the default camera", "configure"),
    Param("image_transport", "both", "which topics to subscribe per camera: raw (Image), compressed "
          "(CompressedImage) or both", "activate", choices=("raw", "compressed", "both")),
    Param("image_qos_reliability", "best_effort", "image subscriptions' reliability (best_effort accepts "
          "both kinds of publisher)", "activate", choices=("best_effort", "reliable")),
    Param("image_qos_depth", 1, "image subscriptions' history depth", "activate", low=1, high=1000),
    Param("vision_rate_hz", 2.0, "most frame-batch encodes per second; 0 = as fast as possible", low=0.0,
          high=1000.0),
    Param("vision_during_answers", False, "encode frames in the background also while a question is "
          "answered; false = answers first (on a CPU an encode beside an answer takes the decoder's cores)"),
    Param("prefill_frames", True, "while no request waits, evaluate the newest fresh frame of each camera "
          "in the decoder, so that a question about it pays only for its own text"),
    Param("frame_cache_size", 4, "encoded frames (embeddings + headers) kept per camera", "configure",
          low=1, high=1000),
    Param("max_frame_age_s", 2.0, "frames older than this (node clock at question time) are not used; "
          "0 = no limit", low=0.0, high=1e9),
    # requests
    Param("max_queue", 4, "requests waiting for the generation worker; more are answered 'busy'",
          "startup", low=1, high=256),
    Param("max_new_tokens", 128, "default upper bound on generated tokens", low=1, high=MAX_NEW_TOKENS_LIMIT),
    Param("temperature", 0.0, "default sampling temperature; 0 = greedy", low=0.0, high=10.0),
    Param("top_p", 1.0, "default nucleus sampling threshold", above=0.0, high=1.0),
    Param("seed", -1, "default random seed; -1 = a fresh seed per request", low=-1, high=2 ** 32 - 1),
    Param("max_question_chars", 2000, "longest accepted question, in characters", low=1, high=1000000),
    # periodic captions and diagnostics
    Param("caption_prompt", "Describe the scene in one sentence.", "question asked for periodic captions"),
    Param("caption_period_s", 0.0, "caption each camera's newest frame this often on ~/captions; 0 = off",
          low=0.0, high=1e6),
    Param("diagnostics_period_s", 1.0, "period of /diagnostics", above=0.0, high=3600.0),
    Param("autostart", True, "configure and activate at start; exit non-zero if that fails", "startup"),
)
PARAM_BY_NAME = {p.name: p for p in PARAMS}
_CAMERA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

RESULT_FIELDS = ("success", "answer", "error", "header", "camera", "prompt_tokens", "completion_tokens",
                 "finish_reason", "vision_ms", "prefill_ms", "decode_ms", "total_ms", "frame_age_ms")


class ParameterError(ValueError):
    """A parameter given at start-up is invalid."""


def check_cameras(cameras) -> Optional[str]:
    if not cameras:
        return "cameras must name at least one camera"
    for c in cameras:
        if not _CAMERA_NAME.match(c):
            return f"camera name '{c}' is not a valid ROS name token (letters, digits, '_')"
    if len(set(cameras)) != len(cameras):
        return f"camera names must be unique, got {list(cameras)}"
    return None


def check_question(question: str, limit: int) -> None:
    """Raise RequestError for an empty, over-long or non-printable question."""
    if not question.strip():
        raise RequestError("question is empty")
    if len(question) > limit:
        raise RequestError(f"question is too long: {len(question)} characters, the limit is {limit} "
                           f"(parameter max_question_chars)")
    for i, ch in enumerate(question):
        if ch in "\t\n\r":
            continue
        if unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") or ch == "\ufffd":
            raise RequestError(f"question contains a non-printable character U+{ord(ch):04X} at position {i} "
                               f"(binary data?)")


class Job:
    """One request for the generation worker; finished exactly once."""

    def __init__(self, kind: str, question: str, camera: str, frame: AnyFrame, params: GenerationParams,
                 arrived_ns: int, cancel: Optional[Callable[[], bool]] = None):
        self.kind, self.question, self.camera, self.frame, self.params = kind, question, camera, frame, params
        self.arrived_ns = arrived_ns
        self.t0 = time.perf_counter()
        self.frame_age_ms = (arrived_ns - frame.stamp_ns) / 1e6
        self._cancel = cancel
        self.abort_reason = ""              # set by the node (deactivate, shutdown)
        self.tokens = 0
        self.goal_handle = None             # the action goal this job answers
        self.tokens_at_cancel: Optional[int] = None
        self.events: "queue.SimpleQueue" = queue.SimpleQueue()   # (tokens, text) ..., then None
        self.done = threading.Event()
        self.result: Dict[str, Any] = {}

    def cancelled(self) -> bool:
        return bool(self.abort_reason) or (self._cancel is not None and self._cancel())

    def on_token(self, _token: int, text: str) -> None:
        self.tokens += 1
        self.events.put((self.tokens, text))

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    def finish(self, **result) -> bool:
        if self.done.is_set():
            return False
        result.setdefault("camera", self.camera)
        result.setdefault("header", self.frame.header if self.frame is not None else Header())
        result.setdefault("frame_age_ms", self.frame_age_ms)
        result.setdefault("total_ms", self.elapsed_ms())
        self.result = result
        self.done.set()
        self.events.put(None)
        return True


def fill(msg, result: Dict[str, Any]):
    """Copy result fields into a srv response / action result / Answer message; returns msg."""
    for k, v in result.items():
        if hasattr(msg, k):
            if isinstance(v, float) or k.endswith("_ms"):
                v = float(v)
            setattr(msg, k, v)
    return msg


def error_result(error: str, camera: str = "", t0: Optional[float] = None) -> Dict[str, Any]:
    return {"success": False, "error": error, "camera": camera, "finish_reason": "error",
            "total_ms": (time.perf_counter() - t0) * 1e3 if t0 else 0.0}


class MobileVLMNode(LifecycleNode):
    """The MobileVLM lifecycle node. See the module docstring."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        for p in PARAMS:
            self.declare_parameter(p.name, p.default, p.descriptor())
        self._cfg: Dict[str, Any] = {p.name: self.get_parameter(p.name).value for p in PARAMS}
        self._cfg["cameras"] = list(self._cfg["cameras"])
        errors = [e for p in PARAMS if (e := p.check(self._cfg[p.name]))]
        if (e := check_cameras(self._cfg["cameras"])):
            errors.append(e)
        if errors:
            raise ParameterError("; ".join(errors))
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._lock = threading.Lock()
        self._lifecycle = "unconfigured"
        self._model = None
        self._model_info: Dict[str, Any] = {}
        self._frames: Optional[FrameStore] = None
        self._queue: "queue.Queue[Job]" = queue.Queue(maxsize=self._cfg["max_queue"])
        self._current: Optional[Job] = None
        self._serving = False
        self._in_callbacks = 0              # service/action callbacks in progress
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._subs: list = []
        self._topics: Dict[str, list] = {}
        self._ask_srv = None
        self._ask_action = None
        self._answers_pub = self._captions_pub = None
        self._caption_timer = None
        self._last_captioned: Dict[str, int] = {}
        self.last_error = ""
        self._counts = dict(requests=0, answers=0, errors=0, busy=0, cancelled=0, captions=0,
                            captions_skipped=0, frames_prefilled=0)
        self._prefilled: Dict[str, int] = {}     # camera -> seq of the frame last prefilled
        self._last_total_ms = 0.0
        self.finished = Future()            # completed by the shutdown transition: main() exits

        self._request_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(self._cfg["diagnostics_period_s"], self._publish_diagnostics,
                                             callback_group=self._timer_group)

    # -------------------------------------------------------------------------------- parameters
    @property
    def autostart(self) -> bool:
        return bool(self._cfg["autostart"])

    def executor_threads(self) -> int:
        """Every queued request plus the running one can hold an executor thread while it waits;
        the rest serve images, timers, parameters, lifecycle and validation."""
        return self._cfg["max_queue"] + 1 + 4

    def _on_set_parameters(self, params) -> SetParametersResult:
        updates = {}
        for prm in params:
            spec = PARAM_BY_NAME.get(prm.name)
            if spec is None:
                continue            # use_sim_time and other parameters rclpy owns
            value = list(prm.value) if prm.name == "cameras" else prm.value
            if value == self._cfg[prm.name]:
                continue
            reason = spec.check(value) or (check_cameras(value) if prm.name == "cameras" else None)
            if reason is None:
                reason = self._when_reason(spec)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            updates[prm.name] = value
        if updates:
            self._cfg.update(updates)
            self.get_logger().info("parameters set: " + ", ".join(f"{k}={v!r}" for k, v in updates.items()))
            if "diagnostics_period_s" in updates:
                self.destroy_timer(self._diag_timer)
                self._diag_timer = self.create_timer(self._cfg["diagnostics_period_s"],
                                                     self._publish_diagnostics, callback_group=self._timer_group)
            if {"caption_period_s", "caption_prompt"} & updates.keys() and self._lifecycle == "active":
                self._start_captions()
        return SetParametersResult(successful=True)

    def _when_reason(self, spec: Param) -> Optional[str]:
        state = self._lifecycle
        if spec.when == "startup":
            return f"{spec.name} is read once at start-up; restart the node to change it"
        if spec.when == "configure" and state != "unconfigured":
            return (f"{spec.name} is read when the node is configured (state: {state}); deactivate and "
                    f"clean up the node, set it, then configure and activate again")
        if spec.when == "activate" and state == "active":
            return (f"{spec.name} is read when the node is activated; deactivate the node, set it, then "
                    f"activate again")
        return None

    # -------------------------------------------------------------------------------- lifecycle
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        from ..core.pipeline import LoadOptions, load_model
        cfg = self._cfg
        t0 = time.perf_counter()
        try:
            if not cfg["model_path"]:
                raise MobileVLMError("parameter model_path is empty: set it to a checkpoint folder or an "
                                     "exported artifacts folder")
            self._model = load_model(cfg["model_path"], LoadOptions(
                vision_backend=cfg["vision_backend"], decoder=cfg["decoder"], quant=cfg["quant"],
                vision_dtype=cfg["vision_dtype"], device=cfg["device"], threads=cfg["threads"],
                gpu_layers=cfg["gpu_layers"]))
        except Exception as e:          # ModelLoadError names the file; anything else is a bug to report
            self.last_error = f"cannot load model '{cfg['model_path']}': {e}"
            self.get_logger().error(self.last_error)
            return TransitionCallbackReturn.FAILURE
        self._model_info = {k: str(v) for k, v in self._model.describe().items()}
        self._frames = FrameStore(cfg["cameras"], cfg["frame_cache_size"])
        self._answers_pub = self.create_lifecycle_publisher(Answer, "~/answers", 10)
        self._captions_pub = self.create_lifecycle_publisher(Answer, "~/captions", 10)
        self._lifecycle = "inactive"
        self.get_logger().info(f"loaded {self._model_info.get('model_id')} in {time.perf_counter() - t0:.1f} s "
                               f"({', '.join(f'{k} {v}' for k, v in self._model_info.items() if k != 'model_id')})")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        cfg = self._cfg
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=cfg["image_qos_depth"],
                         reliability=(ReliabilityPolicy.BEST_EFFORT if cfg["image_qos_reliability"] == "best_effort"
                                      else ReliabilityPolicy.RELIABLE),
                         durability=DurabilityPolicy.VOLATILE)
        for cam in cfg["cameras"]:
            self._topics[cam] = []
            group = MutuallyExclusiveCallbackGroup()     # one per camera: in order, cameras in parallel
            if cfg["image_transport"] in ("raw", "both"):
                sub = self.create_subscription(Image, f"~/{cam}/image", functools.partial(self._on_image, cam),
                                               qos, callback_group=group)
                self._subs.append(sub)
                self._topics[cam].append(sub.topic_name)
            if cfg["image_transport"] in ("compressed", "both"):
                sub = self.create_subscription(CompressedImage, f"~/{cam}/image/compressed",
                                               functools.partial(self._on_compressed, cam), qos,
                                               callback_group=group)
                self._subs.append(sub)
                self._topics[cam].append(sub.topic_name)
        self._stop.clear()
        self._workers = [threading.Thread(target=self._vision_loop, name="mobilevlm-vision", daemon=True),
                         threading.Thread(target=self._generation_loop, name="mobilevlm-generation", daemon=True)]
        for w in self._workers:
            w.start()
        self._ask_srv = self.create_service(AskService, "~/ask", self._on_ask, qos_profile=ASK_SERVICE_QOS,
                                            callback_group=self._request_group)
        self._ask_action = ActionServer(self, AskAction, "~/ask_stream", execute_callback=self._execute,
                                        goal_callback=lambda _goal: GoalResponse.ACCEPT,
                                        cancel_callback=self._on_cancel,
                                        callback_group=self._request_group,
                                        result_timeout=ACTION_RESULT_KEEP_S)
        with self._lock:
            self._serving = True
        self._lifecycle = "active"
        self._start_captions()
        self.get_logger().info("serving ~/ask and ~/ask_stream; cameras: " + "; ".join(
            f"{c} <- {', '.join(t)}" for c, t in self._topics.items()))
        return super().on_activate(state)

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_serving("the node was deactivated")
        self._lifecycle = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release_model()
        self._lifecycle = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.release("the node is shutting down")
        if not self.finished.done():
            self.finished.set_result(True)
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.release("the node hit an error")
        return TransitionCallbackReturn.SUCCESS

    def release(self, reason: str = "the node is shutting down") -> None:
        """Stop serving (every pending request is answered) and free the model. Idempotent."""
        self._stop_serving(reason)
        self._release_model()
        self._lifecycle = "finalized" if "shutting down" in reason else "unconfigured"

    def _stop_serving(self, reason: str) -> None:
        with self._lock:
            self._serving = False
            current = self._current
        if current is not None:
            current.abort_reason = reason
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.finish(**error_result(f"not answered: {reason}", job.camera, job.t0))
        self._stop.set()
        if self._frames is not None:
            self._frames.wake()
        for w in self._workers:
            w.join(timeout=30.0)
        self._workers = []
        deadline = time.monotonic() + 5.0   # let waiting service/action callbacks send their answers
        while self._in_callbacks and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._ask_srv is not None or self._ask_action is not None:
            time.sleep(0.2)                 # the executor sends a returned callback's reply after it returns
        if self._caption_timer is not None:
            self.destroy_timer(self._caption_timer)
            self._caption_timer = None
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs, self._topics = [], {}
        if self._ask_srv is not None:
            self.destroy_service(self._ask_srv)
            self._ask_srv = None
        if self._ask_action is not None:
            self._ask_action.destroy()
            self._ask_action = None
        if self._frames is not None:
            self._frames.clear()            # frames from before a deactivation are stale

    def _release_model(self) -> None:
        for pub in (self._answers_pub, self._captions_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._answers_pub = self._captions_pub = None
        if self._model is not None:
            self._model.close()
            self._model = None
        self._frames = None
        self._model_info = {}

    # -------------------------------------------------------------------------------- images
    def _on_image(self, camera: str, msg: Image) -> None:
        t0 = time.thread_time()
        now = self.get_clock().now().nanoseconds
        frames = self._frames
        try:
            stamp = stamp_ns(msg.header.stamp) or now
            check_stamp(stamp, now)
            raw = raw_image(msg)
            check_raw(raw)
        except ImageError as e:
            self._reject(frames, camera, e)
        else:
            frames.offer(Frame(camera, msg.header, stamp, now, raw=raw))
        frames.note_callback(camera, (time.thread_time() - t0) * 1e3)

    def _on_compressed(self, camera: str, msg: CompressedImage) -> None:
        t0 = time.thread_time()
        now = self.get_clock().now().nanoseconds
        frames = self._frames
        try:
            stamp = stamp_ns(msg.header.stamp) or now
            check_stamp(stamp, now)
            check_compressed(msg.format, msg.data)
        except ImageError as e:
            self._reject(frames, camera, e)
        else:                       # decoded by the vision worker, not here
            frames.offer(Frame(camera, msg.header, stamp, now, compressed=msg.data, fmt=msg.format))
        frames.note_callback(camera, (time.thread_time() - t0) * 1e3)

    def _reject(self, frames: FrameStore, camera: str, err: Exception) -> None:
        frames.reject(camera, str(err))
        self.get_logger().warning(f"camera {camera}: frame rejected: {err}", throttle_duration_sec=5.0)

    # -------------------------------------------------------------------------------- vision worker
    def _vision_loop(self) -> None:
        next_t = 0.0
        while not self._stop.is_set():
            if not self._frames.wait_pending(0.2):
                continue
            rate = self._cfg["vision_rate_hz"]
            delay = next_t - time.monotonic()
            if rate > 0 and delay > 0:
                self._stop.wait(min(delay, 0.2))
                continue
            if self._prefill_due():         # the decoder first: encode, prefill, encode, ...
                self._stop.wait(0.02)
                continue
            t0 = time.monotonic()
            try:
                self._frames.encode_pending(self._model)
            except Exception as e:
                self.last_error = f"vision encoder: {type(e).__name__}: {e}"
                self.get_logger().error(self.last_error, throttle_duration_sec=5.0)
            next_t = t0 + (1.0 / rate if rate > 0 else 0.0)

    # -------------------------------------------------------------------------------- requests
    def _admit(self, req, kind: str, cancel: Optional[Callable[[], bool]] = None, goal_handle=None):
        """Validate a request (fast: no model call) and queue it. Returns (job, None) or (None, error)."""
        t0 = time.perf_counter()
        now = self.get_clock().now().nanoseconds
        self._count("requests")
        camera = (req.camera or "").strip() or self._cfg["cameras"][0]
        try:
            check_question(req.question, self._cfg["max_question_chars"])
            params = self._generation_params(req)
            if camera not in self._cfg["cameras"]:
                raise RequestError(f"unknown camera '{camera}' (cameras: {', '.join(self._cfg['cameras'])})")
            with self._lock:
                if not self._serving or self._model is None:
                    raise RequestError("the node is not active")
                model, frames = self._model, self._frames
            model.prompt(req.question)              # special tokens in the question: RequestError
            try:
                in_decoder = set(model.decoder.cached_frames())     # answered without image prefill
                frame = frames.select(camera, now, self._cfg["max_frame_age_s"], stamp_ns(req.stamp),
                                      ready=lambda f: f.embedding.key in in_decoder)
            except FrameUnavailable as e:
                if frames.stats()[camera].received == 0:
                    raise FrameUnavailable(f"{e} (topics: {', '.join(self._topics.get(camera, []))})") from None
                raise
            job = Job(kind, req.question, camera, frame, params, now, cancel)
            job.goal_handle = goal_handle
            with self._lock:
                if not self._serving:
                    raise RequestError("the node is not active")
                try:
                    self._queue.put_nowait(job)
                except queue.Full:
                    self._counts["busy"] += 1       # self._lock is held
                    raise RequestError(f"busy: {self._queue.qsize()} requests are waiting and one is being "
                                       f"answered (max_queue {self._cfg['max_queue']}); try again later") from None
            return job, None
        except MobileVLMError as e:
            self._count_error(str(e))
            return None, error_result(str(e), camera, t0)

    def _generation_params(self, req) -> GenerationParams:
        cfg = self._cfg
        n = int(req.max_new_tokens)
        if n == 0:
            n = cfg["max_new_tokens"]
        elif not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise RequestError(f"max_new_tokens must be 0 (node default, {cfg['max_new_tokens']}) or in "
                               f"1..{MAX_NEW_TOKENS_LIMIT}, got {n}")
        t, p = float(req.temperature), float(req.top_p)
        for name, v in (("temperature", t), ("top_p", p)):
            if not math.isfinite(v):
                raise RequestError(f"{name} must be a finite number (negative = node default), got {v}")
        t = cfg["temperature"] if t < 0 else t
        p = cfg["top_p"] if p < 0 else p
        seed = int(req.seed)
        if seed == -1:
            seed = cfg["seed"]
        if seed >= 2 ** 32:
            raise RequestError(f"seed must be in 0..2^32-1 (or negative), got {seed}")
        return GenerationParams(max_new_tokens=n, temperature=t, top_p=p,
                                seed=seed if seed >= 0 else None).validate()

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _count_error(self, error: str) -> None:
        with self._lock:
            self._counts["errors"] += 1
            self.last_error = error

    def _on_ask(self, request, response):
        """~/ask: validate, queue, wait for the generation worker (in the reentrant group)."""
        with self._lock:
            self._in_callbacks += 1
        try:
            job, err = self._admit(request, "service")
            if job is None:
                return fill(response, err)
            job.done.wait()
            return fill(response, job.result)
        finally:
            with self._lock:
                self._in_callbacks -= 1

    def _on_cancel(self, goal_handle) -> CancelResponse:
        """Accept; note how many tokens the goal had when the cancel arrived (reported in its error)."""
        with self._lock:
            job = self._current
            if job is not None and job.goal_handle is goal_handle and job.tokens_at_cancel is None:
                job.tokens_at_cancel = job.tokens
        return CancelResponse.ACCEPT

    def _execute(self, goal_handle):
        """~/ask_stream: like ~/ask, with the answer so far as feedback after every token."""
        with self._lock:
            self._in_callbacks += 1
        try:
            job, err = self._admit(goal_handle.request, "action", lambda: goal_handle.is_cancel_requested,
                                   goal_handle)
            if job is None:
                goal_handle.abort()
                return fill(AskAction.Result(), err)
            streaming = True
            while (event := job.events.get()) is not None:
                if not streaming:
                    continue
                tokens, text = event
                feedback = AskAction.Feedback()
                feedback.text, feedback.tokens = text, tokens
                try:
                    goal_handle.publish_feedback(feedback)
                except Exception as e:      # the context went down (SIGINT/SIGTERM): stop this answer
                    streaming = False
                    job.abort_reason = job.abort_reason or "the node is shutting down"
                    self.get_logger().debug(f"feedback not published: {e}")
            result = fill(AskAction.Result(), job.result)
            try:
                if job.result.get("finish_reason") == "cancelled" and goal_handle.is_cancel_requested:
                    goal_handle.canceled()
                elif result.success:
                    goal_handle.succeed()
                else:
                    goal_handle.abort()
            except Exception as e:          # shutting down: nobody can receive the result any more
                self.get_logger().debug(f"goal state not published: {e}")
            return result
        finally:
            with self._lock:
                self._in_callbacks -= 1

    # -------------------------------------------------------------------------------- generation worker
    def _decoder_turn(self):
        """Held while the decoder works: unless vision_during_answers, no background encode starts."""
        if self._cfg["vision_during_answers"]:
            return contextlib.nullcontext()
        return self._frames.hold_background()

    def _generation_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.05)
            except queue.Empty:
                self._prefill_idle()
                continue
            with self._lock:
                self._current = job
                if not self._serving:       # taken just as the node stopped serving
                    job.abort_reason = job.abort_reason or "the node stopped serving"
            try:
                with self._decoder_turn():
                    self._run(job)
            except Exception as e:          # never leave a request unanswered
                self.get_logger().error(f"generation failed: {type(e).__name__}: {e}")
                job.finish(**error_result(f"internal error: {type(e).__name__}: {e}", job.camera, job.t0))
            finally:
                with self._lock:
                    self._current = None
                if not job.done.is_set():
                    job.finish(**error_result("internal error: request not answered", job.camera, job.t0))

    def _to_prefill(self):
        """(camera, cached frame) pairs whose newest encoded frame is fresh and not yet prefilled."""
        frames = self._frames
        if not self._cfg["prefill_frames"] or not self._serving or frames is None:
            return []
        max_age_s = self._cfg["max_frame_age_s"]
        now = self.get_clock().now().nanoseconds
        todo = []
        for camera in self._cfg["cameras"]:
            cached = frames.latest_cached(camera)
            if cached is None or self._prefilled.get(camera) == cached.seq:
                continue
            if max_age_s <= 0 or now - cached.stamp_ns <= max_age_s * NS:
                todo.append((camera, cached))
        return todo

    def _prefill_due(self) -> bool:
        """Whether the vision worker should wait for the decoder to take the newest frames first:
        on shared cores an encode beside a prefill slows both, and an encoded frame that is never
        prefilled costs its first question the image tokens."""
        return not self._cfg["vision_during_answers"] and bool(self._to_prefill())

    def _prefill_idle(self) -> None:
        """With no request waiting: evaluate each camera's newest encoded frame in the decoder, if a
        question could still use it (max_frame_age_s), so that the question pays only for its text."""
        model = self._model
        if model is None:
            return
        for camera, cached in self._to_prefill():
            if not self._queue.empty():
                return
            # one attempt per frame, even if a request interrupts it: the vision worker waits for it
            self._prefilled[camera] = cached.seq
            try:
                with self._decoder_turn():      # a request that arrives meanwhile stops it
                    if model.prefill(cached.embedding, interrupt=lambda: not self._queue.empty()):
                        self._count("frames_prefilled")
            except MobileVLMError as e:     # the question about this frame will report it
                self.get_logger().warning(f"prefill of a {camera} frame failed: {e}", throttle_duration_sec=5.0)

    def _run(self, job: Job) -> None:
        if job.cancelled():
            self._count("cancelled")
            job.finish(success=False, error=job.abort_reason or "cancelled before generation started",
                       finish_reason="cancelled")
            return
        try:
            cached, encoded_now = self._frames.encode_frame(self._model, job.frame)
            on_token = job.on_token if job.kind == "action" else None    # only the action streams
            gen = self._model.ask(job.question, cached.embedding, job.params, on_token, job.cancelled)
        except MobileVLMError as e:
            self._count_error(str(e))
            job.finish(**error_result(str(e), job.camera, job.t0))
            return
        vision_ms = cached.vision_ms if encoded_now else 0.0
        cancelled = gen.finish_reason == "cancelled"
        if cancelled:
            self._count("cancelled")
            error = job.abort_reason or "cancelled by the client"
            if job.tokens_at_cancel is not None:
                error += f" ({gen.completion_tokens - job.tokens_at_cancel} tokens after the cancel request)"
        else:
            error = ""
            self._count("captions" if job.kind == "caption" else "answers")
        result = dict(success=not cancelled, answer=gen.text, error=error, header=cached.header,
                      camera=job.camera, prompt_tokens=gen.prompt_tokens,
                      completion_tokens=gen.completion_tokens, finish_reason=gen.finish_reason,
                      vision_ms=vision_ms, prefill_ms=gen.prefill_ms, decode_ms=gen.decode_ms,
                      total_ms=job.elapsed_ms(), frame_age_ms=job.frame_age_ms)
        self._last_total_ms = result["total_ms"]
        job.finish(**result)
        self._publish_answer(job, result)

    def _publish_answer(self, job: Job, result: Dict[str, Any]) -> None:
        pub = self._captions_pub if job.kind == "caption" else self._answers_pub
        if pub is None:
            return
        msg = fill(Answer(), {k: v for k, v in result.items() if k not in ("success", "error", "frame_age_ms")})
        msg.question = job.question
        msg.model_id = self._model_info.get("model_id", "")
        msg.answered_at = self.get_clock().now().to_msg()
        try:
            pub.publish(msg)
        except Exception as e:              # shutting down
            self.get_logger().debug(f"answer not published: {e}")

    # -------------------------------------------------------------------------------- captions
    def _start_captions(self) -> None:
        if self._caption_timer is not None:
            self.destroy_timer(self._caption_timer)
            self._caption_timer = None
        period = self._cfg["caption_period_s"]
        if period > 0 and self._cfg["caption_prompt"].strip():
            self._caption_timer = self.create_timer(period, self._on_caption_timer,
                                                    callback_group=self._timer_group)

    def _on_caption_timer(self) -> None:
        """Queue a caption of each camera's newest fresh frame, only when no request is waiting."""
        now = self.get_clock().now().nanoseconds
        prompt = self._cfg["caption_prompt"]
        for cam in self._cfg["cameras"]:
            with self._lock:
                if not self._serving:
                    return
                frames = self._frames
            try:
                frame = frames.select(cam, now, self._cfg["max_frame_age_s"])
            except FrameUnavailable:
                continue
            if self._last_captioned.get(cam) == frame.seq:
                continue
            params = GenerationParams(max_new_tokens=self._cfg["max_new_tokens"],
                                      temperature=self._cfg["temperature"], top_p=self._cfg["top_p"],
                                      seed=self._cfg["seed"] if self._cfg["seed"] >= 0 else None)
            with self._lock:
                if not self._serving or not self._queue.empty():
                    self._counts["captions_skipped"] += 1
                    continue
                self._queue.put_nowait(Job("caption", prompt, cam, frame, params, now))
            self._last_captioned[cam] = frame.seq

    # -------------------------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        def kv(d):
            return [KeyValue(key=str(k), value=str(v)) for k, v in d.items()]

        name = self.get_name()
        now = self.get_clock().now()
        model_id = self._model_info.get("model_id", "")
        statuses = []
        state = self._lifecycle
        level = DiagnosticStatus.OK if state == "active" else DiagnosticStatus.WARN
        msg = f"{state}" + (f", model {model_id}" if model_id else "")
        if state == "unconfigured" and self.last_error.startswith("cannot load model"):
            level, msg = DiagnosticStatus.ERROR, self.last_error
        statuses.append(DiagnosticStatus(level=level, name=f"{name}: model", message=msg, hardware_id=model_id,
                                         values=kv({"state": state, "model_path": self._cfg["model_path"],
                                                    **self._model_info})))
        frames = self._frames
        if frames is not None:
            for cam, st in frames.stats().items():
                age = (now.nanoseconds - st.latest_stamp_ns) / NS if st.received > st.rejected else float("nan")
                level, msg = DiagnosticStatus.OK, "receiving"
                if st.received == 0:
                    level, msg = DiagnosticStatus.WARN, "no frame received yet"
                elif st.received == st.rejected:
                    level, msg = DiagnosticStatus.WARN, "every frame rejected: " + st.last_reject
                elif self._cfg["max_frame_age_s"] > 0 and age > self._cfg["max_frame_age_s"]:
                    level, msg = DiagnosticStatus.WARN, f"latest frame is {age:.1f} s old"
                statuses.append(DiagnosticStatus(level=level, name=f"{name}: camera {cam}", message=msg,
                                                 hardware_id=model_id, values=kv({
                                                     "topics": ", ".join(self._topics.get(cam, [])),
                                                     "frames_received": st.received, "frames_encoded": st.encoded,
                                                     "frames_dropped": st.dropped, "frames_rejected": st.rejected,
                                                     "last_reject": st.last_reject,
                                                     "vision_ms": f"{st.vision_ms:.1f}",
                                                     "vision_ms_avg": f"{st.vision_ms_avg:.1f}",
                                                     "vision_latency_ms": f"{st.latency_ms:.1f}",
                                                     "callback_cpu_ms_avg": f"{st.callback_cpu_ms_avg:.3f}",
                                                     "callback_cpu_ms_max": f"{st.callback_cpu_ms_max:.3f}",
                                                     "latest_frame_age_s": f"{age:.3f}"})))
        with self._lock:
            busy_now = int(self._current is not None)
            counts = dict(self._counts)
        level = DiagnosticStatus.OK
        if self._queue.full():
            level = DiagnosticStatus.WARN
        statuses.append(DiagnosticStatus(level=level, name=f"{name}: requests",
                                         message=f"{self._queue.qsize()} waiting, {busy_now} in progress",
                                         hardware_id=model_id, values=kv({
                                             "queue_depth": self._queue.qsize(), "max_queue": self._cfg["max_queue"],
                                             "in_progress": busy_now, **counts,
                                             "vision_errors": frames.encode_errors if frames else 0,
                                             "last_total_ms": f"{self._last_total_ms:.1f}",
                                             "last_error": self.last_error})))
        array = DiagnosticArray(status=statuses)
        array.header.stamp = now.to_msg()
        self._diag_pub.publish(array)


def return_large_buffers_to_the_os(threshold: int = 1 << 20) -> bool:
    """Serve allocations >= threshold by mmap, always (glibc). By default glibc raises that threshold
    after the first large free, so the camera frames (1 to 6 MB, allocated in several threads) then
    come from per-thread arenas that keep the freed memory: RSS climbed by ~200 MB at an unpredictable
    moment of a flood and stayed there. A fixed threshold returns each frame's memory when it is freed."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, threshold))         # M_MMAP_THRESHOLD
    except (OSError, AttributeError):                   # not glibc
        return False


def main(argv=None) -> int:
    return_large_buffers_to_the_os()
    rclpy.init(args=argv)
    try:
        node = MobileVLMNode()
    except Exception as e:          # ParameterError, rclpy's InvalidParameterValueException, ...
        print(f"mobilevlm-node: invalid parameters: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=node.executor_threads())
    executor.add_node(node)
    code = 0
    try:
        if node.autostart:
            for step, trigger in (("configure", node.trigger_configure), ("activate", node.trigger_activate)):
                if trigger() != TransitionCallbackReturn.SUCCESS:
                    print(f"mobilevlm-node: {step} failed: {node.last_error or 'see the log'}", file=sys.stderr)
                    code = 1
                    break
        if code == 0:
            executor.spin_until_future_complete(node.finished)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        for _ in range(3):              # a second Ctrl-C must not leave requests or threads behind
            try:
                node.release()
                break
            except KeyboardInterrupt:
                continue
        executor.shutdown(timeout_sec=10.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())

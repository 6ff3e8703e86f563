"""mobilevlm-node: a managed (lifecycle) ROS 2 node that answers questions about camera frames.

    mobilevlm-node --ros-args --params-file config/mobilevlm.yaml -p model_path:=models/tiny-v2

An adapter over the engine (mobilevlm_ros/engine): parameters -> EngineConfig, image messages ->
engine.offer_*, Ask requests and goals -> engine.submit, Results -> responses and ~/answers,
engine.stats() -> /diagnostics, lifecycle transitions -> engine start / stop.

Lifecycle: configure loads the model and creates the engine (a failed load fails the transition,
naming the file), activate subscribes to the cameras and starts the engine, deactivate stops it
(waiting requests are answered UNAVAILABLE), cleanup releases the model. With `autostart` (default)
the node configures and activates itself; if that fails the process exits with status 1.

Interfaces (relative to the node, `/mobilevlm/...` by default):
  subscribes  ~/<camera>/image              sensor_msgs/Image (see engine/images.py for encodings)
              ~/<camera>/image/compressed   sensor_msgs/CompressedImage (JPEG, PNG)
  services    ~/ask                         mobilevlm_ros/srv/Ask
  actions     ~/ask_stream                  mobilevlm_ros/action/Ask (per-token feedback, cancel)
  publishes   ~/answers, ~/captions         mobilevlm_ros/msg/Answer
              ~/annotated                   sensor_msgs/Image (bgr8): each answer and caption drawn on
              ~/annotated/compressed        its frame, JPEG; only while subscribed (ros/annotated.py)
              /diagnostics                  diagnostic_msgs/DiagnosticArray

Service and action callbacks are coroutines: they submit and await the engine's ticket, so the
node's one executor thread never waits for an answer. A single-threaded executor, because each
camera message costs it half the CPU time of rclpy's multi-threaded one (no hand-over to a pool),
and that time is taken from the decoder's cores (`mobilevlm-bench node`). Lifecycle transitions run
in that thread: while configure loads a model, requests wait in DDS and are served after it.
"""
from __future__ import annotations

import ctypes
import functools
import os
import queue
import sys
import threading
import time
from typing import Any, Dict, Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image

from mobilevlm_ros.action import Ask as AskAction
from mobilevlm_ros.msg import Answer

from ..core.errors import ImageError, MobileVLMError
from ..engine.config import RENAMED_PARAMETERS, ConfigError
from ..engine.engine import Engine
from ..engine.frames import NS
from ..engine.requests import Result, Status
from .annotated import AnnotatedImages
from .conversion import fill_result, raw_image, request_from_msg, stamp_ns
from .params import PARAM_BY_NAME, PARAMS, ENGINE_PARAMS, engine_config, load_options
from .qos import ASK_SERVICE_QOS

from mobilevlm_ros.srv import Ask as AskService  # noqa: E402  (generated types after our own)

NODE_NAME = "mobilevlm"
# Finished goals' results are kept this long for clients that ask late (rclpy's default is 900 s):
# a client that disappears mid-goal must not leave its result behind for a quarter of an hour.
ACTION_RESULT_KEEP_S = 60
RETIRE_SERVERS_AFTER_S = 0.2        # deactivate: replies to the requests it ended go out first
FEEDBACK_HEAD_START_S = 0.05        # between an answer's last feedback and its result


class ParameterError(ValueError):
    """A parameter given at start-up is invalid."""


class MobileVLMNode(LifecycleNode):
    """The MobileVLM lifecycle node. See the module docstring."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        for p in PARAMS:
            self.declare_parameter(p.name, p.default, p.descriptor())
        self._cfg: Dict[str, Any] = {p.name: self.get_parameter(p.name).value for p in PARAMS}
        self._cfg["cameras"] = list(self._cfg["cameras"])
        errors = [e for p in PARAMS if (e := p.check(self._cfg[p.name]))]
        errors += [f"parameter {old} is now called {new} (CHANGELOG.md)"
                   for old, new in RENAMED_PARAMETERS.items()
                   if old in self._parameter_overrides]     # rclpy's copy of the params files' and -p values
        if errors:
            raise ParameterError("; ".join(errors))
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._lifecycle = "unconfigured"
        self._model = None
        self._engine: Optional[Engine] = None
        self._model_info: Dict[str, str] = {}
        self._subs: list = []
        self._topics: Dict[str, list] = {}
        self._ask_srv = None
        self._ask_action = None
        self._answers_pub = self._captions_pub = None
        self._annotated: Optional[AnnotatedImages] = None
        self._goals: Dict[int, Any] = {}            # id(goal handle) -> ticket, for cancel
        self.last_error = ""
        self.finished = Future()                    # completed by the shutdown transition: main() exits

        # requests are coroutines that await the engine: in a group of the node's default kind
        # (mutually exclusive) one waiting request would hold back every other callback
        self._request_group = ReentrantCallbackGroup()
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(self._cfg["diagnostics_period_s"], self._publish_diagnostics)

    # -------------------------------------------------------------------------------- parameters
    @property
    def autostart(self) -> bool:
        return bool(self._cfg["autostart"])

    def _on_set_parameters(self, params) -> SetParametersResult:
        updates = {}
        for prm in params:
            spec = PARAM_BY_NAME.get(prm.name)
            if spec is None:
                continue            # use_sim_time and other parameters rclpy owns
            value = list(prm.value) if prm.name == "cameras" else prm.value
            if value == self._cfg[prm.name]:
                continue
            reason = spec.check(value) or self._when_reason(spec)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            updates[prm.name] = value
        if not updates:
            return SetParametersResult(successful=True)
        engine_updates = {k: v for k, v in updates.items() if k in ENGINE_PARAMS}
        if self._engine is not None and engine_updates:
            try:
                self._engine.update(**engine_updates)
            except ConfigError as e:
                return SetParametersResult(successful=False, reason=str(e))
        self._cfg.update(updates)
        self.get_logger().info("parameters set: " + ", ".join(f"{k}={v!r}" for k, v in updates.items()))
        if "diagnostics_period_s" in updates:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = self.create_timer(self._cfg["diagnostics_period_s"], self._publish_diagnostics)
        return SetParametersResult(successful=True)

    def _when_reason(self, spec) -> Optional[str]:
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
        from ..core.pipeline import load_model
        cfg = self._cfg
        t0 = time.perf_counter()
        try:
            if not cfg["model_path"]:
                raise MobileVLMError("parameter model_path is empty: set it to a checkpoint folder or an "
                                     "exported artifacts folder")
            self._model = load_model(cfg["model_path"], load_options(cfg))
        except Exception as e:          # ModelLoadError names the file; anything else is a bug to report
            self.last_error = f"cannot load model '{cfg['model_path']}': {e}"
            self.get_logger().error(self.last_error)
            return TransitionCallbackReturn.FAILURE
        self._model_info = {k: str(v) for k, v in self._model.describe().items()}
        clock = self.get_clock()
        self._engine = Engine(self._model, engine_config(cfg), clock=lambda: clock.now().nanoseconds)
        self._engine.on_answer = self._publish_answer
        self._engine.no_frame_hint = lambda cam: "topics: " + ", ".join(self._topics.get(cam, []))
        self._answers_pub = self.create_lifecycle_publisher(Answer, "~/answers", 10)
        self._captions_pub = self.create_lifecycle_publisher(Answer, "~/captions", 10)
        if self._engine.config.keep_frame_images:
            self._annotated = AnnotatedImages(self, lambda: self._cfg["annotated_jpeg_quality"])
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
            kinds = {"raw": (Image, "image", self._on_image),
                     "compressed": (CompressedImage, "image/compressed", self._on_compressed)}
            for kind in (("raw", "compressed") if cfg["image_transport"] == "both" else (cfg["image_transport"],)):
                msg_type, suffix, callback = kinds[kind]
                sub = self.create_subscription(msg_type, f"~/{cam}/{suffix}", functools.partial(callback, cam), qos)
                self._subs.append(sub)
                self._topics[cam].append(sub.topic_name)
        self._engine.start()
        self._lower_ros_threads(cfg["ros_threads_nice"])
        self._ask_srv = self.create_service(AskService, "~/ask", self._on_ask, qos_profile=ASK_SERVICE_QOS,
                                            callback_group=self._request_group)
        self._ask_action = ActionServer(self, AskAction, "~/ask_stream", execute_callback=self._execute,
                                        goal_callback=lambda _goal: GoalResponse.ACCEPT,
                                        cancel_callback=self._on_cancel, callback_group=self._request_group,
                                        result_timeout=ACTION_RESULT_KEEP_S)
        self._lifecycle = "active"
        self.get_logger().info("serving ~/ask and ~/ask_stream; cameras: " + "; ".join(
            f"{c} <- {', '.join(t)}" for c, t in self._topics.items()))
        return super().on_activate(state)

    def _lower_ros_threads(self, nice: int) -> None:
        """The node's Python threads but the engine's workers (the main thread, which runs the
        executor: messages deserialised, callbacks) get `nice`. DDS's own receive threads keep their
        priority: at a lower one a camera driver on the same cores would starve them and large
        frames would be lost in the socket. llama.cpp's compute threads are made by the generation
        worker. Raising a nice value needs no
        privilege, lowering it back would: after a re-activation the new workers inherit the value
        of the thread that started them."""
        if nice <= 0 or not os.path.isdir("/proc/self/task"):
            return
        keep = set(self._engine.worker_thread_ids())
        lowered = []
        for t in threading.enumerate():
            tid = t.native_id
            if tid is None or tid in keep:
                continue
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                    lowered.append(tid)
            except OSError:             # the thread ended meanwhile
                continue
        self.get_logger().debug(f"nice {nice} for threads {lowered}; engine workers {sorted(keep)} unchanged")

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
        """Stop serving (every waiting request is answered) and free the model. Idempotent."""
        self._stop_serving(reason)
        self._release_model()
        self._lifecycle = "finalized" if "shutting down" in reason else "unconfigured"

    def _stop_serving(self, reason: str) -> None:
        if self._engine is not None:
            self._engine.stop(reason)       # every waiting request has its result now
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs, self._topics = [], {}
        self._retire_servers()

    def _retire_servers(self) -> None:
        """Take ~/ask and ~/ask_stream down once the requests just ended have been replied to:
        their coroutines resume in the executor after the current callback (the transition)
        returns. Until then a new request is answered UNAVAILABLE by the stopped engine."""
        servers = [s for s in (self._ask_srv, self._ask_action) if s is not None]
        self._ask_srv = self._ask_action = None
        if not servers:
            return

        def destroy(_future=None):
            for server in servers:
                if isinstance(server, ActionServer):
                    server.destroy()
                else:
                    self.destroy_service(server)
        later = self._sleep(RETIRE_SERVERS_AFTER_S) if self.executor is not None else None
        if later is None or later.done():   # not spinning, or the context is going down
            destroy()
        else:
            later.add_done_callback(destroy)

    def _release_model(self) -> None:
        for pub in (self._answers_pub, self._captions_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._answers_pub = self._captions_pub = None
        if self._annotated is not None:
            self._annotated.close()
            self._annotated = None
        self._engine = None
        if self._model is not None:
            self._model.close()
            self._model = None
        self._model_info = {}

    # -------------------------------------------------------------------------------- images
    def _on_image(self, camera: str, msg: Image) -> None:
        self._offer(camera, lambda e: e.offer_raw(camera, msg.header, stamp_ns(msg.header.stamp), raw_image(msg)))

    def _on_compressed(self, camera: str, msg: CompressedImage) -> None:
        self._offer(camera, lambda e: e.offer_compressed(camera, msg.header, stamp_ns(msg.header.stamp),
                                                         msg.format, msg.data))

    def _offer(self, camera: str, offer) -> None:
        """O(1): the engine validates and keeps the newest frame; conversion waits for the encode."""
        t0 = time.thread_time()
        engine = self._engine
        if engine is None:
            return
        try:
            offer(engine)
        except ImageError as e:             # counted by the engine
            self.get_logger().warning(f"camera {camera}: frame rejected: {e}", throttle_duration_sec=5.0)
        engine.frames.note_callback(camera, (time.thread_time() - t0) * 1e3)

    # -------------------------------------------------------------------------------- requests
    async def _wait(self, ticket) -> Result:
        """Await a ticket without holding an executor thread."""
        future = Future(executor=self.executor)
        executor = self.executor

        def done(result):
            future.set_result(result)
            if executor is not None:
                executor.wake()
        ticket.add_done_callback(done)
        return await future

    def _submit(self, msg, kind: str, on_token=None):
        engine = self._engine
        if engine is None:
            return None
        return engine.submit(request_from_msg(msg, kind), on_token)

    @staticmethod
    def _not_active() -> Result:
        return Result(status=Status.UNAVAILABLE, error="the node is not active")

    async def _on_ask(self, request, response):
        """~/ask: submit, await the engine's result (no executor thread waits)."""
        ticket = self._submit(request, "service")
        result = await self._wait(ticket) if ticket is not None else self._not_active()
        return fill_result(response, result)

    def _on_cancel(self, goal_handle) -> CancelResponse:
        ticket = self._goals.get(id(goal_handle))
        if ticket is not None:
            ticket.cancel("cancelled by the client")
        return CancelResponse.ACCEPT

    async def _execute(self, goal_handle):
        """~/ask_stream: like ~/ask, with the answer so far as feedback after every token. Tokens go
        from the generation worker into a queue that this coroutine publishes from: a slow or
        vanished client (a reliable writer blocking on a full history) never slows generation."""
        executor = self.executor
        tokens: "queue.SimpleQueue" = queue.SimpleQueue()
        wake = [Future(executor=executor)]

        def notify(*_):
            f = wake[0]
            if not f.done():
                f.set_result(None)
            if executor is not None:
                executor.wake()

        def on_token(n: int, text: str) -> None:
            tokens.put((n, text))
            notify()
        ticket = self._submit(goal_handle.request, "action", on_token)
        if ticket is None:
            result = self._not_active()
        else:
            self._goals[id(goal_handle)] = ticket
            if goal_handle.is_cancel_requested:
                ticket.cancel("cancelled by the client")
            ticket.add_done_callback(notify)
            published = False
            try:
                while True:
                    wake[0] = Future(executor=executor)
                    while not tokens.empty():
                        n, text = tokens.get()
                        self._feedback(goal_handle, ticket, n, text)
                        published = True
                    if ticket.done() and tokens.empty():
                        break
                    if tokens.empty():
                        await wake[0]
                if published and self.context.ok():
                    # feedback and result travel on different DDS topics, and rclpy's action client
                    # drops feedback that arrives after its result: give the last tokens a head start
                    await self._sleep(FEEDBACK_HEAD_START_S)
            finally:
                self._goals.pop(id(goal_handle), None)
            result = ticket.result(0)
        try:
            if result.status == Status.CANCELLED and goal_handle.is_cancel_requested:
                goal_handle.canceled()
            elif result.success:
                goal_handle.succeed()
            else:
                goal_handle.abort()
        except Exception as e:              # shutting down: nobody can receive the result any more
            self.get_logger().debug(f"goal state not published: {e}")
        return fill_result(AskAction.Result(), result)

    def _sleep(self, seconds: float) -> Future:
        """A future done after `seconds` (a one-shot timer), for a coroutine to await without
        holding an executor thread."""
        done = Future(executor=self.executor)
        timer = None

        def fire():
            timer.cancel()
            self.destroy_timer(timer)
            if not done.done():
                done.set_result(None)
        try:
            timer = self.create_timer(seconds, fire, callback_group=self._request_group)
        except Exception:                   # the context is going down (SIGINT/SIGTERM): no wait
            done.set_result(None)
        return done

    def _feedback(self, goal_handle, ticket, n: int, text: str) -> None:
        msg = AskAction.Feedback()
        msg.text, msg.tokens = text, n
        try:
            goal_handle.publish_feedback(msg)
        except Exception as e:              # the context went down (SIGINT/SIGTERM): stop this answer
            ticket.cancel("the node is shutting down")
            self.get_logger().debug(f"feedback not published: {e}")

    def _publish_answer(self, request, result: Result) -> None:
        """engine.on_answer: every generated answer on ~/answers, captions on ~/captions."""
        pub = self._captions_pub if request.kind == "caption" else self._answers_pub
        if pub is None:
            return
        msg = fill_result(Answer(), result)
        msg.question = request.question
        msg.model_id = self._model_info.get("model_id", "")
        msg.answered_at = self.get_clock().now().to_msg()
        pub.publish(msg)
        if self._annotated is not None:     # drawn in its own thread, not this (the generation worker)
            self._annotated.offer(request.question, result)

    # -------------------------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        def kv(d):
            return [KeyValue(key=str(k), value=str(v)) for k, v in d.items()]

        name = self.get_name()
        now = self.get_clock().now()
        model_id = self._model_info.get("model_id", "")
        state = self._lifecycle
        level = DiagnosticStatus.OK if state == "active" else DiagnosticStatus.WARN
        msg = f"{state}" + (f", model {model_id}" if model_id else "")
        if state == "unconfigured" and self.last_error.startswith("cannot load model"):
            level, msg = DiagnosticStatus.ERROR, self.last_error
        statuses = [DiagnosticStatus(level=level, name=f"{name}: model", message=msg, hardware_id=model_id,
                                     values=kv({"state": state, "model_path": self._cfg["model_path"],
                                                **self._model_info}))]
        engine = self._engine
        if engine is not None:
            st = engine.stats()
            max_age = st.max_frame_age_s
            for cam, cs in st.cameras.items():
                age = (now.nanoseconds - cs.latest_stamp_ns) / NS if cs.received > cs.rejected else float("nan")
                level, msg = DiagnosticStatus.OK, "receiving"
                if cs.received == 0:
                    level, msg = DiagnosticStatus.WARN, "no frame received yet"
                elif cs.received == cs.rejected:
                    level, msg = DiagnosticStatus.WARN, "every frame rejected: " + cs.last_reject
                elif max_age > 0 and age > max_age:
                    level, msg = DiagnosticStatus.WARN, f"latest frame is {age:.1f} s old"
                statuses.append(DiagnosticStatus(level=level, name=f"{name}: camera {cam}", message=msg,
                                                 hardware_id=model_id, values=kv({
                                                     "topics": ", ".join(self._topics.get(cam, [])),
                                                     "frames_received": cs.received, "frames_encoded": cs.encoded,
                                                     "frames_dropped": cs.dropped, "frames_rejected": cs.rejected,
                                                     "last_reject": cs.last_reject,
                                                     "vision_ms": f"{cs.vision_ms:.1f}",
                                                     "vision_ms_avg": f"{cs.vision_ms_avg:.1f}",
                                                     "vision_latency_ms": f"{cs.latency_ms:.1f}",
                                                     "callback_cpu_ms_avg": f"{cs.callback_cpu_ms_avg:.3f}",
                                                     "callback_cpu_ms_max": f"{cs.callback_cpu_ms_max:.3f}",
                                                     "cached_frames": cs.cached,
                                                     "cache_mb": f"{cs.cached_bytes / 2**20:.2f}",
                                                     "latest_frame_age_s": f"{age:.3f}"})))
            level = DiagnosticStatus.WARN if st.queue_depth >= st.max_queue else DiagnosticStatus.OK
            statuses.append(DiagnosticStatus(level=level, name=f"{name}: requests",
                                             message=f"{st.queue_depth} waiting, {st.in_progress} in progress",
                                             hardware_id=model_id, values=kv({
                                                 "queue_depth": st.queue_depth, "max_queue": st.max_queue,
                                                 "in_progress": st.in_progress, **st.counts,
                                                 "vision_errors": st.vision_errors,
                                                 "vision_aborted": st.vision_aborted,
                                                 "max_frame_age_s": f"{max_age:.3f}",
                                                 "prefill_ms_avg": f"{st.prefill_ms_avg:.1f}",
                                                 "decoder_kv_states": st.decoder_kv_states,
                                                 "decoder_cache_mb": f"{st.decoder_cache_bytes / 2**20:.2f}",
                                                 "last_total_ms": f"{st.last_total_ms:.1f}",
                                                 "last_error": st.last_error or self.last_error})))
        annotated = self._annotated
        if annotated is not None:
            a = annotated.snapshot()
            n_raw, n_jpeg = annotated.subscribers()
            statuses.append(DiagnosticStatus(
                level=DiagnosticStatus.WARN if a.errors else DiagnosticStatus.OK, name=f"{name}: annotated",
                message=f"{a.drawn} drawn; subscribers: {n_raw} raw, {n_jpeg} compressed", hardware_id=model_id,
                values=kv({"subscribers_raw": n_raw, "subscribers_compressed": n_jpeg, **a.values()})))
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
    args = list(sys.argv if argv is None else argv)[1:]
    own = args[:args.index("--ros-args")] if "--ros-args" in args else args
    if "-h" in own or "--help" in own:     # before any ROS set-up: help starts no node
        print("usage: mobilevlm-node [--ros-args --params-file FILE -p NAME:=VALUE -r FROM:=TO ...]\n")
        print(__doc__)
        return 0
    return_large_buffers_to_the_os()
    rclpy.init(args=argv)
    try:
        node = MobileVLMNode()
    except Exception as e:          # ParameterError, rclpy's InvalidParameterValueException, ...
        print(f"mobilevlm-node: invalid parameters: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
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
            # the shutdown transition ended the requests it found: let their replies go out
            t_end = time.monotonic() + 2 * RETIRE_SERVERS_AFTER_S
            while rclpy.ok(context=node.context) and time.monotonic() < t_end:
                executor.spin_once(timeout_sec=0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # SIGINT/SIGTERM shut the context down from a signal handler: a spin that was just building
        # its wait set then fails with RCLError ("context is not valid") instead of the exception
        # above. That is the same shutdown; only a failure of a live context is an error.
        if rclpy.ok(context=node.context):
            raise
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

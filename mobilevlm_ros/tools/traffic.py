"""Traffic against a running mobilevlm node: camera streams, many clients asking at once, and the
node's own counters and memory sampled over time.

Shared by the soak command (`mobilevlm-soak`), the node benchmarks (`mobilevlm-bench node|memory`)
and the reliability tests, so what they measure is measured the same way.

    node = NodeUnderTest("models/tiny-v2-artifacts", cameras=["front", "rear"])
    with Flood(node.name, [CameraStream.parse("front:640x480@60")], clients=20) as flood:
        summary = flood.run(duration_s=30, on_sample=print)
    code, seconds = node.stop()

Everything stays on this machine: the node and the flood use localhost-only discovery
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) unless the environment says otherwise.
"""
from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional


from ..resources import share_file
from .synthetic import pattern_frame



def localhost_env(env: Optional[dict] = None) -> dict:
    env = dict(os.environ if env is None else env)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return env


def proc_status(pid: int) -> Dict[str, float]:
    """VmRSS / VmHWM in MB, the thread count and the CPU seconds used so far (user + system) of a
    process (empty once it has exited)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
            elif key == "Threads":
                out[key] = int(value)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime
    except (OSError, ValueError, IndexError):
        pass
    return out


class NodeUnderTest:
    """A mobilevlm node in its own process, as a user starts it: the installed parameters file (or
    `params_file`) with -p overrides, optional remaps (`ros_args`); its log lines are kept, and
    written to `log_path` and/or echoed to stderr."""

    def __init__(self, model_path, cameras=("front",), name: str = "mobilevlm", params: Dict[str, str] = None,
                 params_file=None, env: Optional[dict] = None, log_path=None, ros_args=(), echo: bool = False):
        self.name = name
        overrides = {"model_path": str(model_path), "cameras": "[" + ", ".join(cameras) + "]",
                     "diagnostics_period_s": "0.5", **(params or {})}
        params_file = params_file or share_file("config", "mobilevlm.yaml")
        cmd = [sys.executable, "-m", "mobilevlm_ros.ros.node", "--ros-args", "--params-file", str(params_file),
               "-r", f"__node:={name}", *ros_args]
        for k, v in overrides.items():
            cmd += ["-p", f"{k}:={v}"]
        self.cmd = cmd
        self.lines: List[str] = []
        self._echo = echo
        self._log = open(log_path, "w", encoding="utf-8") if log_path else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", env=localhost_env(env))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self._echo:
                print(f"  [node] {line.rstrip()}", file=sys.stderr, flush=True)
            if self._log:
                self._log.write(line)
                self._log.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        return self.status().get("VmRSS", float("nan"))

    def log(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def status(self) -> Dict[str, float]:
        return proc_status(self.proc.pid)

    def stop(self, sig=signal.SIGINT, timeout: float = 30.0):
        """Send `sig`, wait; returns (exit code or None if it had to be killed, seconds to exit)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None, time.monotonic() - t0
        self._reader.join(timeout=2.0)
        return self.proc.returncode, time.monotonic() - t0


ANNOTATED_MODES = ("none", "raw", "jpeg", "both")

_STREAM = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_]*):(?P<w>\d+)x(?P<h>\d+)@(?P<hz>[0-9.]+)(?::(?P<kind>raw|jpeg))?$")


@dataclass
class CameraStream:
    name: str
    width: int
    height: int
    rate_hz: float
    kind: str = "raw"           # raw: sensor_msgs/Image rgb8; jpeg: CompressedImage on .../compressed

    @classmethod
    def parse(cls, spec: str) -> "CameraStream":
        """NAME:WxH@HZ[:raw|jpeg], e.g. front:640x480@30 or rear:1920x1080@60:jpeg"""
        m = _STREAM.match(spec.strip())
        if not m:
            raise ValueError(f"camera stream '{spec}' is not NAME:WIDTHxHEIGHT@HZ[:raw|jpeg]")
        return cls(m["name"], int(m["w"]), int(m["h"]), float(m["hz"]), m["kind"] or "raw")

    def __str__(self):
        return f"{self.name}:{self.width}x{self.height}@{self.rate_hz:g}:{self.kind}"


@dataclass
class Outcome:
    t: float                 # seconds since the flood started, at the response
    kind: str                # answered | busy | error
    latency_ms: float
    frame_age_ms: float = float("nan")
    error: str = ""
    vision_ms: float = 0.0   # > 0: the frame was encoded for this question (no encoded frame was fresh)
    tokens: int = 0
    first_token_ms: float = float("nan")
    prefill_ms: float = float("nan")    # the node's own figures: question text (and image, if not cached)
    decode_ms: float = float("nan")
    total_ms: float = float("nan")      # taken by the engine -> finished (wait for the decoder included)


@dataclass
class FloodSummary:
    duration_s: float
    requests_sent: int
    responses: int
    answered: int
    busy: int
    errors: int
    error_kinds: Dict[str, int]
    latency_ms_p50: float
    latency_ms_p95: float
    frame_age_ms_p50: float
    frame_age_ms_max: float
    rss_mb_after_warmup: float
    rss_mb_end: float
    cache_mb_after_warmup: float        # what the node's caches held then (diagnostics)
    cache_mb_end: float
    growth_beyond_caches_pct: float     # RSS net of the caches, end vs after warm-up: a leak
    hwm_mb: float
    cameras: Dict[str, dict] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.requests_sent - self.responses


def _pct(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


class Flood:
    """Camera streams and clients against the node `node_name`, in an rclpy context of its own.

    Each client keeps one request outstanding at a time and asks again as soon as it has its
    response, so `clients` requests arrive at once at the start and keep arriving."""

    def __init__(self, node_name: str, streams: List[CameraStream], clients: int = 20,
                 question: str = "What is in the picture?", max_new_tokens: int = 16,
                 node_pid: Optional[int] = None, response_timeout_s: float = 120.0,
                 ask_interval_s: float = 0.0, ask_random: bool = False, seed: int = 0,
                 annotated: str = "none"):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor

        self.node_name = node_name.strip("/")
        self.streams, self.n_clients = streams, clients
        self.question, self.max_new_tokens = question, max_new_tokens
        self.node_pid, self.response_timeout_s, self.ask_interval_s = node_pid, response_timeout_s, ask_interval_s
        # ask_random: each pause after an answer is uniform in [0, 2 x ask_interval_s] (the same mean),
        # so questions also come right after an answer and while a new frame is still being prefilled
        self.ask_random, self._seed = ask_random, seed
        # annotated: which of the node's ~/annotated topics to watch (none, raw, jpeg, both), as a viewer
        if annotated not in ANNOTATED_MODES:
            raise ValueError(f"annotated must be one of {', '.join(ANNOTATED_MODES)}, got '{annotated}'")
        self.annotated = annotated
        self.annotated_received = 0
        self.context = Context()
        rclpy.init(context=self.context)
        self._rclpy = rclpy
        self.monitor = rclpy.create_node(f"flood_monitor_{os.getpid()}", context=self.context)
        self.client_nodes = [rclpy.create_node(f"flood_client_{os.getpid()}_{i}", context=self.context)
                             for i in range(clients)]
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        for n in (self.monitor, *self.client_nodes):
            self.executor.add_node(n)
        self.diag: Dict[str, dict] = {}
        self.outcomes: List[Outcome] = []
        self.sent = 0
        self.frames_sent: Dict[str, int] = {s.name: 0 for s in streams}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._setup_interfaces()
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()

    # ------------------------------------------------------------------ set-up
    def _setup_interfaces(self):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import qos_profile_sensor_data

        from ..ros.qos import ASK_SERVICE_QOS
        from sensor_msgs.msg import CompressedImage, Image

        from mobilevlm_ros.srv import Ask

        self.monitor.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        from ..ros.annotated import QOS as ANNOTATED_QOS
        for mode, msg_type, topic in (("raw", Image, "annotated"), ("jpeg", CompressedImage, "annotated/compressed")):
            if self.annotated in (mode, "both"):
                self.monitor.create_subscription(msg_type, f"/{self.node_name}/{topic}", self._on_annotated,
                                                 ANNOTATED_QOS)
        self.pubs = {}
        self.messages = {}
        for s in self.streams:
            pixels = pattern_frame(s.height, s.width, seed=len(self.pubs))
            if s.kind == "jpeg":
                import io

                from PIL import Image as PILImage
                buf = io.BytesIO()
                PILImage.fromarray(pixels).save(buf, "JPEG", quality=90)
                msg = CompressedImage(format="jpeg", data=buf.getvalue())
                topic = f"/{self.node_name}/{s.name}/image/compressed"
                pub = self.monitor.create_publisher(CompressedImage, topic, qos_profile_sensor_data)
            else:
                msg = Image(height=s.height, width=s.width, encoding="rgb8", step=s.width * 3,
                            data=pixels.tobytes())
                topic = f"/{self.node_name}/{s.name}/image"
                pub = self.monitor.create_publisher(Image, topic, qos_profile_sensor_data)
            msg.header.frame_id = f"flood_{s.name}"
            self.pubs[s.name], self.messages[s.name] = pub, msg
        self.clients = [n.create_client(Ask, f"/{self.node_name}/ask", qos_profile=ASK_SERVICE_QOS)
                        for n in self.client_nodes]
        self._Ask = Ask

    def _on_diag(self, msg):
        prefix = f"{self.node_name}: "
        for st in msg.status:
            if st.name.startswith(prefix):
                self.diag[st.name[len(prefix):]] = {"level": st.level, "message": st.message,
                                                   **{kv.key: kv.value for kv in st.values}}

    def _on_annotated(self, _msg):
        with self._lock:
            self.annotated_received += 1

    def annotated_matched(self) -> bool:
        """Whether the node's diagnostics show the subscriptions this flood watches with."""
        d = self.diag.get("annotated", {})
        want_raw, want_jpeg = self.annotated in ("raw", "both"), self.annotated in ("jpeg", "both")
        return (not want_raw or int(d.get("subscribers_raw", 0)) > 0) and \
            (not want_jpeg or int(d.get("subscribers_compressed", 0)) > 0)

    def camera_counters(self, name: str) -> dict:
        return self.diag.get(f"camera {name}", {})

    def cache_mb(self) -> float:
        """What the node's caches hold by its diagnostics: cached frames (embeddings, kept images)
        of every camera and the decoder's cached KV states. Bounded by design, so not a leak."""
        frames = sum(float(self.camera_counters(s.name).get("cache_mb", 0.0)) for s in self.streams)
        return frames + float(self.diag.get("requests", {}).get("decoder_cache_mb", 0.0))

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the node's service answers discovery and its diagnostics arrive."""
        deadline = time.monotonic() + timeout
        for c in self.clients:
            if not c.wait_for_service(timeout_sec=max(0.1, deadline - time.monotonic())):
                raise TimeoutError(f"/{self.node_name}/ask did not appear within {timeout:.0f} s")
        while not self.diag and time.monotonic() < deadline:
            time.sleep(0.05)
        while not self.annotated_matched() and time.monotonic() < deadline:
            time.sleep(0.05)
        for s in self.streams:
            while self.pubs[s.name].get_subscription_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        # A service's response path is matched separately from its request path: a client whose
        # first request goes out before the node's response writer has matched it never gets the
        # answer (DDS drops it). Ping each client with a request the node refuses at once (empty
        # question) until a response comes back. The node counts these as errors.
        for c in self.clients:
            while True:
                future = c.call_async(self._Ask.Request(question=""))
                done = threading.Event()
                future.add_done_callback(lambda _f: done.set())
                if done.wait(1.0):
                    break
                c.remove_pending_request(future)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no response from /{self.node_name}/ask within {timeout:.0f} s")

    # ------------------------------------------------------------------ traffic
    def _publish_loop(self, s: CameraStream, t_end: float, done: Optional[threading.Event] = None):
        pub, msg = self.pubs[s.name], self.messages[s.name]
        period = 1.0 / s.rate_hz
        next_t = time.monotonic()
        done = done or self._stop
        while not done.is_set() and not self._stop.is_set() and time.monotonic() < t_end:
            msg.header.stamp = self.monitor.get_clock().now().to_msg()
            pub.publish(msg)
            self.frames_sent[s.name] += 1
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()       # behind: do not burst to catch up

    def _ask_loop(self, client, t0: float, t_end: float, start: threading.Barrier):
        import random
        rng = random.Random(f"{self._seed}:{self.clients.index(client)}")     # repeatable arrival times
        start.wait()
        while not self._stop.is_set() and time.monotonic() < t_end:
            req = self._Ask.Request(question=self.question, max_new_tokens=self.max_new_tokens, temperature=0.0)
            done = threading.Event()
            sent_at = time.monotonic()
            future = client.call_async(req)
            future.add_done_callback(lambda _f: done.set())
            with self._lock:
                self.sent += 1
            if not done.wait(self.response_timeout_s):
                with self._lock:
                    self.outcomes.append(Outcome(time.monotonic() - t0, "timeout", float("nan"),
                                                 error="no response"))
                client.remove_pending_request(future)
                continue
            res = future.result()
            latency = (time.monotonic() - sent_at) * 1e3
            if res.success:
                out = Outcome(time.monotonic() - t0, "answered", latency, res.frame_age_ms,
                              vision_ms=res.vision_ms, tokens=res.completion_tokens,
                              first_token_ms=res.first_token_ms, prefill_ms=res.prefill_ms,
                              decode_ms=res.decode_ms, total_ms=res.total_ms)
            elif res.status.code == res.status.BUSY:
                out = Outcome(time.monotonic() - t0, "busy", latency, error=res.error)
            else:
                out = Outcome(time.monotonic() - t0, "error", latency, error=res.error)
            with self._lock:
                self.outcomes.append(out)
            if self.ask_interval_s > 0:
                self._stop.wait(rng.uniform(0.0, 2.0 * self.ask_interval_s) if self.ask_random
                                else self.ask_interval_s)

    def encoded(self) -> bool:
        """Whether every camera has had a frame encoded (per the node's diagnostics)."""
        return all(int(self.camera_counters(s.name).get("frames_encoded", 0)) > 0 for s in self.streams)

    def prime(self, timeout: float = 60.0) -> None:
        """Stream until the node has encoded a frame of every camera, so that what is measured next
        starts with frames in the node (best-effort frames sent before both sides of a topic
        matched are lost). Raises TimeoutError."""
        done = threading.Event()
        deadline = time.monotonic() + timeout
        threads = [threading.Thread(target=self._publish_loop, args=(s, deadline, done), daemon=True)
                   for s in self.streams]
        for t in threads:
            t.start()
        while not self.encoded() and time.monotonic() < deadline:
            time.sleep(0.05)
        done.set()
        for t in threads:
            t.join()
        if not self.encoded():
            received = {s.name: self.camera_counters(s.name).get("frames_received", 0) for s in self.streams}
            raise TimeoutError(f"the node had not encoded a frame of every camera within {timeout:.0f} s "
                               f"(frames received: {received})")

    def run(self, duration_s: float, warmup_s: float = 0.0, sample_period_s: float = 1.0,
            on_sample: Optional[Callable[[dict], None]] = None) -> FloodSummary:
        """Stream and ask for `duration_s`, then wait for every outstanding response. Memory growth
        compares the node's RSS net of its caches at the end with that after `warmup_s` (_memory)."""
        t0 = time.monotonic()
        t_end = t0 + duration_s
        threads = [threading.Thread(target=self._publish_loop, args=(s, t_end), daemon=True) for s in self.streams]
        for t in threads:
            t.start()
        # the clients start together once every camera has delivered a frame (questions before
        # that would only measure "no frame received yet")
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not self.encoded():
            time.sleep(0.05)
        start = threading.Barrier(len(self.clients) + 1)
        clients = [threading.Thread(target=self._ask_loop, args=(c, t0, t_end, start), daemon=True)
                   for c in self.clients]
        for t in clients:
            t.start()
        threads += clients
        start.wait()
        self.samples: List[dict] = []
        next_sample = t0
        while time.monotonic() < t_end:
            next_sample += sample_period_s
            time.sleep(max(0.0, min(next_sample, t_end) - time.monotonic()))
            row = self.sample(time.monotonic() - t0)
            self.samples.append(row)
            if on_sample:
                on_sample(row)
        self.flood_s = time.monotonic() - t0
        for t in threads:           # clients finish their outstanding request (bounded by the timeout)
            t.join(self.response_timeout_s + 5)
        time.sleep(2 * sample_period_s)     # the node's last counters
        final = self.sample(time.monotonic() - t0)
        self.samples.append(final)
        return self._summary(warmup_s, final)

    def sample(self, t: float) -> dict:
        with self._lock:
            outcomes = list(self.outcomes)
            sent = self.sent
        recent = [o for o in outcomes if o.t > t - 1.0 and o.kind == "answered"]
        row = {"t_s": round(t, 3), "requests_sent": sent,
               "answered": sum(o.kind == "answered" for o in outcomes),
               "busy": sum(o.kind == "busy" for o in outcomes),
               "errors": sum(o.kind not in ("answered", "busy") for o in outcomes),
               "latency_ms_p50": _pct([o.latency_ms for o in recent], 0.5)}
        if self.node_pid:
            st = proc_status(self.node_pid)
            row["rss_mb"] = st.get("VmRSS", float("nan"))
            row["hwm_mb"] = st.get("VmHWM", float("nan"))
            row["threads"] = st.get("Threads", 0)
            row["cpu_s"] = st.get("cpu_s", float("nan"))
            row["cache_mb"] = self.cache_mb()
        for s in self.streams:
            c = self.camera_counters(s.name)
            row[f"{s.name}_sent"] = self.frames_sent[s.name]
            for k in ("frames_received", "frames_encoded", "frames_dropped", "frames_rejected"):
                row[f"{s.name}_{k[7:]}"] = int(c.get(k, 0))
            row[f"{s.name}_callback_cpu_ms_avg"] = float(c.get("callback_cpu_ms_avg", "nan"))
        d = self.diag.get("annotated", {})
        row["annotated_received"] = self.annotated_received
        for k in ("drawn", "no_subscriber", "dropped"):
            row[f"annotated_{k}"] = int(d.get(f"annotated_{k}", 0))
        for k in ("draw_ms_avg", "raw_ms_avg", "jpeg_ms_avg", "cpu_ms_avg"):
            row[f"annotated_{k}"] = float(d.get(f"annotated_{k}", "nan"))
        return row

    def _memory(self, warmup_s: float):
        """Node RSS beside what its caches hold, just after warm-up and at the end: (rss, cache) of
        the sample with the lowest RSS net of caches in the first and in the last quarter of the
        samples after warm-up. Frame buffers in flight swing RSS by up to ~50 MB from one sample to
        the next (1080p frames are 6 MB; seen 190-243 MB within 1 s at a floor of 190 MB), so
        medians of a few samples moved by 20 MB at random; what a leak raises is the floor under
        them. The caches fill during the run (4 kept 1080p frames are 25 MB, and a flood that keeps
        the decoder busy may encode only a few frames a camera): their growth is not a leak."""
        nan = float("nan")
        rows = [(r["rss_mb"], r.get("cache_mb", 0.0)) for r in self.samples
                if r["t_s"] >= warmup_s and r.get("rss_mb", nan) == r.get("rss_mb", nan)]
        if len(rows) < 4:
            return (nan, nan), (nan, nan)
        q = max(1, len(rows) // 4)
        net = lambda rc: rc[0] - rc[1]
        return min(rows[:q], key=net), min(rows[-q:], key=net)

    def _summary(self, warmup_s, final) -> FloodSummary:
        outcomes = list(self.outcomes)
        answered = [o for o in outcomes if o.kind == "answered"]
        kinds: Dict[str, int] = {}
        for o in outcomes:
            if o.kind not in ("answered", "busy"):
                key = re.sub(r"[0-9][0-9.]*", "N", o.error.split(":")[0])[:60]   # one kind, whatever the numbers
                kinds[key] = kinds.get(key, 0) + 1
        (rss_warm, cache_warm), (rss_end, cache_end) = self._memory(warmup_s)
        net_warm, net_end = rss_warm - cache_warm, rss_end - cache_end
        cams = {}
        for s in self.streams:
            c = self.camera_counters(s.name)
            cams[s.name] = {"stream": str(s), "sent": self.frames_sent[s.name],
                            "sent_hz": self.frames_sent[s.name] / self.flood_s,
                            **{k[7:]: int(c.get(k, 0)) for k in ("frames_received", "frames_encoded",
                                                                   "frames_dropped", "frames_rejected")},
                            "callback_cpu_ms_avg": float(c.get("callback_cpu_ms_avg", "nan")),
                            "callback_cpu_ms_max": float(c.get("callback_cpu_ms_max", "nan")),
                            "vision_ms_avg": float(c.get("vision_ms_avg", "nan"))}
        ages = [o.frame_age_ms for o in answered]
        return FloodSummary(
            duration_s=self.flood_s, requests_sent=self.sent,
            responses=sum(o.kind != "timeout" for o in outcomes),
            answered=len(answered), busy=sum(o.kind == "busy" for o in outcomes),
            errors=sum(o.kind not in ("answered", "busy") for o in outcomes), error_kinds=kinds,
            latency_ms_p50=_pct([o.latency_ms for o in answered], 0.5),
            latency_ms_p95=_pct([o.latency_ms for o in answered], 0.95),
            frame_age_ms_p50=statistics.median(ages) if ages else float("nan"),
            frame_age_ms_max=max(ages) if ages else float("nan"),
            rss_mb_after_warmup=rss_warm, rss_mb_end=rss_end, cache_mb_after_warmup=cache_warm,
            cache_mb_end=cache_end,
            growth_beyond_caches_pct=100.0 * (net_end - net_warm) / net_warm if net_warm > 0 else float("nan"),
            hwm_mb=final.get("hwm_mb", float("nan")), cameras=cams)

    # ------------------------------------------------------------------ tear-down
    def close(self):
        self._stop.set()
        self.executor.shutdown(timeout_sec=5.0)
        for n in (self.monitor, *self.client_nodes):
            n.destroy_node()
        self._rclpy.try_shutdown(context=self.context)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Every parameter of the node, declared from this one table.

The engine's settings come from EngineConfig (engine/config.py: default, bounds, whether they may
change at run time); the rest are the node's own (model, backends, topics, QoS). `when` says when a
value takes effect:
  runtime   - at once, also while active (validated by the on-set-parameters callback)
  activate  - read by the activate transition: change it while the node is not active
  configure - read by the configure transition: change it while the node is unconfigured
  startup   - read once when the process starts
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

from ..core.decoders.llama_library import LLAMA_LIBRARIES
from ..core.onnx_export import VISION_DTYPES
from ..core.pipeline import DECODERS, VISION_BACKENDS, LlamaCppOptions, LoadOptions, QUANTS
from ..engine.annotate import DEFAULT_JPEG_QUALITY
from ..engine.config import EngineConfig, Spec, check_cameras


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    spec: Spec
    when: str = "runtime"

    @property
    def description(self) -> str:
        return self.spec.doc

    def descriptor(self) -> ParameterDescriptor:
        s = self.spec
        d = ParameterDescriptor(name=self.name, description=s.doc,
                                additional_constraints=f"takes effect: {self.when}"
                                + (f"; one of: {', '.join(s.choices)}" if s.choices else ""))
        lo = s.low if s.low is not None else s.above
        if isinstance(self.default, bool) or (lo is None and s.high is None):
            return d
        if isinstance(self.default, int):
            d.integer_range = [IntegerRange(from_value=int(lo if lo is not None else -2 ** 63),
                                            to_value=int(s.high if s.high is not None else 2 ** 63 - 1), step=1)]
        elif isinstance(self.default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(lo if lo is not None else -math.inf),
                                                         to_value=float(s.high if s.high is not None else math.inf),
                                                         step=0.0)]
        return d

    def check(self, value) -> Optional[str]:
        """Why `value` is not acceptable, or None."""
        if self.name == "cameras":
            return check_cameras(list(value))
        return self.spec.check(self.name, value)


def _node(name, default, doc, when, **spec) -> Param:
    return Param(name, default, Spec(doc, **spec), when)


def _engine(name: str) -> Param:
    spec = EngineConfig.specs()[name]
    default = {f.name: f.default for f in fields(EngineConfig)}[name]
    if isinstance(default, tuple):
        default = list(default)             # ROS string arrays are lists
    return Param(name, default, spec, "runtime" if spec.runtime else "configure")


PARAMS = (
    # model (read by configure)
    _node("model_path", "", "checkpoint folder or exported artifacts folder (manifest.json)", "configure"),
    _node("vision_backend", "auto", "vision encoder backend; auto = torch for a checkpoint, onnxruntime "
          "for artifacts", "configure", choices=("auto", *VISION_BACKENDS)),
    _node("decoder", "auto", "language decoder; auto = torch for a checkpoint, llamacpp for artifacts",
          "configure", choices=("auto", *DECODERS)),
    _node("quant", LoadOptions.quant, "GGUF file the llamacpp decoder loads", "configure", choices=QUANTS),
    _node("llama_library", "auto", "library the llamacpp decoder runs on; auto = ik_llama.cpp on a CPU "
          "where it is built for this CPU (scripts/build-ik-llama.sh), else llama.cpp", "configure",
          choices=("auto", *LLAMA_LIBRARIES)),
    _node("vision_dtype", LoadOptions.vision_dtype, "ONNX vision graph the onnxruntime/tensorrt backends load "
          "(the torch backend: fp32 or bf16)", "configure", choices=VISION_DTYPES),
    _node("threads", 0, "CPU threads for the backends; 0 = library default", "configure", low=0, high=1024),
    _node("device", "cpu", "torch backends: cpu, cuda or cuda:N", "configure"),
    _node("gpu_layers", 0, "llama.cpp layers offloaded to the GPU; -1 = all", "configure", low=-1, high=100000),
    _node("n_ctx", LlamaCppOptions.n_ctx, "llama.cpp KV cells for one prompt and its answer; 0 = the model's training context",
          "configure", low=0, high=1 << 20),
    # cameras
    _engine("cameras"),
    _node("image_transport", "both", "which topics to subscribe per camera: raw (Image), compressed "
          "(CompressedImage) or both", "activate", choices=("raw", "compressed", "both")),
    _node("image_qos_reliability", "best_effort", "image subscriptions' reliability (best_effort accepts "
          "both kinds of publisher)", "activate", choices=("best_effort", "reliable")),
    _node("image_qos_depth", 1, "image subscriptions' history depth", "activate", low=1, high=1000),
    _engine("vision_rate_hz"),
    _engine("vision_during_answers"),
    _engine("prefill_frames"),
    _engine("embedding_cache_size"),
    _engine("keep_frame_images"),
    _engine("max_frame_age_s"),
    # requests
    _engine("max_queue"),
    _engine("max_new_tokens"),
    _engine("temperature"),
    _engine("top_p"),
    _engine("seed"),
    _engine("max_question_chars"),
    # periodic captions and diagnostics
    _engine("caption_prompt"),
    _engine("caption_period_s"),
    _node("annotated_jpeg_quality", DEFAULT_JPEG_QUALITY, "JPEG quality of ~/annotated/compressed (1-100)", "runtime",
          low=1, high=100),
    _node("ros_threads_nice", 10, "nice value of the node's Python threads (executor, callbacks) against "
          "the engine's workers; DDS threads keep theirs (0 = the same priority)", "activate", low=0, high=19),
    _node("diagnostics_period_s", 1.0, "period of /diagnostics", "runtime", above=0.0, high=3600.0),
    _node("autostart", True, "configure and activate at start; exit non-zero if that fails", "startup"),
)
PARAM_BY_NAME = {p.name: p for p in PARAMS}
ENGINE_PARAMS = tuple(p.name for p in PARAMS if p.name in EngineConfig.specs())
assert set(ENGINE_PARAMS) == set(EngineConfig.specs()), "every engine setting is a node parameter"


def engine_config(values: Dict[str, Any]) -> EngineConfig:
    """The engine's configuration from parameter values (validated)."""
    return EngineConfig(**{k: (tuple(values[k]) if k == "cameras" else values[k]) for k in ENGINE_PARAMS}).validate()


def load_options(values: Dict[str, Any]) -> LoadOptions:
    return LoadOptions(vision_backend=values["vision_backend"], decoder=values["decoder"], quant=values["quant"],
                       vision_dtype=values["vision_dtype"], device=values["device"], threads=values["threads"],
                       gpu_layers=values["gpu_layers"],
                       llamacpp=LlamaCppOptions(n_ctx=values["n_ctx"], library=values["llama_library"]))

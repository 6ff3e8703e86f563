"""The image side of MobileVLM: CLIP patch features + projector -> image embeddings [N, hidden].

Backends share one interface (`VisionBackend.encode`): `torch` here (the reference), `onnxruntime`
and `tensorrt` run the exported ONNX graph (see vision_onnx.py, vision_tensorrt.py).
"""
from __future__ import annotations

import itertools
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .errors import EncodeAborted
from .preprocess import preprocess

_keys = itertools.count(1)


@dataclass
class ImageEmbedding:
    """One frame's image embeddings, with a process-unique key that decoders cache KV under."""
    embeds: np.ndarray              # float32 [image_tokens, hidden]
    vision_ms: float = 0.0
    key: int = field(default_factory=lambda: next(_keys))


class Abort:
    """Another thread's request to stop an encode in progress. Backends that can stop mid-run
    register a hook (ONNX Runtime: RunOptions.terminate); the others check it before they start."""

    def __init__(self):
        self._lock = threading.Lock()
        self._hooks: list = []
        self.requested = False

    def request(self) -> None:
        with self._lock:
            self.requested, hooks = True, list(self._hooks)
        for hook in hooks:
            hook()

    def on_request(self, hook: Callable[[], None]) -> None:
        """Call `hook` when abort is requested (at once if it already was)."""
        with self._lock:
            if not self.requested:
                self._hooks.append(hook)
                return
        hook()

    def check(self) -> None:
        if self.requested:
            raise EncodeAborted("the encode was aborted before it started")


class VisionBackend(ABC):
    name = "vision"
    image_size = 336

    @abstractmethod
    def encode_pixels(self, pixels: np.ndarray, abort: Optional[Abort] = None) -> np.ndarray:
        """float32 [B, 3, S, S] normalised pixels -> float32 [B, image_tokens, hidden]. Raises
        EncodeAborted if `abort` is requested before or (where the backend can stop) during the run."""

    def encode(self, frames, channel_order: str = "rgb", abort: Optional[Abort] = None) -> list[ImageEmbedding]:
        """uint8 frames (any size, RGB/BGR/mono) -> one ImageEmbedding each, batched in one call."""
        t0 = time.perf_counter()
        pixels = np.stack([preprocess(f, channel_order, self.image_size) for f in frames])
        embeds = self.encode_pixels(pixels, abort)
        ms = (time.perf_counter() - t0) * 1e3 / len(frames)
        return [ImageEmbedding(np.ascontiguousarray(e, dtype=np.float32), ms) for e in embeds]

    def describe(self) -> dict:
        return {"vision_backend": self.name}

    def close(self) -> None:
        pass


def build_vision_encoder(checkpoint, dtype=None):
    """CLIP tower + projector as one torch module with the checkpoint's weights (the reference)."""
    from torch import nn

    from .clip import CLIPVisionTower
    from .errors import ModelLoadError
    from .projectors import build_projector

    cfg = checkpoint.config

    class VisionEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = CLIPVisionTower(checkpoint.vision.config, cfg.select_layer, cfg.select_feature)
            self.mm_projector = build_projector(cfg.projector_type, cfg.mm_hidden_size, cfg.llm.hidden_size)

        def forward(self, pixels):
            return self.mm_projector(self.vision_tower(pixels))

    enc = VisionEncoder()
    if checkpoint.vision.config.hidden_size != cfg.mm_hidden_size:
        raise ModelLoadError(f"vision tower width {checkpoint.vision.config.hidden_size} != mm_hidden_size "
                             f"{cfg.mm_hidden_size} in {checkpoint.path / 'config.json'}")
    _load(enc.vision_tower, checkpoint.vision.state, checkpoint.vision.source)
    _load(enc.mm_projector, checkpoint.projector_state(), f"{checkpoint.path} (model.mm_projector.*)")
    enc = enc.eval()
    return enc.to(dtype) if dtype is not None else enc


def _load(module, state: dict, where: str) -> None:
    """Strict load that names the first missing or mis-shaped key."""
    from .errors import ModelLoadError
    own = module.state_dict()
    for k, v in own.items():
        if k not in state:
            raise ModelLoadError(f"{where}: missing weight '{k}'")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelLoadError(f"{where}: weight '{k}' has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(v.shape)}")
    module.load_state_dict({k: state[k].to(v.dtype) for k, v in own.items()}, strict=True)


class TorchVision(VisionBackend):
    name = "torch"

    def __init__(self, checkpoint, device: str = "cpu", threads: int = 0, bf16: bool = False):
        """float32 on the CPU (the reference), float16 on CUDA. bf16: the CPU under autocast to
        bfloat16 (oneDNN runs the matmuls on AMX / AVX512_BF16 where the CPU has them; norms and
        softmax stay float32): `mobilevlm-bench vision` measures its speed and fidelity."""
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        dtype = torch.float32 if device == "cpu" else torch.float16
        self.encoder = build_vision_encoder(checkpoint, dtype).to(device)
        self.image_size = checkpoint.vision.config.image_size
        self.dtype = dtype
        self.bf16 = bool(bf16) and device == "cpu"

    def encode_pixels(self, pixels: np.ndarray, abort: Optional[Abort] = None) -> np.ndarray:
        import contextlib

        import torch
        if abort is not None:
            abort.check()
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            x = torch.from_numpy(pixels).to(self.device, self.dtype)
            return self.encoder(x).float().cpu().numpy()

    def describe(self) -> dict:
        return {"vision_backend": self.name, "device": self.device,
                "dtype": "bf16 (autocast)" if self.bf16 else str(self.dtype).replace("torch.", "")}

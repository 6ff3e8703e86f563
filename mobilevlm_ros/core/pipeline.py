"""MobileVLM end to end: encode a frame once, answer many questions about it.

`load_model(path, ...)` accepts a published checkpoint folder or an exported artifacts folder
(manifest.json, ONNX vision graph, GGUF decoder; see tools/export.py). Defaults: a checkpoint runs the
torch reference for both halves; artifacts run ONNX Runtime and llama.cpp and never import torch.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from .artifacts import MANIFEST, choose_vision_dtype, read_manifest
from .decoders.llama_batch import N_BATCH
from .errors import ModelLoadError
from .generation import Generation, GenerationParams, TokenCallback
from .prompt import PromptIds, build_prompt
from .tokenizer import Tokenizer
from .vision import Abort, ImageEmbedding, VisionBackend

log = logging.getLogger(__name__)

VISION_BACKENDS = ("torch", "onnxruntime", "tensorrt")
DECODERS = ("torch", "llamacpp")
QUANTS = ("f16", "q8_0", "q4_k_m", "q4_0", "iq4_xs", "q5_k_m")


@dataclass
class LlamaCppOptions:
    """What LlamaCppDecoder takes beyond LoadOptions' common fields (see its __init__)."""
    n_ctx: int = 1024                       # KV cells for one prompt and its answer (the buffer is
                                            # resident whole); 0 = the model's training context
    n_batch: int = N_BATCH                  # rows per llama_decode (0 = N_BATCH)
    threads_batch: int = 0                  # 0 = threads
    extra_buffers: Optional[bool] = None    # None = repacked layouts unless the CPU backend has AMX
    mmap: Optional[bool] = None             # None = map unless the weights are repacked on the CPU
    flash_attn: Optional[bool] = None       # None = llama.cpp's choice
    library: str = "auto"                   # auto | decoders.llama_library.LLAMA_LIBRARIES (choose_library)


@dataclass
class TensorRTOptions:
    fp16: bool = True
    max_batch: int = 4
    rebuild: bool = False                   # build the engine even if a matching one is cached


@dataclass
class LoadOptions:
    vision_backend: str = "auto"        # auto | torch | onnxruntime | tensorrt
    decoder: str = "auto"               # auto | torch | llamacpp
    quant: str = "q4_k_m"               # GGUF file the llamacpp decoder loads
    vision_dtype: str = "auto"          # ONNX graph the onnx backends load: auto | fp32 | fp16 | int8;
                                        # the torch backend: auto (= fp32) | fp32 | bf16
    device: str = "cpu"                 # torch backends: cpu | cuda
    threads: int = 0                    # 0 = library default
    gpu_layers: int = 0                 # llama.cpp layers offloaded to a GPU
    max_kv_states: int = 4              # frames whose image KV state a decoder keeps
    vision_tower: Optional[str] = None  # explicit CLIP folder for V1 checkpoints
    onnx_providers: Optional[list] = None
    engine_cache: Optional[str] = None  # TensorRT engine / timing cache folder
    llamacpp: LlamaCppOptions = field(default_factory=LlamaCppOptions)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)


def is_artifacts(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class MobileVLM:
    """A loaded model: a vision backend, a decoder and their tokenizer. Implements the engine's
    model interface (engine/model.py): callers go through these methods, not through .decoder."""

    def __init__(self, vision: VisionBackend, decoder, tokenizer: Tokenizer, image_tokens: int,
                 model_id: str):
        self.vision, self.decoder, self.tokenizer = vision, decoder, tokenizer
        self.image_tokens, self.model_id = image_tokens, model_id

    def encode(self, frames, channel_order: str = "rgb", abort: Optional[Abort] = None) -> list[ImageEmbedding]:
        return self.vision.encode(frames, channel_order, abort)

    def prompt(self, question: str) -> PromptIds:
        """Tokenize once (the engine does it when it accepts a request); RequestError if the model
        cannot take the question."""
        return build_prompt(self.tokenizer, question, self.image_tokens)

    def ask(self, question: Union[str, PromptIds], image: ImageEmbedding,
            params: GenerationParams = GenerationParams(), on_token: Optional[TokenCallback] = None,
            cancel: Optional[Callable[[], bool]] = None) -> Generation:
        """Answer `question` (prompt ids from prompt(), or its text, tokenized here) about `image`."""
        prompt = question if isinstance(question, PromptIds) else self.prompt(question)
        return self.decoder.generate(prompt, image, params, on_token, cancel)

    def prefill(self, image: ImageEmbedding, interrupt: Optional[Callable[[], bool]] = None) -> bool:
        """Evaluate a frame's image tokens in the decoder ahead of its questions (see Decoder.prefill)."""
        return self.decoder.prefill(self.prompt(""), image, interrupt)

    def kv_state_keys(self) -> list:
        """Keys of the frames whose image tokens the decoder holds (least recently used first)."""
        return self.decoder.kv_state_keys()

    def kv_state_bytes(self) -> int:
        """Host memory of the decoder's saved KV states (0 for a decoder that does not count it)."""
        return self.decoder.kv_state_bytes()

    def describe(self) -> dict:
        return {"model_id": self.model_id, "image_tokens": self.image_tokens,
                **self.vision.describe(), **self.decoder.describe()}

    def close(self):
        self.decoder.close()
        self.vision.close()


def _checkpoint_for(path: Path, opts: LoadOptions, manifest: Optional[dict]):
    """The torch reference needs the original checkpoint: the folder itself, or the manifest's source."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise ModelLoadError(f"{path}: the torch backends need torch, which is not installed here (the robot "
                             f"runtime set, requirements-runtime.txt, leaves it out); give an artifacts "
                             f"folder (`mobilevlm-export`, on a machine with requirements.txt installed) "
                             f"and the onnxruntime/llamacpp backends")
    from .checkpoint import load_checkpoint
    if manifest is None:
        return load_checkpoint(path, opts.vision_tower)
    src = Path(manifest.get("source", {}).get("path", ""))
    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{path / MANIFEST}: the torch backends need the source checkpoint, "
                             f"which is not at '{src}'")
    return load_checkpoint(src, opts.vision_tower)


def load_model(path, opts: Optional[LoadOptions] = None, **kw) -> MobileVLM:
    opts = opts or LoadOptions(**kw)
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    if not (path / "config.json").is_file() and not is_artifacts(path):
        raise ModelLoadError(f"{path} is neither a checkpoint (missing file: {path / 'config.json'}) nor an "
                             f"exported artifacts folder (missing file: {path / 'manifest.json'})")
    manifest = None
    if is_artifacts(path):
        manifest = read_manifest(path)
    vision_name = opts.vision_backend if opts.vision_backend != "auto" else (
        "onnxruntime" if manifest else "torch")
    decoder_name = opts.decoder if opts.decoder != "auto" else ("llamacpp" if manifest else "torch")
    if vision_name not in VISION_BACKENDS:
        raise ModelLoadError(f"unknown vision backend '{vision_name}' (choose from {', '.join(VISION_BACKENDS)})")
    if decoder_name not in DECODERS:
        raise ModelLoadError(f"unknown decoder '{decoder_name}' (choose from {', '.join(DECODERS)})")
    if manifest is None and (vision_name != "torch" or decoder_name != "torch"):
        raise ModelLoadError(f"{path} is a checkpoint; the {vision_name}/{decoder_name} backends need an "
                             f"artifacts folder: run `mobilevlm-export --model {path} --out ARTIFACTS`")
    t0 = time.perf_counter()
    ckpt = None
    if "torch" in (vision_name, decoder_name):
        ckpt = _checkpoint_for(path, opts, manifest)
    tok_dir = path if manifest else ckpt.path
    from .tokenizer import load_tokenizer      # tokenizer.model, or tokenizer.json without one
    tokenizer = load_tokenizer(tok_dir)

    if manifest and vision_name != "torch" and opts.vision_dtype == "auto":
        dtype, why = choose_vision_dtype(manifest, vision_name, opts.device)
        log.info("vision_dtype auto: the %s graph (%s)", dtype, why)
        opts = dataclasses.replace(opts, vision_dtype=dtype)
    if vision_name == "torch":
        from .vision import TorchVision
        if opts.vision_dtype not in ("auto", "fp32", "bf16"):
            raise ModelLoadError(f"the torch vision backend runs fp32 or bf16 (autocast), not "
                                 f"'{opts.vision_dtype}'")
        vision = TorchVision(ckpt, opts.device, opts.threads, bf16=opts.vision_dtype == "bf16")
    elif vision_name == "onnxruntime":
        from .vision_onnx import OnnxRuntimeVision
        vision = OnnxRuntimeVision.from_artifacts(path, manifest, opts)
    else:
        from .vision_tensorrt import TensorRTVision
        vision = TensorRTVision.from_artifacts(path, manifest, opts)

    if decoder_name == "torch":
        from .decoders.torch_decoder import TorchDecoder
        decoder = TorchDecoder.from_state(ckpt.config.llm, ckpt.state, tokenizer, device=opts.device,
                                          max_kv_states=opts.max_kv_states)
    else:
        from .decoders.llamacpp_decoder import LlamaCppDecoder
        decoder = LlamaCppDecoder.from_artifacts(path, manifest, tokenizer, opts)

    if manifest:
        image_tokens = int(manifest["image_tokens"])
        model_id = str(manifest.get("model_id") or path.name)
    else:
        from .projectors import projector_tokens
        image_tokens = projector_tokens(ckpt.config.projector_type, ckpt.vision.config.num_patches)
        model_id = ckpt.path.name
    ckpt = None  # the torch modules hold what they need; drop the raw state dict
    log.info("loaded %s in %.1f s (vision %s, decoder %s)", model_id, time.perf_counter() - t0,
             vision_name, decoder_name)
    return MobileVLM(vision, decoder, tokenizer, image_tokens, model_id)

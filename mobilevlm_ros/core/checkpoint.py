"""Load a published MobileVLM checkpoint folder as downloaded.

Weights may be `pytorch_model.bin` (torch pickle, read with weights_only=True) or `model.safetensors`,
single or sharded with an index. Vision weights are chosen as the reference loader chooses them (see
`resolve_vision_weights`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import (CLIPVisionConfig, MobileVLMConfig, clip_config_from_dict, load_mobilevlm_config,
                     read_json)
from .errors import ModelLoadError
from .tokenizer import TOKENIZER_JSON, tokenizer_file

log = logging.getLogger(__name__)

VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
TOKENIZER_FILE = "tokenizer.model"

# (single file, index file) in the order the reference (transformers) prefers them.
_WEIGHT_LAYOUTS = (("model.safetensors", "model.safetensors.index.json"),
                   ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: a single file, or the shards its index names."""
    folder = Path(folder)
    for single, index in _WEIGHT_LAYOUTS:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"{folder / index}: no 'weight_map'")
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]
            for shard in shards:
                if not shard.is_file():
                    raise ModelLoadError(f"missing shard {shard} (named by {folder / index})")
            return shards
    raise ModelLoadError(
        f"no weights in {folder}: expected one of model.safetensors, pytorch_model.bin "
        "or a sharded *.index.json")


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise ModelLoadError(f"missing file: {path}") from None
    except Exception as e:  # truncated zip, bad pickle, bad header: all mean a corrupt file
        raise ModelLoadError(f"corrupt or truncated weight file {path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        state.update(read_weight_file(f))
    return state


@dataclass
class VisionWeights:
    config: CLIPVisionConfig
    state: dict[str, torch.Tensor]   # keys "vision_model.*", as in transformers' CLIPVisionModel
    source: str                      # what was used, for the log and the manifest


@dataclass
class Checkpoint:
    path: Path
    config: MobileVLMConfig
    state: dict[str, torch.Tensor]   # everything the checkpoint holds, keys as published
    vision: VisionWeights

    @property
    def tokenizer_path(self) -> Path:
        """tokenizer.model (as published); tokenizer.json only in a folder without one."""
        return tokenizer_file(self.path)

    def projector_state(self) -> dict[str, torch.Tensor]:
        return {k[len(PROJECTOR_PREFIX):]: v for k, v in self.state.items()
                if k.startswith(PROJECTOR_PREFIX)}

    def llm_state(self) -> dict[str, torch.Tensor]:
        """LLM weights with their published names (model.embed_tokens..., lm_head.weight)."""
        return {k: v for k, v in self.state.items()
                if not k.startswith((VISION_PREFIX, PROJECTOR_PREFIX, "model.vision_tower."))}


def _own_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}


def infer_clip_config(vstate: dict[str, torch.Tensor], where: str) -> CLIPVisionConfig:
    """A CLIP config from weight shapes, for a checkpoint whose CLIP folder is not at hand."""
    try:
        hidden = vstate["vision_model.embeddings.class_embedding"].shape[0]
        patch = vstate["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        positions = vstate["vision_model.embeddings.position_embedding.weight"].shape[0]
        inter = vstate["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ModelLoadError(f"{where}: missing vision weight {e.args[0]}") from None
    layers = 1 + max(int(k.split(".")[3]) for k in vstate if k.startswith("vision_model.encoder.layers."))
    grid = math.isqrt(positions - 1)
    # CLIP uses 64-wide heads at every published size (ViT-B/L/H).
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), image_size=grid * patch,
                            patch_size=patch)


def _clip_folder_candidates(model_dir: Path, config: MobileVLMConfig, vision_tower_path):
    if vision_tower_path:
        yield Path(vision_tower_path), "explicit vision_tower path"
    name = Path(config.vision_tower)
    if name.is_absolute():
        yield name, "mm_vision_tower (absolute path)"
    else:
        yield model_dir / name, "mm_vision_tower relative to the checkpoint"
        yield model_dir / name.name, "mm_vision_tower's last component inside the checkpoint"


def resolve_vision_weights(model_dir: Path, config: MobileVLMConfig,
                           state: dict[str, torch.Tensor], vision_tower_path=None) -> VisionWeights:
    """Pick the vision tower weights the way the reference does, without a model hub.

    V2 ("v2" projectors): the weights stored in the checkpoint, with the CLIP folder's config when found.
    V1: the CLIP folder named by mm_vision_tower (an explicit path first, then that name relative to
    the checkpoint); failing both, the checkpoint's own vision weights.
    """
    folder = None
    for cand, how in _clip_folder_candidates(model_dir, config, vision_tower_path):
        if (cand / "config.json").is_file():
            folder = (cand, how)
            break
        if vision_tower_path and cand == Path(vision_tower_path):
            raise ModelLoadError(f"vision tower path {cand} has no config.json")
    own = _own_vision_state(state)
    if folder:
        clip_cfg = clip_config_from_dict(read_json(folder[0] / "config.json"), folder[0] / "config.json")
    if config.uses_checkpoint_vision_weights or folder is None:
        if not own:
            raise ModelLoadError(
                f"{model_dir}: no vision weights ({VISION_PREFIX}*) in the checkpoint and no CLIP "
                f"folder found for mm_vision_tower '{config.vision_tower}'")
        if folder:
            src = f"checkpoint's own vision weights, config from {folder[0]} ({folder[1]})"
        else:
            clip_cfg = infer_clip_config(own, str(model_dir))
            src = "checkpoint's own vision weights, CLIP config inferred from their shapes"
            if not config.uses_checkpoint_vision_weights:
                src += (f" (CLIP folder '{config.vision_tower}' not found; the reference would load "
                        "it from there)")
        return VisionWeights(clip_cfg, own, src)
    vstate = {k: v for k, v in read_weights(folder[0]).items() if k.startswith("vision_model.")}
    if not vstate:
        raise ModelLoadError(f"{folder[0]}: no 'vision_model.*' weights")
    return VisionWeights(clip_cfg, vstate, f"CLIP folder {folder[0]} ({folder[1]})")


def load_checkpoint(model_dir, vision_tower_path=None) -> Checkpoint:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder not found: {model_dir}")
    config = load_mobilevlm_config(model_dir)
    if not tokenizer_file(model_dir).is_file():
        raise ModelLoadError(f"missing file: {model_dir / TOKENIZER_FILE} (nor {TOKENIZER_JSON})")
    state = read_weights(model_dir)
    vision = resolve_vision_weights(model_dir, config, state, vision_tower_path)
    log.info("vision weights: %s", vision.source)
    return Checkpoint(model_dir, config, state, vision)

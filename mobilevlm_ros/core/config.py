"""Typed views of a published MobileVLM checkpoint's config.json (and of a CLIP folder's)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False       # the output head is embed_tokens (no lm_head weight)
    head_dim_override: int = 0              # config.json "head_dim"; 0 = hidden_size / heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP ViT vision tower; the defaults are openai/clip-vit-large-patch14-336."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class MobileVLMConfig:
    llm: LlamaConfig
    projector_type: str
    vision_tower: str               # mm_vision_tower: a hub id or a path
    mm_hidden_size: int
    select_layer: int = -2
    select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    mm_use_im_start_end: bool = False
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def uses_checkpoint_vision_weights(self) -> bool:
        """Whether the reference loader keeps the checkpoint's own vision tower (V2) instead of
        loading CLIP from mm_vision_tower (V1): the projector's file says (its SPEC)."""
        from .projectors import projector_spec
        return projector_spec(self.projector_type).own_vision_weights


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"corrupt JSON in {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _require(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise ModelLoadError(f"{path}: missing key '{key}'")
    return cfg[key]


def llama_config_from_dict(cfg: dict, path: Path) -> LlamaConfig:
    heads = int(_require(cfg, "num_attention_heads", path))
    return LlamaConfig(
        hidden_size=int(_require(cfg, "hidden_size", path)),
        intermediate_size=int(_require(cfg, "intermediate_size", path)),
        num_hidden_layers=int(_require(cfg, "num_hidden_layers", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        vocab_size=int(_require(cfg, "vocab_size", path)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        bos_token_id=int(cfg.get("bos_token_id", 1)),
        eos_token_id=int(cfg.get("eos_token_id", 2)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim_override=int(cfg.get("head_dim") or 0),
    )


def load_mobilevlm_config(model_dir: Path) -> MobileVLMConfig:
    path = Path(model_dir) / "config.json"
    cfg = read_json(path)
    projector = str(cfg.get("mm_projector_type", "linear"))
    from .projectors import projector_spec      # (torch: only checkpoint loading reads config.json)
    try:
        projector_spec(projector)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    if cfg.get("mm_use_im_start_end"):
        raise ModelLoadError(f"{path}: mm_use_im_start_end=true is not supported "
                             "(no published MobileVLM checkpoint uses it)")
    return MobileVLMConfig(
        llm=llama_config_from_dict(cfg, path),
        projector_type=projector,
        vision_tower=str(_require(cfg, "mm_vision_tower", path)),
        mm_hidden_size=int(cfg.get("mm_hidden_size", 1024)),
        select_layer=int(cfg.get("mm_vision_select_layer", -2)),
        select_feature=str(cfg.get("mm_vision_select_feature", "patch")),
        image_aspect_ratio=str(cfg.get("image_aspect_ratio", "pad")),
        mm_use_im_start_end=bool(cfg.get("mm_use_im_start_end", False)),
        raw=cfg,
    )


HF_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=32,
                               layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3)


def clip_config_from_dict(cfg: dict, path: Path) -> CLIPVisionConfig:
    """Accepts a CLIPVisionConfig or a full CLIPConfig (with vision_config).

    Keys a config.json leaves out take the defaults of transformers' CLIPVisionConfig (ViT-B/32),
    as they would in the reference loader, not those of ViT-L/14-336.
    """
    if "vision_config" in cfg and isinstance(cfg["vision_config"], dict):
        cfg = cfg["vision_config"]
    kw = dict(HF_CLIP_VISION_DEFAULTS)
    kw.update({k: cfg[k] for k in HF_CLIP_VISION_DEFAULTS if k in cfg})
    try:
        clip = CLIPVisionConfig(**{k: type(HF_CLIP_VISION_DEFAULTS[k])(v) for k, v in kw.items()})
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: bad vision config value: {e}") from None
    if clip.image_size % clip.patch_size:
        raise ModelLoadError(f"{path}: image_size {clip.image_size} is not a multiple of "
                             f"patch_size {clip.patch_size}")
    return clip

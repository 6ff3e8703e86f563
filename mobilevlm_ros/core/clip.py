"""CLIP ViT vision transformer, read top to bottom; parameter names match transformers'
CLIPVisionModel ("vision_model.*") so published weights load as they are."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPVisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)      # [B, N, D]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(num_layers))


class VisionTransformer(nn.Module):
    """Returns the patch features of hidden_states[select_layer] (CLS dropped): [B, N, D].

    Only the layers up to the selected one are built; with select_layer -2 the last encoder layer and
    post_layernorm never contribute, as in the reference.
    """

    def __init__(self, cfg: CLIPVisionConfig, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        # hidden_states has num_layers + 1 entries: the embeddings, then each layer's output.
        n_states = cfg.num_hidden_layers + 1
        index = select_layer if select_layer >= 0 else n_states + select_layer
        if not 0 <= index < n_states:
            raise ValueError(f"mm_vision_select_layer {select_layer} out of range for "
                             f"{cfg.num_hidden_layers} layers")
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unknown mm_vision_select_feature '{select_feature}'")
        self.cfg, self.keep_cls = cfg, select_feature == "cls_patch"
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, as published
        self.encoder = Encoder(cfg, index)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x if self.keep_cls else x[:, 1:]


class CLIPVisionTower(nn.Module):
    """Wrapper whose state dict keys are "vision_model.*", like transformers' CLIPVisionModel."""

    def __init__(self, cfg: CLIPVisionConfig, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        self.vision_model = VisionTransformer(cfg, select_layer, select_feature)

    def forward(self, pixels):
        return self.vision_model(pixels)

"""Vision -> language projectors, one file per type; parameter names match the published
`model.mm_projector.*` keys with that prefix removed."""
from __future__ import annotations

import re

from torch import nn

from ..errors import ModelLoadError
from .ldp import LDPProjector
from .ldpv2 import LDPv2Projector
from .mlp import MLPProjector


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if projector_type == "ldpnet":
        return LDPProjector(mm_hidden_size, hidden_size)
    if projector_type == "ldpnetv2":
        return LDPv2Projector(mm_hidden_size, hidden_size)
    if projector_type == "linear":
        return MLPProjector(mm_hidden_size, hidden_size, depth=1)
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if m:
        return MLPProjector(mm_hidden_size, hidden_size, depth=int(m.group(1)))
    raise ModelLoadError(f"unknown projector type '{projector_type}'")


def projector_tokens(projector_type: str, num_patches: int) -> int:
    """Image tokens a projector emits for num_patches CLIP patches (576 -> 144 for LDP/LDPv2)."""
    if projector_type in ("ldpnet", "ldpnetv2"):
        side = int(round(num_patches ** 0.5))
        return ((side + 1) // 2) ** 2
    return num_patches

"""`linear` and `mlp{N}x_gelu`: per-token Linear layers with GELU between them (no downsampling).

`linear` is a bare nn.Linear (published keys `weight`, `bias`); `mlp2x_gelu` is a Sequential
(keys `0.*`, `2.*`).
"""
import re

from torch import nn

from .spec import ProjectorSpec


def MLPProjector(mm_hidden_size: int, hidden_size: int, depth: int) -> nn.Module:
    if depth == 1:
        return nn.Linear(mm_hidden_size, hidden_size)
    layers = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)


def _build(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    return MLPProjector(mm_hidden_size, hidden_size, depth=int(m.group(1)) if m else 1)


SPEC = ProjectorSpec(pattern=r"linear|mlp\d+x_gelu", label="linear, mlp<N>x_gelu", build=_build,
                     image_tokens=lambda n: n, own_vision_weights=False)      # one token per patch

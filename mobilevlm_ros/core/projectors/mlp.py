"""`linear` and `mlp{N}x_gelu`: per-token Linear layers with GELU between them (no downsampling).

`linear` is a bare nn.Linear (published keys `weight`, `bias`); `mlp2x_gelu` is a Sequential
(keys `0.*`, `2.*`).
"""
from torch import nn


def MLPProjector(mm_hidden_size: int, hidden_size: int, depth: int) -> nn.Module:
    if depth == 1:
        return nn.Linear(mm_hidden_size, hidden_size)
    layers = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)

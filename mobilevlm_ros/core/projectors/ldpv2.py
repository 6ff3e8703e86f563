"""LDPv2 (MobileVLM V2): per-token MLP, 2x2 average pooling of the token grid, then a depthwise
3x3 convolution added back as a positional encoding (PEG).

    x [B, N, Cin] -> Linear(Cin, C) -> GELU -> Linear(C, C)        mlp.mlp.{0,2}
                  -> grid [B, C, s, s] -> AdaptiveAvgPool2d(s/2)   (no weights)
                  -> x + DWConv3x3(x, bias)                         peg.peg.0
                  -> [B, (s/2)^2, C]
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from .spec import ProjectorSpec


class TokenMLP(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cin, c), nn.GELU(), nn.Linear(c, c))

    def forward(self, x):
        return self.mlp(x)


class PositionalConv(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=True, groups=c))

    def forward(self, grid):
        return grid + self.peg(grid)


class LDPv2Projector(nn.Module):
    def __init__(self, mm_hidden_size: int, hidden_size: int):
        super().__init__()
        self.mlp = TokenMLP(mm_hidden_size, hidden_size)
        self.peg = PositionalConv(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        side = math.isqrt(n)
        grid = self.mlp(x).transpose(1, 2).reshape(b, -1, side, side)
        grid = F.adaptive_avg_pool2d(grid, (side + 1) // 2)
        return self.peg(grid).flatten(2).transpose(1, 2)


def _random_weights(cin: int, c: int, init) -> dict:
    return {**init.lin("mlp.mlp.0", cin, c), **init.lin("mlp.mlp.2", c, c),
            "peg.peg.0.weight": init.rand(c, 1, 3, 3, std=1 / 3), "peg.peg.0.bias": init.rand(c, std=0.02)}


SPEC = ProjectorSpec(
    pattern="ldpnetv2", label="ldpnetv2",
    build=lambda _type, cin, c: LDPv2Projector(cin, c),
    image_tokens=lambda n: ((math.isqrt(n) + 1) // 2) ** 2,      # 2x2 pooling: 576 -> 144
    own_vision_weights=True, random_weights=_random_weights,
    # pool(mlp.2(.)) + peg(pool(mlp.2(.))): linear in mlp.2 and the PEG's bias
    output_linear_in=("mlp.mlp.2.weight", "mlp.mlp.2.bias", "peg.peg.0.bias"))

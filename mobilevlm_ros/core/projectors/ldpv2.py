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

"""LDP (MobileVLM V1): per-token MLP, then two MobileNetV3 inverted-residual blocks with expansion 1
on the token grid, the second with stride 2 (24x24 -> 12x12 tokens).

    x [B, N, Cin] -> Linear(Cin, C) -> GELU -> Linear(C, C)                    mlp.{1,3}
    grid -> block(stride 1) + grid                                             mb_block.1.block
         -> block(stride 2), no residual                                       mb_block.2.block
    block = DWConv3x3(no bias) -> LayerNorm(C) -> Hardswish                    .0.0 / .0.1
          -> SqueezeExcite(C, C/4 rounded to 8: ReLU, Hardsigmoid)             .1.fc1 / .1.fc2
          -> Conv1x1(no bias) -> LayerNorm(C)                                  .2.0 / .2.1
LayerNorm normalises over channels at each grid position (eps 1e-5).
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from .spec import ProjectorSpec


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet channel rounding: nearest multiple of divisor, never below 90 % of v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ChannelLayerNorm(nn.LayerNorm):
    def forward(self, x):  # [B, C, H, W]
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNorm(nn.Sequential):
    def __init__(self, c: int, kernel: int, stride: int, groups: int):
        super().__init__(nn.Conv2d(c, c, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         ChannelLayerNorm(c, eps=1e-5))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, stride: int):
        super().__init__()
        self.residual = stride == 1
        self.block = nn.Sequential(ConvNorm(c, 3, stride, groups=c),
                                   SqueezeExcite(c, make_divisible(c // 4)),
                                   ConvNorm(c, 1, 1, groups=1))

    def forward(self, x):
        dw, se, pw = self.block
        y = pw(se(F.hardswish(dw(x))))
        return x + y if self.residual else y


class LDPBlock(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        # Identity placeholders keep the published indices (mlp.1, mlp.3, mb_block.1, mb_block.2).
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(cin, c), nn.GELU(), nn.Linear(c, c))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(c, 1), InvertedResidual(c, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        side = math.isqrt(n)
        grid = self.mlp(x).transpose(1, 2).reshape(b, -1, side, side)
        return self.mb_block(grid).flatten(2).transpose(1, 2)


class LDPProjector(nn.Module):
    def __init__(self, mm_hidden_size: int, hidden_size: int):
        super().__init__()
        self.model = LDPBlock(mm_hidden_size, hidden_size)

    def forward(self, x):
        return self.model(x)


def _random_weights(cin: int, c: int, init) -> dict:
    sq = make_divisible(c // 4)
    s = {**init.lin("model.mlp.1", cin, c), **init.lin("model.mlp.3", c, c)}
    for b in (1, 2):
        p = f"model.mb_block.{b}.block"
        s[f"{p}.0.0.weight"] = init.rand(c, 1, 3, 3, std=1 / 3)
        s.update(init.norm(f"{p}.0.1", c))
        s[f"{p}.1.fc1.weight"] = init.rand(sq, c, 1, 1, std=1 / math.sqrt(c))
        s[f"{p}.1.fc1.bias"] = init.rand(sq, std=0.02)
        s[f"{p}.1.fc2.weight"] = init.rand(c, sq, 1, 1, std=1 / math.sqrt(sq))
        s[f"{p}.1.fc2.bias"] = init.rand(c, std=0.02)
        s[f"{p}.2.0.weight"] = init.rand(c, c, 1, 1, std=1 / math.sqrt(c))
        s.update(init.norm(f"{p}.2.1", c))
    return s


SPEC = ProjectorSpec(
    pattern="ldpnet", label="ldpnet",
    build=lambda _type, cin, c: LDPProjector(cin, c),
    image_tokens=lambda n: ((math.isqrt(n) + 1) // 2) ** 2,      # the stride-2 block: 576 -> 144
    own_vision_weights=False, random_weights=_random_weights,
    # it ends in a LayerNorm: linear in its affine weights
    output_linear_in=("model.mb_block.2.block.2.1.weight", "model.mb_block.2.block.2.1.bias"))

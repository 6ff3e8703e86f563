"""Each projector against its definition, written out independently with functional torch ops."""
import math

import pytest
import torch
import torch.nn.functional as F

from mobilevlm_ros.core.projectors import build_projector, projector_tokens
from mobilevlm_ros.core.projectors.ldp import make_divisible

torch.manual_seed(0)
CIN, C, GRID = 48, 64, 24


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == C else 0.0))
    return module.eval()


def _mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _grid(x):
    b, n, c = x.shape
    s = math.isqrt(n)
    return x.transpose(1, 2).reshape(b, c, s, s)


def test_ldpv2_matches_definition():
    proj = _randomize(build_projector("ldpnetv2", CIN, C))
    sd = proj.state_dict()
    assert set(sd) == {"mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias",
                       "peg.peg.0.weight", "peg.peg.0.bias"}
    x = torch.randn(2, GRID * GRID, CIN)
    h = _grid(_mlp(x, sd["mlp.mlp.0.weight"], sd["mlp.mlp.0.bias"], sd["mlp.mlp.2.weight"], sd["mlp.mlp.2.bias"]))
    # 2x2 average pooling, stride 2 (AdaptiveAvgPool2d(12) on a 24 grid)
    pooled = h.reshape(2, C, 12, 2, 12, 2).mean(dim=(3, 5))
    expected = pooled + F.conv2d(pooled, sd["peg.peg.0.weight"], sd["peg.peg.0.bias"], padding=1, groups=C)
    out = proj(x)
    assert out.shape == (2, 144, C)
    torch.testing.assert_close(out, expected.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def _ln_channels(x, w, b):
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + 1e-5) * w[None, :, None, None] + b[None, :, None, None]


def _mb_block(x, sd, p, stride):
    y = F.conv2d(x, sd[f"{p}.0.0.weight"], stride=stride, padding=1, groups=C)
    y = F.hardswish(_ln_channels(y, sd[f"{p}.0.1.weight"], sd[f"{p}.0.1.bias"]))
    s = y.mean(dim=(2, 3), keepdim=True)
    s = F.relu(F.conv2d(s, sd[f"{p}.1.fc1.weight"], sd[f"{p}.1.fc1.bias"]))
    s = F.hardsigmoid(F.conv2d(s, sd[f"{p}.1.fc2.weight"], sd[f"{p}.1.fc2.bias"]))
    y = F.conv2d(y * s, sd[f"{p}.2.0.weight"])
    return _ln_channels(y, sd[f"{p}.2.1.weight"], sd[f"{p}.2.1.bias"])


def test_ldp_matches_definition():
    proj = _randomize(build_projector("ldpnet", CIN, C))
    sd = proj.state_dict()
    assert "model.mlp.1.weight" in sd and "model.mlp.3.bias" in sd
    assert sd["model.mb_block.1.block.1.fc1.weight"].shape == (make_divisible(C // 4), C, 1, 1)
    assert not any(k.endswith("0.0.bias") or k.endswith("2.0.bias") for k in sd), "convs have no bias"
    x = torch.randn(2, GRID * GRID, CIN)
    g = _grid(_mlp(x, sd["model.mlp.1.weight"], sd["model.mlp.1.bias"], sd["model.mlp.3.weight"],
                   sd["model.mlp.3.bias"]))
    g = g + _mb_block(g, sd, "model.mb_block.1.block", 1)      # stride 1: residual
    g = _mb_block(g, sd, "model.mb_block.2.block", 2)          # stride 2: no residual
    out = proj(x)
    assert out.shape == (2, 144, C)
    torch.testing.assert_close(out, g.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)


def test_ldp_residual_matters():
    """A bound that would catch a dropped residual: the first block's skip changes the output."""
    proj = _randomize(build_projector("ldpnet", CIN, C))
    x = torch.randn(1, GRID * GRID, CIN)
    out = proj(x)
    proj.model.mb_block[1].residual = False
    assert (proj(x) - out).abs().max() > 1e-2


@pytest.mark.parametrize("kind,keys", [("linear", {"weight", "bias"}),
                                       ("mlp2x_gelu", {"0.weight", "0.bias", "2.weight", "2.bias"})])
def test_mlp_projectors(kind, keys):
    proj = _randomize(build_projector(kind, CIN, C))
    assert set(proj.state_dict()) == keys
    x = torch.randn(1, 10, CIN)
    sd = proj.state_dict()
    expected = (F.linear(x, sd["weight"], sd["bias"]) if kind == "linear"
                else _mlp(x, sd["0.weight"], sd["0.bias"], sd["2.weight"], sd["2.bias"]))
    torch.testing.assert_close(proj(x), expected)


def test_token_counts():
    assert projector_tokens("ldpnet", 576) == 144
    assert projector_tokens("ldpnetv2", 576) == 144
    assert projector_tokens("mlp2x_gelu", 576) == 576


def test_make_divisible_matches_mobilenet_rounding():
    assert make_divisible(2048 // 4) == 512
    assert make_divisible(2560 // 4) == 640
    assert make_divisible(10) == 16    # never below 90 % of v... and never below 8
    assert make_divisible(3) == 8

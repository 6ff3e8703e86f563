"""Vision -> language projectors, one file per type; parameter names match the published
`model.mm_projector.*` keys with that prefix removed. Each file declares its `SPEC` (spec.py):
what the rest of the code asks about the type is looked up here, never branched on elsewhere."""
from __future__ import annotations

from torch import nn

from ..errors import ModelLoadError
from . import ldp, ldpv2, mlp
from .spec import ProjectorSpec

SPECS: tuple[ProjectorSpec, ...] = (ldp.SPEC, ldpv2.SPEC, mlp.SPEC)
# the types mobilevlm-make-tiny can make (their files give random weights)
TINY_PROJECTORS = tuple(s.pattern for s in SPECS if s.random_weights is not None)


def projector_spec(projector_type: str) -> ProjectorSpec:
    for spec in SPECS:
        if spec.matches(projector_type):
            return spec
    raise ModelLoadError(f"unknown mm_projector_type '{projector_type}' "
                         f"(supported: {', '.join(s.label for s in SPECS)})")


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    return projector_spec(projector_type).build(projector_type, mm_hidden_size, hidden_size)


def projector_tokens(projector_type: str, num_patches: int) -> int:
    """Image tokens a projector emits for num_patches CLIP patches (576 -> 144 for LDP/LDPv2)."""
    return projector_spec(projector_type).image_tokens(num_patches)


__all__ = ["ProjectorSpec", "SPECS", "TINY_PROJECTORS", "build_projector", "projector_spec", "projector_tokens"]

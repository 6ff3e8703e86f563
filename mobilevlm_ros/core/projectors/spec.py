"""What the rest of the code asks about a projector type, declared by each projector's own file
(`SPEC` at its end) and looked up by `projectors.projector_spec`: no other module branches on the
projector type."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ProjectorSpec:
    pattern: str                  # the config.json mm_projector_type values it implements (full match)
    label: str                    # how messages name it ("ldpnetv2", "mlp<N>x_gelu")
    build: Callable               # (mm_projector_type, mm_hidden_size, hidden_size) -> nn.Module
    image_tokens: Callable[[int], int]   # tokens it emits for N CLIP patches
    # The reference loader keeps the checkpoint's own copy of the vision tower for this type (V2);
    # otherwise it loads CLIP from mm_vision_tower (V1)
    own_vision_weights: bool
    # mobilevlm-make-tiny: random weights in the published key names, (mm_hidden, hidden, init) ->
    # state, init giving rand(*shape, std=), lin(prefix, fan_in, fan_out) and norm(prefix, n)
    random_weights: Optional[Callable] = None
    output_linear_in: tuple = ()  # weights the output is linear in (make-tiny scales them)

    def matches(self, projector_type: str) -> bool:
        return re.fullmatch(self.pattern, projector_type) is not None

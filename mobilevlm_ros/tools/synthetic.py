"""Synthetic camera frames for tools, benchmarks and tests (deterministic, cheap to make).

    pattern_frame(h, w, seed)            a still test pattern: gradients, a red block, noise
    render_frame(camera, k, rate, w, h)  frame k of a moving scene (a disc, a bouncing square and
                                         the frame number as a bar code on the top rows)
"""
from __future__ import annotations

import math

import numpy as np

BAR_BITS = 16
_PALETTE = [(230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 200, 30), (200, 60, 220), (30, 210, 210)]


def pattern_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 HxWx3 RGB with structure (gradients, a block) and noise, not a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x + y) * 128 // max(height + width, 1)], -1)
    img[height // 4:height // 2, width // 3:width // 2] = (230, 30, 30)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def render_frame(camera_index: int, k: int, rate: float, width: int, height: int) -> np.ndarray:
    """Frame k of camera `camera_index`: uint8 HxWx3 RGB."""
    t = k / rate
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (x * 200 // max(width - 1, 1)).astype(np.uint8)
    img[..., 1] = (y * 200 // max(height - 1, 1)).astype(np.uint8)
    img[..., 2] = (40 + 70 * camera_index) % 256
    # a disc moving left and right
    cx = width * (0.5 + 0.35 * math.sin(2 * math.pi * t / 4.0 + camera_index))
    cy = height * (0.55 + 0.15 * math.cos(2 * math.pi * t / 3.0))
    r = max(2.0, min(width, height) / 7)
    img[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = _PALETTE[camera_index % len(_PALETTE)]
    # a square bouncing up and down
    side = max(2, min(width, height) // 6)
    phase = (t / 2.5 + 0.3 * camera_index) % 2.0
    top = int((phase if phase < 1 else 2 - phase) * (height - side))
    left = int(width * 0.15)
    img[top:top + side, left:left + side] = _PALETTE[(camera_index + 3) % len(_PALETTE)]
    # frame number as a bar code on the top rows (white = 1)
    bar_h = max(1, height // 16)
    cell = width / BAR_BITS
    for bit in range(BAR_BITS):
        val = 255 if (k >> (BAR_BITS - 1 - bit)) & 1 else 0
        img[:bar_h, int(bit * cell):int((bit + 1) * cell)] = val
    return img

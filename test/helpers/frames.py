"""Camera frames for tests: the project's synthetic pattern, and image shapes worth covering."""
from mobilevlm_ros.tools.synthetic import pattern_frame

# aspect ratios the preprocessing must handle: wider than tall, taller than wide, square
FRAMES = {"wide": (360, 640), "tall": (500, 300), "square": (256, 256)}


def synthetic_frame(h=120, w=160, seed=0):
    """Deterministic uint8 HxWx3 RGB frame with structure (gradients + a block) and some noise;
    160x120 unless told (what the node tests publish)."""
    return pattern_frame(h, w, seed)

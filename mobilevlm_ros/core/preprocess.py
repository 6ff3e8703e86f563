"""Camera frame -> CLIP pixels with the reference semantics (image_aspect_ratio "pad"):
pad to a square with the mean colour, image centred; bicubic resize to 336 (PIL, the implementation
transformers' CLIPImageProcessor uses, so pixels are identical to the reference's); centre crop (a
no-op on a square); scale 1/255; normalise with the CLIP mean and std."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import ImageError

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PAD_RGB = tuple(int(255 * m) for m in CLIP_MEAN)      # (122, 116, 104), as the reference truncates
IMAGE_SIZE = 336


def rgb_order(frame: np.ndarray, channel_order: str = "rgb") -> np.ndarray:
    """The one place channel order is normalised: uint8 HxWx3 RGB from HxWx3/HxWx4 pixels in RGB(A) or
    BGR(A) order (alpha dropped; the frame itself when it is RGB already), mono (HxW, HxWx1) as it
    is. Raises ImageError for anything else."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise ImageError(f"expected a uint8 numpy array, got {getattr(frame, 'dtype', type(frame))}")
    if frame.ndim not in (2, 3) or frame.ndim == 3 and frame.shape[2] not in (1, 3, 4) or 0 in frame.shape[:2]:
        raise ImageError(f"expected HxW, HxWx3 or HxWx4 pixels, got shape {frame.shape}")
    if frame.ndim == 2 or frame.shape[2] == 1:
        return frame
    if channel_order not in ("rgb", "bgr"):
        raise ImageError(f"unknown channel order '{channel_order}'")
    return np.ascontiguousarray(frame[:, :, 2::-1] if channel_order == "bgr" else frame[:, :, :3])


def as_rgb(frame: np.ndarray, channel_order: str = "rgb") -> np.ndarray:
    """uint8 HxWx3 RGB from an HxW (mono), HxWx3 or HxWx4 uint8 array in RGB(A) or BGR(A) order."""
    frame = rgb_order(frame, channel_order)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    return np.repeat(frame.reshape(*frame.shape[:2], 1), 3, axis=2)      # mono: grey in every channel


def pad_to_square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = PAD_RGB
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out


def resize_square(rgb: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), resample=Image.BICUBIC))


def preprocess_uint8(frame: np.ndarray, channel_order: str = "rgb", size: int = IMAGE_SIZE) -> np.ndarray:
    """Padded and resized uint8 pixels, CHW [3, size, size] (for graphs that normalise inside)."""
    return resize_square(pad_to_square(as_rgb(frame, channel_order)), size).transpose(2, 0, 1).copy()


def normalize(chw_uint8: np.ndarray) -> np.ndarray:
    x = chw_uint8.astype(np.float32) * np.float32(1 / 255)
    return (x - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


def preprocess(frame: np.ndarray, channel_order: str = "rgb", size: int = IMAGE_SIZE) -> np.ndarray:
    """float32 [3, size, size], normalised: the reference's pixel_values for this frame."""
    return normalize(preprocess_uint8(frame, channel_order, size))

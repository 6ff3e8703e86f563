"""Comparing two decoders' logits where their arithmetic differs (F16 or quantized vs float32):
the error per position in units of the reference logits' std, and the argmax compared only where
the reference's top-1 margin exceeds twice that error (no rounding of that size can flip those).
Used wherever tests compare paths that the code does not promise to be identical."""
import numpy as np


def position_errors(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per position: the largest |got - ref| in units of that position's reference logit std."""
    return np.abs(got - ref).max(axis=1) / ref.std(axis=1)


class MarginTally:
    """Accumulates positions over many (reference, other) teacher-forced logit pairs."""

    def __init__(self):
        self.worst, self.decided, self.flipped, self.positions = 0.0, 0, 0, 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> float:
        """Add one pair of [positions, vocab] logits; returns their lowest per-position correlation."""
        err = position_errors(ref, got)
        top2 = np.sort(ref, axis=1)[:, -2:]
        margin = (top2[:, 1] - top2[:, 0]) / ref.std(axis=1)
        agree = got.argmax(axis=1) == ref.argmax(axis=1)
        sure = margin > 2 * err
        self.worst = max(self.worst, float(err.max()))
        self.decided += int(sure.sum())
        self.flipped += int((sure & ~agree).sum())
        self.positions += len(err)
        return min(float(np.corrcoef(g, r)[0, 1]) for g, r in zip(got, ref))

    def summary(self, bound: float) -> str:
        return (f"{self.positions} positions: max error {self.worst:.4f} logit std (bound {bound}); "
                f"{self.decided} decided by their margin, {self.flipped} flipped")

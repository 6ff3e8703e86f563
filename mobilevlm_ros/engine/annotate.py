"""An answer drawn on the frame it describes: what an operator watches (the node's ~/annotated,
replay's answers bag). Pure: numpy and OpenCV, no ROS.

    bgr = annotate(result, question)        # None when the result has no frame image (errors)
    jpeg = encode_jpeg(bgr, quality=80)

The frame is the answered frame's own pixels (`Result.image`, the frame as received, kept by the
frame store beside its embedding), decoded again here, never a newer frame, and returned as a new
BGR array of the frame's size. The text goes in a band at the bottom, at most MAX_BAND of the
height (one line at least): the frame there darkened to a quarter, then the question (at most
QUESTION_LINES lines), the answer (wrapped to the width; what does not fit ends with "..."), and
one status line: camera, frame age, status, answer time. Every pixel above the band is the frame's.

Text: OpenCV's Hershey fonts draw ASCII only, so `printable` turns other text into ASCII that
stays readable where it can and shows what it cannot: accents are dropped (é -> e, Ü -> U), typographic
quotes, dashes and the ellipsis become their ASCII forms, ß/æ/ø/œ/ł are spelled out, and every
other character (CJK, emoji, controls) is drawn as '?', one per character. No TrueType font:
cv2.freetype is not in opencv-python-headless, and a font file would have to ship with the package.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np

from .frames import Frame, decode_frame

FONT = cv2.FONT_HERSHEY_SIMPLEX
MAX_BAND = 0.45             # of the frame's height, for the text band
QUESTION_LINES = 2
ELLIPSIS = "..."
MIN_SCALE, MAX_SCALE = 0.35, 4.0
SCALE_PER_PIXEL = 1.0 / 1000.0      # font scale per pixel of width: ~50 characters a line at any width
DEFAULT_JPEG_QUALITY = 80

_WHITE, _GREY = (255, 255, 255), (200, 200, 200)
_GREEN, _ORANGE = (80, 220, 80), (0, 165, 255)          # BGR

# characters NFKD does not reduce to ASCII, spelled out instead of shown as '?'
_SPELLED = {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"',
            "\u201e": '"', "\u00ab": '"', "\u00bb": '"', "\u2039": "'", "\u203a": "'", "\u2010": "-",
            "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
            "\u2026": "...", "\u00b7": ".", "\u2022": "*", "\u00df": "ss", "\u00e6": "ae", "\u00c6": "AE",
            "\u00f8": "o", "\u00d8": "O", "\u0153": "oe", "\u0152": "OE", "\u0142": "l", "\u0141": "L",
            "\u0111": "d", "\u0110": "D", "\u00f0": "d", "\u00d0": "D", "\u00fe": "th", "\u00de": "Th",
            "\u00b0": " deg"}


def printable(text: str) -> str:
    """`text` in the ASCII the Hershey fonts draw (see the module docstring): one line, legible
    where a transliteration exists, '?' for each character that has none."""
    out = []
    for ch in unicodedata.normalize("NFC", text):
        if " " <= ch <= "~":
            out.append(ch)
        elif ch in _SPELLED:
            out.append(_SPELLED[ch])
        else:
            cat = unicodedata.category(ch)
            if ch in "\t\n\r" or cat.startswith("Z"):
                out.append(" ")
            elif cat == "Mn":                   # a combining accent left after NFC: part of its letter
                continue
            else:
                base = "".join(c for c in unicodedata.normalize("NFKD", ch) if " " <= c <= "~")
                out.append(base or "?")
    return "".join(out)


@dataclass(frozen=True)
class Overlay:
    """What is written on the frame."""
    question: str
    answer: str
    camera: str
    frame_age_ms: float
    status: str                 # e.g. "OK", "OK (length)", "CANCELLED"
    ok: bool
    total_ms: float = 0.0

    @classmethod
    def of(cls, question: str, result) -> "Overlay":
        """From an engine Result (requests.Result) and the question it answers."""
        ok = result.success
        status = result.status.name
        if ok and result.finish_reason not in ("stop", ""):
            status += f" ({result.finish_reason})"
        return cls(question, result.answer, result.camera, result.frame_age_ms, status, ok, result.total_ms)

    def status_line(self) -> str:
        line = f"{self.camera} | frame age {self.frame_age_ms / 1e3:.2f} s | {self.status}"
        return line + (f" | {self.total_ms / 1e3:.2f} s" if self.total_ms > 0 else "")


# ------------------------------------------------------------------------------------ text layout
def _width(text: str, scale: float, thickness: int) -> int:
    return cv2.getTextSize(text, FONT, scale, thickness)[0][0]


def _fit(text: str, max_w: int, scale: float, thickness: int, suffix: str = "") -> int:
    """The most leading characters of `text` that fit in max_w with `suffix` after them (>= 1)."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _width(text[:mid] + suffix, scale, thickness) <= max_w:
            lo = mid
        else:
            hi = mid - 1
    return lo


def wrap(text: str, max_w: int, scale: float, thickness: int, max_lines: int) -> List[str]:
    """Greedy word wrap to max_w pixels, words wider than a line broken; at most max_lines lines,
    the last ending with "..." when text was left out. Stops measuring once the lines are full, so a
    very long answer costs no more than a short one."""
    max_lines = max(1, max_lines)
    lines: List[str] = []
    cur = ""
    words = text.split()
    cut = False
    for word in words:
        cand = f"{cur} {word}" if cur else word
        if _width(cand, scale, thickness) <= max_w:
            cur = cand
            continue
        if cur:
            lines.append(cur)
            cur = ""
        while len(lines) < max_lines and len(word) > 1 and _width(word, scale, thickness) > max_w:
            n = _fit(word, max_w, scale, thickness)
            lines.append(word[:n])
            word = word[n:]
        cur = word
        if len(lines) >= max_lines:
            cut = True
            break
    else:
        if cur:                 # the loop stops while a line is left: this one fits in max_lines
            lines.append(cur)
    if cut:
        last = lines[max_lines - 1]
        n = _fit(last, max_w, scale, thickness, ELLIPSIS) if len(last) > 1 else len(last)
        lines = lines[:max_lines - 1] + [last[:n].rstrip() + ELLIPSIS]
    return lines


def font_for(width: int) -> Tuple[float, int, int, int]:
    """(scale, thickness, line height, text height above the baseline), in pixels, for a frame
    `width` pixels wide."""
    scale = min(MAX_SCALE, max(MIN_SCALE, width * SCALE_PER_PIXEL))
    thickness = max(1, int(round(scale * 1.5)))
    (_, ascent), descent = cv2.getTextSize("Ag", FONT, scale, thickness)
    return scale, thickness, int(round((ascent + descent) * 1.4)), ascent


# ------------------------------------------------------------------------------------ drawing
def draw(bgr: np.ndarray, overlay: Overlay) -> int:
    """Draw `overlay` on `bgr` (uint8 HxWx3, changed in place). Returns the band's first row: every
    row above it is untouched."""
    h, w = bgr.shape[:2]
    scale, thick, line_h, ascent = font_for(w)
    margin = max(2, line_h // 3)
    text_w = max(1, w - 2 * margin)
    max_lines = max(3, int(h * MAX_BAND) // line_h)     # question, answer and status: one line each at least
    q_lines = wrap("Q: " + printable(overlay.question), text_w, scale, thick, min(QUESTION_LINES, max_lines - 2))
    a_lines = wrap("A: " + (printable(overlay.answer).strip() or "(no text)"), text_w, scale, thick,
                   max_lines - 1 - len(q_lines))
    status = wrap(printable(overlay.status_line()), text_w, scale, thick, 1)
    rows = [(t, _GREY) for t in q_lines] + [(t, _WHITE) for t in a_lines] + \
           [(t, _GREEN if overlay.ok else _ORANGE) for t in status]
    top = max(0, h - len(rows) * line_h - margin)
    band = bgr[top:]
    np.right_shift(band, 2, out=band)                   # a quarter of the frame's brightness
    y = top + margin // 2 + (line_h + ascent) // 2
    for text, colour in rows:
        cv2.putText(bgr, text, (margin, y), FONT, scale, colour, thick, cv2.LINE_AA)
        y += line_h
    return top


def frame_bgr(frame: Frame) -> np.ndarray:
    """A new, writable BGR (uint8 HxWx3) copy of a received frame's pixels. Raises ImageError."""
    rgb = np.ascontiguousarray(decode_frame(frame))
    if rgb.ndim == 2 or rgb.shape[2] == 1:
        return cv2.cvtColor(rgb.reshape(rgb.shape[:2]), cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def annotate(result, question: str) -> Optional[np.ndarray]:
    """The answered frame with the answer drawn on it (BGR), or None when the result carries no
    frame image (an error answered before a frame was chosen, or frame images are not kept).
    Raises ImageError when the frame cannot be decoded."""
    image = getattr(result, "image", None)
    if image is None:
        return None
    bgr = frame_bgr(image)
    draw(bgr, Overlay.of(question, result))
    return bgr


def encode_jpeg(bgr: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV could not encode the annotated frame as JPEG")
    return buf.tobytes()

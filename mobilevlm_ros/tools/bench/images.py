"""What a camera frame costs before the model sees it: each raw encoding to RGB, and JPEG/PNG decoding
with OpenCV (the node's decoder) against Pillow (the one it replaced).

    mobilevlm-bench images [--sizes 640x480,1920x1080] [--encodings rgb8,bayer_rggb8,...]
                           [--repeats 30] [--threads N] [--out DIR]

Per size, make_bag's test frame (gradient, disc, square, bar code; plus a little deterministic
noise, so that JPEG and PNG sizes are those of a camera rather than of flat colour) is rendered into
each raw encoding as make_bag writes it, then timed through:

  check_raw    the image callback's validation (O(1): no pixel is read), microseconds
  raw_to_rgb   the conversion when a frame is about to be encoded, milliseconds

The same frame as JPEG (quality 90) and PNG is decoded by compressed_to_rgb (header checks, then
cv2.imdecode) and by Pillow (open, load, convert to RGB, as a numpy array). Each figure is the median
(min–max) of --repeats runs after one warm-up run. OpenCV's conversions use its own thread pool
(all cores unless --threads). --encodings defaults to every encoding but the aliases uyvy and yuyv
(the same conversion as yuv422 and yuv422_yuy2). Writes OUT/images.json, OUT/images.md, OUT/images.png.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from importlib import metadata

import numpy as np

from .common import barh, finish_machine, fmt, machine_info, machine_line, minmax, report, stats

DEFAULT_SIZES = "640x480,1920x1080"
ALIASES = ("uyvy", "yuyv")


def _size(text: str):
    w, h = text.lower().split("x")
    return int(w), int(h)


def camera_frame(width: int, height: int) -> np.ndarray:
    from ..synthetic import render_frame
    rgb = render_frame(0, 3, 10.0, width, height)
    noise = np.random.default_rng(0).integers(-8, 9, rgb.shape)
    return np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8)


def timed(fn, repeats: int, scale: float = 1e3) -> dict:
    """stats() of fn's wall time over `repeats` runs after one warm-up, in ms (scale 1e3) or us (1e6)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * scale)
    return stats(times)


def pillow_decode(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def run(sizes, encodings, repeats: int, threads: int) -> dict:
    import cv2
    from PIL import Image

    from ...engine.images import check_raw, compressed_to_rgb, raw_to_rgb
    from ..make_bag import render_raw
    if threads:
        cv2.setNumThreads(threads)
    info = machine_info(threads)
    raw_rows, compressed_rows = [], []
    for width, height in sizes:
        size = f"{width}x{height}"
        rgb = camera_frame(width, height)
        print(f"[bench images] {size}: {len(encodings)} encodings, JPEG, PNG", file=sys.stderr, flush=True)
        for enc in encodings:
            raw = render_raw(rgb, enc)
            raw_rows.append({"encoding": enc, "size": size, "bytes": int(raw.data.size),
                             "check_us": timed(lambda: check_raw(raw), repeats, 1e6),
                             "convert_ms": timed(lambda: raw_to_rgb(raw), repeats)})
        for kind, save in (("jpeg", {"format": "JPEG", "quality": 90}), ("png", {"format": "PNG"})):
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, **save)
            data = buf.getvalue()
            compressed_rows.append({"format": kind, "size": size, "bytes": len(data),
                                    "opencv_ms": timed(lambda: compressed_to_rgb(kind, data), repeats),
                                    "pillow_ms": timed(lambda: pillow_decode(data), repeats)})
    return {"benchmark": "images", "sizes": [f"{w}x{h}" for w, h in sizes], "repeats": repeats,
            "opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads(), "pillow": metadata.version("pillow"),
            "machine": finish_machine(info), "raw": raw_rows, "compressed": compressed_rows}


def table(result: dict) -> str:
    sizes = result["sizes"]
    by = {(r["encoding"], r["size"]): r for r in result["raw"]}
    encodings = list(dict.fromkeys(r["encoding"] for r in result["raw"]))
    lines = ["| encoding | " + " | ".join(f"raw_to_rgb ms, {s}" for s in sizes) + f" | check_raw µs, {sizes[-1]} |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for enc in encodings:
        cells = [fmt(by[(enc, s)]["convert_ms"], 2) for s in sizes]
        lines.append(f"| {enc} | " + " | ".join(cells) + f" | {fmt(by[(enc, sizes[-1])]['check_us'], 1)} |")
    lines += ["", "| compressed | size | bytes | OpenCV ms (compressed_to_rgb) | Pillow ms | Pillow / OpenCV |",
              "|---|---|---|---|---|---|"]
    for r in result["compressed"]:
        ratio = r["pillow_ms"]["median"] / r["opencv_ms"]["median"]
        lines.append(f"| {r['format']} | {r['size']} | {r['bytes']} | {fmt(r['opencv_ms'], 2)} | "
                     f"{fmt(r['pillow_ms'], 2)} | {ratio:.2f} |")
    lines += ["", f"Medians (min–max) of {result['repeats']} runs; OpenCV {result['opencv']} "
              f"({result['opencv_threads']} threads), Pillow {result['pillow']}; {machine_line(result['machine'])}."]
    return "\n".join(lines)


def plot(result: dict, ax) -> None:
    size = result["sizes"][-1]
    rows = [(r["encoding"], r["convert_ms"]) for r in result["raw"] if r["size"] == size]
    for r in result["compressed"]:
        if r["size"] == size:
            rows += [(f"{r['format']} OpenCV", r["opencv_ms"]), (f"{r['format']} Pillow", r["pillow_ms"])]
    barh(ax, [n for n, _ in rows], [s["median"] for _, s in rows], [minmax(s) for _, s in rows],
         xlabel="ms per frame (median, min–max)", title=f"Frame to RGB at {size}", fmt_value="{:.2f}",
         color=["tab:orange" if "OpenCV" in n or "Pillow" in n else "tab:blue" for n, _ in rows])


def main(argv=None) -> int:
    from ...core.errors import MobileVLMError
    from ...engine.images import ENCODINGS, check_geometry
    ap = argparse.ArgumentParser(prog="mobilevlm-bench images", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="WIDTHxHEIGHT, comma-separated")
    ap.add_argument("--encodings", default=None, help="comma-separated (default: all but the aliases)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="cv2.setNumThreads; 0 = OpenCV's default")
    ap.add_argument("--out", default=None, help="folder for images.json, images.md and images.png")
    a = ap.parse_args(argv)
    try:
        sizes = [_size(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError:
        print(f"mobilevlm-bench images: --sizes must be WIDTHxHEIGHT,..., got '{a.sizes}'", file=sys.stderr)
        return 2
    encodings = [e for e in ENCODINGS if e not in ALIASES] if not a.encodings else \
        [e.strip() for e in a.encodings.split(",") if e.strip()]
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown or a.repeats < 1:
        print(f"mobilevlm-bench images: unknown encodings {unknown} (choose from {', '.join(ENCODINGS)})"
              if unknown else "mobilevlm-bench images: --repeats must be >= 1", file=sys.stderr)
        return 2
    try:
        for w, h in sizes:
            for enc in encodings:
                check_geometry(enc, w, h)       # e.g. an odd width for YUV 4:2:2: refused before running
    except MobileVLMError as e:
        print(f"mobilevlm-bench images: {e}", file=sys.stderr)
        return 2
    return report("images", lambda: run(sizes, encodings, a.repeats, a.threads), table, a.out, plot)


if __name__ == "__main__":
    sys.exit(main())

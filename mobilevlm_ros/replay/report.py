"""report.html: a fleet run against a previous one, for people to look at.

One self-contained file (no network, no scripts): the counts on top, then per bag what changed,
each question with the thumbnail of its frame (read from the bag, as a data: URI), the previous
and the new answer side by side."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Dict, List, Tuple

from .bagio import IMAGE, BagError, BagReader

THUMB_PX = 160
MAX_ITEMS = 200                     # per bag; the rest are counted


def thumbnails(bag: str, wanted: List[Tuple[str, int]]) -> Dict[Tuple[str, int], str]:
    """data: URIs (JPEG, THUMB_PX wide) of frames (topic, index among the topic's messages). A bag
    that cannot be read gives none (the report says 'no frame')."""
    from PIL import Image

    from ..engine.images import compressed_to_rgb, raw_to_rgb
    from ..ros.conversion import raw_image
    want = set(wanted)
    if not want:
        return {}
    topics = {t for t, _ in want}
    last = {t: max(i for tt, i in want if tt == t) for t in topics}
    out, seen = {}, {t: -1 for t in topics}
    try:
        with BagReader(bag) as b:
            for topic, msgtype, _, msg in b.iter_messages(topics):
                seen[topic] += 1
                k = (topic, seen[topic])
                if k in want:
                    try:
                        rgb = (raw_to_rgb(raw_image(msg)) if msgtype == IMAGE
                               else compressed_to_rgb(msg.format, msg.data))
                    except Exception:
                        continue
                    im = Image.fromarray(rgb)
                    im.thumbnail((THUMB_PX, THUMB_PX * 4))
                    buf = io.BytesIO()
                    im.save(buf, "JPEG", quality=80)
                    out[k] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
                if all(seen[t] >= last[t] for t in topics):
                    break
    except BagError:
        pass
    return out


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
.counts { display: flex; gap: 1em; flex-wrap: wrap; margin-bottom: 1.5em; }
.count { border: 1px solid #ccc; border-radius: 6px; padding: .5em 1em; min-width: 8em; }
.count b { display: block; font-size: 1.6em; }
.count.bad b { color: #b00; }
table { border-collapse: collapse; width: 100%; margin-bottom: 2em; }
td, th { border: 1px solid #ddd; padding: .4em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
.old { background: #fff3f3; } .new { background: #f3fff3; }
.mode { font-size: .85em; color: #555; }
img.thumb { width: 160px; display: block; }
"""


def _answer(rec) -> str:
    if rec is None:
        return "<i>(not asked)</i>"
    if "error" in rec:
        return f"<i>error: {html.escape(str(rec['error']))}</i>"
    return html.escape(str(rec.get("answer", "")))


def render(diff: dict, thumbs: Dict[str, Dict[Tuple[str, int], str]]) -> str:
    e = html.escape
    counts = [("bags compared", diff["bags_compared"], False), ("regressions", diff["regressions"], diff["regressions"] > 0),
              ("bags regressed", len(diff["regressed_bags"]), bool(diff["regressed_bags"])),
              ("bags token for token", diff["identical_bags"], False),
              ("bags by agreement", diff["agreement_bags"], False), ("agreement", diff["agreement"], False)]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mobilevlm-replay report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Replay against {e(diff['previous'])}</h1><div class='counts'>"]
    parts += [f"<div class='count{' bad' if bad else ''}' data-count='{e(name)}'><b>{e(str(v))}</b>{e(name)}</div>"
              for name, v, bad in counts]
    parts.append("</div>")
    for b in diff["bags"]:
        if not b["items"] and not b["regressions"]:
            continue
        mode = ("token for token (same model files, engine and CPU flags)" if b["mode"] == "identical" else
                "by agreement: the arithmetic differs (" + ", ".join(b.get("arithmetic_differs", {})) + ")"
                if b["mode"] == "agreement" else f"status {b['previous_status']} -> {b['status']}")
        parts.append(f"<h2 class='bag' data-bag='{e(b['name'])}'>{e(b['name'])}: {b['regressions']} regressions</h2>"
                     f"<p class='mode'>{e(mode)}; {e(str(b['bag']))}</p>")
        if not b["items"]:
            parts.append(f"<p>{e('; '.join(b['differences']))}</p>")
            continue
        parts.append("<table><tr><th>frame</th><th>question</th><th>previous answer</th><th>new answer</th></tr>")
        for it in b["items"][:MAX_ITEMS]:
            rec = it["now"] or it["previous"]
            src = thumbs.get(b["name"], {}).get((rec.get("topic"), rec.get("frame_index")))
            img = f"<img class='thumb' alt='frame {rec.get('frame_index')}' src='{src}'>" if src else "<i>no frame</i>"
            t = rec.get("t")
            parts.append(f"<tr class='item'><td>{img}{e(str(rec.get('camera')))} frame {rec.get('frame_index')}</td>"
                         f"<td>t={t if t is not None else '?'} s: {e(str(rec.get('question')))}</td>"
                         f"<td class='old'>{_answer(it['previous'])}</td><td class='new'>{_answer(it['now'])}</td></tr>")
        if len(b["items"]) > MAX_ITEMS:
            parts.append(f"<tr><td colspan='4'>... and {len(b['items']) - MAX_ITEMS} more</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(path: Path, diff: dict, jobs=None) -> None:
    thumbs = {}
    for b in diff["bags"]:
        wanted = [((it["now"] or it["previous"]).get("topic"), (it["now"] or it["previous"]).get("frame_index"))
                  for it in b["items"][:MAX_ITEMS]]
        wanted = [(t, i) for t, i in wanted if t is not None and i is not None]
        thumbs[b["name"]] = thumbnails(b["bag"], wanted) if wanted else {}
    Path(path).write_text(render(diff, thumbs), encoding="utf-8")

"""Comparing two replays of a bag (`--expect`): lines matched by (camera, bag time, question)."""
from __future__ import annotations

import json
from collections import Counter, OrderedDict
from pathlib import Path
from typing import List, Tuple

from .questions import QuestionsError


def _key(rec: dict) -> Tuple:
    return (rec.get("camera"), rec.get("bag_time_ns"), rec.get("question"))


def _keyed(records: List[dict]) -> "OrderedDict[Tuple, dict]":
    out: "OrderedDict[Tuple, dict]" = OrderedDict()
    seen: Counter = Counter()
    for r in records:
        k = _key(r)
        out[k + (seen[k],)] = r
        seen[k] += 1
    return out


def read_jsonl(path) -> List[dict]:
    recs = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise QuestionsError(f"cannot read {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuestionsError(f"{path}:{n}: not a JSON line: {e}") from None
        if not isinstance(rec, dict) or "question" not in rec:
            raise QuestionsError(f"{path}:{n}: not a mobilevlm-replay answer line")
        recs.append(rec)
    return recs


def _describe(k: Tuple, rec: dict) -> str:
    camera, at, question, dup = k
    t = rec.get("t")
    when = f"t={t:.3f} s" if isinstance(t, (int, float)) else f"{at} ns"
    return f"{camera} @ {when}: {question!r}" + (f" (#{dup + 1})" if dup else "")


def _outcome(r: dict) -> str:
    return f"error: {r['error']}" if "error" in r else repr(r.get("answer"))


def compare(previous: List[dict], current: List[dict]) -> dict:
    """Differences by (camera, bag time, question): added, missing, changed (answer text, ids, error,
    frame stamp)."""
    old, new = _keyed(previous), _keyed(current)
    added = [k for k in new if k not in old]
    missing = [k for k in old if k not in new]
    changed = []
    for k in new:
        if k not in old:
            continue
        a, b = old[k], new[k]
        what = []
        if ("error" in a) != ("error" in b) or a.get("error") != b.get("error"):
            what.append(f"{_outcome(a)} -> {_outcome(b)}")
        else:
            if a.get("answer") != b.get("answer"):
                what.append(f"answer {a.get('answer')!r} -> {b.get('answer')!r}")
            if a.get("answer_ids") != b.get("answer_ids"):
                ia, ib = a.get("answer_ids") or [], b.get("answer_ids") or []
                at = next((i for i, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
                what.append(f"answer_ids differ from token {at} ({len(ia)} -> {len(ib)} tokens)")
        if a.get("frame_stamp") != b.get("frame_stamp"):
            what.append(f"frame_stamp {a.get('frame_stamp')} -> {b.get('frame_stamp')}")
        if what:
            changed.append((k, "; ".join(what)))
    lines = ([f"added: {_describe(k, new[k])}: {_outcome(new[k])}" for k in added]
             + [f"missing: {_describe(k, old[k])}: was {_outcome(old[k])}" for k in missing]
             + [f"changed: {_describe(k, new[k])}: {w}" for k, w in changed])
    return {"same": len(new) - len(added) - len(changed), "added": len(added), "missing": len(missing),
            "changed": len(changed), "differences": lines}




# ------------------------------------------------------------------------------------ many bags
def _what_differs(a: dict, b: dict) -> List[str]:
    return [k for k in a if a.get(k) != b.get(k)] + [k for k in b if k not in a]


def _read_folder(folder: Path) -> dict:
    """name -> the bag's summary (status, arithmetic, ...) from an --out-dir folder."""
    try:
        run = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise QuestionsError(f"{folder}: not an output folder of mobilevlm-replay --out-dir: {e}") from None
    return {b["name"]: b for b in run.get("per_bag", [])}


def compare_bag(name: str, old: dict, new: dict, prev_dir: Path, new_dir: Path) -> dict:
    """One bag of two fleet runs. Under the determinism contract (the same model files, engine and
    CPU flags: `fleet.arithmetic`) answers must be identical, and any difference is a regression;
    otherwise the arithmetic differs and the bag gets an agreement figure (answers alike / answers
    compared) instead, and only what no arithmetic explains (an answer that became an error, a
    question added or missing, the bag failing) counts as a regression."""
    ok = ("done", "skipped")
    out = {"name": name, "bag": new.get("bag") or old.get("bag"), "previous_status": old.get("status"),
           "status": new.get("status"), "mode": None, "regressions": 0, "differences": [], "items": []}
    if old.get("status") not in ok or new.get("status") not in ok:
        if old.get("status") in ok:
            out["regressions"] = 1
            out["differences"].append(f"{name}: replayed before, now {new.get('status')}: {new.get('error')}")
        return out
    prev_recs = read_jsonl(prev_dir / f"{name}.jsonl")
    new_recs = read_jsonl(new_dir / f"{name}.jsonl")
    same_arith = old.get("arithmetic") == new.get("arithmetic") and old.get("arithmetic") is not None
    out["mode"] = "identical" if same_arith else "agreement"
    if not same_arith:
        a, b = old.get("arithmetic") or {}, new.get("arithmetic") or {}
        out["arithmetic_differs"] = {k: {"previous": a.get(k), "now": b.get(k)} for k in _what_differs(a, b)}
    diff = compare(prev_recs, new_recs)
    old_k, new_k = _keyed(prev_recs), _keyed(new_recs)
    answered = [k for k in new_k if k in old_k and "error" not in old_k[k] and "error" not in new_k[k]]
    alike = sum(old_k[k].get("answer_ids") == new_k[k].get("answer_ids") for k in answered)
    to_error = [k for k in new_k if k in old_k and "error" not in old_k[k] and "error" in new_k[k]]
    added = [k for k in new_k if k not in old_k]
    missing = [k for k in old_k if k not in new_k]
    out.update({"same": diff["same"], "changed": diff["changed"], "added": diff["added"],
                "missing": diff["missing"], "answers_compared": len(answered), "answers_alike": alike})
    if same_arith:
        out["regressions"] = diff["changed"] + diff["added"] + diff["missing"]
        out["differences"] = [f"{name}: {d}" for d in diff["differences"]]
    else:
        out["regressions"] = len(to_error) + len(added) + len(missing)
        out["differences"] = [f"{name}: {d}" for d in diff["differences"]
                              if not d.startswith("changed: ") or "error" in d]
    for k in new_k:
        a, b = old_k.get(k), new_k[k]
        if a is None or a.get("answer_ids") != b.get("answer_ids") or ("error" in a) != ("error" in b) \
                or a.get("frame_stamp") != b.get("frame_stamp"):
            out["items"].append({"previous": a, "now": b})
    out["items"] += [{"previous": old_k[k], "now": None} for k in missing]
    return out


def compare_runs(prev_dir: Path, new_dir: Path) -> dict:
    """Two output folders of `mobilevlm-replay --out-dir`, bag by bag (compare_bag)."""
    old, new = _read_folder(Path(prev_dir)), _read_folder(Path(new_dir))
    bags = [compare_bag(n, old[n], new[n], Path(prev_dir), Path(new_dir)) for n in new if n in old]
    compared = sum(b.get("answers_compared", 0) for b in bags if b["mode"] == "agreement")
    alike = sum(b.get("answers_alike", 0) for b in bags if b["mode"] == "agreement")
    return {
        "previous": str(prev_dir), "bags_compared": len(bags),
        "only_now": [n for n in new if n not in old], "only_previous": [n for n in old if n not in new],
        "identical_bags": sum(b["mode"] == "identical" for b in bags),
        "agreement_bags": sum(b["mode"] == "agreement" for b in bags),
        "agreement": (f"{alike} of {compared} answers alike ({100 * alike / compared:.1f} %)" if compared
                      else "-"),
        "regressions": sum(b["regressions"] for b in bags),
        "regressed_bags": [b["name"] for b in bags if b["regressions"]],
        "differences": [d for b in bags for d in b["differences"]],
        "bags": bags,
    }

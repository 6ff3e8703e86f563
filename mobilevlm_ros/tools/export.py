"""mobilevlm-export: turn a published MobileVLM checkpoint into a robot-ready artifacts folder.

    mobilevlm-export --model CKPT --out ARTIFACTS [--vision-dtype fp32,fp16,int8]
                     [--quant f16,q8_0,q4_k_m,q4_0,iq4_xs,q5_k_m] [--no-llm] [--vision-tower DIR]
                     [--no-verify] [-q]

Writes (see core/artifacts.py for the layout): vision-<dtype>.onnx (CLIP tower + projector, one graph,
dynamic batch; fp32 always, it is what the other dtypes and TensorRT engines are built from),
llm-<quant>.gguf (unless --no-llm), the tokenizer files and manifest.json, last. Each vision graph is
checked against the torch reference on two fixed frames; the figures go into the manifest.
Exit codes: 0 done, 1 the checkpoint cannot be loaded or the export failed, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from .dev_packages import needs_dev_packages
from .options import CommaList

log = logging.getLogger("mobilevlm_ros.export")

DEFAULT_QUANTS = "q4_k_m"


def _tool_version() -> str:
    try:
        from .. import __version__
        return str(__version__)
    except Exception:
        return "0.1.0"


class _Steps:
    """A tqdm bar over the export's long steps (stderr; silent with --quiet or without tqdm)."""

    def __init__(self, total: int, quiet: bool):
        self.bar, self.subbar, self.t0, self.n = None, None, time.perf_counter(), 0
        if not quiet:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True,
                                bar_format="{desc:<44} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
            except ImportError:
                pass
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if self.n:
            self._advance()
        self.n += 1
        if self.bar is not None:
            self.bar.set_description_str(msg)
        elif not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr)

    def sub(self, step: int, total: int, desc: str) -> None:
        """progress(step, total, description) of a long step (the GGUF writer's callback)."""
        if self.bar is None:
            return
        if self.subbar is None:
            from tqdm import tqdm
            self.subbar = tqdm(total=total, unit="t", file=sys.stderr, leave=False, position=1,
                               dynamic_ncols=True)
        self.subbar.total = total
        self.subbar.n = step
        self.subbar.set_description_str(desc[:44])
        self.subbar.refresh()

    def llm_progress(self):
        """What to hand export_gguf: our sub-bar, plain stderr lines without tqdm, nothing when quiet."""
        if self.quiet:
            return None
        return self.sub if self.bar is not None else True

    def _advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.subbar is not None:
            self.subbar.close()
        if self.bar is not None:
            if self.n:
                self._advance()
            self.bar.close()


def _copy_tokenizer(src: Path, out: Path) -> dict:
    """The tokenizer files: tokenizer.model as published, or a tokenizer.json in a folder without
    one (a BPE test model, see core/tokenizer.py), with tokenizer_config.json and
    special_tokens_map.json."""
    from ..core.artifacts import TOKENIZER_FILES, sha256_file
    from ..core.errors import ModelLoadError
    from ..core.tokenizer import TOKENIZER_JSON, TOKENIZER_MODEL, tokenizer_file
    main = tokenizer_file(src).name
    hashes = {}
    for name in [main, *(n for n in TOKENIZER_FILES if n not in (TOKENIZER_MODEL, TOKENIZER_JSON))]:
        if not (src / name).is_file():
            if name == main:
                raise ModelLoadError(f"missing file: {src / name}")
            continue
        shutil.copyfile(src / name, out / name)
        hashes[name] = sha256_file(out / name)
    return hashes


def _previous_llm(out: Path, config_sha: str) -> dict:
    """With --no-llm, keep the GGUF entries of an earlier export of the same checkpoint if intact."""
    from ..core.artifacts import MANIFEST, read_manifest
    if not (out / MANIFEST).is_file():
        return {}
    try:
        old = read_manifest(out)
    except Exception:
        return {}
    if old.get("source", {}).get("config_sha256") != config_sha:
        return {}
    return {q: e for q, e in (old.get("llm") or {}).items()
            if (out / e.get("file", "")).is_file() and (out / e["file"]).stat().st_size == e.get("bytes")}


def export(model: Path, out: Path, vision_dtypes, quants, llm: bool = True, vision_tower=None,
           verify: bool = True, quiet: bool = False) -> dict:
    """Do the whole export; returns the manifest written. Raises MobileVLMError subclasses."""
    from ..core.artifacts import sha256_file, write_manifest
    from ..core.checkpoint import load_checkpoint
    from ..core.errors import ModelLoadError
    from ..core.onnx_export import export_vision, remove_stale_graphs
    from ..core.projectors import projector_tokens

    model, out = Path(model), Path(out)
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"--out {out} exists and is not a folder")
    if out.resolve() == model.resolve():
        raise ModelLoadError("--out must not be the checkpoint folder itself")
    n_graphs = len(set(["fp32", *vision_dtypes]))
    # load, torch reference, fp32 export, one conversion per other dtype, one check per graph,
    # tokenizer, LLM, manifest
    steps = _Steps(3 + (n_graphs - 1) + (n_graphs if verify else 0) + 1 + (1 if llm else 0) + 1, quiet)
    try:
        steps("loading the checkpoint")
        ckpt = load_checkpoint(model, vision_tower)
        out.mkdir(parents=True, exist_ok=True)
        cfg, vcfg = ckpt.config, ckpt.vision.config
        config_sha = sha256_file(model / "config.json")
        vision = export_vision(ckpt, out, vision_dtypes, step=steps, verify=verify)
        remove_stale_graphs(out, vision)
        steps("tokenizer")
        tokenizer = _copy_tokenizer(model, out)
        if llm:
            steps(f"language model -> GGUF ({', '.join(quants)})")
            try:
                from ..core.gguf_export import export_gguf
            except ImportError as e:
                raise ModelLoadError(f"GGUF export is not available ({e}); use --no-llm") from None
            llm_section = export_gguf(ckpt, out, list(quants), steps.llm_progress())
        else:
            llm_section = _previous_llm(out, config_sha)
        steps("manifest")
        manifest = {
            "tool_version": _tool_version(),
            "model_id": model.resolve().name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"path": str(model.resolve()), "config_sha256": config_sha,
                       "name_or_path": cfg.raw.get("_name_or_path")},
            "projector_type": cfg.projector_type,
            "image_size": vcfg.image_size,
            "image_tokens": projector_tokens(cfg.projector_type, vcfg.num_patches),
            "hidden_size": cfg.llm.hidden_size,
            "mm_hidden_size": cfg.mm_hidden_size,
            "vision_weights_source": ckpt.vision.source,
            "vision": vision,
            "llm": llm_section or {},
            "tokenizer": tokenizer,
        }
        write_manifest(out, manifest)
    finally:
        steps.close()
    return manifest


@needs_dev_packages("mobilevlm-export")
def main(argv=None) -> int:
    from ..core.onnx_export import DTYPES
    from ..core.pipeline import QUANTS
    ap = argparse.ArgumentParser(prog="mobilevlm-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="published checkpoint folder")
    ap.add_argument("--out", required=True, type=Path, help="artifacts folder to write")
    dtypes, quants = CommaList(DTYPES, "vision dtype"), CommaList(QUANTS, "quant")
    ap.add_argument("--vision-dtype", default="fp32", type=dtypes,
                    help=f"vision graphs to write, comma-separated: {dtypes.names} (fp32 is always written)")
    ap.add_argument("--quant", default=DEFAULT_QUANTS, type=quants,
                    help=f"GGUF files to write, comma-separated: {quants.names}")
    ap.add_argument("--no-llm", action="store_true", help="skip the language model (GGUF) files")
    ap.add_argument("--vision-tower", default=None, help="CLIP folder for V1 checkpoints")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip running each graph against the torch reference")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..core.errors import MobileVLMError, ModelLoadError
    t0 = time.perf_counter()
    try:
        m = export(a.model, a.out, a.vision_dtype, a.quant, llm=not a.no_llm,
                   vision_tower=a.vision_tower, verify=not a.no_verify, quiet=a.quiet)
    except ModelLoadError as e:
        print(f"mobilevlm-export: cannot load checkpoint: {e}", file=sys.stderr)
        return 1
    except MobileVLMError as e:
        print(f"mobilevlm-export: export failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mobilevlm-export: {e}", file=sys.stderr)
        return 1
    lines = [f"wrote {a.out} in {time.perf_counter() - t0:.0f} s"]
    for dtype, e in m["vision"].items():
        chk = e.get("check")
        fid = f", cosine vs torch {chk['cosine']:.6f}, max abs diff {chk['max_abs_diff']:.3g}" if chk else ""
        lines.append(f"  {e['file']}: {e['bytes'] / 1e6:.1f} MB{fid}")
    for quant, e in (m.get("llm") or {}).items():
        lines.append(f"  {e.get('file', quant)}: {e.get('bytes', 0) / 1e6:.1f} MB")
    if not a.quiet:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

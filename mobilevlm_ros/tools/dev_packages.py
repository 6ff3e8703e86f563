"""The packages beyond the robot runtime set, and the one message a tool gives when one is missing.

requirements-runtime.txt holds what the node, replay and the ask clients import (a robot installs
only that, with ROS 2); requirements.txt adds what export, make-tiny, the benchmarks, soak plots and
the tests need. A tool run where only the runtime set is installed says which package it lacks and
how to install it, instead of a traceback.
"""
from __future__ import annotations

import functools
import importlib.util
import sys

# import name -> what it is needed for (all pinned in requirements.txt, none in requirements-runtime.txt)
DEV_PACKAGES = {
    "torch": "the reference model: export, make-tiny, the torch backends, benchmark baselines",
    "onnx": "export (ONNX graphs)",
    "onnxscript": "export (torch's ONNX exporter)",
    "gguf": "export and make-tiny (GGUF files)",
    "safetensors": "checkpoints in .safetensors",
    "transformers": "the reference-style baseline of `mobilevlm-bench question`",
    "tokenizers": "the byte-level BPE tokenizer of the SmolLM2 test model",
    "matplotlib": "the PNG plots of mobilevlm-bench and mobilevlm-soak",
}


def missing(*modules: str) -> list[str]:
    """The modules among `modules` that are not installed."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def install_hint(modules) -> str:
    names = " ".join(modules)
    return (f"not installed here (the robot runtime set, requirements-runtime.txt, leaves "
            f"{'them' if len(modules) > 1 else 'it'} out); "
            f"install the full set from the source checkout with `pip install -r requirements.txt` "
            f"(pinned), or `pip install {names}`")


def png_plots_possible(path) -> bool:
    """Whether matplotlib is installed; if not, says on stderr that `path` is not written and why
    (the tools write their figures as JSON and Markdown as well)."""
    if not missing("matplotlib"):
        return True
    print(f"no plot {path}: matplotlib is {install_hint(['matplotlib'])}", file=sys.stderr)
    return False


def needs_dev_packages(tool: str):
    """Decorator of a console script's main: a ModuleNotFoundError for one of DEV_PACKAGES becomes
    one line on stderr naming the package and how to install it, and exit status 2."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kw):
            try:
                return main(*args, **kw)
            except ModuleNotFoundError as e:
                top = (e.name or "").split(".")[0]
                if top not in DEV_PACKAGES:
                    raise
                print(f"{tool}: needs {top} for {DEV_PACKAGES[top]}; {install_hint([top])}", file=sys.stderr)
                return 2
        return run
    return wrap

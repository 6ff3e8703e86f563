"""Which llama.cpp library the llamacpp decoder runs on, and opening a GGUF model and a context on it.

Two libraries read the same GGUF files: llama.cpp (llama-cpp-python's build, the default) and
ik_llama.cpp (opt-in, built for this venv by scripts/build-ik-llama.sh; docs/engine-choice.md).
Both are used through one API object (`import_library`): llama-cpp-python's module, or an adapter
with the same names for ik_llama.cpp (ik_llama_api).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

from ..errors import ModelLoadError
from . import ik_llama_lib
from .llama_log import llama_log_tail

log = logging.getLogger(__name__)

LLAMA_LIBRARIES = ("llama.cpp", "ik_llama.cpp")


def default_threads() -> int:
    """Every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def library_available(library: str) -> bool:
    """Whether `library` is installed: llama-cpp-python's package, or ik_llama.cpp's build for this
    venv (scripts/build-ik-llama.sh); it may still fail to load."""
    if library == "ik_llama.cpp":
        return ik_llama_lib.build_info() is not None
    return importlib.util.find_spec("llama_cpp") is not None


def libraries_option(spec: str = "") -> list:
    """The libraries a comma-separated option names; empty: every installed one. ValueError for a
    name that is not a library."""
    names = [e.strip() for e in spec.split(",") if e.strip()] or [e for e in LLAMA_LIBRARIES
                                                                   if library_available(e)]
    bad = [e for e in names if e not in LLAMA_LIBRARIES]
    if bad or not names:
        raise ValueError(f"unknown library {bad} (choose from {', '.join(LLAMA_LIBRARIES)})")
    return names


def choose_library(library: str, gpu_layers: int) -> tuple[str, str]:
    """(the library to load, why) for the option `library`: auto = ik_llama.cpp for a CPU-only
    decoder where it was built (opt-in: MOBILEVLM_IK_LLAMA=1 scripts/setup.sh) and this CPU has
    every instruction-set flag of the CPU it was built for (its small-batch kernels give a
    question's first token sooner on x86, docs/engine-choice.md), else llama.cpp (GPU offload: the
    llama-cpp-python build users make for their GPU)."""
    if library != "auto":
        if library not in LLAMA_LIBRARIES:
            raise ModelLoadError(f"unknown llama.cpp library '{library}' (choose from auto, "
                                 f"{', '.join(LLAMA_LIBRARIES)})")
        return library, "asked for"
    if gpu_layers:
        return "llama.cpp", "auto: layers offloaded to a GPU"
    if not library_available("ik_llama.cpp"):
        return "llama.cpp", "auto: ik_llama.cpp is not built in this venv (opt-in: scripts/build-ik-llama.sh)"
    missing = ik_llama_lib.missing_cpu_flags(_ik_build_info(), _cpu_flags())
    if missing:         # built with -march=native elsewhere: here it would die of an illegal instruction
        return "llama.cpp", f"auto: the ik_llama.cpp build needs {', '.join(missing)}, which this CPU lacks"
    return "ik_llama.cpp", "auto: CPU only, ik_llama.cpp built for this CPU"


def _ik_build_info() -> dict:
    return ik_llama_lib.build_info() or {}


def _cpu_flags() -> set:
    return ik_llama_lib.cpu_flags()


def import_library(library: str):
    """The API object of a library: llama-cpp-python's module for llama.cpp, an adapter with the
    same names for ik_llama.cpp (ik_llama_api)."""
    if library == "ik_llama.cpp":
        from . import ik_llama_api
        return ik_llama_api.load()
    if library != "llama.cpp":
        raise ModelLoadError(f"unknown llama.cpp library '{library}' (choose from {', '.join(LLAMA_LIBRARIES)})")
    try:
        import llama_cpp
    except Exception as e:
        raise ModelLoadError(f"the llamacpp decoder needs llama-cpp-python, which does not import: "
                             f"{type(e).__name__}: {e}") from None
    return llama_cpp


def cpu_has_amx(llama) -> bool:
    """Whether this llama.cpp's CPU backend multiplies with Intel AMX (built with -march=native on a
    Sapphire Rapids or newer Xeon)."""
    try:
        return "AMX_INT8 = 1" in llama.llama_print_system_info().decode(errors="replace")
    except Exception:
        return False


def check_gguf_file(path: Path) -> None:
    """Clear errors for the usual broken files before llama.cpp sees them."""
    if not path.is_file():
        raise ModelLoadError(f"missing file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r})")
    if size < 1024:
        raise ModelLoadError(f"{path} is truncated ({size} bytes)")


def open_model(llama, path: Path, gpu_layers: int, extra_buffers: Optional[bool],
               mmap: Optional[bool]) -> tuple:
    """(model handle, extra_buffers, mmap) for a GGUF file, the Nones resolved: extra_buffers (the
    repacked weight layouts, CPU_REPACK and AMX) on unless the CPU backend has AMX; mmap unless the
    weights are repacked on the CPU."""
    mp = llama.llama_model_default_params()
    mp.n_gpu_layers = gpu_layers
    if extra_buffers is None:
        # llama.cpp's AMX matmul segfaults in the first llama_decode on Sapphire Rapids
        # (ggml-org/llama.cpp#20824; every GGUF we make, tiny to 3B): the plain layout instead
        extra_buffers = not cpu_has_amx(llama)
        if not extra_buffers:
            log.info("llama.cpp's CPU backend has AMX, whose matmul crashes: weights kept in "
                     "the plain layout (no AMX, no CPU_REPACK)")
    mp.use_extra_bufts = bool(extra_buffers)
    if mmap is None:
        # repacking copies the weights out of the mapping, whose pages then stay resident too
        # (1.7B Q4_K_M: 1820 MB RSS mapped, 1271 MB read, the same decode speed)
        mmap = not (extra_buffers and gpu_layers == 0)
    if not mmap:
        mp.load_mode = llama.LLAMA_LOAD_MODE_NONE
    model = llama.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {path}" + llama_log_tail())
    return model, bool(extra_buffers), bool(mmap)


def open_context(llama, model, path: Path, n_ctx: int, n_batch: int, threads: int, threads_batch: int,
                 flash_attn: Optional[bool]):
    """A context of n_ctx cells and ONE sequence (the fixed KV layout, kv_states.py), n_batch rows
    per llama_decode, no embeddings output, no perf counters."""
    cp = llama.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = cp.n_ubatch = n_batch
    cp.n_seq_max = 1
    cp.n_threads, cp.n_threads_batch = threads, threads_batch
    cp.embeddings = False
    cp.no_perf = True
    if flash_attn is not None:
        cp.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                              else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    ctx = llama.llama_init_from_model(model, cp)
    if not ctx:
        raise ModelLoadError(f"llama.cpp could not create a context for {path} "
                             f"(n_ctx {cp.n_ctx}, n_batch {cp.n_batch})" + llama_log_tail())
    return ctx

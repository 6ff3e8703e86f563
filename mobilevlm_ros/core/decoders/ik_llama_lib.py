"""The project's own ctypes binding of the ik_llama.cpp library that scripts/build-ik-llama.sh
builds for this machine's CPU into <venv>/lib/mobilevlm-ik-llama (libllama.so, libggml.so, the
headers they were built from, LICENSE, build.json).

Only what ik_llama_api calls is declared. The structs are passed by value, so they must match
include/llama.h of that build field for field: test/test_ik_llama_lib.py compiles a C program
against the installed header and compares every size and offset with these declarations.

build.json records the x86 instruction-set flags of the CPU the library was compiled on
(-march=native may use any of them); `missing_cpu_flags()` says which of them this CPU lacks, and
neither `auto` nor `load()` runs the library then (an illegal instruction kills the process)."""
from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Optional

from ..errors import ModelLoadError

DIR_NAME = "mobilevlm-ik-llama"
# /proc/cpuinfo's names of x86 instruction-set extensions (scripts/build-ik-llama.sh: ISA_RE)
ISA_FLAG = re.compile(r"^(sse[0-9a-z_]*|ssse3|pni|avx[0-9a-z_]*|amx[a-z0-9_]*|fma4?|f16c|bmi[12]|adx|abm|popcnt"
                      r"|movbe|sha_ni|aes|vaes|pclmulqdq|vpclmulqdq|gfni)$")


def lib_dir() -> Path:
    """Where the build is installed: $MOBILEVLM_IK_LLAMA_DIR, else <sys.prefix>/lib/mobilevlm-ik-llama."""
    return Path(os.environ.get("MOBILEVLM_IK_LLAMA_DIR") or Path(sys.prefix) / "lib" / DIR_NAME)


def build_info(where: Optional[Path] = None) -> Optional[dict]:
    """build.json of the installed build; None when there is none (or it is unreadable)."""
    d = where or lib_dir()
    try:
        info = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if not all((d / f).is_file() for f in ("libllama.so", "libggml.so")):
        return None
    return info if isinstance(info, dict) else None


def cpu_flags() -> set:
    """This CPU's flags as /proc/cpuinfo lists them (empty where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def missing_cpu_flags(info: dict, flags: set) -> list:
    """The instruction-set flags the build may use that `flags` (this CPU's) lacks, sorted.
    A build that records none (not x86, or unreadable) counts as needing nothing unusual."""
    return sorted(f for f in info.get("cpu_flags", ()) if ISA_FLAG.match(f) and f not in flags)


# -- llama.h's types (ik_llama.cpp, the commit of the pinned sdist) -------------------------------
c = ctypes
_enum = c.c_int
ggml_abort_callback = c.CFUNCTYPE(c.c_bool, c.c_void_p)
llama_progress_callback = c.CFUNCTYPE(c.c_bool, c.c_float, c.c_void_p)
ggml_log_callback = c.CFUNCTYPE(None, c.c_int, c.c_char_p, c.c_void_p)
eval_callback = c.CFUNCTYPE(c.c_bool, c.c_void_p, c.c_bool, c.c_void_p)


class ModelParams(c.Structure):
    _fields_ = [
        ("devices", c.c_char_p),
        ("n_gpu_layers", c.c_int32), ("mla", c.c_int32), ("split_mode", _enum), ("main_gpu", c.c_int32),
        ("max_gpu", c.c_int32), ("ncmoe", c.c_int32), ("type_k", _enum), ("type_v", _enum),
        ("max_ctx_size", c.c_uint32), ("n_seq_max", c.c_int32), ("n_ubatch", c.c_int32), ("amb", c.c_int32),
        ("fit_margin", c.c_int32), ("fit", c.c_bool), ("worst_graph_tokens", c.c_int32),
        ("type_k_first", _enum), ("type_k_last", _enum), ("type_v_first", _enum), ("type_v_last", _enum),
        ("n_k_first", c.c_int32), ("n_k_last", c.c_int32), ("n_v_first", c.c_int32), ("n_v_last", c.c_int32),
        ("tensor_split", c.POINTER(c.c_float)), ("rpc_servers", c.c_char_p),
        ("progress_callback", llama_progress_callback), ("progress_callback_user_data", c.c_void_p),
        ("kv_overrides", c.c_void_p), ("tensor_buft_overrides", c.c_void_p),
        ("vocab_only", c.c_bool), ("use_mmap", c.c_bool), ("use_mlock", c.c_bool), ("check_tensors", c.c_bool),
        ("repack_tensors", c.c_bool), ("use_thp", c.c_bool), ("validate_quants", c.c_bool),
        ("merge_qkv", c.c_bool), ("merge_up_gate_exps", c.c_bool), ("mtp", c.c_bool), ("dry_run", c.c_bool),
        ("flash_attn", c.c_bool),
    ]


class ContextParams(c.Structure):
    _fields_ = [
        ("seed", c.c_uint32), ("n_ctx", c.c_uint32), ("n_batch", c.c_uint32), ("n_ubatch", c.c_uint32),
        ("n_seq_max", c.c_uint32), ("n_threads", c.c_uint32), ("n_threads_batch", c.c_uint32),
        ("max_extra_alloc", c.c_int32), ("worst_case_tokens", c.c_int32),
        ("rope_scaling_type", _enum), ("pooling_type", _enum), ("attention_type", _enum),
        ("rope_freq_base", c.c_float), ("rope_freq_scale", c.c_float), ("yarn_ext_factor", c.c_float),
        ("yarn_attn_factor", c.c_float), ("yarn_beta_fast", c.c_float), ("yarn_beta_slow", c.c_float),
        ("yarn_orig_ctx", c.c_uint32), ("defrag_thold", c.c_float),
        ("cb_eval", eval_callback), ("cb_eval_user_data", c.c_void_p),
        ("type_k", _enum), ("type_v", _enum), ("type_reduce", _enum), ("type_k_first", _enum),
        ("type_k_last", _enum), ("type_v_first", _enum), ("type_v_last", _enum),
        ("n_k_first", c.c_int32), ("n_k_last", c.c_int32), ("n_v_first", c.c_int32), ("n_v_last", c.c_int32),
        ("logits_all", c.c_bool), ("embeddings", c.c_bool), ("offload_kqv", c.c_bool), ("flash_attn", c.c_bool),
        ("mla_attn", c.c_int), ("attn_max_batch", c.c_int),
        ("fused_moe_up_gate", c.c_bool), ("grouped_expert_routing", c.c_bool), ("fused_up_gate", c.c_bool),
        ("fused_mmad", c.c_bool), ("rope_cache", c.c_bool), ("graph_reuse", c.c_bool),
        ("min_experts", c.c_int), ("thresh_experts", c.c_float),
        ("only_active_experts", c.c_bool), ("k_cache_hadamard", c.c_bool), ("v_cache_hadamard", c.c_bool),
        ("split_mode_graph_scheduling", c.c_bool), ("scheduler_async", c.c_bool), ("mtp", c.c_bool),
        ("mtp_op_type", _enum),
        ("abort_callback", ggml_abort_callback), ("abort_callback_data", c.c_void_p),
        ("offload_policy", c.c_void_p), ("cuda_params", c.c_void_p),
    ]


class Batch(c.Structure):
    _fields_ = [
        ("n_tokens", c.c_int32),
        ("token", c.POINTER(c.c_int32)), ("embd", c.POINTER(c.c_float)), ("pos", c.POINTER(c.c_int32)),
        ("n_seq_id", c.POINTER(c.c_int32)), ("seq_id", c.POINTER(c.POINTER(c.c_int32))),
        ("logits", c.POINTER(c.c_int8)),
        ("all_pos_0", c.c_int32), ("all_pos_1", c.c_int32), ("all_seq_id", c.c_int32),
    ]


STRUCTS = {"llama_model_params": ModelParams, "llama_context_params": ContextParams, "llama_batch": Batch}

_p, _i32, _u32, _size = c.c_void_p, c.c_int32, c.c_uint32, c.c_size_t
_u8p = c.POINTER(c.c_uint8)
# name: (argument types, result type), as llama.h declares them
FUNCTIONS = {
    "llama_backend_init": ([], None),
    "llama_log_set": ([ggml_log_callback, _p], None),
    "llama_print_system_info": ([], c.c_char_p),
    "llama_model_default_params": ([], ModelParams),
    "llama_context_default_params": ([], ContextParams),
    "llama_model_load_from_file": ([c.c_char_p, ModelParams], _p),
    "llama_free_model": ([_p], None),
    "llama_init_from_model": ([_p, ContextParams], _p),
    "llama_free": ([_p], None),
    "llama_model_get_vocab": ([_p], _p),
    "llama_vocab_n_tokens": ([_p], _i32),
    "llama_model_n_embd": ([_p], _i32),
    "llama_n_ctx_train": ([_p], _i32),
    "llama_n_ctx": ([_p], _u32),
    "llama_n_batch": ([_p], _u32),
    "llama_n_threads": ([_p], _u32),
    "llama_n_threads_batch": ([_p], _u32),
    "llama_batch_init": ([_i32, _i32, _i32], Batch),
    "llama_batch_free": ([Batch], None),
    "llama_decode": ([_p, Batch], _i32),
    "llama_get_logits_ith": ([_p, _i32], c.POINTER(c.c_float)),
    "llama_set_abort_callback": ([_p, ggml_abort_callback, _p], None),
    "llama_kv_cache_clear": ([_p], None),
    "llama_kv_cache_seq_rm": ([_p, _i32, _i32, _i32], c.c_bool),
    "llama_kv_cache_seq_pos_max": ([_p, _i32], _i32),
    "llama_state_seq_get_size": ([_p, _i32, _u32], _size),
    "llama_state_seq_get_data": ([_p, _u8p, _size, _i32, _u32], _size),
    "llama_state_seq_set_data": ([_p, _u8p, _size, _i32, _u32], _size),
}


class Library:
    """The loaded libraries; every name of FUNCTIONS is an attribute (a ctypes function)."""

    def __init__(self, where: Path, info: dict):
        self.dir, self.info = where, info
        # libggml first and global: libllama's undefined ggml symbols resolve against it (its RUNPATH
        # $ORIGIN finds it too; this also covers a copy without RUNPATH)
        self.ggml = ctypes.CDLL(str(where / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
        self.llama = ctypes.CDLL(str(where / "libllama.so"))
        for name, (argtypes, restype) in FUNCTIONS.items():
            f = getattr(self.llama, name)
            f.argtypes, f.restype = argtypes, restype
            setattr(self, name, f)


_lock = threading.Lock()
_lib: Optional[Library] = None


def load() -> Library:
    """The process's one Library; ModelLoadError if there is no build, or this CPU cannot run it."""
    global _lib
    with _lock:
        if _lib is None:
            where = lib_dir()
            info = build_info(where)
            if info is None:
                raise ModelLoadError(f"the ik_llama.cpp engine is not built: no library in {where} "
                                     "(opt-in: MOBILEVLM_IK_LLAMA=1 scripts/setup.sh, or "
                                     "scripts/build-ik-llama.sh <venv>)")
            missing = missing_cpu_flags(info, cpu_flags())
            if missing:
                raise ModelLoadError(f"the ik_llama.cpp library in {where} was built for a CPU with "
                                     f"{', '.join(missing)}, which this CPU lacks: rebuild it here "
                                     "(scripts/build-ik-llama.sh <venv>)")
            try:
                _lib = Library(where, info)
            except (OSError, AttributeError) as e:
                raise ModelLoadError(f"the ik_llama.cpp library in {where} does not load: {e}") from None
        return _lib

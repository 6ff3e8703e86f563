"""ik_llama.cpp behind the llama.cpp API names that LlamaCppDecoder calls.

ik_llama.cpp (github.com/ikawrakow/ik_llama.cpp) is a fork of llama.cpp that reads the same GGUF
files and has its own CPU matrix kernels; with its weights repacked at load (`repack_tensors`) it
evaluates a question's small batch much faster on x86 (README, Performance). Its C API is older
llama.cpp's: the KV cache is addressed through the context (`llama_kv_cache_*`), the sequence-state
functions take flags, there is no sampler chain, and the parameter structs differ.

`load()` returns an object with the names LlamaCppDecoder uses on llama-cpp-python's `llama_cpp`,
implemented on the project's own binding (ik_llama_lib) of the library that scripts/setup.sh builds
for this CPU. Where the two APIs differ:
  model / context parameters  wrapped: the decoder sets mainline field names (`use_extra_bufts` ->
                              `repack_tensors`, `load_mode` -> `use_mmap`, `flash_attn_type` ->
                              `flash_attn`; `no_perf` has no counterpart)
  llama_get_memory            the context itself; llama_memory_* -> llama_kv_cache_*
  llama_state_seq_*           flags 0: the whole sequence state, as mainline's functions save it
  samplers                    temperature -> top-p -> a seeded draw, in NumPy, in llama.cpp's order;
                              the draws are not llama.cpp's (another RNG): sampled answers differ
                              from the llama.cpp engine's, greedy ones are argmax either way
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from . import ik_llama_lib

LLAMA_LOAD_MODE_NONE = 0                    # mainline's value: read the file, no mapping
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0
LLAMA_FLASH_ATTN_TYPE_ENABLED = 1
LLAMA_DEFAULT_SEED = 0xFFFFFFFF

_lock = threading.Lock()
_api: Optional["IkLlamaApi"] = None


def load() -> "IkLlamaApi":
    """The process's one IkLlamaApi (the library is loaded once); ModelLoadError if there is no
    build of ik_llama.cpp or this CPU cannot run it (ik_llama_lib.load)."""
    global _api
    with _lock:
        if _api is None:
            _api = IkLlamaApi(ik_llama_lib.load())
        return _api


class _Params:
    """A parameter struct that the decoder fills with mainline field names."""
    RENAMED: dict = {}
    IGNORED: tuple = ()

    def __init__(self, raw):
        object.__setattr__(self, "raw", raw)

    def __getattr__(self, name):
        return getattr(self.raw, self.RENAMED.get(name, name))

    def __setattr__(self, name, value):
        if name in self.IGNORED:
            return
        setattr(self.raw, self.RENAMED.get(name, name), value)


class _ModelParams(_Params):
    RENAMED = {"use_extra_bufts": "repack_tensors"}

    def __setattr__(self, name, value):
        if name == "load_mode":                 # mainline's enum; ik_llama.cpp has the boolean
            self.raw.use_mmap = value != LLAMA_LOAD_MODE_NONE
            return
        super().__setattr__(name, value)


class _ContextParams(_Params):
    IGNORED = ("no_perf",)

    def __setattr__(self, name, value):
        if name == "flash_attn_type":
            self.raw.flash_attn = value == LLAMA_FLASH_ATTN_TYPE_ENABLED
            return
        super().__setattr__(name, value)


class _Sampler:
    """temperature -> top-p -> a draw with its own seeded generator (llama.cpp's chain order)."""

    def __init__(self):
        self.temperature, self.top_p, self.rng = 1.0, 1.0, None

    def sample(self, logits: np.ndarray) -> int:
        x = logits.astype(np.float64)
        if self.temperature <= 0:
            return int(x.argmax())
        x = x / self.temperature
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[:max(1, int(np.searchsorted(cum, self.top_p)) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.size, p=p))


class IkLlamaApi:
    """The subset of llama_cpp's names LlamaCppDecoder (and route_llama_logs) calls."""

    name = "ik_llama.cpp"
    LLAMA_LOAD_MODE_NONE = LLAMA_LOAD_MODE_NONE
    LLAMA_FLASH_ATTN_TYPE_DISABLED = LLAMA_FLASH_ATTN_TYPE_DISABLED
    LLAMA_FLASH_ATTN_TYPE_ENABLED = LLAMA_FLASH_ATTN_TYPE_ENABLED
    LLAMA_DEFAULT_SEED = LLAMA_DEFAULT_SEED

    def __init__(self, raw: ik_llama_lib.Library):
        self.raw = raw
        self.ggml_abort_callback = ik_llama_lib.ggml_abort_callback
        self.llama_log_callback = ik_llama_lib.ggml_log_callback
        for name in ("llama_log_set", "llama_print_system_info", "llama_n_ctx", "llama_n_batch",
                     "llama_n_threads", "llama_n_threads_batch", "llama_set_abort_callback",
                     "llama_backend_init", "llama_model_get_vocab", "llama_vocab_n_tokens", "llama_model_n_embd",
                     "llama_batch_init", "llama_batch_free", "llama_decode", "llama_get_logits_ith"):
            setattr(self, name, getattr(raw, name))
        self.n_vocab = {}                       # context -> vocabulary size, for the samplers

    # -- parameters, model, context ----------------------------------------------------------------
    def llama_model_default_params(self):
        return _ModelParams(self.raw.llama_model_default_params())

    def llama_context_default_params(self):
        return _ContextParams(self.raw.llama_context_default_params())

    def llama_model_load_from_file(self, path: bytes, params):
        return self.raw.llama_model_load_from_file(path, params.raw)

    def llama_model_n_ctx_train(self, model):
        return self.raw.llama_n_ctx_train(model)

    def llama_init_from_model(self, model, params):
        ctx = self.raw.llama_init_from_model(model, params.raw)
        if ctx:
            self.n_vocab[ctx] = int(self.raw.llama_vocab_n_tokens(self.raw.llama_model_get_vocab(model)))
        return ctx

    def llama_model_free(self, model):
        self.raw.llama_free_model(model)

    def llama_free(self, ctx):
        self.n_vocab.pop(ctx, None)
        self.raw.llama_free(ctx)

    # -- the KV cache ------------------------------------------------------------------------------
    def llama_get_memory(self, ctx):
        return ctx

    def llama_memory_clear(self, ctx, data: bool):
        self.raw.llama_kv_cache_clear(ctx)

    def llama_memory_seq_rm(self, ctx, seq, p0, p1) -> bool:
        return bool(self.raw.llama_kv_cache_seq_rm(ctx, seq, p0, p1))

    def llama_memory_seq_pos_max(self, ctx, seq) -> int:
        return int(self.raw.llama_kv_cache_seq_pos_max(ctx, seq))

    def llama_state_seq_get_size(self, ctx, seq):
        return self.raw.llama_state_seq_get_size(ctx, seq, 0)

    def llama_state_seq_get_data(self, ctx, dst, size, seq):
        return self.raw.llama_state_seq_get_data(ctx, dst, size, seq, 0)

    def llama_state_seq_set_data(self, ctx, src, size, seq):
        return self.raw.llama_state_seq_set_data(ctx, src, size, seq, 0)

    # -- samplers ----------------------------------------------------------------------------------
    def llama_sampler_chain_default_params(self):
        return None

    def llama_sampler_chain_init(self, _params):
        return _Sampler()

    def llama_sampler_init_greedy(self):
        chain = _Sampler()
        chain.temperature = 0.0
        return chain

    def llama_sampler_init_temp(self, t: float):
        return ("temperature", float(t))

    def llama_sampler_init_top_p(self, p: float, _min_keep: int):
        return ("top_p", float(p))

    def llama_sampler_init_dist(self, seed: int):
        return ("rng", np.random.default_rng(int(seed)))

    def llama_sampler_chain_add(self, chain: _Sampler, stage) -> None:
        setattr(chain, *stage)

    def llama_sampler_sample(self, chain: _Sampler, ctx, i: int) -> int:
        ptr = self.raw.llama_get_logits_ith(ctx, i)
        if not ptr:
            return -1
        return chain.sample(np.ctypeslib.as_array(ptr, shape=(self.n_vocab[ctx],)))

    def llama_sampler_free(self, chain) -> None:
        pass

"""The GGUF decoder: MobileLLaMA on llama.cpp (low-level ctypes API of llama-cpp-python), fed with
cached image embeddings.

Same contract as TorchDecoder.generate (prompt.prefix, image embeddings, prompt.suffix; AnswerBuilder
for stop rules, streaming and cancellation; the same Generation fields).

Determinism: every evaluation runs in one fixed KV layout. The context holds a single sequence
whose cells are 0..n-1 in position order, and nothing else: a frame's KV (prompt prefix + its image
tokens) is kept outside the context as llama.cpp's serialised sequence state and restored into an
emptied cache before its question is evaluated. So the cells a question attends over, their number
and their order are the same whether the frame was prefilled while idle or evaluated by the
question, whichever other frames are cached, and whatever was asked before. (llama.cpp's
attention and softmax sum over the cells in SIMD lanes by cell index, so the same values in
other cells round differently: with one unified KV buffer holding several frames, the same frame
and question gave different greedy answers on AVX-512 machines.) Images always go in the same
batches (n_batch rows, one batch at the default n_batch).

    prefix state   BOS + system + "USER: ", evaluated once per load
    frame states   prefix + the frame's image tokens (+ with frame_tail: "\\n", the same for every
                   question), LRU over max_cached_frames (host memory, 2 x layers x kv width x
                   2 bytes per token: 35 MB per frame at 1.7B)
    the context    the state being answered from, + the rest of "\\n<question> ASSISTANT:" + the answer

With frame_tail (off by default, see _load_frame_tail) the frame tail goes in the image's batch as
its token-embedding rows (read from the GGUF; checked at load to give the same logits as the
tokens), so a question evaluates two tokens fewer: on 2 cores a small batch costs ~15 ms a token,
and the question's batch is all of time to first token.
A question whose text does not start with the tail is evaluated from the image without it (the
tail's cells removed from the restored state).

A prefill while idle can be interrupted (a request arrived): `interrupt` is polled by llama.cpp
between graph nodes through its abort callback, so a question waits milliseconds, not a whole
image evaluation. Nothing is cached from an interrupted prefill.

Image embeddings enter through a batch whose `embd` is set (llama_batch_init(n, n_embd, 1)), at most
n_batch rows per llama_decode. Greedy decoding takes the argmax of the logits (as the reference does);
sampling runs llama.cpp's sampler chain: temperature -> top-p -> seeded draw, in the reference's order.

llama.cpp's log goes to the Python logger "mobilevlm_ros.llama_cpp" at DEBUG; its recent warnings and
errors are quoted in the exceptions raised here.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import ModelLoadError, RequestError
from ..generation import GenerationParams
from ..pipeline import LLAMACPP_ENGINES
from ..prompt import PromptIds, frame_tail
from ..tokenizer import Tokenizer
from ..vision import ImageEmbedding
from .base import Decoder, FrameCache, Turn
from . import ik_llama_lib

log = logging.getLogger(__name__)
llama_log = logging.getLogger("mobilevlm_ros.llama_cpp")

SEQ = 0                     # the context's only sequence
DEFAULT_N_BATCH = 512
# A question's batch up to four tokens short of a multiple of 16 is padded to it: llama.cpp's
# repacked x86 kernels multiply 16 rows at a time and take a remainder row by row, at about 1.5x
# a row's cost in a full block. 1.7B Q4_K_M, 2 cores, median ms by batch size:
#   AMD EPYC (AVX-512 VNNI): 11: 196, 12: 199, 13: 211, 14: 230, 15: 240, 16: 187; 26: 338, 32: 349
#   Intel Xeon (AVX-512, AMX unused): 11: 185, 14: 220, 15: 234, 16: 189
# so padding pays from 12 of 16 on both; at 11 it is a wash on the Xeon. ik_llama.cpp's kernels take
# any row count at about the same cost per row (AMD EPYC: 11: 101, 12: 108, 13: 116, 15: 131, 16: 139
# unpadded; 12 padded to 16: 139), so it gets no padding.
PAD_MULTIPLE, PAD_MAX = 16, 4
PAD_MAX_BY_ENGINE = {"llama.cpp": PAD_MAX, "ik_llama.cpp": 0}


def padded_length(n: int, pad_max: int = PAD_MAX) -> int:
    """The length a question batch of n tokens is evaluated at: the next multiple of PAD_MULTIPLE
    when that is at most pad_max tokens away, else n."""
    m = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
    return m if 0 < m - n <= pad_max else n


class _Interrupted(Exception):
    """A prefill stopped by its interrupt callable."""

# --------------------------------------------------------------------------------------------------
# llama.cpp's log -> Python logging


class _LogRouter:
    """Collects llama.cpp's log fragments into lines, logs them at DEBUG and remembers the recent
    warnings/errors so that exceptions can quote them."""

    LEVELS = {0: "NONE", 1: "DEBUG", 2: "INFO", 3: "WARN", 4: "ERROR", 5: "CONT"}     # enum ggml_log_level

    def __init__(self):
        self.lock = threading.Lock()
        self.buf = ""
        self.level = 1
        self.problems = collections.deque(maxlen=8)
        self.callback = None

    def __call__(self, level, text, user_data):
        try:
            s = text.decode("utf-8", "replace") if text else ""
            with self.lock:
                if level != 5:
                    if self.buf:
                        self._emit(self.buf)
                        self.buf = ""
                    self.level = level
                self.buf += s
                while "\n" in self.buf:
                    line, self.buf = self.buf.split("\n", 1)
                    self._emit(line)
        except Exception:   # never let an exception cross into C
            pass

    def _emit(self, line):
        line = line.rstrip()
        if not line.strip(" ."):
            return
        llama_log.debug("[%s] %s", self.LEVELS.get(self.level, self.level), line)
        if self.level in (3, 4):
            self.problems.append(line.strip())

    def tail(self, clear=True) -> str:
        with self.lock:
            lines = list(self.problems)
            if clear:
                self.problems.clear()
        return ("; llama.cpp said: " + " | ".join(lines[-4:])) if lines else ""


_router = _LogRouter()
_routed: dict = {}          # engine name -> its log callback, kept alive here


def route_llama_logs(lc=None) -> None:
    """Send llama.cpp's (and ggml's) log to Python logging at DEBUG and initialise the backend;
    idempotent, process-wide, once per engine library (lc: an engine API, default llama_cpp)."""
    if lc is None:
        import llama_cpp as lc
    name = getattr(lc, "name", "llama.cpp")
    if name not in _routed:
        _routed[name] = lc.llama_log_callback(_router)
        lc.llama_log_set(_routed[name], ctypes.c_void_p(0))
        lc.llama_backend_init()


def llama_log_tail() -> str:
    """Recent llama.cpp warnings/errors, formatted for an exception message ('' if none)."""
    return _router.tail()


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_has_amx(lc) -> bool:
    """Whether this llama.cpp's CPU backend multiplies with Intel AMX (built with -march=native on a
    Sapphire Rapids or newer Xeon)."""
    try:
        return "AMX_INT8 = 1" in lc.llama_print_system_info().decode(errors="replace")
    except Exception:
        return False


ENGINES = LLAMACPP_ENGINES


def engine_available(engine: str) -> bool:
    """Whether `engine` is installed: llama-cpp-python's package, or ik_llama.cpp's build for this
    venv (scripts/build-ik-llama.sh); it may still fail to load."""
    if engine == "ik_llama.cpp":
        return ik_llama_lib.build_info() is not None
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def engines_option(spec: str = "") -> list:
    """The engines a comma-separated option names; empty: every installed one. ValueError for a
    name that is not an engine."""
    engines = [e.strip() for e in spec.split(",") if e.strip()] or [e for e in ENGINES if engine_available(e)]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise ValueError(f"unknown engine {bad} (choose from {', '.join(ENGINES)})")
    return engines


def choose_engine(engine: str, gpu_layers: int) -> tuple[str, str]:
    """(the engine to load, why) for the option `engine`: auto = ik_llama.cpp for a CPU-only
    decoder where it was built (opt-in: MOBILEVLM_IK_LLAMA=1 scripts/setup.sh) and this CPU has
    every instruction-set flag of the CPU it was built for (its small-batch kernels give a
    question's first token sooner on x86, docs/engine-choice.md), else llama.cpp (GPU offload: the
    llama-cpp-python build users make for their GPU)."""
    if engine != "auto":
        if engine not in ENGINES:
            raise ModelLoadError(f"unknown llama.cpp engine '{engine}' (choose from auto, {', '.join(ENGINES)})")
        return engine, "asked for"
    if gpu_layers:
        return "llama.cpp", "auto: layers offloaded to a GPU"
    if not engine_available("ik_llama.cpp"):
        return "llama.cpp", "auto: ik_llama.cpp is not built in this venv (opt-in: scripts/build-ik-llama.sh)"
    missing = ik_llama_lib.missing_cpu_flags(_ik_build_info(), _cpu_flags())
    if missing:         # built with -march=native elsewhere: here it would die of an illegal instruction
        return "llama.cpp", f"auto: the ik_llama.cpp build needs {', '.join(missing)}, which this CPU lacks"
    return "ik_llama.cpp", "auto: CPU only, ik_llama.cpp built for this CPU"


def _ik_build_info() -> dict:
    return ik_llama_lib.build_info() or {}


def _cpu_flags() -> set:
    return ik_llama_lib.cpu_flags()


def _import_engine(engine: str):
    """The API object of an engine: llama-cpp-python's module for llama.cpp, an adapter with the
    same names for ik_llama.cpp (ik_llama_api)."""
    if engine == "ik_llama.cpp":
        from . import ik_llama_api
        return ik_llama_api.load()
    if engine != "llama.cpp":
        raise ModelLoadError(f"unknown llama.cpp engine '{engine}' (choose from {', '.join(ENGINES)})")
    try:
        import llama_cpp
    except Exception as e:
        raise ModelLoadError(f"the llamacpp decoder needs llama-cpp-python, which does not import: "
                             f"{type(e).__name__}: {e}") from None
    return llama_cpp


class _KVState:
    """One sequence's KV as llama.cpp serialises it (llama_state_seq_get_data): cells 0..n_pos-1."""
    __slots__ = ("data", "n_pos")

    def __init__(self, data: np.ndarray, n_pos: int):
        self.data, self.n_pos = data, n_pos

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class LlamaCppDecoder(Decoder):
    name = "llamacpp"

    def __init__(self, model_path, tokenizer: Tokenizer, quant: Optional[str] = None, threads: int = 0,
                 threads_batch: int = 0, gpu_layers: int = 0, max_cached_frames: int = 4,
                 n_ctx: int = 0, n_batch: int = DEFAULT_N_BATCH, flash_attn: Optional[bool] = None,
                 extra_buffers: Optional[bool] = None, mmap: Optional[bool] = None,
                 frame_tail: bool = False, engine: str = "llama.cpp"):
        """Load a GGUF file. threads/threads_batch 0 = every core this process may use; gpu_layers:
        layers offloaded to a GPU (needs a CUDA/Metal build; -1 = all); n_ctx 0 = the model's
        training context (KV cells for one prompt and its answer); n_batch: most rows per
        llama_decode (an image goes in one batch when it has no more tokens than that);
        extra_buffers: llama.cpp's repacked weight layouts (CPU_REPACK, AMX); None = on unless the
        CPU backend uses AMX; mmap: map the file instead of reading it; None = map unless the weights
        are repacked on the CPU; frame_tail: evaluate the template's newline with the image (off:
        see _load_frame_tail); engine: "llama.cpp" (llama-cpp-python) or "ik_llama.cpp" (the fork,
        through ik_llama_api), the same GGUF files either way."""
        self._model = self._ctx = None
        self._tok_batch = self._emb_batch = None
        self._closed = True
        self.engine = engine
        lc = self.lc = _import_engine(engine)
        route_llama_logs(lc)
        self.path = Path(model_path)
        self.quant = quant
        self.tok = tokenizer
        _check_gguf_file(self.path)
        max_cached_frames = int(max_cached_frames)
        if max_cached_frames < 1:
            raise ModelLoadError(f"max_cached_frames must be >= 1, got {max_cached_frames}")
        self.threads = int(threads) if threads and threads > 0 else default_threads()
        self.threads_batch = int(threads_batch) if threads_batch and threads_batch > 0 else self.threads
        self.gpu_layers = int(gpu_layers)

        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = self.gpu_layers
        if extra_buffers is None:
            # llama.cpp's AMX matmul segfaults in the first llama_decode on Sapphire Rapids
            # (ggml-org/llama.cpp#20824; every GGUF we make, tiny to 3B): the plain layout instead
            extra_buffers = not cpu_has_amx(lc)
            if not extra_buffers:
                log.info("llama.cpp's CPU backend has AMX, whose matmul crashes: weights kept in "
                         "the plain layout (no AMX, no CPU_REPACK)")
        self.extra_buffers = bool(extra_buffers)
        mp.use_extra_bufts = self.extra_buffers
        if mmap is None:
            # repacking copies the weights out of the mapping, whose pages then stay resident too
            # (1.7B Q4_K_M: 1820 MB RSS mapped, 1271 MB read, the same decode speed)
            mmap = not (self.extra_buffers and self.gpu_layers == 0)
        self.mmap = bool(mmap)
        if not self.mmap:
            mp.load_mode = lc.LLAMA_LOAD_MODE_NONE
        model = lc.llama_model_load_from_file(str(self.path).encode(), mp)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {self.path}" + llama_log_tail())
        self._model = model
        try:
            self._vocab = lc.llama_model_get_vocab(model)
            self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
            self.n_embd = int(lc.llama_model_n_embd(model))
            self.n_ctx_train = int(lc.llama_model_n_ctx_train(model))
            if self.n_vocab < tokenizer.vocab_size:
                raise ModelLoadError(f"{self.path} has {self.n_vocab} tokens, fewer than the tokenizer's "
                                     f"{tokenizer.vocab_size}: the GGUF and tokenizer do not match")
            cp = lc.llama_context_default_params()
            cp.n_ctx = int(n_ctx) if n_ctx and n_ctx > 0 else self.n_ctx_train
            cp.n_batch = cp.n_ubatch = max(1, int(n_batch))
            cp.n_seq_max = 1
            cp.n_threads, cp.n_threads_batch = self.threads, self.threads_batch
            cp.embeddings = False
            cp.no_perf = True
            if flash_attn is not None:
                cp.flash_attn_type = (lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            ctx = lc.llama_init_from_model(model, cp)
            if not ctx:
                raise ModelLoadError(f"llama.cpp could not create a context for {self.path} "
                                     f"(n_ctx {cp.n_ctx}, n_batch {cp.n_batch})" + llama_log_tail())
            self._ctx = ctx
            self._mem = lc.llama_get_memory(ctx)
            self.n_ctx = int(lc.llama_n_ctx(ctx))
            self.n_batch = int(lc.llama_n_batch(ctx))
            self._tok_batch = lc.llama_batch_init(self.n_batch, 0, 1)
            self._emb_batch = lc.llama_batch_init(self.n_batch, self.n_embd, 1)
        except BaseException:
            self._free_native()
            raise
        self.max_cached_frames = max_cached_frames
        self._frames = FrameCache(max_cached_frames, on_evict=lambda _key, state: self._recycle(state))
        # buffers of evicted frame states, reused by the next save: a fresh 35 MB buffer costs
        # ~80 ms of first-touch page faults (measured in a VM, where large blocks come from mmap)
        self._spare: list[np.ndarray] = []
        self.frame_tail, self._tail_rows = self._load_frame_tail() if frame_tail else ((), None)
        self.pad_max = PAD_MAX_BY_ENGINE[engine]      # 0: question batches as they are
        self._prefix: Optional[tuple] = None          # (prefix ids, _KVState)
        self._loaded = None                           # the _KVState the context holds as it is
        self._base = None                             # the _KVState the context holds in its cells
                                                      # 0..n_pos-1, maybe followed by a question's
        self._no_abort = lc.ggml_abort_callback()     # NULL: llama.cpp's default, no polling
        self._closed = False
        log.info("llama.cpp decoder: %s (%s), n_ctx %d, n_batch %d, threads %d/%d, gpu layers %d",
                 self.path.name, quant or "?", self.n_ctx, self.n_batch, self.threads,
                 self.threads_batch, self.gpu_layers)

    @classmethod
    def from_artifacts(cls, path, manifest: dict, tokenizer: Tokenizer, opts) -> "LlamaCppDecoder":
        """The manifest's llm-<opts.quant>.gguf with opts.threads, gpu_layers, max_cached_frames,
        n_ctx and the typed opts.llamacpp (pipeline.LlamaCppOptions)."""
        from ..artifacts import artifact_path
        quant = str(opts.quant).lower()
        file = artifact_path(Path(path), manifest, "llm", quant)
        lo = opts.llamacpp
        engine, why = choose_engine(lo.engine, opts.gpu_layers)
        if lo.engine == "auto" and engine != "llama.cpp":
            try:                    # a build that does not load: auto's other choice, the reason logged
                _import_engine(engine)
            except ModelLoadError as e:
                engine, why = "llama.cpp", f"auto: {e}"
        log.info("llama.cpp engine: %s (%s)", engine, why)
        dec = cls(file, tokenizer, quant=quant, threads=opts.threads, threads_batch=lo.threads_batch,
                  gpu_layers=opts.gpu_layers, max_cached_frames=opts.max_cached_frames,
                  n_ctx=opts.n_ctx or lo.n_ctx, n_batch=lo.n_batch or DEFAULT_N_BATCH,
                  flash_attn=lo.flash_attn, extra_buffers=lo.extra_buffers, mmap=lo.mmap, engine=engine)
        hidden = manifest.get("hidden_size")
        if hidden is not None and int(hidden) != dec.n_embd:
            dec.close()
            raise ModelLoadError(f"{file}: embedding size {dec.n_embd} != hidden_size {hidden} in "
                                 f"{Path(path) / 'manifest.json'} (GGUF from another model?)")
        return dec

    # ---------------------------------------------------------------------------------- interface

    def describe(self) -> dict:
        return {"decoder": self.name, "engine": self.engine, "quant": self.quant, "file": str(self.path),
                "threads": self.threads, "gpu_layers": self.gpu_layers, "n_ctx": getattr(self, "n_ctx", 0),
                "extra_buffers": getattr(self, "extra_buffers", None), "mmap": getattr(self, "mmap", None)}

    def close(self) -> None:
        self._closed = True
        self._frames.clear()
        self._spare.clear()
        self._prefix = self._loaded = self._base = None
        self._free_native()

    def __del__(self):
        try:
            self._free_native()
        except Exception:
            pass

    def clear_cache(self) -> None:
        """Forget the cached prefix and frames (the next question evaluates everything)."""
        self._check_open()
        self.lc.llama_memory_clear(self._mem, False)
        for state in self._frames.values():
            self._recycle(state)
        self._frames.clear()
        self._prefix = self._loaded = self._base = None

    def cached_state_bytes(self) -> int:
        """Host memory held by the cached KV states (prefix and frames) and their spare buffers."""
        frames = sum(f.nbytes for f in list(self._frames.values()))
        spare = sum(a.nbytes for a in list(self._spare))
        return frames + spare + (self._prefix[1].nbytes if self._prefix else 0)

    def _turn(self, prompt: PromptIds, image: ImageEmbedding, params: GenerationParams) -> "_LlamaTurn":
        self._check_open()
        embeds = self._check_request(prompt, image)
        try:
            frame, cached, prefix_ms = self._frame_state(prompt, image, embeds)
            pos, skip = self._place(frame, prompt)
        except BaseException:
            self._loaded = None
            raise
        timings = {"prefix_prefill_ms": prefix_ms,
                   "evaluated_prompt_tokens": (len(prompt.prefix) if prefix_ms else 0)
                   + (0 if cached else prompt.image_tokens + len(self.frame_tail)) + len(prompt.suffix) - skip}
        return _LlamaTurn(self, pos, skip, cached, None if params.greedy else self._sampler(params), timings)

    def prefill(self, prompt: PromptIds, image: ImageEmbedding,
                interrupt: Optional[Callable[[], bool]] = None) -> bool:
        self._check_open()
        embeds = self._check_request(prompt, image)
        try:
            return not self._frame_state(prompt, image, embeds, interrupt)[1]
        except _Interrupted:
            return False

    def teacher_forced_logits(self, prompt: PromptIds, image: ImageEmbedding, ids=()) -> np.ndarray:
        """float32 [len(ids) + 1, n_vocab]: row j holds the logits that predict ids[j] after the
        prompt and ids[:j] (the last row: the token after all of them). Through the same KV states
        as generate; the question and ids are evaluated as batches."""
        self._check_open()
        embeds = self._check_request(prompt, image)
        tokens = [*prompt.suffix, *(int(t) for t in ids)]
        if prompt.total + len(ids) > self.n_ctx:
            raise RequestError(f"{prompt.total + len(ids)} positions do not fit the context of {self.n_ctx}")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        frame, _, _ = self._frame_state(prompt, image, embeds)
        pos, skip = self._place(frame, prompt)
        tokens = tokens[skip:]
        first = len(prompt.suffix) - skip - 1   # the suffix's last token predicts ids[0]
        rows = []
        b = self._tok_batch
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                for i, t in enumerate(chunk):
                    b.token[i] = t
                    b.pos[i] = pos + start + i
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = SEQ
                    b.logits[i] = int(start + i >= first)
                b.n_tokens = len(chunk)
                self._decode(b)
                for i in range(len(chunk)):
                    if start + i >= first:
                        ptr = self.lc.llama_get_logits_ith(self._ctx, i)
                        if not ptr:
                            raise RequestError("llama.cpp returned no logits" + llama_log_tail())
                        rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        finally:
            self._loaded = None
        return np.stack(rows)

    # ---------------------------------------------------------------------------------- internals

    def _check_open(self):
        if self._closed or self._ctx is None:
            raise RequestError("the llama.cpp decoder is closed")

    def _check_request(self, prompt: PromptIds, image: ImageEmbedding) -> np.ndarray:
        e = image.embeds if isinstance(image, ImageEmbedding) else None
        if not isinstance(e, np.ndarray) or e.ndim != 2:
            raise RequestError("image embeddings must be a 2-D float array [image_tokens, hidden], got "
                               f"{getattr(e, 'shape', type(e).__name__)}")
        if e.shape[1] != self.n_embd:
            raise RequestError(f"image embeddings have width {e.shape[1]}, the model's hidden size is "
                               f"{self.n_embd}")
        if e.shape[0] != prompt.image_tokens or e.shape[0] == 0:
            raise RequestError(f"image embeddings have {e.shape[0]} rows, the prompt expects "
                               f"{prompt.image_tokens} image tokens")
        if not prompt.prefix or not prompt.suffix:
            raise RequestError("the prompt needs text before and after the image")
        for part in (prompt.prefix, prompt.suffix):
            bad = [t for t in part if not 0 <= int(t) < self.n_vocab]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        if prompt.total >= self.n_ctx:
            raise RequestError(f"the prompt has {prompt.total} tokens ({len(prompt.prefix)} + "
                               f"{prompt.image_tokens} image + {len(prompt.suffix)}); the context holds "
                               f"{self.n_ctx}: ask a shorter question")
        e = np.ascontiguousarray(e, dtype=np.float32)
        if not np.isfinite(e).all():
            raise RequestError("image embeddings contain NaN or infinite values")
        return e

    def _frame_state(self, prompt: PromptIds, image: ImageEmbedding, embeds: np.ndarray,
                     interrupt: Optional[Callable[[], bool]] = None):
        """(the KV state of prefix + this frame's image tokens + the frame tail, whether it was
        cached, prefix ms).
        Evaluates what is missing, each part into an emptied cache. With `interrupt`, the image
        evaluation stops (raising _Interrupted, nothing cached) as soon as it returns True."""
        prefix_ms = 0.0
        if self._prefix is None or self._prefix[0] != tuple(prompt.prefix):
            self.clear_cache()
            t = time.perf_counter()
            self._decode_tokens(prompt.prefix, 0, logits=False)
            self._prefix = (tuple(prompt.prefix), self._save(len(prompt.prefix)))
            prefix_ms = (time.perf_counter() - t) * 1e3
        key = (image.key, self._prefix[0])
        frame = self._frames.get_fresh(key)
        if frame is not None:
            return frame, True, prefix_ms
        prefix = self._prefix[1]
        self._restore(prefix)
        self._loaded = None
        if self._tail_rows is not None:
            embeds = np.concatenate([embeds, self._tail_rows])
        self._decode_embeds(embeds, prefix.n_pos, interrupt)
        frame = self._save(prefix.n_pos + embeds.shape[0])
        self._frames.put(key, frame)
        return frame, False, prefix_ms

    def _place(self, frame: _KVState, prompt: PromptIds) -> tuple[int, int]:
        """Restore `frame` for `prompt`: (the position its text starts at, how many of its suffix's
        tokens the state holds already). A suffix that does not start with the frame tail gets the
        state without the tail's cells (the image's cells keep their values: attention is causal)."""
        self._restore(frame)
        n = len(self.frame_tail)
        if tuple(prompt.suffix[:n]) == self.frame_tail and len(prompt.suffix) > n:
            return frame.n_pos, n
        if n:
            self._loaded = self._base = None
            if not self.lc.llama_memory_seq_rm(self._mem, SEQ, frame.n_pos - n, -1):
                raise RequestError("llama.cpp could not remove the frame tail from the KV cache"
                                   + llama_log_tail())
        return frame.n_pos - n, 0

    def _load_frame_tail(self) -> tuple[tuple[int, ...], Optional[np.ndarray]]:
        """The frame tail's ids and token-embedding rows, float32 [n, n_embd], from the GGUF's
        token_embd as llama.cpp dequantizes it; ((), None) where that does not give the logits
        the tokens give (a type gguf cannot dequantize, an architecture that scales embeddings).
        Off by default: the question bench gains 31 ms to the first token with it, but in the node
        (mobilevlm-bench node, shipped defaults, Xeon, 2026-12-05) decoding ran at 13.5 tokens/s with
        it against 17.2 without, reproduced twice; the cause is not found yet."""
        tail = frame_tail(self.tok)
        if not tail or self.gpu_layers:
            return (), None
        try:
            import gguf
            reader = gguf.GGUFReader(str(self.path))
            table = next(t for t in reader.tensors if t.name == "token_embd.weight")
            rows = gguf.quants.dequantize(np.asarray(table.data[list(tail)]), table.tensor_type)
            rows = np.ascontiguousarray(rows.reshape(len(tail), self.n_embd), dtype=np.float32)
            del reader, table
        except Exception as e:
            log.info("frame tail off: token_embd not readable from %s (%s: %s)", self.path.name,
                     type(e).__name__, e)
            return (), None
        # one evaluation each way from an empty cache: the same logits, or no tail
        try:
            self.lc.llama_memory_clear(self._mem, False)
            self._decode_tokens(tail, 0)
            from_tokens = self._logits().copy()
            self.lc.llama_memory_clear(self._mem, False)
            b = self._emb_batch
            ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
            for i in range(len(tail)):
                b.pos[i], b.n_seq_id[i], b.logits[i] = i, 1, int(i == len(tail) - 1)
                b.seq_id[i][0] = SEQ
            b.n_tokens = len(tail)
            self._decode(b)
            same = np.array_equal(from_tokens, self._logits())
        finally:
            self.lc.llama_memory_clear(self._mem, False)
            self._loaded = self._base = None
        if not same:
            log.info("frame tail off: %s's token_embd rows do not give the tokens' logits", self.path.name)
            return (), None
        return tail, rows

    def _save(self, n_pos: int) -> _KVState:
        """The context's sequence (cells 0..n_pos-1) as a state; the context keeps holding it."""
        lc = self.lc
        size = lc.llama_state_seq_get_size(self._ctx, SEQ)
        data = next((a for a in self._spare if a.size == size), None)
        if data is not None:
            self._spare.remove(data)
        else:
            data = np.empty(size, dtype=np.uint8)
        got = lc.llama_state_seq_get_data(self._ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                          size, SEQ)
        if got != size:
            raise RequestError(f"llama.cpp saved {got} of {size} bytes of the KV state" + llama_log_tail())
        state = _KVState(data, n_pos)
        self._loaded = self._base = state
        return state

    def _recycle(self, state: _KVState) -> None:
        """An evicted frame state's buffer becomes a spare (at most max_cached_frames of them)."""
        if state.data is not None and len(self._spare) < self.max_cached_frames:
            self._spare.append(state.data)
        state.data = None
        if self._loaded is state:
            self._loaded = None
        if self._base is state:
            self._base = None

    def _restore(self, state: _KVState) -> None:
        """Empty the cache and put `state` back into cells 0..n_pos-1. Skipped when the context
        holds exactly that state already; when it holds it followed by a question and its answer
        (a second question about the frame), those cells are removed instead: the state's own cells
        kept their values (attention is causal), and the question's go to the same cells after it."""
        if state.data is None:
            raise RequestError("internal: a recycled KV state was restored")
        if self._loaded is state:
            return
        lc = self.lc
        if self._base is state and lc.llama_memory_seq_rm(self._mem, SEQ, state.n_pos, -1):
            self._loaded = state
            return
        self._loaded = self._base = None
        lc.llama_memory_clear(self._mem, False)
        got = lc.llama_state_seq_set_data(self._ctx, state.data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                          state.data.size, SEQ)
        if got == 0:
            raise RequestError("llama.cpp could not restore a cached KV state" + llama_log_tail())
        self._loaded = self._base = state

    def _decode_tokens(self, ids, pos0: int, logits: bool = True):
        """Evaluate token ids from position pos0; logits for the last one if asked."""
        b = self._tok_batch
        ids = [int(t) for t in ids]
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last = start + len(chunk) == len(ids)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = SEQ
                b.logits[i] = 0
            if logits and last:
                b.logits[len(chunk) - 1] = 1
            b.n_tokens = len(chunk)
            self._decode(b)

    def _decode_question(self, ids, pos0: int) -> None:
        """The question's text from position pos0, logits for its last token; padded per
        PAD_MULTIPLE (by at most self.pad_max tokens) with copies of the last token, whose cells are
        removed again (causal attention: they change no real row)."""
        ids = [int(t) for t in ids]
        n = len(ids)
        m = padded_length(n, self.pad_max)
        if m == n or m > self.n_batch or pos0 + m > self.n_ctx:
            self._decode_tokens(ids, pos0)
            return
        b = self._tok_batch
        for i, t in enumerate(ids + [ids[-1]] * (m - n)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos0 + i, 1, int(i == n - 1)
            b.seq_id[i][0] = SEQ
        b.n_tokens = m
        self._decode(b)
        if not self.lc.llama_memory_seq_rm(self._mem, SEQ, pos0 + n, -1):
            raise RequestError("llama.cpp could not remove the padding from the KV cache" + llama_log_tail())

    def _decode_embeds(self, embeds: np.ndarray, pos0: int,
                       interrupt: Optional[Callable[[], bool]] = None):
        """Evaluate image embeddings from position pos0, n_batch rows per llama_decode (one batch at
        the default n_batch), the same batches on every path."""
        b = self._emb_batch
        row = self.n_embd * 4
        callback = None
        # ik_llama.cpp's llama_decode returns 0 after an abort (the graph's status is dropped), with
        # the evaluation cut short: an abort is known by the callback having said stop
        stopped = [False]
        if interrupt is not None:
            if interrupt():
                raise _Interrupted()

            def poll(_data, interrupt=interrupt):
                try:
                    stop = bool(interrupt())
                except Exception:       # never let an exception cross into C
                    return False
                stopped[0] = stopped[0] or stop
                return stop
            callback = self.lc.ggml_abort_callback(poll)
            self.lc.llama_set_abort_callback(self._ctx, callback, None)
        try:
            for start in range(0, embeds.shape[0], self.n_batch):
                chunk = embeds[start:start + self.n_batch]
                ctypes.memmove(b.embd, chunk.ctypes.data, chunk.shape[0] * row)
                for i in range(chunk.shape[0]):
                    b.pos[i] = pos0 + start + i
                    b.n_seq_id[i] = 1
                    b.seq_id[i][0] = SEQ
                    b.logits[i] = 0
                b.n_tokens = chunk.shape[0]
                if self._decode(b, abortable=callback is not None) or stopped[0]:
                    self._loaded = None
                    raise _Interrupted()
        finally:
            if callback is not None:
                self.lc.llama_set_abort_callback(self._ctx, self._no_abort, None)

    def _decode(self, batch, abortable: bool = False) -> bool:
        """llama_decode; True if it was aborted (only where an abort callback is set)."""
        rc = self.lc.llama_decode(self._ctx, batch)
        if rc == 0:
            return False
        self._loaded = self._base = None
        if rc == 2 and abortable:
            return True
        if rc == 1:
            raise RequestError(f"the KV cache ({self.n_ctx} cells) is full: the prompt and answer do "
                               "not fit; ask for fewer new tokens or load with a larger n_ctx"
                               + llama_log_tail())
        if rc == 2:
            raise RequestError("llama.cpp evaluation was aborted")
        raise RequestError(f"llama.cpp could not evaluate the batch (code {rc})" + llama_log_tail())

    def _sampler(self, params: GenerationParams):
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(float(params.temperature)))
        if params.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(float(params.top_p), 1))
        if params.seed is None:
            seed = int.from_bytes(os.urandom(4), "little") % lc.LLAMA_DEFAULT_SEED
        else:   # LLAMA_DEFAULT_SEED itself means "random" to llama.cpp: keep it deterministic
            seed = params.seed if params.seed != lc.LLAMA_DEFAULT_SEED else params.seed - 1
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def _logits(self) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise RequestError("llama.cpp returned no logits" + llama_log_tail())
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _next_token(self, sampler) -> int:
        if sampler is not None:
            return int(self.lc.llama_sampler_sample(sampler, self._ctx, -1))
        return int(self._logits().argmax())

    def _free_native(self):
        lc = getattr(self, "lc", None)
        if lc is None:
            return
        if self._tok_batch is not None:
            lc.llama_batch_free(self._tok_batch)
            self._tok_batch = None
        if self._emb_batch is not None:
            lc.llama_batch_free(self._emb_batch)
            self._emb_batch = None
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lc.llama_model_free(self._model)
            self._model = None


def _check_gguf_file(path: Path) -> None:
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


__all__ = ["LlamaCppDecoder", "ENGINES", "engines_option", "choose_engine", "route_llama_logs", "llama_log_tail",
           "default_threads"]


class _LlamaTurn(Turn):
    """An answer on the llama.cpp context, from the restored frame state at position `pos`."""

    def __init__(self, dec: LlamaCppDecoder, pos: int, skip: int, cached: bool, sampler, timings: dict):
        self.dec, self.pos, self.skip, self.frame_cached = dec, pos, skip, cached
        self.sampler, self.timings = sampler, timings

    def eval_text(self, ids) -> None:
        ids = ids[self.skip:]                   # the frame tail is in the restored state
        self.skip = 0
        self.dec._decode_question(ids, self.pos)
        self.dec._loaded = None                 # the context holds more than the frame now
        self.pos += len(ids)

    def sample(self) -> int:
        return self.dec._next_token(self.sampler)

    def feed(self, token: int) -> bool:
        if self.pos >= self.dec.n_ctx:
            log.warning("answer stopped at the context size (%d positions)", self.dec.n_ctx)
            return False
        self.dec._decode_tokens((token,), self.pos)
        self.pos += 1
        return True

    def close(self) -> None:
        self.dec._loaded = None
        if self.sampler is not None:
            self.dec.lc.llama_sampler_free(self.sampler)

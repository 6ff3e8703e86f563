"""The GGUF decoder: MobileLLaMA on llama.cpp (or ik_llama.cpp), fed with cached image embeddings.

Same contract as TorchDecoder.generate (prompt.prefix, image embeddings, prompt.suffix; AnswerBuilder
for stop rules, streaming and cancellation; the same Generation fields). Its parts, one file each:

    llama_library.py  which library (llama.cpp or ik_llama.cpp), opening a model and a context on it
    llama_log.py      the library's log -> Python logging; recent warnings quoted in exceptions
    llama_context.py  one context's evaluation steps (tokens, a padded question, interruptible
                      image rows), logits and sampling
    llama_batch.py    filling llama_batch (token rows, embedding rows); a question batch's padding
    kv_states.py      the saved KV states (prefix, frames) and the one KV layout every evaluation
                      runs in, which makes answers independent of what is cached (determinism)

Images always go in the same batches (n_batch rows, one batch at the default n_batch), through a
batch whose `embd` is set. With frame_tail (off by default, see _load_frame_tail) the template's
"\\n" after the image goes in the image's batch as its token-embedding rows (read from the GGUF;
checked at load to give the same logits as the tokens), so a question evaluates two tokens fewer;
a question whose text does not start with the tail is evaluated from the image without it (the
tail's cells removed from the restored state).

A prefill while idle can be interrupted (a request arrived): a question waits milliseconds, not a
whole image evaluation (LlamaContext.embeds). Nothing is cached from an interrupted prefill.

Greedy decoding takes the argmax of the logits (as the reference does); sampling runs llama.cpp's
sampler chain: temperature -> top-p -> seeded draw, in the reference's order.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import ModelLoadError, RequestError
from ..generation import GenerationParams
from ..prompt import PromptIds, frame_tail
from ..tokenizer import Tokenizer
from ..vision import ImageEmbedding
from .base import Decoder, Turn
from .kv_states import KVState
from .llama_batch import N_BATCH, NO_LOGITS, last
from .llama_context import Interrupted, LlamaContext
from .llama_library import check_gguf_file, choose_library, default_threads, import_library, open_model
from .llama_log import route_llama_logs

log = logging.getLogger(__name__)


class LlamaCppDecoder(Decoder):
    name = "llamacpp"

    def __init__(self, model_path, tokenizer: Tokenizer, quant: Optional[str] = None, threads: int = 0,
                 threads_batch: int = 0, gpu_layers: int = 0, max_kv_states: int = 4,
                 n_ctx: int = 0, n_batch: int = N_BATCH, flash_attn: Optional[bool] = None,
                 extra_buffers: Optional[bool] = None, mmap: Optional[bool] = None,
                 frame_tail: bool = False, library: str = "llama.cpp"):
        """Load a GGUF file. threads/threads_batch 0 = every core this process may use; gpu_layers:
        layers offloaded to a GPU (needs a CUDA/Metal build; -1 = all); n_ctx 0 = the model's
        training context (KV cells for one prompt and its answer); n_batch: most rows per
        llama_decode (an image goes in one batch when it has no more tokens than that);
        extra_buffers: llama.cpp's repacked weight layouts (CPU_REPACK, AMX); None = on unless the
        CPU backend uses AMX; mmap: map the file instead of reading it; None = map unless the weights
        are repacked on the CPU; frame_tail: evaluate the template's newline with the image (off:
        see _load_frame_tail); library: "llama.cpp" (llama-cpp-python) or "ik_llama.cpp" (the fork,
        through ik_llama_api), the same GGUF files either way."""
        self.llama_model = self.context = None
        self._closed = True
        self.library = library
        llama = self.llama = import_library(library)
        route_llama_logs(llama)
        self.path = Path(model_path)
        self.quant = quant
        self.tok = tokenizer
        check_gguf_file(self.path)
        max_kv_states = int(max_kv_states)
        if max_kv_states < 1:
            raise ModelLoadError(f"max_kv_states must be >= 1, got {max_kv_states}")
        self.threads = int(threads) if threads and threads > 0 else default_threads()
        self.threads_batch = int(threads_batch) if threads_batch and threads_batch > 0 else self.threads
        self.gpu_layers = int(gpu_layers)
        self.llama_model, self.extra_buffers, self.mmap = open_model(llama, self.path, self.gpu_layers,
                                                                extra_buffers, mmap)
        try:
            vocab = llama.llama_model_get_vocab(self.llama_model)
            self.n_vocab = int(llama.llama_vocab_n_tokens(vocab))
            self.n_embd = int(llama.llama_model_n_embd(self.llama_model))
            self.n_ctx_train = int(llama.llama_model_n_ctx_train(self.llama_model))
            if self.n_vocab < tokenizer.vocab_size:
                raise ModelLoadError(f"{self.path} has {self.n_vocab} tokens, fewer than the tokenizer's "
                                     f"{tokenizer.vocab_size}: the GGUF and tokenizer do not match")
            self.context = LlamaContext(llama, library, self.llama_model, self.path,
                                        int(n_ctx) if n_ctx and n_ctx > 0 else self.n_ctx_train,
                                        max(1, int(n_batch)), self.threads, self.threads_batch, flash_attn,
                                        self.n_embd, self.n_vocab, max_kv_states)
        except BaseException:
            self._free_native()
            raise
        self.n_ctx, self.n_batch = self.context.n_ctx, self.context.n_batch
        self.max_kv_states = max_kv_states
        self.kv = self.context.kv
        self._frames = self.kv.frames                 # Decoder.kv_state_keys reads it
        self.frame_tail, self._tail_rows = self._load_frame_tail() if frame_tail else ((), None)
        self._closed = False
        log.info("llama.cpp decoder: %s (%s), n_ctx %d, n_batch %d, threads %d/%d, gpu layers %d",
                 self.path.name, quant or "?", self.n_ctx, self.n_batch, self.threads,
                 self.threads_batch, self.gpu_layers)

    @classmethod
    def from_artifacts(cls, path, manifest: dict, tokenizer: Tokenizer, opts) -> "LlamaCppDecoder":
        """The manifest's llm-<opts.quant>.gguf with opts.threads, gpu_layers, max_kv_states
        and the typed opts.llamacpp (pipeline.LlamaCppOptions: n_ctx, library, ...)."""
        from ..artifacts import artifact_path
        quant = str(opts.quant).lower()
        file = artifact_path(Path(path), manifest, "llm", quant)
        lo = opts.llamacpp
        library, why = choose_library(lo.library, opts.gpu_layers)
        if lo.library == "auto" and library != "llama.cpp":
            try:                    # a build that does not load: auto's other choice, the reason logged
                import_library(library)
            except ModelLoadError as e:
                library, why = "llama.cpp", f"auto: {e}"
        log.info("llama.cpp library: %s (%s)", library, why)
        dec = cls(file, tokenizer, quant=quant, threads=opts.threads, threads_batch=lo.threads_batch,
                  gpu_layers=opts.gpu_layers, max_kv_states=opts.max_kv_states,
                  n_ctx=lo.n_ctx, n_batch=lo.n_batch or N_BATCH, flash_attn=lo.flash_attn,
                  extra_buffers=lo.extra_buffers, mmap=lo.mmap, library=library)
        hidden = manifest.get("hidden_size")
        if hidden is not None and int(hidden) != dec.n_embd:
            dec.close()
            raise ModelLoadError(f"{file}: embedding size {dec.n_embd} != hidden_size {hidden} in "
                                 f"{Path(path) / 'manifest.json'} (GGUF from another model?)")
        return dec

    # ---------------------------------------------------------------------------------- interface

    def describe(self) -> dict:
        return {"decoder": self.name, "library": self.library, "quant": self.quant, "file": str(self.path),
                "threads": self.threads, "gpu_layers": self.gpu_layers, "n_ctx": getattr(self, "n_ctx", 0),
                "extra_buffers": getattr(self, "extra_buffers", None), "mmap": getattr(self, "mmap", None)}

    def close(self) -> None:
        self._closed = True
        self._free_native()

    def __del__(self):
        try:
            self._free_native()
        except Exception:
            pass

    def clear_cache(self) -> None:
        """Forget the cached prefix and frames (the next question evaluates everything)."""
        self._check_open()
        self.kv.clear()

    @property
    def pad_max(self) -> int:
        """How many tokens a question batch may be padded by (llama_batch.padded_length; 0: none);
        settable (mobilevlm-bench batches times both)."""
        return self.context.pad_max

    @pad_max.setter
    def pad_max(self, value: int) -> None:
        self.context.pad_max = int(value)

    def kv_state_bytes(self) -> int:
        """Host memory held by the saved KV states (prefix and frames) and their spare buffers."""
        return self.kv.nbytes()

    def _turn(self, prompt: PromptIds, image: ImageEmbedding, params: GenerationParams) -> "_LlamaTurn":
        pos, skip, cached, prefix_ms = self._put(prompt, image)
        timings = {"prefix_prefill_ms": prefix_ms,
                   "evaluated_prompt_tokens": (len(prompt.prefix) if prefix_ms else 0)
                   + (0 if cached else prompt.image_tokens + len(self.frame_tail)) + len(prompt.suffix) - skip}
        sampler = None if params.greedy else self.context.sampler(params)
        return _LlamaTurn(self.context, pos, skip, cached, sampler, timings)

    def prefill(self, prompt: PromptIds, image: ImageEmbedding,
                interrupt: Optional[Callable[[], bool]] = None) -> bool:
        self._check_open()
        embeds = self._check_request(prompt, image)
        try:
            return not self._frame_state(prompt, image, embeds, interrupt)[1]
        except Interrupted:
            return False

    def place(self, prompt: PromptIds, image: ImageEmbedding) -> tuple[int, int]:
        """Put the KV state of `prompt`'s prefix + `image` in the context as generate does (evaluated
        now if not cached): (the position prompt.suffix[skip:] goes to, skip: how many of the
        suffix's tokens the context holds already). The first step of a measurement (evaluate)."""
        return self._put(prompt, image)[:2]

    def evaluate(self, ids, pos0: int, logits: range = NO_LOGITS) -> np.ndarray:
        """Evaluate token ids from position pos0 after what the context holds (after place);
        float32 copies of the logits of the ids whose index is in `logits`, [len(logits), n_vocab].
        For measurements (tools/bench/fidelity.teacher_forced_logits)."""
        self._check_open()
        return self.context.evaluate(ids, pos0, logits)

    # ---------------------------------------------------------------------------------- internals

    def _check_open(self):
        if self._closed or self.context is None:
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
            self.context.check_ids(part)
        if prompt.total >= self.n_ctx:
            raise RequestError(f"the prompt has {prompt.total} tokens ({len(prompt.prefix)} + "
                               f"{prompt.image_tokens} image + {len(prompt.suffix)}); the context holds "
                               f"{self.n_ctx}: ask a shorter question")
        e = np.ascontiguousarray(e, dtype=np.float32)
        if not np.isfinite(e).all():
            raise RequestError("image embeddings contain NaN or infinite values")
        return e

    def _put(self, prompt: PromptIds, image: ImageEmbedding) -> tuple[int, int, bool, float]:
        """The frame's state in the context for `prompt`: (pos, skip) as place, whether the frame
        was cached, prefix ms."""
        self._check_open()
        embeds = self._check_request(prompt, image)
        try:
            state, cached, prefix_ms = self._frame_state(prompt, image, embeds)
            pos, skip = self.kv.place(state, prompt.suffix, self.frame_tail)
        except BaseException:
            self.kv.changed()
            raise
        return pos, skip, cached, prefix_ms

    def _frame_state(self, prompt: PromptIds, image: ImageEmbedding, embeds: np.ndarray,
                     interrupt: Optional[Callable[[], bool]] = None) -> tuple[KVState, bool, float]:
        """(the KV state of prefix + this frame's image tokens + the frame tail, whether it was
        cached, prefix ms).
        Evaluates what is missing, each part into an emptied cache. With `interrupt`, the image
        evaluation stops (raising Interrupted, nothing cached) as soon as it returns True."""
        kv = self.kv
        prefix_ms = 0.0
        if kv.prefix is None or kv.prefix[0] != tuple(prompt.prefix):
            kv.clear()
            t = time.perf_counter()
            self.context.tokens(prompt.prefix, 0, logits=False)
            kv.prefix = (tuple(prompt.prefix), kv.save(len(prompt.prefix)))
            prefix_ms = (time.perf_counter() - t) * 1e3
        key = (image.key, kv.prefix[0])
        state = kv.frames.get_fresh(key)
        if state is not None:
            return state, True, prefix_ms
        prefix = kv.prefix[1]
        kv.restore(prefix)
        kv.changed()
        if self._tail_rows is not None:
            embeds = np.concatenate([embeds, self._tail_rows])
        self.context.embeds(embeds, prefix.n_pos, interrupt)
        state = kv.save(prefix.n_pos + embeds.shape[0])
        kv.frames.put(key, state)
        return state, False, prefix_ms

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
        ctx = self.context
        try:
            self.kv.clear()
            ctx.tokens(tail, 0)
            from_tokens = ctx.logits().copy()
            self.kv.clear()
            ctx.decode(ctx.batches.fill_embeds(rows, 0, last(len(tail))))
            same = np.array_equal(from_tokens, ctx.logits())
        finally:
            self.kv.clear()
        if not same:
            log.info("frame tail off: %s's token_embd rows do not give the tokens' logits", self.path.name)
            return (), None
        return tail, rows

    def _free_native(self):
        llama = getattr(self, "llama", None)
        if llama is None:
            return
        if self.context is not None:
            self.context.free()
            self.context = None
        if self.llama_model is not None:
            llama.llama_model_free(self.llama_model)
            self.llama_model = None


__all__ = ["LlamaCppDecoder"]


class _LlamaTurn(Turn):
    """An answer on a decoder's context, from the restored KV state of its frame at position `pos`."""

    def __init__(self, context: LlamaContext, pos: int, skip: int, cached: bool, sampler, timings: dict):
        self.context, self.pos, self.skip, self.frame_cached = context, pos, skip, cached
        self.sampler, self.timings = sampler, timings

    def eval_text(self, ids) -> None:
        ids = ids[self.skip:]                   # the frame tail is in the restored state
        self.skip = 0
        self.context.question(ids, self.pos)
        self.pos += len(ids)

    def sample(self) -> int:
        return self.context.next_token(self.sampler)

    def feed(self, token: int) -> bool:
        if self.pos >= self.context.n_ctx:
            log.warning("answer stopped at the context size (%d positions)", self.context.n_ctx)
            return False
        self.context.tokens((token,), self.pos)
        self.pos += 1
        return True

    def close(self) -> None:
        self.context.kv.changed()
        if self.sampler is not None:
            self.context.free_sampler(self.sampler)

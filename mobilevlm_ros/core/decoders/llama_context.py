"""One llama.cpp context and its evaluation steps: token rows, a question's padded batch, image rows
that an interrupt can stop, logits, sampling. Every failure is a RequestError quoting the library's
recent warnings; the saved KV states (kv_states.KVStates) are told what each step did to the cells.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import RequestError
from ..generation import GenerationParams
from .kv_states import KVStates
from .llama_batch import NO_LOGITS, PAD_MAX_BY_LIBRARY, Batches, last, padded_length
from .llama_library import open_context
from .llama_log import llama_log_tail


class Interrupted(Exception):
    """An image evaluation stopped by its interrupt callable."""


class LlamaContext:
    """A context of n_ctx cells on `model` (one sequence, the fixed KV layout of kv_states.py), its
    batches and its KV states. `llama`: an API object of llama_library.import_library."""

    def __init__(self, llama, library: str, model, path: Path, n_ctx: int, n_batch: int, threads: int,
                 threads_batch: int, flash_attn: Optional[bool], n_embd: int, n_vocab: int,
                 max_kv_states: int):
        self.llama, self.n_vocab = llama, n_vocab
        self.ctx = open_context(llama, model, path, n_ctx, n_batch, threads, threads_batch, flash_attn)
        try:
            self.n_ctx = int(llama.llama_n_ctx(self.ctx))
            self.n_batch = int(llama.llama_n_batch(self.ctx))
            self.batches = Batches(llama, self.n_batch, n_embd)
        except BaseException:
            llama.llama_free(self.ctx)
            raise
        self.kv = KVStates(llama, self.ctx, max_kv_states)
        self.pad_max = PAD_MAX_BY_LIBRARY[library]    # 0: question batches as they are
        self._no_abort = llama.ggml_abort_callback()  # NULL: llama.cpp's default, no polling

    def free(self) -> None:
        if self.ctx is not None:
            self.kv.drop()
            self.batches.close()
            self.llama.llama_free(self.ctx)
            self.ctx = None

    def check_ids(self, ids) -> None:
        """RequestError unless every token id is in the vocabulary (checked before llama.cpp sees them)."""
        bad = [t for t in ids if not 0 <= int(t) < self.n_vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")

    def tokens(self, ids, pos0: int, logits: bool = True) -> None:
        """Evaluate token ids from position pos0; logits for the last one if asked."""
        for _, batch in self.batches.token_chunks(ids, pos0, last(len(ids)) if logits else NO_LOGITS):
            self.decode(batch)

    def question(self, ids, pos0: int) -> None:
        """A question's text from position pos0, logits for its last token; padded per
        llama_batch.padded_length (by at most pad_max tokens) with copies of the last token, whose
        cells are removed again (causal attention: they change no real row)."""
        ids = [int(t) for t in ids]
        n = len(ids)
        m = padded_length(n, self.pad_max)
        if m == n or m > self.n_batch or pos0 + m > self.n_ctx:
            self.tokens(ids, pos0)
            return
        self.decode(self.batches.fill_tokens(ids + [ids[-1]] * (m - n), pos0, last(n)))
        self.kv.remove_from(pos0 + n, "the padding")

    def embeds(self, embeds: np.ndarray, pos0: int, interrupt: Optional[Callable[[], bool]] = None) -> None:
        """Evaluate image embeddings from position pos0, n_batch rows per llama_decode (one batch at
        the default n_batch), the same batches on every path. With `interrupt`, polled by llama.cpp
        between graph nodes (its abort callback): Interrupted as soon as it returns True."""
        callback = None
        # ik_llama.cpp's llama_decode returns 0 after an abort (the graph's status is dropped), with
        # the evaluation cut short: an abort is known by the callback having said stop
        stopped = [False]
        if interrupt is not None:
            if interrupt():
                raise Interrupted()

            def poll(_data, interrupt=interrupt):
                try:
                    stop = bool(interrupt())
                except Exception:       # never let an exception cross into C
                    return False
                stopped[0] = stopped[0] or stop
                return stop
            callback = self.llama.ggml_abort_callback(poll)
            self.llama.llama_set_abort_callback(self.ctx, callback, None)
        try:
            for _, batch in self.batches.embed_chunks(embeds, pos0):
                if self.decode(batch, abortable=callback is not None) or stopped[0]:
                    self.kv.changed()
                    raise Interrupted()
        finally:
            if callback is not None:
                self.llama.llama_set_abort_callback(self.ctx, self._no_abort, None)

    def evaluate(self, ids, pos0: int, logits: range = NO_LOGITS) -> np.ndarray:
        """Evaluate token ids from position pos0 after what the context holds, in n_batch chunks;
        float32 copies of the logits of the ids whose index is in `logits`, [len(logits), n_vocab]."""
        ids = [int(t) for t in ids]
        if pos0 + len(ids) > self.n_ctx:
            raise RequestError(f"{pos0 + len(ids)} positions do not fit the context of {self.n_ctx}")
        self.check_ids(ids)
        rows = []
        for start, batch in self.batches.token_chunks(ids, pos0, logits):
            self.decode(batch)
            rows += [self.logits(i).copy() for i in range(batch.n_tokens) if start + i in logits]
        return np.stack(rows) if rows else np.empty((0, self.n_vocab), dtype=np.float32)

    def decode(self, batch, abortable: bool = False) -> bool:
        """llama_decode; True if it was aborted (only where an abort callback is set)."""
        rc = self.llama.llama_decode(self.ctx, batch)
        if rc == 0:
            self.kv.changed()
            return False
        self.kv.lost()
        if rc == 2 and abortable:
            return True
        if rc == 1:
            raise RequestError(f"the KV cache ({self.n_ctx} cells) is full: the prompt and answer do "
                               "not fit; ask for fewer new tokens or load with a larger n_ctx"
                               + llama_log_tail())
        if rc == 2:
            raise RequestError("llama.cpp evaluation was aborted")
        raise RequestError(f"llama.cpp could not evaluate the batch (code {rc})" + llama_log_tail())

    def logits(self, row: int = -1) -> np.ndarray:
        """The logits of a row of the last batch (-1: its last row with logits), a view."""
        ptr = self.llama.llama_get_logits_ith(self.ctx, row)
        if not ptr:
            raise RequestError("llama.cpp returned no logits" + llama_log_tail())
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def sampler(self, params: GenerationParams):
        """llama.cpp's sampler chain for `params` (free it with free_sampler)."""
        llama = self.llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(float(params.temperature)))
        if params.top_p < 1.0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(float(params.top_p), 1))
        if params.seed is None:
            seed = int.from_bytes(os.urandom(4), "little") % llama.LLAMA_DEFAULT_SEED
        else:   # LLAMA_DEFAULT_SEED itself means "random" to llama.cpp: keep it deterministic
            seed = params.seed if params.seed != llama.LLAMA_DEFAULT_SEED else params.seed - 1
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def free_sampler(self, chain) -> None:
        self.llama.llama_sampler_free(chain)

    def next_token(self, sampler) -> int:
        """The next token from the last batch's logits: sampled, or the argmax (sampler None)."""
        if sampler is not None:
            return int(self.llama.llama_sampler_sample(sampler, self.ctx, -1))
        return int(self.logits().argmax())

"""Filling llama.cpp's `llama_batch`: token rows and embedding rows, and a question batch's padding.

One sequence (SEQ), every row at the next position: the only shape of batch the decoder and the
benches' reference loop evaluate. A batch object is reused: decode it before filling it again.
"""
from __future__ import annotations

import ctypes
from typing import Iterator

import numpy as np

SEQ = 0                     # the context's only sequence
NO_LOGITS = range(0)
N_BATCH = 512               # rows per llama_decode by default: an image's 144 rows and a question in one

# A question's batch up to PAD_MAX tokens short of a multiple of PAD_MULTIPLE is padded to it:
# llama.cpp's repacked x86 kernels multiply 16 rows at a time and take a remainder row by row, at
# about 1.5x a row's cost in a full block (measurements: docs/decoder-internals.md). ik_llama.cpp's
# kernels take any row count at about the same cost per row: no padding.
PAD_MULTIPLE, PAD_MAX = 16, 4
PAD_MAX_BY_LIBRARY = {"llama.cpp": PAD_MAX, "ik_llama.cpp": 0}


def padded_length(n: int, pad_max: int = PAD_MAX) -> int:
    """The length a question batch of n tokens is evaluated at: the next multiple of PAD_MULTIPLE
    when that is at most pad_max tokens away, else n."""
    m = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
    return m if 0 < m - n <= pad_max else n


def last(n: int) -> range:
    """The logits rows of a batch of n rows where only the last one's are wanted."""
    return range(n - 1, n)


class Batches:
    """A token batch and an embedding batch of n_batch rows each, on `llama` (an API object of
    llama_library.import_library). close() frees them."""

    def __init__(self, llama, n_batch: int, n_embd: int):
        self.llama, self.n_batch, self.n_embd = llama, int(n_batch), int(n_embd)
        self.tokens = llama.llama_batch_init(self.n_batch, 0, 1)
        try:
            self.embeds = llama.llama_batch_init(self.n_batch, self.n_embd, 1)
        except BaseException:
            llama.llama_batch_free(self.tokens)
            raise

    def fill_tokens(self, ids, pos0: int, logits: range = NO_LOGITS):
        """The token batch holding ids (at most n_batch) at positions pos0.., with logits for the
        rows whose index is in `logits`."""
        b = self.tokens
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos0 + i, 1, i in logits
            b.seq_id[i][0] = SEQ
        b.n_tokens = len(ids)
        return b

    def fill_embeds(self, rows: np.ndarray, pos0: int, logits: range = NO_LOGITS):
        """The embedding batch holding rows (float32, C-contiguous, [<= n_batch, n_embd]) at
        positions pos0.., with logits for the rows whose index is in `logits`."""
        b = self.embeds
        ctypes.memmove(b.embd, rows.ctypes.data, rows.shape[0] * self.n_embd * 4)
        for i in range(rows.shape[0]):
            b.pos[i], b.n_seq_id[i], b.logits[i] = pos0 + i, 1, i in logits
            b.seq_id[i][0] = SEQ
        b.n_tokens = rows.shape[0]
        return b

    def token_chunks(self, ids, pos0: int, logits: range = NO_LOGITS) -> Iterator[tuple]:
        """(start, batch) per n_batch chunk of ids, each batch filled at positions pos0 + start..,
        logits for the ids whose index (in ids) is in `logits`; decode each before the next."""
        ids = [int(t) for t in ids]
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            rows = range(max(0, logits.start - start), max(0, logits.stop - start)) if logits else NO_LOGITS
            yield start, self.fill_tokens(chunk, pos0 + start, rows)

    def embed_chunks(self, rows: np.ndarray, pos0: int) -> Iterator[tuple]:
        """(start, batch) per n_batch chunk of embedding rows, no logits; decode each before the next."""
        for start in range(0, rows.shape[0], self.n_batch):
            yield start, self.fill_embeds(rows[start:start + self.n_batch], pos0 + start)

    def close(self) -> None:
        if self.tokens is not None:
            self.llama.llama_batch_free(self.tokens)
            self.llama.llama_batch_free(self.embeds)
            self.tokens = self.embeds = None

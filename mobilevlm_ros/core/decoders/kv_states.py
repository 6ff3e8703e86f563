"""The llamacpp decoder's saved KV states and the one KV layout every evaluation runs in.

The layout rule (determinism): the context holds a single sequence whose cells are 0..n-1 in
position order, and nothing else. A frame's KV (prompt prefix + its image tokens) is kept outside
the context as llama.cpp's serialised sequence state and restored into an emptied cache before its
question is evaluated. So the cells a question attends over, their number and their order are the
same whether the frame was prefilled while idle or evaluated by the question, whichever other
frames are cached, and whatever was asked before. (llama.cpp's attention and softmax sum over the
cells in SIMD lanes by cell index, so the same values in other cells round differently: with one
unified KV buffer holding several frames, the same frame and question gave different greedy
answers on AVX-512 machines.)

    prefix state   BOS + system + "USER: ", evaluated once per load
    frame states   prefix + the frame's image tokens (+ the frame tail, see LlamaCppDecoder), LRU
                   over max_kv_states (host memory, 2 x layers x kv width x 2 bytes per token:
                   35 MB per frame at 1.7B)
    the context    the state being answered from, + the rest of the question + the answer
"""
from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np

from ..errors import RequestError
from .base import FrameCache
from .llama_batch import SEQ
from .llama_log import llama_log_tail


class KVState:
    """One sequence's KV as llama.cpp serialises it (llama_state_seq_get_data): cells 0..n_pos-1."""
    __slots__ = ("data", "n_pos")

    def __init__(self, data: np.ndarray, n_pos: int):
        self.data, self.n_pos = data, n_pos

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class KVStates:
    """The prefix state, the LRU of frame states (`frames`, keyed by (image key, prefix ids)) and
    what the context holds now, on one context of `llama` (an API object of
    llama_library.import_library). Not thread-safe: the decoder's callers serialise."""

    def __init__(self, llama, ctx, max_kv_states: int):
        self.llama, self.ctx = llama, ctx
        self.mem = llama.llama_get_memory(ctx)
        self.max_kv_states = max_kv_states
        self.frames = FrameCache(max_kv_states, on_evict=lambda _key, state: self.recycle(state))
        self.prefix: Optional[tuple] = None       # (prefix ids, KVState)
        # buffers of evicted frame states, reused by the next save: a fresh 35 MB buffer costs
        # ~80 ms of first-touch page faults (measured in a VM, where large blocks come from mmap)
        self.spare: list[np.ndarray] = []
        self.loaded: Optional[KVState] = None     # the state the context holds as it is
        self.base: Optional[KVState] = None       # the state the context holds in its cells
                                                  # 0..n_pos-1, maybe followed by a question's

    def nbytes(self) -> int:
        """Host memory held by the cached states (prefix and frames) and their spare buffers."""
        frames = sum(f.nbytes for f in list(self.frames.values()))
        spare = sum(a.nbytes for a in list(self.spare))
        return frames + spare + (self.prefix[1].nbytes if self.prefix else 0)

    def clear(self) -> None:
        """Forget the prefix and the frames, and empty the context (spare buffers are kept)."""
        self.llama.llama_memory_clear(self.mem, False)
        for state in self.frames.values():
            self.recycle(state)
        self.frames.clear()
        self.prefix = self.loaded = self.base = None

    def drop(self) -> None:
        """Release every buffer (the decoder closes)."""
        self.frames.clear()
        self.spare.clear()
        self.prefix = self.loaded = self.base = None

    def changed(self) -> None:
        """The context was evaluated into: it holds more than a saved state now."""
        self.loaded = None

    def lost(self) -> None:
        """The context's cells are unknown (a failed or aborted evaluation, cells removed)."""
        self.loaded = self.base = None

    def save(self, n_pos: int) -> KVState:
        """The context's sequence (cells 0..n_pos-1) as a state; the context keeps holding it."""
        llama = self.llama
        size = llama.llama_state_seq_get_size(self.ctx, SEQ)
        data = next((a for a in self.spare if a.size == size), None)
        if data is not None:
            self.spare.remove(data)
        else:
            data = np.empty(size, dtype=np.uint8)
        got = llama.llama_state_seq_get_data(self.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                             size, SEQ)
        if got != size:
            raise RequestError(f"llama.cpp saved {got} of {size} bytes of the KV state" + llama_log_tail())
        state = KVState(data, n_pos)
        self.loaded = self.base = state
        return state

    def recycle(self, state: KVState) -> None:
        """An evicted frame state's buffer becomes a spare (at most max_kv_states of them)."""
        if state.data is not None and len(self.spare) < self.max_kv_states:
            self.spare.append(state.data)
        state.data = None
        if self.loaded is state:
            self.loaded = None
        if self.base is state:
            self.base = None

    def restore(self, state: KVState) -> None:
        """Empty the cache and put `state` back into cells 0..n_pos-1. Skipped when the context
        holds exactly that state already; when it holds it followed by a question and its answer
        (a second question about the frame), those cells are removed instead: the state's own cells
        kept their values (attention is causal), and the question's go to the same cells after it."""
        if state.data is None:
            raise RequestError("internal: a recycled KV state was restored")
        if self.loaded is state:
            return
        llama = self.llama
        if self.base is state and llama.llama_memory_seq_rm(self.mem, SEQ, state.n_pos, -1):
            self.loaded = state
            return
        self.lost()
        llama.llama_memory_clear(self.mem, False)
        got = llama.llama_state_seq_set_data(self.ctx, state.data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                             state.data.size, SEQ)
        if got == 0:
            raise RequestError("llama.cpp could not restore a cached KV state" + llama_log_tail())
        self.loaded = self.base = state

    def place(self, state: KVState, suffix, tail: tuple) -> tuple[int, int]:
        """Restore a frame's `state` for a question's `suffix`: (the position its text starts at,
        how many of its tokens the state holds already). A frame state ends with the frame tail
        `tail` (() without one); a suffix that does not start with it gets the state without the
        tail's cells (the image's cells keep their values: attention is causal)."""
        self.restore(state)
        n = len(tail)
        if tuple(suffix[:n]) == tail and len(suffix) > n:
            return state.n_pos, n
        if n:
            self.lost()
            self.remove_from(state.n_pos - n, "the frame tail")
        return state.n_pos - n, 0

    def remove_from(self, pos: int, what: str) -> None:
        """Remove the sequence's cells from `pos` on (what: for the error message)."""
        if not self.llama.llama_memory_seq_rm(self.mem, SEQ, pos, -1):
            raise RequestError(f"llama.cpp could not remove {what} from the KV cache" + llama_log_tail())

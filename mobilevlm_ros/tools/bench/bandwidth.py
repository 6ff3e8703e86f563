"""Memory bandwidth of this machine and the decode speed it allows.

    mobilevlm-bench bandwidth [--gguf FILE] [--position 200] [--gib 1] [--threads N] [--json]

Decoding one token reads every weight of the language model once (of the token embedding, one row)
and the KV cache of every position before it, so tokens/s <= bandwidth / bytes-per-token. The
measurement streams through a buffer much larger than the caches with one thread per core and
reports the best and the median of several passes. The ceiling uses the median: on a shared
machine single passes burst above what a read sustained for a whole answer gets.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .common import stats

KV_BYTES = 2            # llama.cpp's default KV cache type is f16


def measure_read_bandwidth(gib: float = 1.0, threads: int = 0, repeats: int = 5) -> dict:
    """Bytes/s of a parallel streaming read: each thread takes the max of its own slices (numpy
    releases the GIL; a uint8 max is the cheapest vectorised reduction, so memory is the limit)."""
    threads = threads or len(os.sched_getaffinity(0)) or 1
    buf = np.ones(int(gib * (1 << 30)), dtype=np.uint8)
    chunks = np.array_split(buf, threads * 8)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            list(pool.map(np.max, chunks))
            rates.append(buf.nbytes / (time.perf_counter() - t0) / 1e9)
    del buf, chunks
    s = stats(rates[1:])                                # the first pass faults the pages in
    return {"threads": threads, "bytes": int(gib * (1 << 30)), "best_gbps": s["max"],
            "median_gbps": s["median"], "min_gbps": s["min"], "passes_gbps": rates[1:]}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return int(f.parts[f.data[0]][0]) if f is not None else default


def decode_bytes_per_token(path, position: int = 0) -> dict:
    """What one decode step at KV position `position` reads from a GGUF model: every tensor but the
    token embedding, one embedding row, and the f16 K and V of `position` earlier tokens per layer."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    weights = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            weights += int(t.n_bytes) // int(t.shape[-1] if len(t.shape) > 1 else 1)
        else:
            weights += int(t.n_bytes)
    arch = r.fields["general.architecture"]
    arch = bytes(arch.parts[arch.data[0]]).decode()
    layers = _field(r, f"{arch}.block_count", 0)
    embd = _field(r, f"{arch}.embedding_length", 0)
    heads = _field(r, f"{arch}.attention.head_count", 1)
    kv_heads = _field(r, f"{arch}.attention.head_count_kv", heads)
    kv = layers * 2 * (embd // heads * kv_heads) * KV_BYTES * int(position)
    return {"weights_bytes": weights, "kv_bytes": kv, "position": int(position), "bytes": weights + kv}


def ceiling(bandwidth: dict, per_token: dict) -> float:
    """Decode tokens/s the measured (median) bandwidth allows."""
    return bandwidth["median_gbps"] * 1e9 / per_token["bytes"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-bench bandwidth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF file whose decode ceiling to report")
    ap.add_argument("--position", type=int, default=200, help="KV position of the decode step")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    bw = measure_read_bandwidth(a.gib, a.threads)
    if a.gguf:
        per_token = decode_bytes_per_token(a.gguf, a.position)
        bw.update(gguf=a.gguf, **per_token, ceiling_tokens_per_s=ceiling(bw, per_token))
    if a.json:
        print(json.dumps(bw))
    else:
        for k, v in bw.items():
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory bandwidth of this machine and the decode speed it allows.

Decoding one token reads every weight of the language model once (except the token embedding, of
which one row is read), so tokens/s <= bandwidth / bytes-per-token. The measurement reads a buffer
much larger than the caches with one thread per core and takes the best of several passes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def measure_read_bandwidth(gib: float = 1.0, threads: int = 0, repeats: int = 5) -> dict:
    """Bytes/s for a parallel streaming read (numpy reductions release the GIL)."""
    threads = threads or os.cpu_count() or 1
    n = int(gib * (1 << 30)) // 8
    buf = np.ones(n, dtype=np.int64)
    chunks = np.array_split(buf, threads * 4)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            list(pool.map(np.sum, chunks))          # int64 sum: vectorised, memory-bound
            rates.append(buf.nbytes / (time.perf_counter() - t0))
    rates = rates[1:]                                   # the first pass warms the pages
    return {"threads": threads, "bytes": buf.nbytes, "best_gbps": max(rates) / 1e9,
            "median_gbps": float(np.median(rates)) / 1e9, "min_gbps": min(rates) / 1e9}


def gguf_bytes_per_token(path) -> int:
    """Bytes of weights one decode step reads from a GGUF file: all tensors but the token embedding
    (one row of it)."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[-1] if len(t.shape) > 1 else 1)
        else:
            total += int(t.n_bytes)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mobilevlm-bench bandwidth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF file whose decode ceiling to report")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    bw = measure_read_bandwidth(a.gib, a.threads)
    if a.gguf:
        per_token = gguf_bytes_per_token(a.gguf)
        bw.update(gguf=a.gguf, bytes_per_token=per_token,
                  ceiling_tokens_per_s=bw["best_gbps"] * 1e9 / per_token)
    if a.json:
        print(json.dumps(bw))
    else:
        for k, v in bw.items():
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

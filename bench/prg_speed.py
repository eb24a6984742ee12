"""Speed of the PRG streams (AES-128-CTR, permllm/protocols/prg.py) against numpy's PCG64, one run.

Every mask, permutation and pad of a session comes from a stream; the light client opens
~500 streams a token, and a SmolLM2 token draws a few million mask elements. Prints, for
both generators in the same process: the cost of opening a stream and of a small draw,
and the throughput of ring words (uint64), float64 uniforms and a vocabulary-sized
permutation.

    .venv/bin/python bench/prg_speed.py
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable

import numpy as np

from permllm.protocols.prg import stream

N = 1 << 22  # elements per throughput draw (32 MiB of uint64)
SEED = bytes(range(32))


def pcg(seed: bytes, *key: str | int) -> np.random.Generator:
    """The former construction: PCG64 seeded from the same BLAKE2b key derivation."""
    h = hashlib.blake2b(seed, digest_size=32, person=b"permllm-prg")
    for part in key:
        h.update(str(part).encode())
    return np.random.Generator(np.random.PCG64(int.from_bytes(h.digest(), "little")))


def best(fn: Callable[[], object], reps: int) -> float:
    """Best of ``reps`` timings of ``fn`` (seconds): the least disturbed by the shared machine."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    rows = []
    for label, make, ring in (("AES-128-CTR (permllm)", stream, lambda g: g.ring(N, 64)),
                              ("PCG64 (numpy)", pcg, lambda g: g.integers(0, 2**64, N, dtype=np.uint64,
                                                                          endpoint=False))):
        open_us = best(lambda: [make(SEED, "op", i, "r") for i in range(1000)], 5) * 1e3
        small_us = best(lambda: [make(SEED, "op", i, "r").random(16) for i in range(1000)], 5) * 1e3
        ring_mb = N * 8 / best(lambda: ring(make(SEED, "x")), 5) / 1e6
        f64_mb = N * 8 / best(lambda: make(SEED, "x").random(N), 5) / 1e6
        perm_ms = best(lambda: make(SEED, "x").permutation(49152), 5) * 1e3
        rows.append((label, open_us, small_us, ring_mb, f64_mb, perm_ms))
    print("| generator | open a stream | open + random(16) | uint64 words | float64 uniforms | permutation of 49,152 |")
    print("|---|---|---|---|---|---|")
    for label, o, s, r, f, p in rows:
        print(f"| {label} | {o:.1f} µs | {s:.1f} µs | {r:.0f} MB/s | {f:.0f} MB/s | {p:.2f} ms |")


if __name__ == "__main__":
    main()

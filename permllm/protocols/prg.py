"""PRG streams: masks and permutations two parties derive without sending them.

A stream is keyed by (seed, op name, token index, purpose...). The model party and
the helper share ``s_MH``; the user and the helper share ``s_UH``. Both holders of a
seed derive bit-identical masks from the same key, on any platform (PCG64 seeded
from a BLAKE2b hash of the key).
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np

__all__ = ["stream", "uniform_mask", "row_permutation", "flat_permutation"]


POOL = 32  # bit generators each thread cycles through (a stream must be used before 32 more are made)
_LOCAL = threading.local()


def _bit_generator() -> np.random.PCG64:
    """One of this thread's reusable PCG64 objects: seeding a new one costs ~10 µs, setting a state ~1 µs."""
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = [np.random.PCG64(0) for _ in range(POOL)]
        _LOCAL.next = 0
    _LOCAL.next = (_LOCAL.next + 1) % POOL
    return pool[_LOCAL.next]


def stream(seed: bytes, *key: str | int) -> np.random.Generator:
    """A generator for one purpose; the same (seed, key) always gives the same numbers.

    The PCG64 state and increment are the BLAKE2b hash of (seed, key). Use the stream at
    once: its bit generator is reused after :data:`POOL` more streams in the same thread
    (every call site draws from it right away; the light client makes ~500 per token).
    """
    h = hashlib.blake2b(seed, digest_size=32, person=b"permllm-prg")
    for part in key:
        b = str(part).encode()
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    d = h.digest()
    bg = _bit_generator()
    bg.state = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                "state": {"state": int.from_bytes(d[:16], "little"), "inc": int.from_bytes(d[16:], "little") | 1}}
    return np.random.Generator(bg)


def uniform_mask(gen: np.random.Generator, shape: tuple[int, ...], width: float | np.ndarray,
                 dtype: np.dtype) -> np.ndarray:
    """A mask drawn uniformly from [-width/2, width/2]; ``width`` may vary along the last axis."""
    dt = np.dtype(dtype)
    out = gen.random(shape, dtype=dt)
    out -= dt.type(0.5)
    out *= np.asarray(width, dtype=dt) if np.ndim(width) else dt.type(width)
    return out


def row_permutation(gen: np.random.Generator, rows: int, n: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Independent permutations of ``n`` columns for each row, as gather indices.

    With ``valid`` (a per-row prefix length), each row permutes only its first
    ``valid[i]`` columns among themselves and leaves the rest in place, so the
    permuted row starts with its valid entries (used for masked softmax).
    """
    keys = gen.random((rows, n))
    if valid is not None:
        valid = np.broadcast_to(np.asarray(valid, dtype=np.int64), (rows,))
        cols = np.arange(n)
        tail = cols[None, :] >= valid[:, None]
        keys = np.where(tail, 2.0 + cols[None, :], keys)
    return np.argsort(keys, axis=1, kind="stable")


def flat_permutation(gen: np.random.Generator, n: int) -> np.ndarray:
    """A uniformly random permutation of ``n`` elements, as gather indices."""
    return gen.permutation(n)

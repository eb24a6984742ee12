"""The wide ring Z_N, N = 2^64·q₁·q₂ ≈ 2^106, as residues: Z_2^64 × Z_q₁ × Z_q₂ (docs/ring.md, *Wide values*).

By the Chinese remainder theorem a share mod N is its residues mod 2^64 (a uint64 word, the
arithmetic of :mod:`permllm.protocols.ring`) and mod each prime q (here a float64 holding an
integer, so numpy's BLAS multiplies exactly: residues below 2^21 and inner dimensions chunked to
2^11 keep every partial sum below 2^53). A mask uniform mod N is a mask uniform in each residue,
so an op on a wide value is the same op run once per residue, each hiding perfectly; only U, where
it decodes a revealed value, combines the residues (:func:`decode`) and splits the output it
encodes (:func:`encode`). Values whose chains of fixed-point products need more than 64 bits
(SmolLM2's attention-output chain, docs/ring.md) travel this way.
"""
from __future__ import annotations

import numpy as np

from .ring import RingOverflow

__all__ = ["PRIMES", "WIDE_BITS", "reduce", "matmul", "encode", "decode"]

PRIMES = (2097143, 2097133)   # the two largest primes below 2^21
WIDE_BITS = 64 + sum(int(q).bit_length() - 1 for q in PRIMES)  # log2 N, rounded down: 104
_CHUNK = 2048                  # inner-dimension chunk: (2^21)^2 · 2^11 < 2^53


def reduce(x: np.ndarray, q: int) -> np.ndarray:
    """x mod q in [0, q) (float64 integers; exact for |x| < 2^53). x − q·⌊x/q⌋ with the quotient from a
    multiplication (numpy's float mod is several times slower), then one correction each way."""
    x = np.asarray(x, dtype=np.float64)
    fq = float(q)
    r = x - fq * np.floor(x * (1.0 / fq))
    r -= fq * (r >= fq)
    r += fq * (r < 0)
    return r


def matmul(a: np.ndarray, b: np.ndarray, q: int, transpose_b: bool = False, reduced_b: bool = False) -> np.ndarray:
    """a @ b (a @ bᵀ with ``transpose_b``) mod q, exact: operands reduced (``reduced_b``: b already is, or is a
    small signed weight with |b| < 2^21), the inner dimension in chunks."""
    a = reduce(a, q)
    if not reduced_b:
        b = reduce(b, q)
    if transpose_b:
        b = np.swapaxes(b, -1, -2)
    k = a.shape[-1]
    out = None
    for lo in range(0, k, _CHUNK):
        part = reduce(a[..., lo:lo + _CHUNK] @ b[..., lo:lo + _CHUNK, :], q)
        out = part if out is None else reduce(out + part, q)
    if out is None:  # an empty inner dimension
        out = np.zeros(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]))
    return out


def encode(x: np.ndarray, scale: int, what: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """round(x·2^scale) mod N as (uint64 residue mod 2^64, [residue mod q for q in PRIMES]); RingOverflow if
    |x·2^scale| ≥ N/2."""
    y = np.rint(np.asarray(x, dtype=np.float64) * 2.0**scale)
    if y.size and not np.all(np.abs(y) < 2.0 ** (WIDE_BITS - 1)):
        raise RingOverflow(f"{what}: a value of magnitude {float(np.max(np.abs(y))) / 2.0**scale:.6g} does not fit "
                           f"its encoding (±2^{WIDE_BITS - 1 - scale} at 2^-{scale} in Z_N, N ≈ 2^{WIDE_BITS})")
    # y = hi·2^64 + lo exactly, lo in [0, 2^64): the residue mod 2^64 is lo, mod q it is lo + hi·(2^64 mod q)
    small = np.abs(y) < 2.0**63
    lo64 = np.where(small, y, 0.0).astype(np.int64).view(np.uint64)  # two's complement is the residue mod 2^64
    hi = np.where(small, np.where(y < 0, -1.0, 0.0), np.floor(y / 2.0**64))
    if not np.all(small):  # |y| ≥ 2^63: a multiple of 2^11 (53 significant bits), so y − hi·2^64 is exact
        lo = y - hi * 2.0**64
        big = np.where(lo >= 2.0**63, lo - 2.0**64, lo).astype(np.int64).view(np.uint64)
        lo64 = np.where(small, lo64, big)
    return lo64, [reduce((lo64 % np.uint64(q)).astype(np.float64) + reduce(hi, q) * float(2**64 % q), q)
                  for q in PRIMES]


def decode(v64: np.ndarray, rs: list[np.ndarray], scale: int, what: str, range_bits: int) -> np.ndarray:
    """The signed value of (v64 mod 2^64, r_q mod q) in Z_N times 2^-scale (Garner's mixed radix), as float64;
    RingOverflow if it left ±2^range_bits."""
    q1, q2 = PRIMES
    v = np.asarray(v64, dtype=np.uint64)
    t = [(np.asarray(r, dtype=np.float64) - (v % np.uint64(q)).astype(np.float64)) for r, q in zip(rs, PRIMES)]
    i1 = float(pow(2**64 % q1, -1, q1))
    d1 = reduce(reduce(t[0], q1) * i1, q1)                       # x = v + 2^64·(d1 + q1·d2)
    i2 = float(pow((2**64 % q2) * q1 % q2, -1, q2))
    d2 = reduce(reduce(reduce(t[1], q2) - reduce(d1 * float(2**64 % q2), q2), q2) * i2, q2)
    m = d1 + float(q1) * d2                                      # in [0, q1·q2), exact (< 2^42)
    qq = float(q1) * float(q2)
    neg = (m > (qq - 1) / 2) | ((m == (qq - 1) / 2) & (v >= np.uint64(1 << 63)))
    # negative: x − N = (m − q1·q2 + 1)·2^64 − (2^64 − v) for v ≠ 0, with 2^64 − v exact in uint64 (no cancellation)
    borrow = neg & (v != 0)
    low = np.where(borrow, -(np.uint64(0) - v).astype(np.float64), v.astype(np.float64))
    out = ((m - np.where(neg, qq, 0.0) + borrow) * 2.0**64 + low) * 2.0**-scale
    if out.size and not np.all(np.abs(out) < 2.0**range_bits):
        raise RingOverflow(f"{what}: a value of magnitude {float(np.max(np.abs(out))):.6g} left its encoding range "
                           f"±2^{range_bits} (Z_N at 2^-{scale}, N ≈ 2^{WIDE_BITS})")
    return out

"""Exact arithmetic on Z_2^k (k ≤ 64, one uint32 or uint64 word per element) with fixed-point encoding.

A real x is carried as round(x·2^scale) mod 2^k; shares are arrays of the ring's word
(:func:`word`: uint32 for k ≤ 32, else uint64) with values in [0, 2^k), and a mask uniform
on [0, 2^k) (:meth:`~permllm.protocols.prg.Stream.ring`) hides any value mod 2^k
perfectly. Sums, differences and products are those of the word (numpy and torch wrap
mod 2^32 and 2^64) reduced mod 2^k, exact whatever the operands. A value
outside its encoding range never wraps silently into a wrong result: :func:`encode`
refuses it, and :func:`decode` checks the decoded value against its public range and
raises :class:`RingOverflow` naming the op. docs/ring.md has the design and the bit budget.

Messages travel in ⌈k/8⌉ bytes per element (:func:`pack`), not in 8.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["RingOverflow", "word", "mod", "encode", "decode", "matmul", "matmul_small", "pack", "unpack", "wire_bytes", "trunc",
           "shift_up", "Enc"]

_U64, _U32 = np.dtype(np.uint64), np.dtype(np.uint32)


class RingOverflow(ArithmeticError):
    """A value does not fit its fixed-point encoding: the op, the value and the range are in the message."""


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 64:
        raise ValueError(f"a ring has 1 to 64 bits, not {bits}")


def word(bits: int) -> np.dtype:
    """The unsigned dtype that holds Z_2^bits: uint32 up to 32 bits (torch multiplies int32 ~4× faster), else uint64."""
    _check_bits(bits)
    return _U32 if bits <= 32 else _U64


def mod(x: np.ndarray, bits: int) -> np.ndarray:
    """``x`` (of the ring's word) reduced mod 2^bits, in place."""
    if x.dtype != word(bits):
        raise TypeError(f"a value of Z_2^{bits} is held in {word(bits)}, not {x.dtype}")
    if bits not in (32, 64):
        x &= x.dtype.type((1 << bits) - 1)
    return x


def encode(x: np.ndarray, scale: int, bits: int, what: str) -> np.ndarray:
    """round(x·2^scale) mod 2^bits in the ring's :func:`word`; RingOverflow when |x·2^scale| does not fit
    bits − 1 bits."""
    _check_bits(bits)
    y = np.rint(np.asarray(x, dtype=np.float64) * 2.0**scale)
    limit = 2.0 ** (bits - 1)
    if y.size and not np.all(np.abs(y) < limit):
        bad = float(np.max(np.abs(np.nan_to_num(y, nan=np.inf))))
        raise RingOverflow(f"{what}: a value of magnitude {bad / 2.0**scale:.6g} does not fit its encoding "
                           f"(range ±2^{bits - 1 - scale} at 2^-{scale} in Z_2^{bits})")
    return mod(y.astype(np.int64).view(_U64).astype(word(bits)), bits)


def decode(v: np.ndarray, scale: int, bits: int, what: str, range_bits: int | None = None) -> np.ndarray:
    """The signed value of ``v`` mod 2^bits, times 2^-scale, as float64.

    ``range_bits``: the public bound log2 of |value| (default: the whole ring); a value at
    or beyond it means the computation left its encoding range, and raises RingOverflow.
    """
    _check_bits(bits)
    sh = np.uint64(64 - bits)
    s = (np.asarray(v).astype(_U64) << sh).view(np.int64) >> sh.astype(np.int64)  # sign-extend from bit bits−1
    out = s.astype(np.float64) * 2.0**-scale
    if range_bits is not None and out.size and not np.all(np.abs(out) < 2.0**range_bits):
        raise RingOverflow(f"{what}: a value of magnitude {float(np.max(np.abs(out))):.6g} left its encoding range "
                           f"±2^{range_bits} (Z_2^{bits} at 2^-{scale})")
    return out


def matmul(a: np.ndarray, b: np.ndarray, bits: int, transpose_b: bool = False) -> np.ndarray:
    """a @ b (a @ bᵀ over the last two axes with ``transpose_b``) mod 2^bits for operands of the ring's word;
    leading axes broadcast (torch's integer matmul wraps mod 2^32 / 2^64)."""
    w = word(bits)
    signed = np.int32 if w == _U32 else np.int64
    ta, tb = (torch.from_numpy(_writable(np.ascontiguousarray(x, dtype=w)).view(signed)) for x in (a, b))
    if transpose_b:
        tb = tb.transpose(-1, -2)
    return mod(torch.matmul(ta, tb).numpy().view(w), bits)


def matmul_small(x: np.ndarray, W: np.ndarray, transpose_b: bool = False, w_bits: int = 21) -> np.ndarray:
    """x @ W (x @ Wᵀ with ``transpose_b``) mod 2^64 for ring words ``x`` and a public-size *small* integer matrix
    ``W`` held as float64 (|W| < 2^``w_bits``: an encoded weight), through BLAS: ``x`` is split into limbs of
    L = 53 − w_bits − ⌈log₂ K⌉ bits (K inputs: every partial sum stays below 2^53, so exact) stacked as rows of
    one float64 product (a single row: one GEMV per limb), then recombined with wrapping integer shifts. An encoded weight of 18 significant bits
    takes 3 limbs for K ≤ 2048 (a decode step's product costs about 3 float GEMVs); torch's int64 matmul is
    10–20× slower."""
    k = x.shape[-1]
    limb = min(32, 53 - w_bits - max(1, (k - 1).bit_length()))
    if limb < 8:
        raise ValueError(f"matmul_small: {w_bits}-bit weights and inner dimension {k} leave {limb}-bit limbs")
    n = -(-64 // limb)
    x2 = x.reshape(-1, k)
    low = np.uint64((1 << limb) - 1)
    xs = np.concatenate([((x2 >> np.uint64(limb * i)) & low).astype(np.float64) for i in range(n)])
    if len(x2) == 1 and transpose_b:  # a decode row: one GEMV per limb over W's contiguous rows beats BLAS's
        P = np.stack([W @ v for v in xs]).reshape(n, *x.shape[:-1], -1)  # small-m GEMM (measured ~2×)
    else:
        P = (xs @ (W.T if transpose_b else W)).reshape(n, *x.shape[:-1], -1)  # one 2-D BLAS product
    out = np.zeros(P.shape[1:], dtype=_U64)
    for i in range(n):
        out += P[i].astype(np.int64).view(_U64) << np.uint64(limb * i)
    return out


def _writable(x: np.ndarray) -> np.ndarray:
    """``x``, copied if read-only (a received message's zero-copy view): torch wants writable memory."""
    return x if x.flags.writeable else x.copy()


def trunc(x: np.ndarray, f: int) -> np.ndarray:
    """One party's share of a local truncation by 2^f: ⌊x_share / 2^f⌋ (docs/ring.md, *Local truncation*).

    If x = x_M + x_U mod 2^64, the two truncated shares add up to ⌊x/2^f⌋ or ⌊x/2^f⌋ − 1
    **mod 2^(64−f)**, always: the value then lives on the smaller ring. No message is sent, so it
    hides perfectly; a share derivable by the helper stays derivable.
    """
    return x >> np.uint64(f) if f else x


def shift_up(x: np.ndarray, d: int) -> np.ndarray:
    """x·2^d mod 2^64: a share moved to a scale d bits finer (exact while the value fits)."""
    return x << np.uint64(d) if d else x


class Enc:
    """The public fixed-point encoding of a shared value: ``scale`` fractional bits on Z_2^``bits``, with
    |value| < 2^``range`` (its published bound). ``wire`` is the width a masked opening of it travels in: its
    bits (sign, one bit to detect an overflow) in whole bytes, so that every byte of the message is uniform;
    ``opened`` the ring U decodes it on."""

    __slots__ = ("scale", "bits", "range")

    def __init__(self, scale: int, bits: int, range: int) -> None:
        self.scale, self.bits, self.range = int(scale), int(bits), int(range)

    @property
    def wire(self) -> int:
        return min(64, -(-(self.scale + self.range + 2) // 8) * 8)

    @property
    def opened(self) -> int:
        return min(self.wire, self.bits)

    def __repr__(self) -> str:
        return f"Enc(scale={self.scale}, bits={self.bits}, range={self.range})"


def wire_bytes(bits: int) -> int:
    """Bytes per element of a value mod 2^bits on the wire."""
    _check_bits(bits)
    return -(-bits // 8)


def pack(v: np.ndarray, bits: int) -> np.ndarray:
    """The low ⌈bits/8⌉ little-endian bytes of each element (uint8, shape (…, n_bytes)): a value mod 2^bits
    under a mask uniform mod 2^bits stays uniform in those bytes."""
    n = wire_bytes(bits)
    w = word(bits)
    le = np.ascontiguousarray(v, dtype=w).astype(w.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(le.view(np.uint8).reshape(*le.shape, w.itemsize)[..., :n])


def unpack(b: np.ndarray, bits: int, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Inverse of :func:`pack`; ValueError unless ``b`` is a uint8 array of ``shape`` × ⌈bits/8⌉ with no
    value at or above 2^bits."""
    n = wire_bytes(bits)
    if not (isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.shape == (*shape, n)):
        raise ValueError(f"{what}: expected a uint8 array of shape {(*shape, n)}, got "
                         f"{getattr(b, 'dtype', type(b).__name__)} {getattr(b, 'shape', '')}")
    w = word(bits)
    out = np.zeros((*shape, w.itemsize), dtype=np.uint8)
    out[..., :n] = b
    v = out.view(w.newbyteorder("<")).reshape(shape).astype(w)
    if bits % 8 and np.any(v >> w.type(bits)):
        raise ValueError(f"{what}: a value does not fit {bits} bits")
    return v

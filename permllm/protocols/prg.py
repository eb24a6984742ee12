"""PRG streams: masks and permutations two parties derive without sending them.

A stream is keyed by (seed, op name, token index, purpose...). The model party and
the helper share ``s_MH``; the user and the helper share ``s_UH``. Both holders of a
seed derive bit-identical masks from the same key, on any platform.

Construction: the 32-byte BLAKE2b hash (personalised ``b"permllm-prg"``) of the seed
and the length-prefixed key parts is split into an AES-128 key (first 16 bytes) and
the initial CTR counter block (last 16 bytes); the stream is the AES-128-CTR
keystream (the encryption of zeros, by OpenSSL through ``cryptography``), read as
little-endian words. It is cryptographic because BLAKE2b of a secret 256-bit seed
followed by public data is a PRF (BLAKE2 has no length extension), so each
(seed, key) gets an independent-looking AES key, and AES-CTR under a secret key is
a PRG: no efficient observer of any number of streams, or of values drawn from
them, can tell them from uniform bytes or predict the rest of a stream, which masks
need (PCG64, used before, is not: its state can be recovered from a modest number
of outputs). Every draw maps keystream to values without bias: integers by masking
and rejection, permutations by sorting random keys (ties broken at random), floats
on a grid of 2**-52 (float64) or 2**-23 (float32).
"""
from __future__ import annotations

import hashlib
import math
import operator
import sys

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["Stream", "stream", "uniform_mask", "row_permutation", "flat_permutation"]

_CHUNK = 1 << 20                    # keystream bytes encrypted per OpenSSL call
_ZEROS = memoryview(bytes(_CHUNK))  # the plaintext: CTR encryption of zeros is the keystream
_UINT = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}
_LITTLE = sys.byteorder == "little"
_F64, _F32 = np.dtype(np.float64), np.dtype(np.float32)
_BOUNDS = {np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in
           (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)}
_SHIFT64, _SHIFT32 = np.uint64(12), np.uint32(9)  # keep the mantissa's 52 / 23 bits
_ONE64 = np.uint64(0x3FF0000000000000)  # exponent bits of 1.0 as float64
_ONE32 = np.uint32(0x3F800000)          # exponent bits of 1.0 as float32
_RADIX_MIN = 2048  # rows at least this long are sorted by radix passes (argsort is faster below)


def _shape(size: int | tuple[int, ...]) -> tuple[int, ...]:
    """A size argument (an int or a tuple of ints) as a shape tuple."""
    if isinstance(size, int):
        return (size,)
    if isinstance(size, tuple):
        return tuple(operator.index(s) for s in size)
    return (operator.index(size),) if np.ndim(size) == 0 else tuple(operator.index(s) for s in size)


class Stream:
    """The AES-128-CTR keystream of one (seed, key), and the draws the protocols make from it.

    Every draw consumes the next keystream bytes, so the same sequence of calls on
    the same (seed, key) gives the same values at every party and platform.
    """

    __slots__ = ("_enc",)

    def __init__(self, digest: bytes) -> None:
        """``digest``: 32 bytes, the AES-128 key then the initial counter block."""
        if len(digest) != 32:
            raise ValueError("a stream needs a 32-byte digest")
        self._enc = Cipher(algorithms.AES(digest[:16]), modes.CTR(digest[16:])).encryptor()

    def _words(self, shape: int | tuple[int, ...], itemsize: int) -> np.ndarray:
        """A fresh array of the next keystream bytes read as little-endian unsigned words of
        ``itemsize`` bytes (1, 2, 4 or 8), in native byte order."""
        out = np.empty(shape, dtype=_UINT[itemsize])
        n = out.nbytes
        if not n:
            return out
        buf = memoryview(out).cast("B")
        if n <= _CHUNK:
            self._enc.update_into(_ZEROS[:n], buf)
        else:
            for off in range(0, n, _CHUNK):
                m = min(_CHUNK, n - off)
                self._enc.update_into(_ZEROS[:m], buf[off:off + m])
        if not _LITTLE:
            out.byteswap(inplace=True)
        return out

    def ring(self, shape: int | tuple[int, ...], bits: int) -> np.ndarray:
        """uint64 values uniform on [0, 2**bits), ``1 <= bits <= 64``: ring masks mod 2**bits.

        Each element is the next 8 keystream bytes as a little-endian uint64 with its
        top ``64 - bits`` bits cleared.
        """
        if not 1 <= bits <= 64:
            raise ValueError(f"bits must be in [1, 64], not {bits}")
        w = self._words(_shape(shape), 8)
        if bits < 64:
            w &= np.uint64((1 << bits) - 1)
        return w

    def random(self, size: int | tuple[int, ...] | None = None,
               dtype: np.dtype | type = np.float64) -> np.ndarray | np.floating:
        """Floats uniform on [0, 1) (float64 or float32), e.g. for masks of a given width.

        float64: 52 keystream bits per value (8 bytes each) set the mantissa of a number
        in [1, 2), minus 1, i.e. a multiple of 2**-52; float32: 23 bits of 4 bytes, a
        multiple of 2**-23. Exact (no rounding), and a few times faster than converting
        integers. A scalar when ``size`` is None.
        """
        dt = np.dtype(dtype)
        shp = (1,) if size is None else _shape(size)
        if dt == _F64:
            w = self._words(shp, 8)
            w >>= _SHIFT64
            w |= _ONE64
        elif dt == _F32:
            w = self._words(shp, 4)
            w >>= _SHIFT32
            w |= _ONE32
        else:
            raise TypeError(f"random draws float64 or float32, not {dt}")
        out = w.view(dt)
        out -= 1.0
        return out[0] if size is None else out

    def _below(self, n: int, r: int) -> np.ndarray:
        """``n`` unsigned integers uniform on [0, r), ``1 <= r <= 2**64``, in the narrowest
        word that holds r - 1: masked to the bit length of r - 1, and rejection of values
        >= r where r is not a power of two (each draw is accepted with probability > 1/2)."""
        bits = (r - 1).bit_length()
        size = 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8
        wt = _UINT[size]
        if bits == 0:
            return np.zeros(n, dtype=wt)
        mask = wt.type((1 << bits) - 1)
        if r == 1 << bits:
            w = self._words(n, size)
            if bits < 8 * size:
                w &= mask
            return w
        out = np.empty(n, dtype=wt)
        got = 0
        while got < n:
            need = n - got
            m = (need << bits) // r + 4 * math.isqrt(need) + 8  # enough for all `need` most times
            w = self._words(m, size)
            w &= mask
            ok = w[w < wt.type(r)][:need]
            out[got:got + ok.size] = ok
            got += ok.size
        return out

    def integers(self, low: int, high: int | None = None, size: int | tuple[int, ...] | None = None,
                 dtype: np.dtype | type = np.int64, endpoint: bool = False) -> np.ndarray | np.integer:
        """Integers exactly uniform on [low, high) ([low, high] with ``endpoint``; [0, low)
        when ``high`` is None), as numpy's ``Generator.integers`` with scalar bounds:
        e.g. one-time pads, secret offsets, integer masks. A numpy scalar when ``size``
        is None."""
        dt = np.dtype(dtype)
        if dt not in _BOUNDS:
            raise TypeError(f"integers draws a signed or unsigned integer dtype, not {dt}")
        lo, hi = (0, operator.index(low)) if high is None else (operator.index(low), operator.index(high))
        hi += bool(endpoint)
        if hi <= lo:
            raise ValueError(f"empty range: low={low}, high={high}, endpoint={endpoint}")
        vmin, vmax = _BOUNDS[dt]
        if lo < vmin or hi - 1 > vmax:
            raise ValueError(f"range [{lo}, {hi}) does not fit {dt}")
        shp = (1,) if size is None else _shape(size)
        v = self._below(math.prod(shp), hi - lo)
        ut = _UINT[dt.itemsize]
        v = v.astype(ut, copy=False)
        if lo:
            v += ut.type(lo % (1 << (8 * dt.itemsize)))  # wraps mod 2**bits: lo + v lies in the dtype's range
        out = v.view(dt)
        return out[0] if size is None else out.reshape(shp)

    def permutation(self, n: int) -> np.ndarray:
        """A uniformly random permutation of range(n), as int64 gather indices (see :meth:`_orders`)."""
        return self._orders(1, operator.index(n))[0]

    def _orders(self, rows: int, n: int, valid: np.ndarray | None = None) -> np.ndarray:
        """Uniformly random orders of the ``n`` columns of each of ``rows`` rows, as int64
        gather indices; with ``valid`` (per row), only the first ``valid[r]`` columns of row r
        are permuted, the rest stay in place.

        Each column gets a random key and the row is sorted by key. Short rows (under
        :data:`_RADIX_MIN` columns): 63-bit keys, a column past the valid prefix gets
        2**63 + its index (after every random key, in column order), numpy's argsort.
        Long rows: 32-bit keys (48 or 64 bits for rows over 2**21), sorted by stable
        radix passes over their 16-bit digits, least significant first (numpy's stable
        argsort of uint16, linear time); a column past the valid prefix gets the largest
        key, and the stable sort keeps it behind the valid ones and in column order.

        Ties: keys that tie would be left in an order set by the sort, which is biased
        (and, for argsort, not fixed across numpy versions); so each run of tied keys is
        put in index order and shuffled by a permutation of its own. The result is then
        exactly uniform (sorting i.i.d. keys and breaking ties uniformly gives every order
        the same probability, as relabelling the columns does not change the keys' law),
        and the same at every party. A row of n columns has about n**2 / 2**33 tied pairs
        with 32-bit keys, n**2 / 2**64 with 63-bit keys.
        """
        cols = np.arange(n)
        tail = None if valid is None else cols[None, :] >= valid[:, None]
        if n < _RADIX_MIN:
            keys = self.ring((rows, n), 63)
            if tail is not None:
                keys = np.where(tail, np.uint64(1 << 63) + cols.astype(np.uint64)[None, :], keys)
            p = np.argsort(keys, axis=1)
            top = np.take_along_axis(keys, p, axis=1)
            r, i = np.nonzero(top[:, 1:] == top[:, :-1])  # tail keys are distinct and above the rest
        else:
            D = 2 if n <= 1 << 21 else 3 if n <= 1 << 29 else 4
            d = self._words((D, rows, n), 2)
            if tail is not None:
                d |= np.where(tail, np.uint16(0xFFFF), np.uint16(0))
            p = np.argsort(d[0], axis=1, kind="stable")
            for j in range(1, D):
                p = np.take_along_axis(p, np.argsort(np.take_along_axis(d[j], p, axis=1), axis=1, kind="stable"),
                                       axis=1)
            top = np.take_along_axis(d[D - 1], p, axis=1)
            eq = top[:, 1:] == top[:, :-1]  # eq[r, i]: sorted positions i, i + 1 of row r may tie
            if tail is not None:
                eq &= cols[None, 1:] < valid[:, None]  # both inside the valid prefix
            r, i = np.nonzero(eq)
            for j in range(D - 2, -1, -1):
                if not r.size:
                    break
                same = d[j][r, p[r, i]] == d[j][r, p[r, i + 1]]
                r, i = r[same], i[same]
        if r.size:  # runs of tied keys: positions i[k], i[k] + 1 of row r[k], over consecutive i
            brk = (r[1:] != r[:-1]) | (i[1:] != i[:-1] + 1)
            first, last = np.r_[True, brk], np.r_[brk, True]
            for row, a, b in zip(r[first].tolist(), i[first].tolist(), (i[last] + 2).tolist()):
                p[row, a:b] = np.sort(p[row, a:b])[self.permutation(b - a)]
        return p.astype(np.int64, copy=False)


def stream(seed: bytes, *key: str | int) -> Stream:
    """A stream for one purpose; the same (seed, key) always gives the same numbers.

    The AES key and counter are the BLAKE2b hash of (seed, key), each key part
    length-prefixed, so distinct keys give unrelated streams.
    """
    h = hashlib.blake2b(seed, digest_size=32, person=b"permllm-prg")
    for part in key:
        b = str(part).encode()
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return Stream(h.digest())


def uniform_mask(gen: Stream, shape: tuple[int, ...], width: float | np.ndarray,
                 dtype: np.dtype) -> np.ndarray:
    """A mask drawn uniformly from [-width/2, width/2]; ``width`` may vary along the last axis."""
    dt = np.dtype(dtype)
    out = gen.random(shape, dtype=dt)
    out -= dt.type(0.5)
    out *= np.asarray(width, dtype=dt) if np.ndim(width) else dt.type(width)
    return out


def row_permutation(gen: Stream, rows: int, n: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Independent permutations of ``n`` columns for each row, as gather indices.

    With ``valid`` (a per-row prefix length), each row permutes only its first
    ``valid[i]`` columns among themselves and leaves the rest in place, so the
    permuted row starts with its valid entries (used for masked softmax).
    Every row is exactly uniform (see :meth:`Stream._orders`).
    """
    if valid is not None:
        valid = np.broadcast_to(np.asarray(valid, dtype=np.int64), (rows,))
    return gen._orders(rows, n, valid)


def flat_permutation(gen: Stream, n: int) -> np.ndarray:
    """A uniformly random permutation of ``n`` elements, as gather indices."""
    return gen.permutation(n)

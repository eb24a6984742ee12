"""CKKS matrix products for the light client's offline phase (docs/design.md §6).

Layer: :mod:`permllm.protocols` (above :mod:`permllm.net`, below :mod:`permllm.model`).
In the light mode (``ShareConfig.offline == "he"``) the user party holds no masked
weights. The offline correlation of a private-weight linear, x_U·W − r at M, comes from
homomorphic encryption instead of the dealt D = W − U_W:

1. U encrypts its offline input shares x_U (known ahead: PRG outputs) under its own
   CKKS key and sends the ciphertexts to M;
2. M multiplies them by its plaintext W, re-randomises each result with a fresh
   encryption of zero and adds a polynomial u uniform modulo q to its first component,
   and returns them;
3. U subtracts its new share r (from s_UH) under encryption, decrypts *without decoding*
   and returns the plaintext polynomial, Δ·(x_U·W − r) + e + u modulo q;
4. M removes u, decodes, and keeps x_U·W − r: the correlation of the dealt mode, so
   the online phase of the linear is unchanged (zero messages).

The rows of a batch of offline steps (the session makes the batches: the prefill with
the first decode steps, then runs of decode steps; :func:`open_batch`,
:func:`close_batch`) go into one exchange per linear op, so the fixed costs — M's
plaintext encodings and rotations — are paid once per batch. Pyfhel holds the GIL in
every SEAL call, so M computes the products in worker processes, one per CPU by
default (``PERMLLM_HE_WORKERS``; 1 computes them in a thread).

**Parameters** (:func:`setup_ckks`). Ring dimension N = 8192 (4096 complex slots);
coefficient modulus of three 60-bit primes: q = q₀q₁ (120 bits) for the ciphertexts and
the 60-bit special prime of key switching, 180 bits in all, below the 218 bits the
HomomorphicEncryption.org standard allows for 128-bit security at N = 8192 (SEAL
checks it: ``sec=128``; M accepts only exactly these parameters from U). One
multiplicative level, no rescaling: U encodes x_U at scale 2^x and M encodes W at scale
2^w, with x + w as large as a bound on |x_U·W − r| allows below 2^117 (four times below
q), split to balance the two errors (:func:`scales`: public numbers only, both parties
compute it). U sends its public key and Galois keys for the rotations by powers of two
(9.5 MB, once). Measured precision (``bench/light_client.py --precision``): see
docs/light_client.md — about 1e-8 relative to the outputs' magnitudes.

**Layout.** K is a power of two; a ciphertext holds a K-coordinate block of 2·S/K rows
(S = 4096 complex slots, two rows per slot: real and imaginary parts), slot
h·(S/K) + t holding coordinate h of row pair t ("h outer"), so a rotation by S/K shifts
h cyclically within the block. The input columns are split into power-of-two *chunks*
P | K, each repeated K/P times in its block, so a chunk needs exactly P diagonals. The
output rows are split into *groups* of R ≤ K rows: either K-row blocks (the last one
padded), or powers of two repeated K/R times, each copy summing a window of R columns
of a chunk (R diagonals cover the chunk), after which log₂(K/R) rotations give every
copy the sum of all. M computes each group with the diagonal method, baby-step/giant-step:
the baby rotations of each input ciphertext (a binary tree of rotations by powers of
two, so each carries at most log₂ b₁ key switches of noise) are shared by all groups,
the giant rotations of each group by all chunks (Halevi–Shoup). :func:`plan` picks K,
the grouping and the baby-step count from a cost model (measured SEAL timings).

**What each party learns.** M receives only ciphertexts under U's key (IND-CPA, RLWE at
128 bits): nothing of x_U. It then receives Δ·(x_U·W − r) + e + u and learns
x_U·W − r (plus the noise e/Δ, about 1e-8 of its magnitude): hidden by r, R times wider,
as in the dealt mode. U decrypts Δ·(x_U·W − r) + e + u with u uniform modulo q: nothing
of W, not even the noise; the second component is re-randomised by M's fresh
encryption of zero, so it carries nothing of W either (RLWE). Every copy of an output
row holds the same sum and U subtracts r from each, so M's decoded slots are output
entries minus r (repeated) or zero. H takes no part in the linear layers: it sees
nothing of them.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import math
import os
import pickle
import queue
import secrets
import subprocess
import sys
import tempfile
import warnings
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from Pyfhel import PyCtxt, PyPtxt, Pyfhel

from .party import Party, ProtocolError, Role, check_array

__all__ = ["RING", "SLOTS", "PRIME_BITS", "X_BITS", "W_BITS", "CKKS_KEY", "Layout", "plan", "pack", "unpack",
           "pack_out", "setup_ckks", "user_encrypt", "user_unmask", "model_product", "model_unmask",
           "scales", "open_batch", "close_batch", "abort_batch", "offline_product", "user_share"]

RING = 8192                  # N: ring dimension
SLOTS = RING // 2            # complex slots per ciphertext
PRIME_BITS = (60, 60, 60)    # q₀, q₁ (ciphertexts) and the special prime: 180 bits ≤ 218 (128-bit security)
LEVELS = len(PRIME_BITS) - 1  # primes in a ciphertext
X_BITS = 55                  # log2 of the largest scale of U's encrypted inputs
W_BITS = 55                  # log2 of the largest scale of M's plaintext weights
MIN_BITS = 25                # below this a scale loses too much precision
CAPACITY_BITS = 117          # |value|·scale stays below 2^117 < q/4 (q = q₀q₁ > 2^119.99)
ROTATIONS = tuple(1 << j for j in range(SLOTS.bit_length() - 1))   # Galois keys: 1, 2, 4, …, S/2
CKKS_KEY = ("ckks", -1)      # p.store entry of the session's CKKS state
BATCH_KEY = ("he-batch", -1)  # p.store entry of the open batch
IN_FLIGHT = 4                # ops U may have sent whose answer it has not handled yet
PART_CTS = 16                # ciphertexts per message (4 MB): bounds U's memory, and frames, for any batch
WORKERS_ENV = "PERMLLM_HE_WORKERS"  # M's worker processes for the products (default: one per CPU; ≤ 1: none)

# SEAL timings on one core (N = 8192, two primes; ms), for the layout cost model.
T_ENCODE, T_PRODUCT, T_ROTATE, T_ENCRYPT, T_DECRYPT = 0.3, 0.2, 1.2, 3.0, 0.8
RESIDENT_CTS = 1024          # ciphertexts M may hold for one op (262 kB each)


# ---------------------------------------------------------------------------------- layout
@dataclass(frozen=True, slots=True)
class Layout:
    """Where the rows and columns of one batched product sit in ciphertext slots (module docstring)."""

    rows: int
    n_in: int
    n_out: int
    K: int                                   # block length, a power of two dividing SLOTS
    b1: int                                  # baby steps (a power of two)
    chunks: tuple[tuple[int, int], ...]      # (first input column, period P), P | K
    groups: tuple[tuple[int, int], ...]      # (first output row, rows R), R ≤ K
    diag: bool = False                       # element-wise weight: chunk i meets group i at offset 0 only

    @property
    def gc(self) -> int:
        """Row pairs per ciphertext (the slot stride of one block coordinate)."""
        return SLOTS // self.K

    @property
    def cts(self) -> int:
        """Ciphertexts per chunk (and per group): the rows in 2·gc-row slices."""
        return -(-self.rows // (2 * self.gc))

    def width(self, o: int, c: int) -> int:
        """Offsets (diagonals) group ``o`` needs from chunk ``c``."""
        if self.diag:
            return 1 if o == c else 0
        return _width(self.K, self.groups[o][1], self.chunks[c][1])

    def copies(self, o: int) -> int:
        """Copies of group ``o``'s rows in its block (1: padded)."""
        R = self.groups[o][1]
        return self.K // R if self.K % R == 0 else 1

    def giant(self, o: int) -> int:
        """Giant steps of group ``o``."""
        if self.diag:
            return 1
        return max(-(-_width(self.K, self.groups[o][1], P) // self.b1) for P in {P for _, P in self.chunks})

    def baby(self, c: int) -> int:
        """Baby-step ciphertexts of chunk ``c`` (the unrotated one included)."""
        return 1 if self.diag else min(self.b1, self.chunks[c][1])


def _width(K: int, R: int, P: int) -> int:
    """Diagonals a group of R rows needs from a chunk of period P: R < P rows in K/R copies each sum a
    window of R columns, so R diagonals cover the chunk; otherwise all P."""
    return min(R, P) if K % R == 0 else P


def _pow2_split(n: int, K: int) -> list[int]:
    """n as full K-blocks plus the binary digits of the remainder, largest first."""
    out = [K] * (n // K)
    rest, b = n % K, K
    while rest:
        b //= 2
        if rest >= b:
            out.append(b)
            rest -= b
    return out


def _starts(sizes: list[int]) -> tuple[tuple[int, int], ...]:
    out, s = [], 0
    for n in sizes:
        out.append((s, n))
        s += n
    return tuple(out)


def _cost(L: Layout) -> tuple[float, int]:
    """(modelled milliseconds of both parties' HE work, M's resident ciphertexts), in O(distinct sizes)."""
    B, nc, ng = L.cts, len(L.chunks), len(L.groups)
    if L.diag:
        D, babies, giants, folds = nc, nc, ng, 0
    else:
        cp, cr = Counter(P for _, P in L.chunks), Counter(R for _, R in L.groups)
        D = sum(m * n * _width(L.K, R, P) for R, m in cr.items() for P, n in cp.items())
        babies = sum(n * min(L.b1, P) for P, n in cp.items())
        giants = sum(m * max(-(-_width(L.K, R, P) // L.b1) for P in cp) for R, m in cr.items())
        folds = sum(m * (L.K // R).bit_length() - m for R, m in cr.items() if L.K % R == 0)
    rot = B * (babies - nc + giants - ng + folds)
    ms = (T_ENCODE * D + T_PRODUCT * B * D + T_ROTATE * rot + T_ENCRYPT * B * (ng + nc) + T_DECRYPT * B * ng)
    return ms, B * (min(babies, giants) + nc + 2)


def plan(n_in: int, n_out: int, rows: int, diag: bool = False) -> Layout:
    """The cheapest layout (by the cost model) for ``rows`` rows through an n_out × n_in weight.

    Deterministic: U and M call it with the same public numbers and get the same layout.
    """
    if min(n_in, n_out, rows) < 1 or (diag and n_in != n_out):
        raise ValueError(f"bad product shape: {rows} rows, {n_in} → {n_out}{' (diagonal)' if diag else ''}")
    best: tuple[float, Layout] | None = None
    K = SLOTS
    while K >= 8 and (K >= min(n_in, n_out) // 8 or K == SLOTS):
        chunks = _starts(_pow2_split(n_in, K))
        variants = [chunks] if diag else [_starts([K] * (n_out // K) + ([n_out % K] if n_out % K else [])),
                                          _starts(_pow2_split(n_out, K))]
        for groups in dict.fromkeys(variants):
            b1 = 1
            while b1 <= (1 if diag else K):
                L = Layout(rows, n_in, n_out, K, b1, chunks, groups, diag)
                ms, resident = _cost(L)
                if resident <= RESIDENT_CTS and (best is None or ms < best[0]):
                    best = (ms, L)
                b1 *= 2
        K //= 2
    if best is None:
        raise ValueError(f"no layout keeps {rows} rows of a {n_out}×{n_in} product within "
                         f"{RESIDENT_CTS} ciphertexts; split the batch")
    return best[1]


def pack(X: np.ndarray, L: Layout) -> np.ndarray:
    """U's rows (rows × n_in) as slot vectors: (cts, chunks, SLOTS) complex."""
    gc, K = L.gc, L.K
    Xp = np.zeros((L.cts * 2 * gc, L.n_in))
    Xp[:L.rows] = X
    Z = Xp.reshape(L.cts, 2, gc, L.n_in)
    Zc = Z[:, 0] + 1j * Z[:, 1]                       # (cts, gc, n_in): row pairs in complex slots
    out = np.empty((L.cts, len(L.chunks), SLOTS), dtype=np.complex128)
    for i, (s, P) in enumerate(L.chunks):
        block = np.tile(Zc[:, :, s:s + P], (1, 1, K // P))   # (cts, gc, K): the chunk repeated
        out[:, i] = block.transpose(0, 2, 1).reshape(L.cts, SLOTS)
    return out


def unpack(V: np.ndarray, L: Layout) -> np.ndarray:
    """Output slot vectors (cts, groups, SLOTS) back to rows (rows × n_out), from each group's first copy."""
    gc, K = L.gc, L.K
    Y = np.zeros((L.cts, gc, L.n_out), dtype=np.complex128)
    for i, (s, R) in enumerate(L.groups):
        Y[:, :, s:s + R] = V[:, i].reshape(L.cts, K, gc).transpose(0, 2, 1)[:, :, :R]
    return np.stack([Y.real, Y.imag], axis=1).reshape(L.cts * 2 * gc, L.n_out)[:L.rows]


def pack_out(Y: np.ndarray, L: Layout) -> np.ndarray:
    """Rows (rows × n_out) as output slot vectors (cts, groups, SLOTS): every copy of a group, zero padding."""
    gc, K = L.gc, L.K
    Yp = np.zeros((L.cts * 2 * gc, L.n_out))
    Yp[:L.rows] = Y
    Z = Yp.reshape(L.cts, 2, gc, L.n_out)
    Zc = Z[:, 0] + 1j * Z[:, 1]
    out = np.zeros((L.cts, len(L.groups), K, gc), dtype=np.complex128)
    for i, (s, R) in enumerate(L.groups):
        block = Zc[:, :, s:s + R].transpose(0, 2, 1)
        out[:, i] = np.tile(block, (1, L.copies(i), 1)) if L.copies(i) > 1 else np.pad(block, ((0, 0), (0, K - R),
                                                                                              (0, 0)))
    return out.reshape(L.cts, len(L.groups), SLOTS)


def _diagonals(W: np.ndarray, L: Layout, o: int, c: int, g: int) -> np.ndarray:
    """The pre-rotated diagonals d'_{g,b} (b < b1) of group o and chunk c: one row of K values per b.

    d_k[h] = W[row h mod R, chunk column (h + k) mod P] on the copies of the group's rows
    that the chunk uses (R < P: the first P/R copies, each a window; else the first),
    zero elsewhere; d'_{g,b}[h] = d_{g·b1+b}[h − g·b1]; offsets past the width are zero.
    """
    K, b1 = L.K, L.b1
    rs, R = L.groups[o]
    cs, P = L.chunks[c]
    h = np.arange(K)
    hp = (h - g * b1) % K                                   # the slot before the giant rotation
    if L.copies(o) > 1:
        r, j = hp % R, hp // R
        active = j < max(1, P // R)
    else:
        r = np.minimum(hp, R - 1)
        active = hp < R
    bs = np.arange(1 if L.diag else b1)
    if L.diag:
        vals = np.where(active, W[rs + r], 0.0)[None, :]
    else:
        cols = cs + (h[None, :] + bs[:, None]) % P           # (b1, K)
        vals = W[rs + r[None, :], cols] * active[None, :]
    return vals * (g * b1 + bs < L.width(o, c))[:, None]


# ------------------------------------------------------------------------------- HE state
@dataclass(slots=True, weakref_slot=True)
class _Ckks:
    """A party's CKKS state: U's holds the secret key, M's the public and Galois keys."""

    he: Pyfhel
    q: np.ndarray        # the ciphertext primes q₀, q₁ (uint64)
    ct_bytes: int        # serialized size of a fresh ciphertext: the bound on anything received
    keys: str = ""       # M: a file with U's public keys, for the worker processes (removed with the state)


def _context() -> Pyfhel:
    he = Pyfhel()
    with warnings.catch_warnings():  # Pyfhel warns that the primes do not suit a rescaling scale: we never rescale
        warnings.simplefilter("ignore")
        status = he.contextGen(scheme="ckks", n=RING, scale=2.0 ** 60, qi_sizes=list(PRIME_BITS), sec=128)
    if "success" not in status:
        raise ValueError(f"CKKS parameters rejected: {status}")
    return he


def _state(he: Pyfhel, q: np.ndarray) -> _Ckks:
    size = len(he.encryptComplex(np.zeros(SLOTS, dtype=np.complex128), scale=2.0 ** X_BITS).to_bytes("none"))
    return _Ckks(he, q, size)


def _user_keys() -> tuple[_Ckks, dict]:
    he = _context()
    q = np.array(he.get_qi()[:LEVELS], dtype=np.uint64)
    he.keyGen()
    he.rotateKeyGen(list(ROTATIONS))
    msg = {"context": he.to_bytes_context("none"), "public_key": he.to_bytes_public_key("none"),
           "rotation_keys": he.to_bytes_rotate_key("none")}
    keep = Pyfhel()  # U keeps what it needs to encrypt and decrypt, not the 9.5 MB of Galois keys
    keep.from_bytes_context(msg["context"])
    keep.from_bytes_public_key(msg["public_key"])
    keep.from_bytes_secret_key(he.to_bytes_secret_key("none"))
    return _state(keep, q), msg


def _model_keys(msg: object) -> _Ckks:
    if not (isinstance(msg, dict) and all(isinstance(msg.get(k), bytes)
                                          for k in ("context", "public_key", "rotation_keys"))):
        raise ProtocolError("setup_ckks: expected {'context', 'public_key', 'rotation_keys'} as bytes from the user")
    he = _context()  # M's own context: U's must be byte-for-byte the same parameters
    if msg["context"] != he.to_bytes_context("none"):
        raise ProtocolError(f"setup_ckks: the user's CKKS context differs from N = {RING}, primes of "
                            f"{'+'.join(map(str, PRIME_BITS))} bits at 128-bit security")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            he.from_bytes_public_key(msg["public_key"])
            he.from_bytes_rotate_key(msg["rotation_keys"])
    except Exception as e:  # Pyfhel raises RuntimeError, MemoryError, ValueError on bad bytes
        raise ProtocolError(f"setup_ckks: bad keys from the user ({type(e).__name__}: {e})") from e
    return _state(he, np.array(he.get_qi()[:LEVELS], dtype=np.uint64))


def _model_state(msg: object) -> _Ckks:
    """M's state, plus U's keys in a private temporary file when products run in worker processes."""
    st = _model_keys(msg)
    if _workers() > 1:
        assert isinstance(msg, dict)
        fd, path = tempfile.mkstemp(prefix="permllm-ckks-")
        with os.fdopen(fd, "wb") as f:
            for k in ("public_key", "rotation_keys"):
                f.write(len(msg[k]).to_bytes(8, "little") + msg[k])
        st.keys = path
        weakref.finalize(st, _remove, path)
    return st


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _ckks(p: Party) -> _Ckks:
    st = p.store.get(CKKS_KEY)
    if st is None:
        raise ProtocolError(f"{p.role.value}: no CKKS context; run setup_ckks in the setup phase first")
    return st


def _he_work(ops: int) -> int:
    """A multiply-add count that sends HE work to a worker thread (see Party.compute)."""
    return ops * RING * 64


async def setup_ckks(p: Party) -> None:
    """Setup: U makes a CKKS key pair and Galois keys and sends M the context and public keys.

    Learns: M gets U's public and Galois keys and the public parameters (module docstring);
    H takes no part. The state goes to ``p.store[CKKS_KEY]``.
    """
    if p.phase != "setup":
        raise ProtocolError(f"setup_ckks runs in the setup phase, not {p.phase!r}")
    if p.is_user:
        st, msg = await p.compute(_user_keys, work=_he_work(64))
        p.send(Role.MODEL, ("ckks", "setup", "keys"), msg)
        p.store[CKKS_KEY] = st
    elif p.is_model:
        msg = await p.recv(Role.USER, ("ckks", "setup", "keys"))
        p.store[CKKS_KEY] = await p.compute(_model_state, msg, work=_he_work(16))


# ------------------------------------------------------------------ SEAL's serialized data
def _tail(b: bytes, words: int) -> np.ndarray:
    """The last ``words`` uint64 of a serialized SEAL object (its polynomial data, in NTT form)."""
    return np.frombuffer(b, dtype=np.uint64, count=words, offset=len(b) - 8 * words)


def _load(st: _Ckks, b: object, who: str) -> PyCtxt:
    if not isinstance(b, bytes) or not 0 < len(b) <= st.ct_bytes:
        raise ProtocolError(f"HE product: a ciphertext from {who} must be at most {st.ct_bytes} bytes")
    try:
        ct = PyCtxt(pyfhel=st.he, bytestring=b, scheme="ckks")
        if ct.size() != 2 or ct.mod_level != 0:
            raise ValueError(f"ciphertext of size {ct.size()} at level {ct.mod_level}, expected 2 at level 0")
    except Exception as e:  # Pyfhel raises RuntimeError, MemoryError, ValueError on bad input
        raise ProtocolError(f"HE product: invalid ciphertext from {who} ({type(e).__name__}: {e})") from e
    return ct


# ------------------------------------------------------------------------- the two sides
def user_encrypt(st: _Ckks, X: np.ndarray, L: Layout, x_bits: int, cts: range | None = None) -> list[bytes]:
    """U: encrypt its rows laid out by ``L`` at scale 2^x_bits, for the ciphertext slices ``cts``
    (default all); ciphertexts in (ct, chunk) order."""
    cts = range(L.cts) if cts is None else cts
    rows = 2 * L.gc
    sub = X[cts.start * rows:cts.stop * rows]
    V = pack(sub, Layout(len(sub), L.n_in, L.n_out, L.K, L.b1, L.chunks, L.groups, L.diag))
    return [st.he.encryptComplex(V[b, c], scale=2.0 ** x_bits).to_bytes("none")
            for b in range(len(cts)) for c in range(len(L.chunks))]


def user_unmask(st: _Ckks, blobs: object, R: np.ndarray, first: int, expect: int) -> np.ndarray:
    """U: subtract its share from ``expect`` of M's answers under encryption, decrypt them without decoding.

    ``R`` is the share r laid out as outputs (:func:`pack_out`: cts, groups, SLOTS);
    ``blobs`` are the answers ``first``, ``first + 1``, … in (ct, group) order. Returns
    their plaintext polynomials (answers, primes, N) uint64 in NTT form: uniform modulo q
    to U (M's mask u), Δ·(x_U·W − r) + e to M once it removes u.
    """
    if not (isinstance(blobs, list) and len(blobs) == expect):
        raise ProtocolError(f"HE product: expected {expect} ciphertexts from the model party")
    ng = R.shape[1]
    out = np.empty((len(blobs), LEVELS, RING), dtype=np.uint64)
    for i, b in enumerate(blobs):
        ct = _load(st, b, "the model party")
        k = first + i
        st.he.sub_plain(ct, st.he.encodeComplex(R[k // ng, k % ng], scale=ct.scale))
        out[i] = _tail(st.he.decryptPtxt(ct).to_bytes("none"), LEVELS * RING).reshape(LEVELS, RING)
    return out


def scales(ratio: float, mag_in: float, w_scale: float, n_in: int, mag_out: float, diag: bool) -> tuple[int, int]:
    """(log2 of U's input scale, log2 of M's weight scale) for one op, from public numbers only.

    Their sum is as large as |x_U·W − r|·2^sum < 2^CAPACITY_BITS allows: x_U is uniform of
    width R·mag_in per entry and ‖W_j‖₂ ≤ max|W|·√n_in, so by Hoeffding |x_U·W_j| exceeds
    5·R·mag_in·max|W|·√n_in with probability below 1e-21, and |r| ≤ R·mag_out/2. The split
    balances the two errors: the weights' encoding error times |x_U| (∝ R·mag_in) against
    U's encryption and rotation noise times |W| (measured ~2^10 apart per unit).
    """
    y = ratio * mag_in * w_scale * (0.5 if diag else 5.0 * math.sqrt(n_in))
    total = int(math.floor(CAPACITY_BITS - math.log2(y + ratio * mag_out / 2 + 1.0)))
    skew = int(round(math.log2(max(mag_in, 1e-30) / max(w_scale, 1e-30))))
    x_bits = min(X_BITS, max(MIN_BITS, (total - skew) // 2))
    w_bits = min(W_BITS, total - x_bits)
    if w_bits < MIN_BITS:
        raise ValueError(f"HE product: values up to {y:.3g} leave {total} bits of scale: too few for the precision")
    return x_bits, w_bits


def model_product(st: _Ckks, W: np.ndarray, L: Layout, blobs: object, x_bits: int, w_bits: int,
                  seed: int) -> tuple[list[bytes], np.ndarray]:
    """M: Enc(x_U·Wᵀ), re-randomised and masked by u uniform modulo q, for U's ciphertexts.

    ``W`` is n_out × n_in (a vector for a diagonal layout); ``seed`` is M's private
    randomness for u. Returns the ciphertexts in (ct, group) order and u (ct·group, primes, N).
    """
    he, nc, ng, B = st.he, len(L.chunks), len(L.groups), L.cts
    if not (isinstance(blobs, list) and len(blobs) == B * nc):
        raise ProtocolError(f"HE product: expected {B * nc} ciphertexts from the user")
    cts = [[_load(st, blobs[b * nc + c], "the user") for c in range(nc)] for b in range(B)]
    if any(ct.scale != 2.0 ** x_bits for row in cts for ct in row):
        raise ProtocolError(f"HE product: the user's ciphertexts must have scale 2^{x_bits}")
    scale, gc = 2.0 ** w_bits, L.gc

    def plain(o: int, c: int, g: int) -> list[Any]:
        return [he.encodeFrac(np.repeat(v, gc), scale=scale) if v.any() else None for v in _diagonals(W, L, o, c, g)]

    def babies(ct: PyCtxt, c: int) -> list[PyCtxt]:
        """Rotations by b·gc, b < baby(c): each from an earlier one by its highest power of two."""
        out = [ct]
        for b in range(1, L.baby(c)):
            top = 1 << (b.bit_length() - 1)
            out.append(he.rotate(out[b - top], top * gc, True))
        return out

    def horner(parts: list[PyCtxt | None], o: int) -> PyCtxt:
        """Σ_g rot^g(parts[g]), one rotation by b1·gc per giant step; then every copy of the
        group's rows gets the sum of all copies (log₂ copies rotations)."""
        acc: PyCtxt | None = None
        for part in reversed(parts):
            if acc is not None:
                he.rotate(acc, L.b1 * gc)
            if part is not None:
                acc = part if acc is None else he.add(acc, part)
        if acc is None:
            raise ProtocolError("HE product: an output group has no weights")  # unreachable for a valid layout
        step = L.groups[o][1]
        while step < L.K and L.copies(o) > 1:
            he.add(acc, he.rotate(acc, step * gc, True))
            step *= 2
        return acc

    def mac(acc: PyCtxt | None, z: PyCtxt, pt: Any) -> PyCtxt:
        t = he.multiply_plain(z, pt, True)
        return t if acc is None else he.add(acc, t)

    out: list[list[PyCtxt]] = [[] for _ in range(B)]
    if sum(L.giant(o) for o in range(ng)) < sum(L.baby(c) for c in range(nc)):
        # many chunks, few groups (the embedding): accumulate per (ct, group, giant step), one chunk at a time
        acc: list[list[list[PyCtxt | None]]] = [[[None] * L.giant(o) for o in range(ng)] for _ in range(B)]
        for c in range(nc):
            zs = [babies(cts[b][c], c) for b in range(B)]
            for o in range(ng):
                for g in range(-(-L.width(o, c) // L.b1)):
                    for j, pt in enumerate(plain(o, c, g)):
                        if pt is not None:
                            for b in range(B):
                                acc[b][o][g] = mac(acc[b][o][g], zs[b][j], pt)
            del zs
        for b in range(B):
            out[b] = [horner(acc[b][o], o) for o in range(ng)]
    else:  # few chunks, many groups (the LM head): keep the baby steps, finish one group at a time
        zs = [[babies(cts[b][c], c) for c in range(nc)] for b in range(B)]
        for o in range(ng):
            parts: list[list[PyCtxt | None]] = [[None] * L.giant(o) for _ in range(B)]
            for g in range(L.giant(o)):
                for c in range(nc):
                    if g * L.b1 < L.width(o, c):
                        for j, pt in enumerate(plain(o, c, g)):
                            if pt is not None:
                                for b in range(B):
                                    parts[b][g] = mac(parts[b][g], zs[b][c][j], pt)
            for b in range(B):
                out[b].append(horner(parts[b], o))
    rng = np.random.default_rng(seed)
    q = st.q.astype(np.uint64)
    masks = np.empty((B * ng, LEVELS, RING), dtype=np.uint64)
    blobs_out = []
    zero = np.zeros(SLOTS, dtype=np.complex128)
    for b in range(B):
        for o in range(ng):
            ct = out[b][o]
            he.add(ct, he.encryptComplex(zero, scale=ct.scale))   # fresh randomness in both components
            raw = bytearray(ct.to_bytes("none"))
            c0 = np.frombuffer(raw, dtype=np.uint64, count=2 * LEVELS * RING,
                               offset=len(raw) - 16 * LEVELS * RING)[:LEVELS * RING].reshape(LEVELS, RING)
            u = rng.integers(0, q[:, None], size=(LEVELS, RING), dtype=np.uint64)
            c0[:] = (c0 + u) % q[:, None]                        # < 2^61: no overflow
            masks[b * ng + o] = u
            blobs_out.append(bytes(raw))
    return blobs_out, masks


def model_unmask(st: _Ckks, V: np.ndarray, masks: np.ndarray, L: Layout, scale: float) -> np.ndarray:
    """M: remove u from U's polynomials (answers, primes, N) and decode them: x_U·W − r, rows × n_out."""
    q = st.q[None, :, None]
    if np.any(V >= q):
        raise ProtocolError("HE product: a coefficient from the user is not reduced modulo its prime")
    D = (V + (q - masks)) % q
    template = st.he.encodeComplex(np.zeros(SLOTS, dtype=np.complex128), scale=scale).to_bytes("none")
    head = template[:len(template) - 8 * LEVELS * RING]
    ng = len(L.groups)
    slots = np.empty((L.cts, ng, SLOTS), dtype=np.complex128)
    for i in range(len(D)):
        pt = PyPtxt(pyfhel=st.he, bytestring=head + D[i].tobytes())
        slots[i // ng, i % ng] = st.he.decodeComplex(pt)
    return unpack(slots, L)


# ------------------------------------------------------------------------- worker processes
class _Worker:
    """A process computing M's products: pickled (arguments) in through its stdin, (ok, result) out of its stdout.

    Started as ``python -c`` rather than by multiprocessing, which would re-run the caller's
    main script in every child (a script without a ``__main__`` guard would start again).
    """

    def __init__(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-c", "from permllm.protocols.he_matmul import _serve; _serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def call(self, *args: Any) -> Any:
        """Run :func:`_worker_product` there (blocking: call it from a thread)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        _write(self.proc.stdin, args)
        ok, value = _read(self.proc.stdout)
        if not ok:
            raise value
        return value


def _write(f: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=5)
    f.write(len(data).to_bytes(8, "little"))
    f.write(data)
    f.flush()


def _read(f: Any) -> Any:
    head = f.read(8)
    if len(head) < 8:
        raise EOFError("the worker process ended")
    return pickle.loads(f.read(int.from_bytes(head, "little")))


def _serve() -> None:
    """A worker process's loop (see :class:`_Worker`)."""
    pipe_in, pipe_out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    while True:
        try:
            args = _read(pipe_in)
        except EOFError:
            return
        try:
            answer = (True, _worker_product(*args))
        except Exception as e:  # the caller raises it
            answer = (False, e)
        _write(pipe_out, answer)


_IDLE: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
_STARTED: list[_Worker] = []
_WORKER_STATES: OrderedDict[str, _Ckks] = OrderedDict()  # in a worker: the sessions' keys it has loaded


def _workers() -> int:
    """M's worker processes for the products: PERMLLM_HE_WORKERS, else one per CPU (≤ 1: none)."""
    try:
        return int(os.environ.get(WORKERS_ENV, os.cpu_count() or 1))
    except ValueError:
        raise ValueError(f"{WORKERS_ENV} must be an integer") from None


def _run_in_worker(*args: Any) -> Any:
    """Blocking: an idle worker (started on first need, up to :func:`_workers`) runs one product."""
    try:
        w = _IDLE.get_nowait()
    except queue.Empty:
        w = _Worker()
        _STARTED.append(w)
    try:
        out = w.call(*args)
    except (EOFError, OSError) as e:
        w.proc.kill()
        _STARTED.remove(w)
        raise RuntimeError(f"an HE worker process failed ({type(e).__name__}: {e})") from e
    _IDLE.put(w)
    return out


@atexit.register
def _stop_workers() -> None:
    for w in _STARTED:
        with contextlib.suppress(OSError):
            w.proc.kill()


def _worker_product(keys: str, W: np.ndarray, L: Layout, blobs: list[bytes], x_bits: int, w_bits: int,
                    seed: int) -> tuple[list[bytes], np.ndarray]:
    """In a worker process: :func:`model_product` with the keys of the session whose file is ``keys``."""
    st = _WORKER_STATES.get(keys)
    if st is None:
        he = _context()
        with open(keys, "rb") as f:
            data = f.read()
        n = int.from_bytes(data[:8], "little")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            he.from_bytes_public_key(data[8:8 + n])
            he.from_bytes_rotate_key(data[16 + n:])
        st = _WORKER_STATES[keys] = _state(he, np.array(he.get_qi()[:LEVELS], dtype=np.uint64))
        while len(_WORKER_STATES) > 4:
            _WORKER_STATES.popitem(last=False)
    return model_product(st, W, L, blobs, x_bits, w_bits, seed)


# ------------------------------------------------------------------------------ batches
@dataclass(slots=True)
class _Op:
    """One linear op of a batch: its public description and, at U, its rows so far."""

    weight: str
    n_in: int
    n_out: int
    diag: bool
    ratio: float
    mag_in: float
    w_scale: float
    mag_out: Any
    tokens: list[int] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)     # U: x_U per token


class _Batch:
    """The HE products of one batch of offline steps at one party (U or M)."""

    __slots__ = ("tokens", "last", "ops", "tasks", "window", "busy")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)
        self.last = self.tokens[-1]
        self.ops: dict[str, _Op] = {}
        self.tasks: list[asyncio.Task] = []
        self.window = asyncio.Semaphore(IN_FLIGHT)    # U: ops in flight
        self.busy: asyncio.Semaphore | None = None    # M: products at once


def open_batch(p: Party, tokens: list[int]) -> None:
    """Start a batch: the offline steps of ``tokens`` (increasing) run next at U and M."""
    if not tokens or any(b <= a for a, b in zip(tokens, tokens[1:])):
        raise ValueError(f"a batch needs increasing tokens, got {tokens}")
    if p.store.get(BATCH_KEY) is not None:
        raise ProtocolError(f"{p.role.value}: an HE batch is already open")
    p.store[BATCH_KEY] = _Batch(tokens)


async def close_batch(p: Party) -> None:
    """Wait until every product of the open batch is done (M then holds all its correlations)."""
    batch: _Batch | None = p.store.get(BATCH_KEY)
    if batch is None:
        raise ProtocolError(f"{p.role.value}: no HE batch is open")
    missing = [name for name, op in batch.ops.items() if op.tokens[-1] != batch.last]
    if missing:
        raise ProtocolError(f"HE batch: ops {missing[:3]} did not run at every step of the batch")
    await asyncio.gather(*batch.tasks)
    p.store.pop(BATCH_KEY, None)
    _release_free_memory()


def _release_free_memory() -> None:
    """Give free heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A batch's ciphertexts are made and freed in worker threads, whose malloc arenas would
    keep their pages: the light user's next allocations (its planned masks, in the event
    loop's thread) would then come on top of them in its peak memory.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def abort_batch(p: Party) -> None:
    """Drop the open batch, if any, cancelling its products (after a failure or a cancellation)."""
    batch: _Batch | None = p.store.pop(BATCH_KEY, None)
    if batch is not None:
        for t in batch.tasks:
            t.cancel()


def _batch(p: Party) -> _Batch:
    batch = p.store.get(BATCH_KEY)
    if batch is None or p.token not in batch.tokens:
        raise ProtocolError(f"{p.role.value}: offline step for token {p.token} outside an open HE batch")
    return batch


def _tag(name: str, batch: _Batch, part: str) -> tuple:
    return ("he", name, batch.tokens[0], part)


async def offline_product(p: Party, name: str, x: np.ndarray | None, W: np.ndarray | None, *, weight: str,
                          shape: tuple[int, int], diag: bool, ratio_mag_in: tuple[float, float],
                          w_scale: float, mag_out: Any) -> None:
    """The offline branch of a light-mode linear at U (``x`` = x_U) and M (``W``); H does not call it.

    ``shape`` is (n_out, n_in); ``ratio_mag_in`` = (R, mag_in), ``w_scale`` = max|W| and
    ``mag_out`` bound the values (public). Rows accumulate per op until the batch's last
    step meets the op; then U encrypts them all and M answers: one exchange per op and batch.
    """
    batch = _batch(p)
    n_out, n_in = shape
    op = batch.ops.get(name)
    if op is None:
        op = batch.ops[name] = _Op(weight, n_in, n_out, diag, *ratio_mag_in, w_scale, mag_out)
    elif (op.weight, op.n_in, op.n_out, op.diag) != (weight, n_in, n_out, diag):
        raise ProtocolError(f"HE batch: op {name!r} changed its weight between steps")
    if op.tokens and op.tokens[-1] >= p.token:
        raise ProtocolError(f"HE batch: op {name!r} ran twice for token {p.token} or out of order")
    op.tokens.append(p.token)
    if p.is_user:
        assert x is not None
        op.rows.append(x)
    if p.token != batch.last:
        return
    if p.is_user:
        await batch.window.acquire()  # flow control: U's offline steps wait here while M is busy
        batch.tasks.append(asyncio.create_task(_user_op(p, batch, name, op)))
    else:
        assert W is not None
        batch.tasks.append(asyncio.create_task(_model_op(p, batch, name, op, W)))


def user_share(p: Party, name: str, rows: int, n_out: int, mag_out: Any) -> np.ndarray:
    """U's output share r of a light-mode linear, from s_UH: drawn offline (and planned), again online."""
    shape, width = (rows, n_out), p.ratio * mag_out
    if p.phase == "offline":
        p.plan_mask("uh", name, "r", shape, mag_out)
        return p.mask("uh", name, "r", shape, width)
    return p.mask_again("uh", name, "r", shape, width)


def _parts(n: int) -> list[range]:
    """Ciphertext indices 0..n−1 in messages of at most PART_CTS."""
    return [range(i, min(i + PART_CTS, n)) for i in range(0, n, PART_CTS)]


async def _user_op(p: Party, batch: _Batch, name: str, op: _Op) -> None:
    """U: send Enc(x_U) of every row of the batch; answer with the polynomials unmasked by r.

    Messages carry at most PART_CTS ciphertexts (4 MB) and U waits for each to leave, so
    it holds one part of an op at a time, whatever the batch's size.
    """
    try:
        st = _ckks(p)
        sizes = [len(x) for x in op.rows]
        X = np.concatenate(op.rows) if len(op.rows) > 1 else op.rows[0]
        op.rows = []
        L = plan(op.n_in, op.n_out, len(X), op.diag)
        x_bits, _ = _scales(op)
        nc, ng = len(L.chunks), len(L.groups)
        slices = [range(i, min(i + max(1, PART_CTS // nc), L.cts)) for i in range(0, L.cts, max(1, PART_CTS // nc))]
        p.send(Role.MODEL, _tag(name, batch, "x"), {"rows": [[t, n] for t, n in zip(op.tokens, sizes)],
                                                    "parts": len(slices)})
        for i, cts in enumerate(slices):
            blobs = await p.compute(user_encrypt, st, X, L, x_bits, cts, work=_he_work(len(cts) * nc))
            p.send(Role.MODEL, _tag(name, batch, f"x{i}"), blobs)
            del blobs
            await p.channels[Role.MODEL].flush()
        del X
        R = pack_out(np.concatenate([user_share(p.view("offline", t), name, n, op.n_out, op.mag_out)
                                     for t, n in zip(op.tokens, sizes)]), L)
        for i, part in enumerate(_parts(L.cts * ng)):
            answer = await p.recv(Role.MODEL, _tag(name, batch, f"y{i}"))
            V = await p.compute(user_unmask, st, answer, R, part.start, len(part), work=_he_work(len(part)))
            del answer
            p.send(Role.MODEL, _tag(name, batch, f"z{i}"), V)
            del V
            await p.channels[Role.MODEL].flush()
    finally:
        batch.window.release()


def _scales(op: _Op) -> tuple[int, int]:
    return scales(op.ratio, op.mag_in, op.w_scale, op.n_in, float(np.max(op.mag_out)), op.diag)


async def _model_op(p: Party, batch: _Batch, name: str, op: _Op, W: np.ndarray) -> None:
    """M: answer U's ciphertexts of one op, then keep x_U·W − r per token."""
    head = await p.recv(Role.USER, _tag(name, batch, "x"))
    if not (isinstance(head, dict) and isinstance(head.get("rows"), list) and isinstance(head.get("parts"), int)):
        raise ProtocolError(f"HE product {name!r}: malformed message from the user")
    try:
        rows = [(int(t), int(n)) for t, n in head["rows"]]
    except (TypeError, ValueError):
        raise ProtocolError(f"HE product {name!r}: malformed row counts from the user") from None
    if [t for t, _ in rows] != op.tokens or any(n < 1 for _, n in rows):
        raise ProtocolError(f"HE product {name!r}: the user's rows are for tokens {[t for t, _ in rows]}, "
                            f"expected {op.tokens}")
    L = plan(op.n_in, op.n_out, sum(n for _, n in rows), op.diag)
    if not 1 <= head["parts"] <= L.cts:
        raise ProtocolError(f"HE product {name!r}: {head['parts']} parts for {L.cts} ciphertext slices")
    cts: list[Any] = []
    for i in range(head["parts"]):
        part = await p.recv(Role.USER, _tag(name, batch, f"x{i}"))
        if not isinstance(part, list):
            raise ProtocolError(f"HE product {name!r}: part {i} from the user is not a list of ciphertexts")
        cts += part
    x_bits, w_bits = _scales(op)
    st = _ckks(p)
    if batch.busy is None:
        batch.busy = asyncio.Semaphore(min(_workers(), IN_FLIGHT) if st.keys else 1)
    async with batch.busy:  # as many products at once as worker processes (one without: the GIL)
        if st.keys:
            blobs, masks = await asyncio.to_thread(_run_in_worker, st.keys, W, L, cts, x_bits, w_bits,
                                                   secrets.randbits(128))
        else:
            blobs, masks = await p.compute(model_product, st, W, L, cts, x_bits, w_bits,
                                           secrets.randbits(128), work=_he_work(L.cts * len(L.groups)))
    del cts
    parts = _parts(len(blobs))
    for i, part in enumerate(parts):
        p.send(Role.USER, _tag(name, batch, f"y{i}"), blobs[part.start:part.stop])
    del blobs
    V = np.empty_like(masks)
    for i, part in enumerate(parts):
        z = await p.recv(Role.USER, _tag(name, batch, f"z{i}"))
        check_array(z, np.dtype(np.uint64), (len(part), LEVELS, RING), f"HE product {name!r}: the user's part {i}")
        V[part.start:part.stop] = z
    corr = await p.compute(model_unmask, st, V, masks, L, 2.0 ** (x_bits + w_bits), work=_he_work(len(masks)))
    i = 0
    for t, n in rows:
        p.view("offline", t).keep(name, corr[i:i + n])
        i += n

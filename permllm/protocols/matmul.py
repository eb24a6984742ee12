"""Shared × shared matmul against a growing cache (q·Kᵀ and P·V in attention).

[C] = [A]·[B]ᵀ (``transpose_b``) or [A]·[B], where B is a cache that grows by
appending the new rows' shares each token (the KV cache); only the new rows are
opened, once. With α, β from s_MH (H knows them) and U's shares H-derivable:

* offline: H sends c = α·B_Uᵀ + A_U·βᵀ + ρ to M (ρ from s_UH).
* online hop 1, M → U: A_M − α and the new rows B_M,new − β_new (U appends them to
  its copy of the opened cache B_M − β).
* U's share C_U = (A_M − α)·B_Uᵀ + A_U·(B_M − β + B_U)ᵀ − ρ, which H cannot derive, so
* online hop 2, U → M: C_U − r; M's share becomes A_M·B_Mᵀ + c + C_U − r = C − r and
  U's is r (H-derivable again).

**Only the causal half travels.** With the rows' ``valid`` prefixes (a prefill's causal scores),
the score-sized messages carry the entries inside them only (``prefix.pack``): for q·Kᵀ, c and
C_U − r (the output's entries past a prefix are never used: the softmax reveals the prefixes
only); for P·V, where A = P is 0 past each prefix at both parties (the softmax's output), A_M − α
with α 0 there as well (M and H draw α and zero it alike), so U puts zeros in its place.

Learns: U sees A_M and B_M hidden by α, β; M receives c and C_U − r, hidden by ρ and r. On
the ring (every mask uniform on Z_2^64) each of these is uniform whatever the secret: perfect
hiding. On real numbers α, β have width R·mag, ρ width R·|secret-dependent part| =
R²·mag_a·mag_b·√k and r width R·mag_out. H learns nothing.
"""
from __future__ import annotations

import math

import numpy as np

from . import crt, prefix, ring
from .config import RING_BITS
from .party import Party, ProtocolError, Role

__all__ = ["matmul_shared"]


def _mm(a: np.ndarray, b: np.ndarray, transpose_b: bool, q: int = 0) -> np.ndarray:
    if q:  # a residue view: exact mod q
        return crt.matmul(a, b, q, transpose_b)
    if a.dtype == np.uint64:  # ring words: exact mod 2^64
        return ring.matmul(a, b, RING_BITS, transpose_b)
    return a @ np.swapaxes(b, -1, -2) if transpose_b else a @ b


def _append(caches: dict, key: str, rows: np.ndarray) -> np.ndarray:
    old = caches.get(key)
    new = rows if old is None else np.concatenate([old, rows], axis=-2)
    caches[key] = new
    return new


async def matmul_shared(p: Party, name: str, a: np.ndarray | None, b_new: np.ndarray | None, cache: str, *,
                        transpose_b: bool, mag_a: float, mag_b: float, mag_out: float,
                        l2_a: float | None = None, l2_b: float | None = None,
                        valid: np.ndarray | None = None) -> np.ndarray | None:
    """[A]·[B]ᵀ or [A]·[B] with B = cache ``cache`` after appending ``b_new`` rows (axis −2); 2 online hops.

    Offline, U and H pass their (H-derivable) shares of A and of the new rows; M passes None.
    ``mag_*`` bound |entries|; ``l2_a``/``l2_b`` bound the L2 norm of A's rows and of B's
    vectors along the contracted axis (default mag·√k). ``valid``: each of the t rows' causal
    prefix of keys — the output's (q·Kᵀ: its entries past a prefix are left unspecified) or A's
    (P·V: A must be 0 past each prefix at both parties); the messages then carry the prefixes only.
    Leading axes broadcast (grouped-query attention: A (kv, g, t, d), B (kv, 1, s, d)).
    """
    R = p.ratio
    if p.phase == "offline":
        if p.is_model:
            p.keep(name, await p.recv_array(Role.HELPER, p.tag("smm", name, "c")))
            return None
        assert a is not None and b_new is not None
        bu = _append(p.caches, cache + "/bu", b_new)
        out_shape = np.broadcast_shapes(a.shape[:-2], bu.shape[:-2]) + (
            a.shape[-2], bu.shape[-2] if transpose_b else bu.shape[-1])
        keep = prefix.mask(out_shape if transpose_b else a.shape, valid)
        k = a.shape[-1]
        la = mag_a * math.sqrt(k) if l2_a is None else l2_a
        lb = mag_b * math.sqrt(k) if l2_b is None else l2_b
        # ρ hides α·B_Uᵀ + A_U·βᵀ; its secret-dependent part α·Bᵀ + A·βᵀ has entries of
        # standard deviation R·(mag_a·‖b‖₂ + mag_b·‖a‖₂)/√12 (α, β uniform).
        rho = p.mask("uh", name, "rho", out_shape, R * R * (mag_a * lb + mag_b * la) / math.sqrt(12.0))
        r = p.mask("uh", name, "r", out_shape, R * mag_out)
        if p.is_user:
            p.keep(name, (rho, r, bu.shape[-2]))
            return r
        alpha = p.mask("mh", name, "alpha", a.shape, R * mag_a)
        if not transpose_b:
            alpha = prefix.zero_tail(alpha, keep)
        beta = _append(p.caches, cache + "/beta", p.mask("mh", name, "beta", b_new.shape, R * mag_b))
        q = p.modq
        c = await p.compute(lambda: _mm(alpha, bu, transpose_b, q) + _mm(a, beta, transpose_b, q) + rho,
                            work=2 * a.size * bu.shape[-2])
        p.send(Role.MODEL, p.tag("smm", name, "c"), prefix.pack(c, keep) if transpose_b else c)
        return r
    if p.is_model:
        assert a is not None and b_new is not None
        c = p.take(name)
        alpha = p.mask("mh", name, "alpha", a.shape, R * mag_a)
        beta = p.mask("mh", name, "beta", b_new.shape, R * mag_b)
        keep = None if transpose_b else prefix.mask(a.shape, valid)
        p.send(Role.USER, p.tag("smm", name, "open"), [prefix.pack(a - prefix.zero_tail(alpha, keep), keep),
                                                       b_new - beta])
        bm = _append(p.caches, cache + "/bm", b_new)
        cm = await p.compute(_mm, a, bm, transpose_b, p.modq, work=a.size * bm.shape[-2])
        if transpose_b:
            keep = prefix.mask(cm.shape, valid)
            c = prefix.unpack(c, keep, f"matmul_shared {name!r}: the helper's correlation")
        if cm.shape != c.shape:
            raise ProtocolError(f"matmul_shared {name!r}: product shape {cm.shape} != correlation {c.shape}")
        packed = transpose_b and keep is not None
        d = await p.recv_array(Role.USER, p.tag("smm", name, "u"), (int(keep.sum()),) if packed else c.shape)
        if packed:
            d = prefix.unpack(d, keep, f"matmul_shared {name!r}: the user's share")
        return cm + c + d
    if p.is_user:
        assert a is not None
        rho, r, n_rows = p.take(name)
        opened = await p.recv(Role.MODEL, p.tag("smm", name, "open"), modulus=2**64 if p.ring else p.modq or None)
        if not (isinstance(opened, list) and len(opened) == 2
                and all(isinstance(o, np.ndarray) and o.dtype == p.dtype for o in opened)):
            raise ProtocolError(f"matmul_shared {name!r}: bad opened values from the model party")
        if not transpose_b:
            opened[0] = prefix.unpack(opened[0], prefix.mask(a.shape, valid), f"matmul_shared {name!r}: opened P")
        if opened[0].shape != a.shape:
            raise ProtocolError(f"matmul_shared {name!r}: bad opened values from the model party")
        ob = _append(p.caches, cache + "/opened", opened[1])
        bu = p.caches[cache + "/bu"][..., :n_rows, :]
        if ob.shape != bu.shape:
            raise ProtocolError(f"matmul_shared {name!r}: opened cache {ob.shape} != own cache {bu.shape}")
        q = p.modq
        cu = await p.compute(lambda: _mm(opened[0], bu, transpose_b, q) + _mm(a, ob + bu, transpose_b, q) - rho,
                             work=2 * a.size * n_rows)
        p.send(Role.MODEL, p.tag("smm", name, "u"),
               prefix.pack(cu - r, prefix.mask(cu.shape, valid)) if transpose_b else cu - r)
        return r
    raise ProtocolError(f"matmul_shared {name!r}: the helper has no online branch")

"""The 8-hop attention block of a decode step (docs/design.md §3.7; on the ring docs/ring.md).

One op, :func:`attention_decode`, runs norm → qkv linear → heads/RoPE → q·Kᵀ → softmax
→ P·V for one new token (T = 1) against the growing KV cache, in **4 dependent online
hops**: the norm's round trip and the softmax's round trip. The two shared × shared
products ride inside those messages, and the output leaves M with the attention
output share and U with an H-derivable share (the U-share invariant), so the o
projection after it stays zero-round. With norm2 + activation a decoder layer costs
8 hops instead of 12.

Prefill (T > 1) keeps the 12-hop ops (:func:`~permllm.protocols.matmul.matmul_shared`
and the permuted softmax); the KV caches are the same objects under the same keys
(M: ``/bm`` = K_M, U: ``/bu`` = K_U and ``/opened`` = K_M − β, H: ``/bu`` and
``/beta``), so the routes can follow each other on one cache in any order.

Notation (one query head; GQA broadcasts the key/value head of its group; t keys, the
new one last). x = x_M + x_U (x_U H-derivable); π₁ the norm's permutation of the hidden
axis and π₂ the softmax's permutation of each score row (both from s_MH); masks named
below come from s_MH (M, H), s_UH (U, H) or s_H (H only). K = K_M + K_U, V = V_M + V_U
are the caches (K_U, V_U: U's H-derivable shares from the qkv linear); U holds
O = K_M − β and O_V = V_M − β_V (β, β_V from s_MH: each row opened once, when new).

Offline (H → M unless said): δ₁ = π₁(x_U) − b₁, γ₁ = π₁⁻¹(a₁) − b₁′ (as a norm); the
qkv zero-round linear on U's share h_U = b₁′ (U's output share r: q_U, r_k, r_v); the
**w-linear**, a zero-round linear of q̃_U = q_U·Rᵀ (U's query share through the transpose of
the new position's rotation R, rope(z) = z·R, so q_U·rope(k̂)ᵀ = q̃_U·k̂ᵀ) through W_k (U sends
q̃_U·D_k + t_w, H sends q̃_U·U_Wk − t_w − r_w, r_w from s_H), so M holds
w_M = q̃_U·W_k − r_w; H → U: π₁(r_w), K̃ = π₂(K_U + Γ) and Ṽ = π₂(V_U + Γ_V) (Γ, Γ_V from
s_MH, fresh per token and head, R times wider than K_U, V_U); η, δ₂, γ₂, η′ below.

Online:

1. M → U: m₁ = π₁(x_M) + δ₁. U: y = norm(m₁ + b₁) = π₁(norm(x)).
2. U → M: z = y − a₁ and e = ẽ + τ, one entry per key and query head:
   ẽ_j = q_U·O_jᵀ for cached keys; ẽ_new = π₁(r_w)·zᵀ + q̃_U·D_k·h_Uᵀ (+ q̃_U·D_bkᵀ,
   the masked k bias). H's η = η̃ − τ − ρ with η̃_j = q_U·β_jᵀ and
   η̃_new = r_w·γ₁ᵀ + q̃_U·U_Wk·h_Uᵀ − q̃_U·r_kᵀ (+ q̃_U·U_bkᵀ).
   M: h_M = π₁⁻¹(z) + γ₁; q_M, k_M, v_M by the linear; X = e + η (+ w_M·h_Mᵀ on the new
   key) = q_U·K_Mᵀ − ρ (the new key through k_M = rope(k̂_M), k̂_M = h_M·W_kᵀ + c_k + b_k,
   and q_U·rope(k̂_M)ᵀ = q̃_U·k̂_Mᵀ).
3. M → U: m₂ = π₂(q_M·(K_M − Γ)ᵀ + X) + δ₂ with δ₂ = π₂(q_U·K_Uᵀ + α·(K_U + Γ)ᵀ + ρ) − b₂,
   and q_M − α, k_M,new − β_new, v_M,new − β_V,new (U appends them to O, O_V).
   U: π₂(S) = m₂ + b₂ + (q_M − α)·K̃ᵀ, then P′ = softmax(scale·π₂(S)) in the clear.
4. U → M: z′ = P′ − a₂ and e′ = b₂′·O_V + z′·Ṽ + τ′; H's η′ = b₂′·V_U + b₂′·β_V + γ₂·V_U
   − τ′ − r_o, γ₂ = π₂⁻¹(a₂) − b₂′. M: o_M = π₂⁻¹(z′)·(V_M − Γ_V) + γ₂·V_M + e′ + η′
   = P·V − r_o; U's share is r_o (from s_UH).

**On the ring** (docs/ring.md, *The 8-hop route*) the same algebra runs exactly, every mask uniform
on its ring: the input x on Z_2^64 (M's hop-1 message travels in the bytes its encoding needs),
everything after the norm on the wide ring Z_N (no truncation, so the w-linear's identity
q_U·rope(k̂)ᵀ = q̃_U·k̂ᵀ holds exactly with the integer rotation), one *lane* per residue (mod 2^64
and mod each prime of :mod:`~permllm.protocols.crt`) with its own masks, caches and messages, all
lanes under the same π₁, π₂. U decodes the norm input and the scores (combining the lanes) and
encodes the norm output, the probabilities and the residual stream (re-encoded in hop 2, as the
12-hop norm does) on every lane. Then every message M receives, and every one U receives but the
two reveals, is uniform whatever the secrets (perfect hiding), and Γ, Γ_V need no width.

What each party learns (beyond the public shapes; on real numbers also the calibrated magnitudes):

* **U** learns π₁(norm input) and π₂(scores) (and so the permuted softmax) in the clear:
  exactly the PermLLM leakage of the 12-hop route. Everything else it receives is
  masked (on the ring uniformly, on real numbers at ratio R): q_M − α (α hides q, since U knows q_U), the new rows of K_M, V_M
  once (β), π₁(r_w) (a fresh s_H mask: no information on π₁), K̃ and Ṽ (Γ hides U's own
  K_U, V_U at ratio R, fresh per token and query head, so rows cannot be matched to
  its shares, across tokens or across the heads of a group: π₂ stays hidden).
* **M** receives z (y hidden by a₁), e (hidden by τ), z′ (P′ hidden by a₂), e′ (hidden
  by τ′), and offline the linear messages and δ₁, γ₁, η, δ₂, γ₂, η′ (all uniform on the ring). The
  sums it can form (on real numbers: hidden at ratio R; on the ring each is uniform):
  e + η (+ its own w_M·h_Mᵀ) = q_U·K_Mᵀ − ρ: hidden by ρ, which is R times the
  secret-dependent part q·K_Mᵀ (without ρ, t ≥ head_dim keys give M the equations that
  solve for q_U, i.e. q); adding π₂⁻¹(δ₂) gives q_U·Kᵀ + α·K_Uᵀ + α·Γᵀ − π₂⁻¹(b₂): hidden
  by b₂, R times the secret part; π₂⁻¹(z′) + γ₂ = P − b₂′ (b₂′ hides P); e′ + η′ (+ its
  own terms) = P·V − r_o (r_o hides the output); the w-linear sum w − r_w (r_w hides
  q̃_U·W_k).
* **H** receives no message at all (it only deals).

Why Γ. The cache persists: if U saw π₂(K_U) itself (the reference design's sketch,
docs/design.md §3.7: K_U from a seed only H holds), each row would recur token after
token, so U could match rows across tokens, spot the one new row each time and so learn
every key's position in π₂. Fresh Γ per token and query head prevents it (and hides U's
own K_U, which the 12-hop prefill gives U anyway); re-sharing K between M and H every
token instead would let M average the fresh shares away and learn K.

Precision (real numbers only). U must see the cached keys and values in a fresh order every token without
recognising its own shares K_U, V_U, so Γ and Γ_V are R² wide and the products
(q_M − α)·K̃ᵀ, q_M·Γᵀ, z′·Ṽ and π₂⁻¹(z′)·Γ_V carry R³ magnitudes ("a mask hiding
a permutation of a mask", docs/design.md §10); the new key's constant q̃_U·D_k·h_Uᵀ
multiplies two shares through D and needs an R³ pad as well. The ring has none of this. The cancellation leaves about
2⁻⁵³·R³ of relative error (float64) instead of the 2⁻⁵³·R² of the 12-hop route: see
``bench/attention8_fidelity.py`` (one block) and ``bench/generation.py --routes 12 8``
(SmolLM2 end to end) for measured numbers. Costs beyond the 12-hop route: offline, H → U
sends K̃ and Ṽ (2·heads·t·head_dim values per layer and token: they grow with the
context) and the w-linear adds heads·hidden values U → M, H → M and H → U.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import crt, functions as F, ring
from .config import RING_BITS
from .linear import _helper_uw, linear
from .party import Party, ProtocolError, Role
from .permute import Perm

__all__ = ["AttnSpec", "AttnMags", "AttnEnc", "attention_decode"]

_SD = 1.0 / math.sqrt(12.0)  # standard deviation of a uniform mask of width 1
Split = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class AttnSpec:
    """Public description of one attention block.

    ``split`` maps a (T, qkv_out) array to q (kv, g, T, d), k and v (kv, 1, T, d);
    ``rope(z, q)`` is the public rotation of q and k at the new token's position (identity
    without RoPE; ChatGLM's 2-D rotation works the same) on a lane's arithmetic (``q``: a residue's
    prime, 0 the party's own; on the ring the rotation is encoded in fixed point). Both are linear,
    so each party applies them to its own share. ``mix`` (public) says which columns RoPE combines,
    so that masks can be sized per column.
    """

    heads: int
    kv_heads: int
    head_dim: int
    norm: str            # "rms" | "layer" (affine folded into the qkv weight)
    eps: float
    scale: float         # softmax scale, 1/√head_dim
    split: Split
    rope: Callable[[np.ndarray, int], np.ndarray]
    mix: np.ndarray | None = None   # (d, d) bool: RoPE makes column i from the columns j with mix[j, i]


@dataclass(frozen=True)
class AttnMags:
    """Public calibrated magnitudes that size every mask of the op."""

    x: float                      # |layer input|
    h: float                      # |norm output|
    h_col: float | np.ndarray     # per hidden column (U's share of the norm output)
    h_l2: float                   # L2 of a norm-output row
    qkv_col: float | np.ndarray   # per qkv column (U's share of q, k, v)
    q: float
    q_l2: float                   # L2 of a query row (head_dim)
    k: float
    k_l2: float                   # L2 of a key row
    v: float
    v_l2: float                   # L2 of a value column over the keys
    w: float                      # |q_raw·W_k| (the w-linear's output)
    w_l2: float                   # its row L2 (over hidden)
    att_col: float | np.ndarray   # per head_dim column of the attention output
    q_col: float | np.ndarray = 0.0   # per head_dim column of q, k, v (after RoPE); default: q, k, v
    k_col: float | np.ndarray = 0.0
    v_col: float | np.ndarray = 0.0

    def __post_init__(self) -> None:
        for col, whole in (("q_col", self.q), ("k_col", self.k), ("v_col", self.v)):
            if np.all(np.asarray(getattr(self, col)) == 0):
                object.__setattr__(self, col, whole)


def _gather_rows(pi: Perm, X: np.ndarray) -> np.ndarray:
    """Key rows of X (…, t, d) in the order π gives each score row (…, 1, t): X̃ = π(X)."""
    t, d = X.shape[-2:]
    X2 = np.ascontiguousarray(X).reshape(-1, t, d)
    return np.take_along_axis(X2, pi.idx[:, :, None], axis=1).reshape(X.shape)


def _append(caches: dict, key: str, rows: np.ndarray) -> np.ndarray:
    old = caches.get(key)
    new = rows if old is None else np.concatenate([old, rows], axis=-2)
    caches[key] = new
    return new


def _k_rows(p: Party, weight: str, split: Split, kind: str) -> np.ndarray:
    """This party's copy of the key rows of a weight as (kv, 1, d, in): D_k (U) or U_Wk (H)."""
    w = p.weights.get(weight)
    if w is None:
        raise ProtocolError(f"weight {weight!r} was not set up")
    got = w.extra.get("k8")
    if got is None:
        full = w.value if p.is_user else _helper_uw(p, weight)
        if kind == "bias":
            got = np.swapaxes(split(full[None, :])[1], -1, -2)          # (kv, 1, d, 1)
        else:
            got = np.ascontiguousarray(np.swapaxes(split(full.T)[1], -1, -2))  # (kv, 1, d, n)
        w.extra["k8"] = got
    return got


def _rotated(spec: AttnSpec, c: np.ndarray) -> np.ndarray:
    """Bound per column of rope(r) for |r| ≤ c per column: RoPE mixes columns in pairs (√2 · the larger)."""
    if spec.mix is None:
        return c
    mix = np.asarray(spec.mix, dtype=bool)
    out = np.max(np.where(mix, c[..., :, None], 0.0), axis=-2)
    return out * np.where(mix.sum(0) > 1, math.sqrt(2.0), 1.0)


def _l2(v: np.ndarray) -> float:
    """Largest L2 norm over the last axis (over heads when v has leading axes)."""
    return float(np.max(np.sqrt(np.sum(np.square(v), axis=-1))))


class _W:
    """Every mask width of the op, computed alike by all three parties from public values.

    Each mask is R times the standard deviation (or the bound) of the secret-dependent part
    of what it hides, per column where the column is not permuted (docs/design.md
    §10): per-column widths keep the R³ products small where a few columns are large.
    """

    def __init__(self, p: Party, spec: AttnSpec, m: AttnMags, t: int, n: int, scale_w: float,
                 scale_b: float) -> None:
        R, d = p.ratio, spec.head_dim
        qkv_out = (spec.heads + 2 * spec.kv_heads) * d
        # Widths/R of U's shares of q, k, v (raw, before RoPE) per head and column, and after RoPE.
        qc, kc, vc = spec.split(np.broadcast_to(np.asarray(m.qkv_col, dtype=np.float64), (1, qkv_out)).copy())
        qr, kr = _rotated(spec, qc), _rotated(spec, kc)
        q_col, k_col, v_col = (np.broadcast_to(np.asarray(c, dtype=np.float64), (d,)) for c in (m.q_col, m.k_col,
                                                                                              m.v_col))
        h_col = np.broadcast_to(np.asarray(m.h_col, dtype=np.float64), (n,))
        self.b1, self.a1, self.b1p = R * m.x, R * m.h, R * h_col
        self.tw = R * R * scale_w * m.q_l2 * _SD       # hides q̃_U·D_k (secret part q̃·D_k), as in linear
        self.rw = R * m.w                              # hides q̃·W_k in w_M (uniform: U sees it permuted)
        self.alpha, self.bk, self.bv = R * q_col, R * k_col, R * v_col
        self.gam = R * R * kr                          # (kv, 1, 1, d): hides U's K_U (width R·kr) from U
        self.gamv = R * R * vc                         # (kv, 1, 1, d): hides V_U
        tau_old = R * _l2(q_col * R * (kr + k_col) * _SD)   # q·O_j, O = K_M − β
        tau_new = R * (m.w_l2 * R * m.h * _SD                                      # w·π₁⁻¹(z)
                       + m.q_l2 * R * scale_w * _SD * R * _SD * _l2(h_col)          # q̃·D_k·h_Mᵀ
                       + R * _SD * _l2(qc) * R * scale_w * _SD * m.h_l2             # q̃_M·D_k·hᵀ
                       + m.q_l2 * R * scale_b * _SD)                                # q̃·D_bk
        self.tau = np.array([tau_old] * (t - 1) + [tau_new])
        self.rho = R * _l2(q_col * R * kr * _SD)                                    # q·K_Mᵀ
        self.b2 = R * (_l2(R * (qr + q_col) * _SD * k_col) + _l2(q_col * R * kr * _SD))  # (α − q_M)·Kᵀ + q·K_Mᵀ
        self.a2 = self.b2p = R * 1.0                                                # probabilities ≤ 1
        self.tau2 = R * R * (vc + v_col + m.v_l2) * _SD                             # P·O_V + z′·π₂(V), per column
        self.ro = R * np.asarray(m.att_col)


def _norm(spec: AttnSpec, z: np.ndarray) -> np.ndarray:
    return F.rms_norm(z, spec.eps) if spec.norm == "rms" else F.layer_norm(z, spec.eps)


@dataclass(frozen=True)
class AttnEnc:
    """The op's public ring encodings (docs/ring.md, *The 8-hop route*): U decodes the norm input at ``x``
    (Z_2^64) and the scores at ``s``, and encodes the norm output at ``h``, the probabilities at ``p`` and,
    with ``res``, the residual stream re-encoded in the norm's hop (these on Z_N: the op runs the wide ring)."""

    x: ring.Enc
    h: ring.Enc
    s: ring.Enc
    p: ring.Enc
    res: ring.Enc | None = None


class _Lane:
    """One residue of the op's arithmetic: the party's own (real numbers, or Z_2^64 on the ring) or, on the
    ring, mod one of :data:`crt.PRIMES` (the wide ring Z_N's other residues). Every lane runs the same
    algebra; lanes share the permutations, and each has its own masks, caches, weights and messages."""

    __slots__ = ("p", "sfx", "q")

    def __init__(self, p: Party, i: int) -> None:
        self.q = 0 if i < 0 else crt.PRIMES[i]
        self.p = p if i < 0 else p.residue(self.q)
        self.sfx = "" if i < 0 else f"#q{i}"

    def mm(self, a: np.ndarray, b: np.ndarray, tb: bool = False) -> np.ndarray:
        """a @ b (a @ bᵀ over the last two axes with ``tb``), exact on this lane's ring."""
        if self.q:
            return crt.matmul(a, b, self.q, transpose_b=tb)
        if self.p.ring:
            return ring.matmul(a, b, RING_BITS, transpose_b=tb)
        return a @ (np.swapaxes(b, -1, -2) if tb else b)

    def mask(self, which: str, name: str, purpose: str, shape: tuple[int, ...], width: float | np.ndarray) -> np.ndarray:
        return self.p.mask(which, name + self.sfx, purpose, shape, width)

    def tag(self, name: str, part: str) -> tuple:
        return self.p.tag("attn8", name + self.sfx, part)

    def modulus(self) -> int | None:
        return self.q or (2**64 if self.p.ring else None)

    def eye(self, d: int) -> np.ndarray:
        return np.eye(d, dtype=self.p.dtype)


def _lanes(p: Party) -> list[_Lane]:
    return [_Lane(p, -1)] + ([_Lane(p, i) for i in range(len(crt.PRIMES))] if p.ring else [])


def _decode(vals: list[np.ndarray], enc: ring.Enc | None, what: str) -> np.ndarray:
    """U's clear value from every lane's residue (real numbers: the value itself)."""
    if enc is None:
        return vals[0]
    return crt.decode(vals[0], [crt.reduce(v, q) for v, q in zip(vals[1:], crt.PRIMES)], enc.scale, what, enc.range)


def _encode(y: np.ndarray, enc: ring.Enc | None, what: str) -> list[np.ndarray]:
    """U's clear value as every lane's residue (on Z_N at ``enc``'s scale; real numbers: itself)."""
    if enc is None:
        return [y]
    lo, rs = crt.encode(y, enc.scale, what)
    return [lo, *rs]


def _rope_t(spec: AttnSpec, ln: _Lane, x: np.ndarray) -> np.ndarray:
    """x·Rᵀ for the rotation R of ``spec.rope`` on this lane (rope(z) = z·R): q_U·rope(k̂)ᵀ = (q_U·Rᵀ)·k̂ᵀ,
    exact on a ring (R is the integer rotation), the raw query share on real numbers (R orthogonal)."""
    d = x.shape[-1]
    R = spec.rope(ln.eye(d)[:, None, :], ln.q)[:, 0, :]  # row j: rope of the j-th unit vector
    return ln.mm(x, R, tb=True)


def _arrays(got: object, shapes: list[tuple[int, ...]], dtype: np.dtype) -> bool:
    return (isinstance(got, list) and len(got) == len(shapes)
            and all(isinstance(g, np.ndarray) and g.dtype == dtype and g.shape == s for g, s in zip(got, shapes)))


def _m_bias(ln: _Lane, weight: str | None) -> np.ndarray | None:
    """M's qkv bias on this lane: on a ring set up at the product's scale (an exact integer), as a word or
    reduced mod q."""
    if weight is None:
        return None
    b = ln.p.weights[weight + ln.sfx].value
    if ln.q:
        return crt.reduce(b, ln.q)
    return b.astype(np.int64).view(np.uint64) if ln.p.ring else b


async def attention_decode(p: Party, name: str, x: np.ndarray | None, *, spec: AttnSpec, mags: AttnMags,
                           weight: str, cache_k: str, cache_v: str, bias_weight: str | None = None,
                           valid: np.ndarray | None = None, enc: AttnEnc | None = None) -> tuple[list, list, list]:
    """[norm(x)] and [attention(norm(x))] for one new token; 4 online hops (M→U, U→M, M→U, U→M).

    ``x`` is this party's share of the layer input (1, hidden) (M passes None offline);
    ``weight`` names the fused qkv weight (dense, out × in, layout of ``spec.split``) and
    ``bias_weight`` its bias set up as a masked weight (U and H need their copy for the
    new key's score; M adds the bias itself). ``cache_k``/``cache_v`` name the KV caches
    (shared with :func:`~permllm.protocols.matmul.matmul_shared`). ``valid`` is the public
    number of keys the row attends to (default: all). On the ring ``enc`` gives the public encodings;
    the op then runs on the wide ring Z_N (the input on Z_2^64): every value but the input is a list of
    residues, mod 2^64 and mod each of :data:`crt.PRIMES` (one *lane* each).

    Returns (h, o, res), each a list over the lanes: the norm output share (1, hidden), the attention
    output share (kv, g, 1, d) and, with ``enc.res``, the residual stream re-encoded (else empty). U's shares
    are H-derivable. M gets ([], [], []) offline; the helper gets its derivation of U's shares.
    See the module docstring for the message flow and what each party learns.
    """
    op = _Op(p, name, spec, mags, weight, cache_k, cache_v, bias_weight, valid, enc)
    if p.phase == "offline":
        if p.is_model:
            await _model_offline(p, op)
            return [], [], []
        if x is None or x.shape != (1, op.n):
            raise ProtocolError(f"attention {name!r}: decode takes one row of {op.n} (got {getattr(x, 'shape', None)})")
        return await _dealt_offline(p, op, x)
    if p.phase != "online" or p.is_helper:
        raise ProtocolError(f"attention {name!r}: the {p.role.value} party has no {p.phase} branch")
    if p.is_model:
        return await _model_online(p, op, x)
    return await _user_online(p, op)


class _Op:
    """The public description of one use of the op, as every party derives it (no secret in it)."""

    def __init__(self, p: Party, name: str, spec: AttnSpec, mags: AttnMags, weight: str, cache_k: str, cache_v: str,
                 bias_weight: str | None, valid: np.ndarray | None, enc: AttnEnc | None) -> None:
        if p.ring != (enc is not None):
            raise ValueError(f"attention {name!r}: the ring needs the op's encodings (and real numbers none)")
        self.name, self.spec, self.mags, self.weight, self.bias = name, spec, mags, weight, bias_weight
        self.cache_k, self.cache_v, self.valid, self.enc = cache_k, cache_v, valid, enc
        self.lanes = _lanes(p)
        self.KV, self.G, self.d = spec.kv_heads, spec.heads // spec.kv_heads, spec.head_dim
        w_qkv = p.weights.get(weight)
        if w_qkv is None or any(ln.p.weights.get(weight + ln.sfx) is None for ln in self.lanes):
            raise ProtocolError(f"weight {weight!r} was not set up (on every residue)")
        self.n, self.scale_w, self.scale_b = w_qkv.shape[1], w_qkv.scale, 0.0
        if bias_weight is not None:
            wb = p.weights.get(bias_weight)
            if wb is None or any(ln.p.weights.get(bias_weight + ln.sfx) is None for ln in self.lanes):
                raise ProtocolError(f"weight {bias_weight!r} was not set up (on every residue)")
            if enc is not None and wb.frac != enc.h.scale + w_qkv.frac:
                raise ProtocolError(f"attention {name!r}: the qkv bias is encoded at 2^-{wb.frac}, its product at "
                                    f"2^-{enc.h.scale + w_qkv.frac}")
            self.scale_b = wb.scale
        self.has_res = enc is not None and enc.res is not None
        self.lin = name + ".qkv"
        self.lin_kw = dict(mag_in=mags.h, mag_out=mags.qkv_col, l2_in=mags.h_l2)
        self._widths: tuple[int, _W] | None = None

    def widths(self, p: Party, t: int) -> "_W":
        """The real-number mask widths for ``t`` keys (ignored on the ring, where every mask is uniform), computed
        once for all lanes."""
        if self._widths is None or self._widths[0] != t:
            self._widths = (t, _W(p, self.spec, self.mags, t, self.n, self.scale_w, self.scale_b))
        return self._widths[1]

    def score_shape(self, t: int) -> tuple[int, int, int, int]:
        return (self.KV, self.G, 1, t)


async def _model_offline(p: Party, op: _Op) -> None:
    """M: the w-linear's two messages and H's correlations per lane, its own masks and permutations."""
    KV, G, d, name = op.KV, op.G, op.d, op.name
    kept = []
    for ln in op.lanes:
        await linear(ln.p, op.lin + ln.sfx, None, op.weight + ln.sfx, **op.lin_kw)
        wu = await ln.p.recv_array(Role.USER, ln.tag(name, "w"))
        wh = await ln.p.recv_array(Role.HELPER, ln.tag(name, "w"), wu.shape)
        corr = await ln.p.recv(Role.HELPER, ln.tag(name, "corr"), modulus=ln.modulus())
        if not (isinstance(corr, list) and len(corr) == 5 + op.has_res and all(
                isinstance(c, np.ndarray) and c.dtype == ln.p.dtype for c in corr)
                and corr[1].ndim == 4 and corr[1].shape[:3] == (KV, G, 1)):
            raise ProtocolError(f"attention {name!r}: bad correlation from the helper")
        t = corr[1].shape[-1]
        W = op.widths(p, t)
        masks = (ln.mask("mh", name, "alpha", (KV, G, 1, d), W.alpha),
                 ln.mask("mh", name, "bk", (KV, 1, 1, d), W.bk),
                 ln.mask("mh", name, "bv", (KV, 1, 1, d), W.bv),
                 ln.mask("mh", name, "gam", (KV, G, t, d), W.gam),
                 ln.mask("mh", name, "gamv", (KV, G, t, d), W.gamv))
        kept.append(_MKept(wu + wh, corr, *masks))
    base = op.lanes[0]
    delta1 = await base.p.recv_array(Role.HELPER, base.tag(name, "d1"), (1, op.n))
    # M's permutations, drawn now so the online phase only computes.
    sh = op.score_shape(kept[0].corr[1].shape[-1])
    p.keep(name, (kept, delta1, Perm.draw(p.gen("mh", name, "pi1"), (1, op.n), "rows"),
                  Perm.draw(p.gen("mh", name, "pi2"), sh, "rows", _valid(op.valid, sh))))


@dataclass(slots=True)
class _MKept:
    """What M keeps of one lane's offline phase: its w-linear sum, H's correlations and its own masks."""

    w_m: np.ndarray
    corr: list[np.ndarray]   # γ₁, η, δ₂, γ₂, η′ (and the residual's γ)
    alpha: np.ndarray
    bk: np.ndarray
    bv: np.ndarray
    gam: np.ndarray
    gamv: np.ndarray


async def _dealt_offline(p: Party, op: _Op, x: np.ndarray) -> tuple[list, list, list]:
    """U and H: U's shares of the outputs (H-derivable) and, per lane, the w-linear's message; H deals every
    correlation of the op (module docstring), U keeps its masks for the online phase."""
    R, KV, G, d, n, name, spec = p.ratio, op.KV, op.G, op.d, op.n, op.name, op.spec
    base = op.lanes[0]
    pi1 = Perm.draw(p.gen("mh", name, "pi1"), (1, n), "rows") if p.is_helper else None
    pi2 = None
    b1 = base.mask("uh", name, "b1", (1, n), R * op.mags.x)
    hs, ros, ress, kept = [], [], [], []
    for ln in op.lanes:
        # U's (H-derivable) shares: norm output h_U = b₁′; q, k, v from the linear's r.
        b1p = ln.mask("uh", name, "b1p", (1, n), R * np.asarray(op.mags.h_col))
        r = await linear(ln.p, op.lin + ln.sfx, b1p, op.weight + ln.sfx, **op.lin_kw)
        q_raw, k_raw, v_u = spec.split(r)
        q_u, k_u = spec.rope(q_raw, ln.q), spec.rope(k_raw, ln.q)
        KU = _append(p.caches, op.cache_k + ln.sfx + "/bu", k_u)
        VU = _append(p.caches, op.cache_v + ln.sfx + "/bu", v_u)
        t = KU.shape[-2]
        W = op.widths(p, t)
        a1 = ln.mask("uh", name, "a1", (1, n), W.a1)
        qt = _rope_t(spec, ln, q_u)                                   # q̃_U = q_U·Rᵀ
        yw = ln.mm(qt, _k_rows(ln.p, op.weight + ln.sfx, spec.split, "dense"))  # q̃_U·D_k (U) / q̃_U·U_Wk (H)
        tw = ln.mask("uh", name, "tw", yw.shape, W.tw)
        c_new = ln.mm(yw, b1p, tb=True)                               # q̃_U·D_k·h_Uᵀ (U) / q̃_U·U_Wk·h_Uᵀ (H)
        if op.bias is not None:
            c_new = c_new + ln.mm(qt, _k_rows(ln.p, op.bias + ln.sfx, spec.split, "bias"))
        sh = op.score_shape(t)
        tau = ln.mask("uh", name, "tau", sh, W.tau)
        b2 = ln.mask("uh", name, "b2", sh, W.b2)
        a2 = ln.mask("uh", name, "a2", sh, W.a2)
        b2p = ln.mask("uh", name, "b2p", sh, W.b2p)
        tau2 = ln.mask("uh", name, "tau2", (KV, G, 1, d), W.tau2)
        r_o = ln.mask("uh", name, "ro", (KV, G, 1, d), W.ro)
        res = (ln.mask("uh", name, "ares", (1, n), R * op.mags.x), ln.mask("uh", name, "bres", (1, n), R * op.mags.x)) \
            if op.has_res else None
        hs.append(b1p)
        ros.append(r_o)
        if res is not None:
            ress.append(res[1])
        if p.is_user:
            ln.p.send(Role.MODEL, ln.tag(name, "w"), yw + tw)
            got = await ln.p.recv(Role.HELPER, ln.tag(name, "u"), modulus=ln.modulus())
            if not _arrays(got, [yw.shape, (KV, G, t, d), (KV, G, t, d)], ln.p.dtype):
                raise ProtocolError(f"attention {name!r}: bad correlation from the helper")
            rw_p, Kt, Vt = got
            kept.append(_UKept(a1, b1p, q_u, c_new, tau, b2, a2, b2p, tau2, r_o, res, rw_p, Kt, Vt, t))
            continue
        # H: every correlation of the op on this lane.
        rho = ln.mask("uh", name, "rho", sh, W.rho)
        rw = ln.mask("h", name, "rw", yw.shape, W.rw)
        ln.p.send(Role.MODEL, ln.tag(name, "w"), yw - tw - rw)
        gamma1 = pi1.invert(a1) - b1p
        BK = _append(p.caches, op.cache_k + ln.sfx + "/beta", ln.mask("mh", name, "bk", k_u.shape, W.bk))
        BV = _append(p.caches, op.cache_v + ln.sfx + "/beta", ln.mask("mh", name, "bv", v_u.shape, W.bv))
        if BK.shape != KU.shape or BV.shape != VU.shape:
            raise ProtocolError(f"attention {name!r}: helper caches out of step")
        if pi2 is None:
            pi2 = Perm.draw(p.gen("mh", name, "pi2"), sh, "rows", _valid(op.valid, sh))
        alpha = ln.mask("mh", name, "alpha", (KV, G, 1, d), W.alpha)
        gam = ln.mask("mh", name, "gam", (KV, G, t, d), W.gam)
        gamv = ln.mask("mh", name, "gamv", (KV, G, t, d), W.gamv)
        KUg = KU + gam
        ln.p.send(Role.USER, ln.tag(name, "u"), [rw[..., pi1.idx[0]], _gather_rows(pi2, KUg),
                                                 _gather_rows(pi2, VU + gamv)])
        eta_old = ln.mm(q_u, BK[..., :t - 1, :], tb=True)
        eta_new = ln.mm(rw, gamma1, tb=True) + c_new - ln.mm(qt, k_raw, tb=True)
        eta = np.concatenate([eta_old, eta_new], -1) - tau - rho
        delta2 = pi2.apply(ln.mm(q_u, KU, tb=True) + ln.mm(alpha, KUg, tb=True) + rho) - b2
        gamma2 = pi2.invert(a2) - b2p
        eta2 = ln.mm(b2p, VU + BV) + ln.mm(gamma2, VU) - tau2 - r_o
        corr = [gamma1, eta, delta2, gamma2, eta2]
        if res is not None:
            corr.append(pi1.invert(res[0]) - res[1])
        ln.p.send(Role.MODEL, ln.tag(name, "corr"), corr)
    if p.is_user:
        p.keep(name, (b1, kept))
    else:
        base.p.send(Role.MODEL, base.tag(name, "d1"), pi1.apply(x) - b1)
    return hs, ros, ress


@dataclass(slots=True)
class _UKept:
    """What U keeps of one lane's offline phase for the online one."""

    a1: np.ndarray
    b1p: np.ndarray
    q_u: np.ndarray
    c_new: np.ndarray
    tau: np.ndarray
    b2: np.ndarray
    a2: np.ndarray
    b2p: np.ndarray
    tau2: np.ndarray
    r_o: np.ndarray
    res: tuple[np.ndarray, np.ndarray] | None   # (a_res, b_res′): the residual's reshare masks
    rw_p: np.ndarray
    Kt: np.ndarray
    Vt: np.ndarray
    t: int


async def _model_online(p: Party, op: _Op, x: np.ndarray | None) -> tuple[list, list, list]:
    """M's hops 1–4 (module docstring)."""
    KV, G, n, name, spec, enc = op.KV, op.G, op.n, op.name, op.spec, op.enc
    if x is None or x.shape != (1, n):
        raise ProtocolError(f"attention {name!r}: decode takes one row of {n}")
    kept, delta1, pi1, pi2 = p.take(name)
    base = op.lanes[0]
    m1 = pi1.apply(x) + delta1
    base.p.send(Role.USER, base.tag(name, "1"), ring.pack(m1, enc.x.wire) if enc is not None else m1)  # hop 1
    hs, ress, later = [], [], []
    for ln, k in zip(op.lanes, kept):
        gamma1, eta, delta2, gamma2, eta2 = k.corr[:5]
        got = await ln.p.recv(Role.USER, ln.tag(name, "2"), modulus=ln.modulus())   # hop 2
        if not _arrays(got, [(1, n), eta.shape] + [(1, n)] * op.has_res, ln.p.dtype):
            raise ProtocolError(f"attention {name!r}: bad message from the user")
        z, e = got[:2]
        h_m = pi1.invert(z) + gamma1
        if op.has_res:
            ress.append(pi1.invert(got[2]) + k.corr[5])
        qkv_m = await linear(ln.p, op.lin + ln.sfx, h_m, op.weight + ln.sfx, bias=_m_bias(ln, op.bias), **op.lin_kw)
        q_raw, k_raw, v_m = spec.split(qkv_m)
        q_m, k_m = spec.rope(q_raw, ln.q), spec.rope(k_raw, ln.q)
        KM = _append(p.caches, op.cache_k + ln.sfx + "/bm", k_m)
        VM = _append(p.caches, op.cache_v + ln.sfx + "/bm", v_m)
        t = KM.shape[-2]
        if eta.shape != op.score_shape(t):
            raise ProtocolError(f"attention {name!r}: cache of {t} keys, correlation for {eta.shape[-1]}")
        X = e + eta
        X[..., -1:] += ln.mm(k.w_m, h_m, tb=True)
        at_m = ln.mm(q_m, KM - k.gam, tb=True) + X
        ln.p.send(Role.USER, ln.tag(name, "3s"), pi2.apply(at_m) + delta2)        # hop 3
        ln.p.send(Role.USER, ln.tag(name, "3"), [q_m - k.alpha, k_m - k.bk, v_m - k.bv])
        hs.append(h_m)
        later.append((VM, k.gamv, gamma2, eta2))
    outs = []
    for ln, (VM, gamv, gamma2, eta2) in zip(op.lanes, later):
        got = await ln.p.recv(Role.USER, ln.tag(name, "4"), modulus=ln.modulus())   # hop 4
        if not _arrays(got, [op.score_shape(VM.shape[-2]), eta2.shape], ln.p.dtype):
            raise ProtocolError(f"attention {name!r}: bad message from the user")
        z2, e2 = got
        outs.append(ln.mm(pi2.invert(z2), VM - gamv) + ln.mm(gamma2, VM) + e2 + eta2)
    return hs, outs, ress


async def _user_online(p: Party, op: _Op) -> tuple[list, list, list]:
    """U's side of hops 1–4: the norm and the softmax in the clear on permuted values."""
    KV, G, d, n, name, spec, enc = op.KV, op.G, op.d, op.n, op.name, op.spec, op.enc
    b1, kept = p.take(name)
    base = op.lanes[0]
    for ln, k in zip(op.lanes, kept):
        await linear(ln.p, op.lin + ln.sfx, k.b1p, op.weight + ln.sfx, **op.lin_kw)  # U's share is its offline r
    if enc is None:
        m1 = await base.p.recv_array(Role.MODEL, base.tag(name, "1"), (1, n))              # hop 1
        xv = m1 + b1
    else:
        m1 = await base.p.recv(Role.MODEL, base.tag(name, "1"), modulus=256, revealed=True)
        try:
            v = ring.unpack(m1, enc.x.wire, (1, n), f"attention {name!r}: the model party's message")
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        xv = ring.decode(v.astype(np.uint64) + b1, enc.x.scale, enc.x.opened, f"{name!r} input", enc.x.range)
    ys = _encode(_norm(spec, xv), None if enc is None else enc.h, f"{name!r} output")
    rs = _encode(xv, enc.res, f"{name!r} residual") if op.has_res else None
    for i, (ln, k) in enumerate(zip(op.lanes, kept)):
        O = p.caches.get(op.cache_k + ln.sfx + "/opened")
        n_old = 0 if O is None else O.shape[-2]
        if n_old != k.t - 1:
            raise ProtocolError(f"attention {name!r}: {n_old} opened keys, expected {k.t - 1}")
        z = ys[i] - k.a1
        e_old = np.zeros((KV, G, 1, 0), dtype=ln.p.dtype) if O is None else ln.mm(k.q_u, O, tb=True)
        e_new = ln.mm(k.rw_p, z, tb=True) + k.c_new
        msg = [z, np.concatenate([e_old, e_new], -1) + k.tau]
        if rs is not None:
            msg.append(rs[i] - k.res[0])
        ln.p.send(Role.MODEL, ln.tag(name, "2"), msg)                                      # hop 2
    ss, opened_v = [], []
    for ln, k in zip(op.lanes, kept):
        m2 = await ln.p.recv(Role.MODEL, ln.tag(name, "3s"), modulus=ln.modulus(), revealed=True)  # hop 3
        got = await ln.p.recv(Role.MODEL, ln.tag(name, "3"), modulus=ln.modulus())
        if not (_arrays([m2], [op.score_shape(k.t)], ln.p.dtype)
                and _arrays(got, [(KV, G, 1, d), (KV, 1, 1, d), (KV, 1, 1, d)], ln.p.dtype)):
            raise ProtocolError(f"attention {name!r}: bad message from the model party")
        qa, kb, vb = got
        _append(p.caches, op.cache_k + ln.sfx + "/opened", kb)
        opened_v.append(_append(p.caches, op.cache_v + ln.sfx + "/opened", vb))
        ss.append(m2 + k.b2 + ln.mm(qa, k.Kt, tb=True))                                  # π₂(q·Kᵀ)
    s_perm = _decode(ss, None if enc is None else enc.s, f"{name!r} scores")
    valid = None if op.valid is None else np.broadcast_to(np.asarray(op.valid), s_perm.shape[:-1])
    ps = _encode(F.softmax(s_perm, valid, spec.scale), None if enc is None else enc.p, f"{name!r} probabilities")
    for ln, k, pv, OV in zip(op.lanes, kept, ps, opened_v):
        z2 = pv - k.a2
        ln.p.send(Role.MODEL, ln.tag(name, "4"), [z2, ln.mm(k.b2p, OV) + ln.mm(z2, k.Vt) + k.tau2])  # hop 4
    return [k.b1p for k in kept], [k.r_o for k in kept], [] if rs is None else [k.res[1] for k in kept]


def _valid(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if valid is None:
        return None
    return np.broadcast_to(np.asarray(valid, dtype=np.int64), shape[:-1]).reshape(-1)

"""The 8-hop attention block of a decode step (docs/design.md §3.7).

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
**w-linear**, a zero-round linear of U's raw query share q̂_U through W_k (U sends
q̂_U·D_k + t_w, H sends q̂_U·U_Wk − t_w − r_w, r_w from s_H), so M holds
w_M = q̂_U·W_k − r_w; H → U: π₁(r_w), K̃ = π₂(K_U + Γ) and Ṽ = π₂(V_U + Γ_V) (Γ, Γ_V from
s_MH, fresh per token and head, R times wider than K_U, V_U); η, δ₂, γ₂, η′ below.

Online:

1. M → U: m₁ = π₁(x_M) + δ₁. U: y = norm(m₁ + b₁) = π₁(norm(x)).
2. U → M: z = y − a₁ and e = ẽ + τ, one entry per key and query head:
   ẽ_j = q_U·O_jᵀ for cached keys; ẽ_new = π₁(r_w)·zᵀ + q̂_U·D_k·h_Uᵀ (+ q̂_U·D_bkᵀ,
   the masked k bias). H's η = η̃ − τ − ρ with η̃_j = q_U·β_jᵀ and
   η̃_new = r_w·γ₁ᵀ + q̂_U·U_Wk·h_Uᵀ − q̂_U·r_kᵀ (+ q̂_U·U_bkᵀ).
   M: h_M = π₁⁻¹(z) + γ₁; q_M, k_M, v_M by the linear; X = e + η (+ w_M·h_Mᵀ on the new
   key) = q_U·K_Mᵀ − ρ (the new key through k_M = rope(h_M·W_kᵀ + c_k + b_k) and
   q_U·rope(k)ᵀ = q̂_U·kᵀ: q and the new key share one position).
3. M → U: m₂ = π₂(q_M·(K_M − Γ)ᵀ + X) + δ₂ with δ₂ = π₂(q_U·K_Uᵀ + α·(K_U + Γ)ᵀ + ρ) − b₂,
   and q_M − α, k_M,new − β_new, v_M,new − β_V,new (U appends them to O, O_V).
   U: π₂(S) = m₂ + b₂ + (q_M − α)·K̃ᵀ, then P′ = softmax(scale·π₂(S)) in the clear.
4. U → M: z′ = P′ − a₂ and e′ = b₂′·O_V + z′·Ṽ + τ′; H's η′ = b₂′·V_U + b₂′·β_V + γ₂·V_U
   − τ′ − r_o, γ₂ = π₂⁻¹(a₂) − b₂′. M: o_M = π₂⁻¹(z′)·(V_M − Γ_V) + γ₂·V_M + e′ + η′
   = P·V − r_o; U's share is r_o (from s_UH).

What each party learns (beyond the public shapes and calibrated magnitudes):

* **U** learns π₁(norm input) and π₂(scores) (and so the permuted softmax) in the clear:
  exactly the PermLLM leakage of the 12-hop route. Everything else it receives is
  masked at ratio R: q_M − α (α hides q, since U knows q_U), the new rows of K_M, V_M
  once (β), π₁(r_w) (a fresh s_H mask: no information on π₁), K̃ and Ṽ (Γ hides U's own
  K_U, V_U at ratio R, fresh per token and query head, so rows cannot be matched to
  its shares, across tokens or across the heads of a group: π₂ stays hidden).
* **M** receives z (y hidden by a₁), e (hidden by τ), z′ (P′ hidden by a₂), e′ (hidden
  by τ′), and offline the linear messages and δ₁, γ₁, η, δ₂, γ₂, η′. The sums it can form:
  e + η (+ its own w_M·h_Mᵀ) = q_U·K_Mᵀ − ρ: hidden by ρ, which is R times the
  secret-dependent part q·K_Mᵀ (without ρ, t ≥ head_dim keys give M the equations that
  solve for q_U, i.e. q); adding π₂⁻¹(δ₂) gives q_U·Kᵀ + α·K_Uᵀ + α·Γᵀ − π₂⁻¹(b₂): hidden
  by b₂, R times the secret part; π₂⁻¹(z′) + γ₂ = P − b₂′ (b₂′ hides P); e′ + η′ (+ its
  own terms) = P·V − r_o (r_o hides the output); the w-linear sum w − r_w (r_w hides
  q̂·W_k).
* **H** receives no message at all (it only deals).

Why Γ. The cache persists: if U saw π₂(K_U) itself (the reference design's sketch,
docs/design.md §3.7: K_U from a seed only H holds), each row would recur token after
token, so U could match rows across tokens, spot the one new row each time and so learn
every key's position in π₂. Fresh Γ per token and query head prevents it (and hides U's
own K_U, which the 12-hop prefill gives U anyway); re-sharing K between M and H every
token instead would let M average the fresh shares away and learn K.

Precision. U must see the cached keys and values in a fresh order every token without
recognising its own shares K_U, V_U, so Γ and Γ_V are R² wide and the products
(q_M − α)·K̃ᵀ, q_M·Γᵀ, z′·Ṽ and π₂⁻¹(z′)·Γ_V carry R³ magnitudes ("a mask hiding
a permutation of a mask", docs/design.md §10); the new key's constant q̂_U·D_k·h_Uᵀ
multiplies two shares through D and needs an R³ pad as well. The cancellation leaves about
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

from . import functions as F
from .linear import _helper_uw, linear
from .party import Party, ProtocolError, Role
from .permute import Perm

__all__ = ["AttnSpec", "AttnMags", "attention_decode"]

_SD = 1.0 / math.sqrt(12.0)  # standard deviation of a uniform mask of width 1
Split = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class AttnSpec:
    """Public description of one attention block.

    ``split`` maps a (T, qkv_out) array to q (kv, g, T, d), k and v (kv, 1, T, d);
    ``rope`` is the public rotation of q and k at the new token's position (identity
    without RoPE; ChatGLM's 2-D rotation works the same). Both are linear, so each
    party applies them to its own share. ``mix`` (public) says which columns RoPE combines,
    so that masks can be sized per column.
    """

    heads: int
    kv_heads: int
    head_dim: int
    norm: str            # "rms" | "layer" (affine folded into the qkv weight)
    eps: float
    scale: float         # softmax scale, 1/√head_dim
    split: Split
    rope: Callable[[np.ndarray], np.ndarray]
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
        self.tw = R * R * scale_w * m.q_l2 * _SD       # hides q̂_U·D_k (secret part q̂·D_k), as in linear
        self.rw = R * m.w                              # hides q̂·W_k in w_M (uniform: U sees it permuted)
        self.alpha, self.bk, self.bv = R * q_col, R * k_col, R * v_col
        self.gam = R * R * kr                          # (kv, 1, 1, d): hides U's K_U (width R·kr) from U
        self.gamv = R * R * vc                         # (kv, 1, 1, d): hides V_U
        tau_old = R * _l2(q_col * R * (kr + k_col) * _SD)   # q·O_j, O = K_M − β
        tau_new = R * (m.w_l2 * R * m.h * _SD                                      # w·π₁⁻¹(z)
                       + m.q_l2 * R * scale_w * _SD * R * _SD * _l2(h_col)          # q̂·D_k·h_Mᵀ
                       + R * _SD * _l2(qc) * R * scale_w * _SD * m.h_l2             # q̂_M·D_k·hᵀ
                       + m.q_l2 * R * scale_b * _SD)                                # q̂·D_bk
        self.tau = np.array([tau_old] * (t - 1) + [tau_new])
        self.rho = R * _l2(q_col * R * kr * _SD)                                    # q·K_Mᵀ
        self.b2 = R * (_l2(R * (qr + q_col) * _SD * k_col) + _l2(q_col * R * kr * _SD))  # (α − q_M)·Kᵀ + q·K_Mᵀ
        self.a2 = self.b2p = R * 1.0                                                # probabilities ≤ 1
        self.tau2 = R * R * (vc + v_col + m.v_l2) * _SD                             # P·O_V + z′·π₂(V), per column
        self.ro = R * np.asarray(m.att_col)


def _norm(spec: AttnSpec, z: np.ndarray) -> np.ndarray:
    return F.rms_norm(z, spec.eps) if spec.norm == "rms" else F.layer_norm(z, spec.eps)


async def attention_decode(p: Party, name: str, x: np.ndarray | None, *, spec: AttnSpec, mags: AttnMags,
                           weight: str, cache_k: str, cache_v: str, bias_weight: str | None = None,
                           valid: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """[norm(x)] and [attention(norm(x))] for one new token; 4 online hops (M→U, U→M, M→U, U→M).

    ``x`` is this party's share of the layer input (1, hidden) (M passes None offline);
    ``weight`` names the fused qkv weight (dense, out × in, layout of ``spec.split``) and
    ``bias_weight`` its bias set up as a masked weight (U and H need their copy for the
    new key's score; M adds the bias itself). ``cache_k``/``cache_v`` name the KV caches
    (shared with :func:`~permllm.protocols.matmul.matmul_shared`). ``valid`` is the public
    number of keys the row attends to (default: all).

    Returns (h, o): the norm output share (1, hidden) — needed by residuals that use it —
    and the attention output share (kv, g, 1, d). U's shares of both are H-derivable.
    M gets (None, None) offline; the helper gets its derivation of U's shares.
    See the module docstring for the message flow and what each party learns.
    """
    R = p.ratio
    KV, G, d = spec.kv_heads, spec.heads // spec.kv_heads, spec.head_dim
    w_qkv = p.weights.get(weight)
    if w_qkv is None:
        raise ProtocolError(f"weight {weight!r} was not set up")
    n = w_qkv.shape[1]
    scale_w = w_qkv.scale
    scale_b = 0.0
    if bias_weight is not None:
        wb = p.weights.get(bias_weight)
        if wb is None:
            raise ProtocolError(f"weight {bias_weight!r} was not set up")
        scale_b = wb.scale
    lin = name + ".qkv"
    lin_kw = dict(mag_in=mags.h, mag_out=mags.qkv_col, l2_in=mags.h_l2)
    tag = lambda part: p.tag("attn8", name, part)  # noqa: E731

    if p.phase == "offline":
        if p.is_model:
            await linear(p, lin, None, weight, **lin_kw)
            wu = await p.recv_array(Role.USER, tag("w"))
            wh = await p.recv_array(Role.HELPER, tag("w"), wu.shape)
            corr = await p.recv(Role.HELPER, tag("corr"))
            if not (isinstance(corr, list) and len(corr) == 6 and all(isinstance(c, np.ndarray) for c in corr)
                    and corr[2].ndim == 4 and corr[2].shape[:3] == (KV, G, 1)):
                raise ProtocolError(f"attention {name!r}: bad correlation from the helper")
            # M's own masks and permutations, drawn now so the online phase only computes.
            t = corr[2].shape[-1]
            W = _W(p, spec, mags, t, n, scale_w, scale_b)
            sh = (KV, G, 1, t)
            mine = (Perm.draw(p.gen("mh", name, "pi1"), (1, n), "rows"),
                    Perm.draw(p.gen("mh", name, "pi2"), sh, "rows", _valid(valid, sh)),
                    p.mask("mh", name, "alpha", (KV, G, 1, d), W.alpha),
                    p.mask("mh", name, "bk", (KV, 1, 1, d), W.bk),
                    p.mask("mh", name, "bv", (KV, 1, 1, d), W.bv),
                    p.mask("mh", name, "gam", (KV, G, t, d), W.gam),
                    p.mask("mh", name, "gamv", (KV, G, t, d), W.gamv))
            p.keep(name, (wu + wh, corr, mine))
            return None, None
        if x is None or x.shape != (1, n):
            raise ProtocolError(f"attention {name!r}: decode takes one row of {n} (got {getattr(x, 'shape', None)})")
        # U's (H-derivable) shares: norm output h_U = b₁′; q, k, v from the linear's r.
        b1p = p.mask("uh", name, "b1p", (1, n), R * np.asarray(mags.h_col))
        r = await linear(p, lin, b1p, weight, **lin_kw)
        q_raw, k_raw, v_u = spec.split(r)
        q_u, k_u = spec.rope(q_raw), spec.rope(k_raw)
        KU = _append(p.caches, cache_k + "/bu", k_u)
        VU = _append(p.caches, cache_v + "/bu", v_u)
        t = KU.shape[-2]
        W = _W(p, spec, mags, t, n, scale_w, scale_b)
        b1 = p.mask("uh", name, "b1", (1, n), W.b1)
        a1 = p.mask("uh", name, "a1", (1, n), W.a1)
        Dk = _k_rows(p, weight, spec.split, "dense")                 # U: D_k, H: U_Wk (kv, 1, d, n)
        yw = q_raw @ Dk                                              # (kv, g, 1, n)
        tw = p.mask("uh", name, "tw", yw.shape, W.tw)
        c_new = yw @ b1p.T                                           # q̂_U·D_k·h_Uᵀ (U) / q̂_U·U_Wk·h_Uᵀ (H)
        if bias_weight is not None:
            c_new = c_new + q_raw @ _k_rows(p, bias_weight, spec.split, "bias")
        sh = (KV, G, 1, t)
        tau = p.mask("uh", name, "tau", sh, W.tau)
        b2 = p.mask("uh", name, "b2", sh, W.b2)
        a2 = p.mask("uh", name, "a2", sh, W.a2)
        b2p = p.mask("uh", name, "b2p", sh, W.b2p)
        tau2 = p.mask("uh", name, "tau2", (KV, G, 1, d), W.tau2)
        r_o = p.mask("uh", name, "ro", (KV, G, 1, d), W.ro)
        if p.is_user:
            p.send(Role.MODEL, tag("w"), yw + tw)
            got = await p.recv(Role.HELPER, tag("u"))
            if not (isinstance(got, list) and len(got) == 3 and all(isinstance(g_, np.ndarray) for g_ in got)
                    and got[0].shape == yw.shape and got[1].shape == (KV, G, t, d) and got[2].shape == (KV, G, t, d)):
                raise ProtocolError(f"attention {name!r}: bad correlation from the helper")
            rw_p, Kt, Vt = got
            p.keep(name, (b1, a1, b1p, q_u, c_new, tau, b2, a2, b2p, tau2, r_o, rw_p, Kt, Vt, t))
            return b1p, r_o
        # H: every correlation of the op.
        x_u = x
        rho = p.mask("uh", name, "rho", sh, W.rho)
        pi1 = Perm.draw(p.gen("mh", name, "pi1"), (1, n), "rows")
        rw = p.mask("h", name, "rw", yw.shape, W.rw)
        p.send(Role.MODEL, tag("w"), yw - tw - rw)
        delta1 = pi1.apply(x_u) - b1
        gamma1 = pi1.invert(a1) - b1p
        BK = _append(p.caches, cache_k + "/beta", p.mask("mh", name, "bk", k_u.shape, W.bk))
        BV = _append(p.caches, cache_v + "/beta", p.mask("mh", name, "bv", v_u.shape, W.bv))
        if BK.shape != KU.shape or BV.shape != VU.shape:
            raise ProtocolError(f"attention {name!r}: helper caches out of step")
        pi2 = Perm.draw(p.gen("mh", name, "pi2"), sh, "rows", _valid(valid, sh))
        alpha = p.mask("mh", name, "alpha", (KV, G, 1, d), W.alpha)
        gam = p.mask("mh", name, "gam", (KV, G, t, d), W.gam)
        gamv = p.mask("mh", name, "gamv", (KV, G, t, d), W.gamv)
        KUg = KU + gam
        p.send(Role.USER, tag("u"), [rw[..., pi1.idx[0]], _gather_rows(pi2, KUg), _gather_rows(pi2, VU + gamv)])
        eta_old = q_u @ np.swapaxes(BK[..., :t - 1, :], -1, -2)
        eta_new = rw @ gamma1.T + c_new - q_raw @ np.swapaxes(k_raw, -1, -2)
        eta = np.concatenate([eta_old, eta_new], -1) - tau - rho
        delta2 = pi2.apply(q_u @ np.swapaxes(KU, -1, -2) + alpha @ np.swapaxes(KUg, -1, -2) + rho) - b2
        gamma2 = pi2.invert(a2) - b2p
        eta2 = b2p @ (VU + BV) + gamma2 @ VU - tau2 - r_o
        p.send(Role.MODEL, tag("corr"), [delta1, gamma1, eta, delta2, gamma2, eta2])
        return b1p, r_o

    if p.phase != "online" or p.is_helper:
        raise ProtocolError(f"attention {name!r}: the {p.role.value} party has no {p.phase} branch")

    if p.is_model:
        if x is None or x.shape != (1, n):
            raise ProtocolError(f"attention {name!r}: decode takes one row of {n}")
        w_m, (delta1, gamma1, eta, delta2, gamma2, eta2), (pi1, pi2, alpha, bk, bv, gam, gamv) = p.take(name)
        p.send(Role.USER, tag("1"), pi1.apply(x) + delta1)                         # hop 1
        got = await p.recv(Role.USER, tag("2"))                                    # hop 2
        if not (isinstance(got, list) and len(got) == 2 and all(isinstance(g_, np.ndarray) for g_ in got)
                and got[0].shape == (1, n) and got[1].shape == eta.shape):
            raise ProtocolError(f"attention {name!r}: bad message from the user")
        z, e = got
        h_m = pi1.invert(z) + gamma1
        bias = None if bias_weight is None else p.weights[bias_weight].value
        qkv_m = await linear(p, lin, h_m, weight, bias=bias, **lin_kw)
        q_raw, k_raw, v_m = spec.split(qkv_m)
        q_m, k_m = spec.rope(q_raw), spec.rope(k_raw)
        KM = _append(p.caches, cache_k + "/bm", k_m)
        VM = _append(p.caches, cache_v + "/bm", v_m)
        t = KM.shape[-2]
        if eta.shape != (KV, G, 1, t):
            raise ProtocolError(f"attention {name!r}: cache of {t} keys, correlation for {eta.shape[-1]}")
        X = e + eta
        X[..., -1:] += w_m @ h_m.T
        at_m = q_m @ np.swapaxes(KM - gam, -1, -2) + X
        sh = (KV, G, 1, t)
        p.send(Role.USER, tag("3"), [pi2.apply(at_m) + delta2, q_m - alpha, k_m - bk, v_m - bv])  # hop 3
        got = await p.recv(Role.USER, tag("4"))                                    # hop 4
        if not (isinstance(got, list) and len(got) == 2 and all(isinstance(g_, np.ndarray) for g_ in got)
                and got[0].shape == sh and got[1].shape == eta2.shape):
            raise ProtocolError(f"attention {name!r}: bad message from the user")
        z2, e2 = got
        o_m = pi2.invert(z2) @ (VM - gamv) + gamma2 @ VM + e2 + eta2
        return h_m, o_m

    # U online
    (b1, a1, b1p, q_u, c_new, tau, b2, a2, b2p, tau2, r_o, rw_p, Kt, Vt, t) = p.take(name)
    await linear(p, lin, b1p, weight, **lin_kw)  # U's share is its offline r (nothing sent)
    m1 = await p.recv_array(Role.MODEL, tag("1"), (1, n))                          # hop 1
    z = _norm(spec, m1 + b1) - a1
    O = p.caches.get(cache_k + "/opened")
    n_old = 0 if O is None else O.shape[-2]
    if n_old != t - 1:
        raise ProtocolError(f"attention {name!r}: {n_old} opened keys, expected {t - 1}")
    e_old = np.zeros((KV, G, 1, 0), dtype=p.dtype) if O is None else q_u @ np.swapaxes(O, -1, -2)
    e_new = rw_p @ z.T + c_new
    p.send(Role.MODEL, tag("2"), [z, np.concatenate([e_old, e_new], -1) + tau])   # hop 2
    got = await p.recv(Role.MODEL, tag("3"))                                       # hop 3
    if not (isinstance(got, list) and len(got) == 4 and all(isinstance(g_, np.ndarray) and g_.dtype == p.dtype
                                                            for g_ in got)
            and got[0].shape == (KV, G, 1, t) and got[1].shape == (KV, G, 1, d)
            and got[2].shape == (KV, 1, 1, d) and got[3].shape == (KV, 1, 1, d)):
        raise ProtocolError(f"attention {name!r}: bad message from the model party")
    m2, qa, kb, vb = got
    _append(p.caches, cache_k + "/opened", kb)
    OV = _append(p.caches, cache_v + "/opened", vb)
    s_perm = m2 + b2 + qa @ np.swapaxes(Kt, -1, -2)                               # π₂(q·Kᵀ)
    P = F.softmax(s_perm, None if valid is None else np.broadcast_to(np.asarray(valid), s_perm.shape[:-1]),
                  spec.scale)
    z2 = P - a2
    p.send(Role.MODEL, tag("4"), [z2, b2p @ OV + z2 @ Vt + tau2])                  # hop 4
    return b1p, r_o


def _valid(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if valid is None:
        return None
    return np.broadcast_to(np.asarray(valid, dtype=np.int64), shape[:-1]).reshape(-1)

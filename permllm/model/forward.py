"""The decoder forward pass, written once over an ops backend.

:class:`Forward` reads like the model's equations (``h = await ops.norm(...)``,
``qkv = await ops.linear(...)``); the backend decides what a value is:

* :class:`PlainOps` — plaintext numpy float64: the reference, and the calibration
  run that records each op's output magnitude (the public mask sizes).
* :class:`PrivateOps` — one party's branch of the protocol ops: a value is that
  party's share (or ``None`` where it has none, e.g. M in the offline phase).

One description (:class:`~permllm.model.arch.Arch` + op names) therefore drives the
reference and all three parties.
"""
from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

import numpy as np

from ..protocols import Party, embed, gelu, glu, layer_norm, linear, matmul_shared, rms_norm, softmax
from ..protocols import functions as F
from ..protocols import crt, ring
from ..protocols.config import RING_BITS
from ..protocols.permute import apply_permuted_wide
from ..protocols.linear import public_scale, weight_frac
from ..protocols.ring import RingOverflow
from ..protocols.attention import AttnEnc, AttnMags, AttnSpec, attention_decode
from ..protocols.embedding import setup_table, table_scale
from .arch import Arch, ModelWeights
from .layout import (from_qk_rows, merge_heads, pass_positions, positions, prompt_steps, qk_rows, rope, rope_bits, shift_rows,
                     split_heads, valid_lengths, window_starts)

__all__ = ["Forward", "PlainOps", "PrivateOps", "StepShape", "weight_names", "calibrate", "public_bounds",
           "setup_embedding", "ring_table_meta", "RING_TABLE", "RingPlan", "Fx", "choose_ring_plan", "weight_fracs",
           "resolve_arith", "RING_FLOOR", "RING_FRONTIER", "layer_output", "layer_weight_names", "narrow_plan",
           "WIDE_FRONTIER", "PLAN_ORDER", "wide_weights", "takes_fused", "step_hops", "EDGE_HOPS", "plan_route",
           "ATTN8_MAX_KEYS"]

RING_TABLE = "embed.ring"  # the dealt mode's ring-encoded embedding table (protocols/embedding.py)
# The 8-hop route's helper sends U masked permuted copies of the whole KV cache every decode step
# (2·heads·keys·head_dim words per layer and lane): past this many keys a decode step takes the 12-hop
# ops instead, so a long session's offline traffic per token stays bounded (docs/design.md §3.7).
ATTN8_MAX_KEYS = 256
EDGE_HOPS = 3 + 2 + 3  # per step besides the layers: embedding (one-hot, lift), final norm, token selection

Value = Any  # np.ndarray, or None where a party holds no value


class StepShape:
    """Public shape of one step: T new tokens after ``past`` cached ones; ``emits``: the step ends in a
    token (every step but a long prompt's chunks before its last, :func:`~permllm.model.layout.positions`);
    ``out``: how many of the last rows get logits (1; all T in a verify pass, :meth:`verify`)."""

    __slots__ = ("T", "past", "pos", "block", "valid", "emits", "out")

    def __init__(self, arch: Arch, prompt_len: int, step: int, chunk: int = 0) -> None:
        self.pos, self.block, self.past = positions(arch, prompt_len, step, chunk)
        self.T = len(self.pos)
        self.valid = valid_lengths(arch, self.T, self.past)
        self.emits = step >= prompt_steps(arch, prompt_len, chunk) - 1
        self.out = 1

    @classmethod
    def verify(cls, arch: Arch, prompt_len: int, past: int, T: int) -> "StepShape":
        """A verify pass of speculative decoding: T generated tokens (the last emitted one, then T − 1 drafts)
        after ``past`` cached ones, causal among themselves, with the logits of every row."""
        s = cls.__new__(cls)
        s.pos, s.block = pass_positions(arch, prompt_len, past, T)
        s.past, s.T = past, T
        s.valid = valid_lengths(arch, T, past)
        s.emits, s.out = True, T
        return s


def takes_fused(arch: Arch, route: str, layer: int, s: StepShape) -> bool:
    """Whether decoder layer ``layer``'s attention in step ``s`` takes the fused 8-hop op (else the 12-hop ops).

    The fused op reveals every score of its row: only a one-row step that attends to all keys takes it (a
    prefill chunk or a verify pass has causal rows). Its keys are linear in the norm's output (the w-linear):
    a QK-norm between them takes the 12-hop ops. Past :data:`ATTN8_MAX_KEYS` keys its offline copies of the
    cache cost more than the 4 hops it saves.
    """
    return (route == "8" and s.T == 1 and not np.any(s.valid != s.past + s.T)
            and not window_starts(arch, layer, s.valid).any() and not arch.qk_norm and s.past + s.T <= ATTN8_MAX_KEYS)


def plan_route(arch: Arch, route: str) -> str:
    """The route whose setup (masked weights, ring plan) ``route`` needs for ``arch``: "12" for route "8" where
    the fused op never runs (QK-norm: :func:`takes_fused`), so no layer pays for its wide ring and weights."""
    return "12" if route == "8" and arch.qk_norm else route


def step_hops(arch: Arch, route: str, s: StepShape) -> int:
    """The dependent online hops step ``s`` takes by the hop model: 8 per layer on the fused op, 12 on the
    12-hop ops, and :data:`EDGE_HOPS` for the embedding, the final norm and token selection."""
    return sum(8 if takes_fused(arch, route, i, s) else 12 for i in range(arch.layers)) + EDGE_HOPS


def weight_names(arch: Arch, route: str = "12", offline: str = "dealer") -> list[tuple[str, str]]:
    """(name, kind) of every private weight that needs the masked-weight setup.

    The real-number embedding table is one only where it is used: by a tied head, or by the
    light mode's lookup (the dealt lookup has its ring table, :func:`setup_embedding`). The
    8-hop attention route also needs the qkv bias as a masked weight (U and H use it for the
    new key's score; see :mod:`permllm.protocols.attention`).
    """
    route = plan_route(arch, route)
    out = [("embed", "dense")] if arch.tied_head or offline == "he" else []
    for i in range(arch.layers):
        out += [(f"L{i}.qkv", "dense"), (f"L{i}.o", "dense"), (f"L{i}.mlp_in", "dense"), (f"L{i}.mlp_out", "dense")]
        if route == "8" and arch.qkv_bias:
            out.append((f"L{i}.qkv.b", "bias"))
        if arch.residual == "alpha":
            out += [(f"L{i}.res_in", "diag"), (f"L{i}.res_post", "diag")]
        if arch.qk_norm:
            out += [(f"L{i}.qn", "diag"), (f"L{i}.kn", "diag")]
        if arch.post_norms:
            out += [(f"L{i}.post_attn", "diag"), (f"L{i}.post_ff", "diag")]
    out.append(("final", "diag") if arch.tied_head else ("head", "dense"))
    return out


def _added(weights: ModelWeights) -> float:
    """A bound of what M adds to a lookup: the learned positions' largest entry (0 without them)."""
    pos = weights.get("pos_embed") if weights.arch.pos == "learned" else None
    return float(np.max(np.abs(pos))) if pos is not None and pos.size else 0.0


def lookup_table(weights: ModelWeights) -> np.ndarray:
    """The table the lookup reads: the embedding, times the public ``embed_scale`` (Gemma's √hidden; the tied
    head keeps the unscaled ``embed``)."""
    E, s = weights["embed"], weights.arch.embed_scale
    return E if s == 1.0 else E * s


def ring_table_meta(weights: ModelWeights) -> tuple[tuple[int, int], int]:
    """(shape, public scale) of the dealt mode's ring table, as the model party's setup announces it."""
    E = weights["embed"]
    bound = float(np.max(np.abs(E))) * weights.arch.embed_scale
    return (E.shape[0], E.shape[1]), table_scale(bound + _added(weights))


async def setup_embedding(p: Party, weights: ModelWeights | None, arch: Arch) -> None:
    """The dealt mode's ring table for the embedding lookup (M passes its weights); nothing in the light mode."""
    if p.config.offline == "he":
        return
    if p.is_model:
        await setup_table(p, RING_TABLE, lookup_table(weights), added=_added(weights))  # type: ignore[arg-type]
    else:
        await setup_table(p, RING_TABLE, shape=(arch.vocab, arch.hidden))


def weight_shape(arch: Arch, name: str) -> tuple[int, ...]:
    """The shape of the private weight ``name`` (one of :func:`weight_names`): what the user and the
    helper expect the model party's setup to announce."""
    base = name.split(".", 1)[1] if name.startswith("L") else name
    gate = 2 if arch.gated else 1
    shapes = {"embed": (arch.vocab, arch.hidden), "head": (arch.vocab, arch.hidden), "final": (arch.hidden,),
              "qkv": (arch.qkv_out, arch.hidden), "qkv.b": (arch.qkv_out,),
              "o": (arch.hidden, arch.heads * arch.head_dim), "mlp_in": (gate * arch.ffn, arch.hidden),
              "mlp_out": (arch.hidden, arch.ffn), "res_in": (arch.hidden,), "res_post": (arch.hidden,),
              "qn": (arch.head_dim,), "kn": (arch.head_dim,), "post_attn": (arch.hidden,), "post_ff": (arch.hidden,)}
    return shapes[base]


class Forward:
    """The decoder: embedding, layers, final norm and head, for one step."""

    def __init__(self, arch: Arch) -> None:
        self.arch = arch

    async def step(self, ops: "PlainOps | PrivateOps", ids: Any, shape: StepShape) -> Value:
        """Logits (``shape.out``, vocab) of the last new tokens (one, or a verify pass's every row), given the
        step's token ids (held by U); None for a chunk of the prompt before its last (it only fills the caches)."""
        a = self.arch
        x = await ops.embed("embed", ids, shape.T, shape.pos if a.pos == "learned" else None)
        for i in range(a.layers):
            await ops.gate(i)
            x = await self.layer(ops, i, x, shape)
        await ops.gate(a.layers)
        if not shape.emits:
            return None
        return await self.head(ops, x, shape.out)

    async def head(self, ops: "PlainOps | PrivateOps", x: Value, rows: int = 1) -> Value:
        """Logits (rows, vocab) of the last ``rows`` rows of the last layer's output ``x``: final norm, then
        the head (a verify pass: every row)."""
        a = self.arch
        x = ops.note("final.x", ops.local(lambda v: v[-rows:], x))
        h, _ = await ops.norm("final.n", x, "final.x", (rows, a.hidden))
        if a.tied_head:
            h = await ops.linear("final", h, "final", "final.n", kind="diag")
            return await ops.linear("logits", h, "embed", "final")
        return await ops.linear("logits", h, "head", "final.n")

    async def layer(self, ops: "PlainOps | PrivateOps", i: int, x: Value, s: StepShape) -> Value:
        a, n, T = self.arch, f"L{i}", s.T
        ops.note(f"{n}.x", x)
        attend = getattr(ops, "attention", None)  # a backend may fuse norm1 … P·V (8-hop route)
        h, att, x = await (attend(i, x, s) if attend is not None else attention_block(ops, a, i, x, s))
        o_in = ops.note(f"{n}.attm", ops.local(lambda z: merge_heads(a, z), att))
        o = await ops.linear(f"{n}.o", o_in, f"{n}.o", f"{n}.attm")
        if a.post_norms:  # Gemma: (1 + w)·norm(o) before the add; the weight a zero-round diagonal linear
            o = await ops.linear(f"{n}.post_attn", (await ops.norm(f"{n}.na", o, f"{n}.o", (T, a.hidden)))[0],
                                 f"{n}.post_attn", f"{n}.na", kind="diag")
        if a.residual == "alpha":
            x = ops.add(await ops.linear(f"{n}.res_in", h, f"{n}.res_in", f"{n}.n1", kind="diag"), o)
        else:
            x = ops.add(x, o)
        ops.note(f"{n}.x2", x)
        h2, x = await ops.norm(f"{n}.n2", x, f"{n}.x2", (T, a.hidden), a.residual != "alpha")
        u = await ops.linear(f"{n}.mlp_in", h2, f"{n}.mlp_in", f"{n}.n2")
        m = await ops.act(f"{n}.act", u, f"{n}.mlp_in", (T, a.ffn))
        y = await ops.linear(f"{n}.mlp_out", m, f"{n}.mlp_out", f"{n}.act")
        if a.post_norms:
            y = await ops.linear(f"{n}.post_ff", (await ops.norm(f"{n}.nf", y, f"{n}.mlp_out", (T, a.hidden)))[0],
                                 f"{n}.post_ff", f"{n}.nf", kind="diag")
        if a.residual == "alpha":
            return ops.add(await ops.linear(f"{n}.res_post", h2, f"{n}.res_post", f"{n}.n2", kind="diag"), y)
        return ops.add(x, y)


async def attention_block(ops: "PlainOps | PrivateOps", a: Arch, i: int, x: Value,
                          s: StepShape) -> tuple[Value, Value, Value]:
    """norm1 → qkv → heads (QK-norm) /RoPE → q·Kᵀ → softmax → P·V as separate ops (the 12-hop route).

    Returns the norm output (used by ChatGLM's residual), the attention output (kv, g, T, d) and
    the residual stream x (on the ring re-encoded by the norm, which restarts its scale).
    """
    n, T = f"L{i}", s.T
    h, x = await ops.norm(f"{n}.n1", x, f"{n}.x", (T, a.hidden), a.residual != "alpha")
    qkv = await ops.linear(f"{n}.qkv", h, f"{n}.qkv", f"{n}.n1")
    q, k, v = ops.local_multi(lambda z: split_heads(a, z), qkv, 3)
    if a.qk_norm:  # Gemma 3: every q and k head's row normalised in one permuted op (2 hops), then 1 + w
        rows = ops.note(f"{n}.qkr", ops.local(lambda z: qk_rows(a, z), qkv))
        rows, _ = await ops.norm(f"{n}.qkn", rows, f"{n}.qkr", ((a.heads + a.kv_heads) * T, a.head_dim))
        q, k = ops.local_multi(lambda z: from_qk_rows(a, z), rows, 2)
        q = await ops.linear(f"{n}.qn", q, f"{n}.qn", f"{n}.qkn", kind="diag")
        k = await ops.linear(f"{n}.kn", k, f"{n}.kn", f"{n}.qkn", kind="diag")
    q = await ops.rope(f"{n}.q", q, s, i)
    k = await ops.rope(f"{n}.k", k, s, i)
    v = ops.note(f"{n}.v", v)
    keys = s.past + T
    sc = await ops.smm(f"{n}.s", q, k, f"{n}.K", True, f"{n}.q", f"{n}.k", s.valid)
    start = window_starts(a, i, s.valid)
    if start.any():  # a sliding window: each row's keys [start, valid) become its prefix (a public shift)
        sc = ops.local(lambda z: shift_rows(z, start), sc)
    pr = await ops.softmax(f"{n}.p", sc, s.valid - start, a.score_scale, f"{n}.s", (a.kv_heads, a.group, T, keys))
    if start.any():
        pr = ops.local(lambda z: shift_rows(z, -start), pr)
    att = await ops.smm(f"{n}.att", pr, v, f"{n}.V", False, f"{n}.p", f"{n}.v", s.valid)
    return h, att, x


def _norm_fn(arch: Arch) -> Callable[[np.ndarray], np.ndarray]:
    eps = arch.norm_eps
    return (lambda z: F.rms_norm(z, eps)) if arch.norm == "rms" else (lambda z: F.layer_norm(z, eps))


def _act_fn(arch: Arch) -> Callable[[np.ndarray], np.ndarray]:
    if arch.gated:
        f, glu_fn = arch.ffn, F.glu(_GATE[arch.act])
        return lambda u: glu_fn(u[..., :f], u[..., f:])
    return F.gelu_tanh if arch.act == "gelu_tanh" else F.gelu


_GATE = {"swiglu": "silu", "geglu_tanh": "gelu_tanh"}  # a gated MLP's activation of its gate


class PlainOps:
    """Plaintext float64 backend: the reference forward, recording each op's max |output|."""

    def __init__(self, weights: ModelWeights) -> None:
        self.w = weights
        self.arch = weights.arch
        self.cache: dict[str, np.ndarray] = {}
        self.mags: dict[str, float] = {}
        self._norm, self._act = _norm_fn(self.arch), _act_fn(self.arch)

    async def gate(self, layer: int) -> None:
        """Nothing to pace in plaintext (:meth:`PrivateOps.gate`)."""

    def reset(self) -> None:
        self.cache.clear()

    def note(self, name: str, x: np.ndarray, axis: int = -1) -> np.ndarray:
        """Record max |x| under ``name`` and the max L2 norm along ``axis`` under ``name|l2``."""
        if x.size:
            ax = np.abs(x)
            self.mags[name] = max(self.mags.get(name, 0.0), float(np.max(ax)))
            l2 = float(np.max(np.sqrt(np.sum(x * x, axis=axis))))
            self.mags[name + "|l2"] = max(self.mags.get(name + "|l2", 0.0), l2)
            col = np.max(ax.reshape(-1, x.shape[-1]), axis=0)
            old = self.mags.get(name + "|col")
            self.mags[name + "|col"] = col if old is None or np.shape(old) != col.shape else np.maximum(old, col)
        return x

    def local(self, fn: Callable, x: np.ndarray) -> np.ndarray:
        return fn(x)

    def local_multi(self, fn: Callable, x: np.ndarray, n: int) -> tuple:
        return fn(x)

    def add(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x + y

    async def embed(self, name: str, ids: Any, T: int, pos: np.ndarray | None = None) -> np.ndarray:
        """E[ids], plus the learned positions' rows ``pos`` where the model has them."""
        x = self.w["embed"][np.asarray(ids)] * self.arch.embed_scale
        return self.note(name, x if pos is None else x + self.w["pos_embed"][pos])

    async def linear(self, name: str, x: np.ndarray, weight: str, src: str, kind: str = "dense") -> np.ndarray:
        W = self.w[weight]
        y = x * W if kind == "diag" else x @ W.T
        b = self.w.get(weight + ".b")
        return self.note(name, y if b is None else y + b)

    async def norm(self, name: str, x: np.ndarray, src: str, shape: tuple,
                   residual: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(norm(x), x): the private backend may re-encode the residual stream x at the norm."""
        return self.note(name, self._norm(x)), x

    async def rope(self, name: str, x: np.ndarray, s: StepShape, layer: int | None = None) -> np.ndarray:
        return self.note(name, rope(self.arch, x, s.pos, s.block, layer=layer))

    async def smm(self, name: str, a: np.ndarray, b_new: np.ndarray, cache: str, transpose_b: bool,
                  src_a: str, src_b: str, valid: np.ndarray | None = None) -> np.ndarray:
        old = self.cache.get(cache)
        b = b_new if old is None else np.concatenate([old, b_new], -2)
        self.cache[cache] = b
        self.note(src_b + "|cols", b, axis=-1 if transpose_b else -2)
        return self.note(name, a @ np.swapaxes(b, -1, -2) if transpose_b else a @ b)

    async def softmax(self, name: str, s: np.ndarray, valid: np.ndarray, scale: float, src: str,
                      shape: tuple) -> np.ndarray:
        return self.note(name, F.softmax(s, valid, scale))

    async def act(self, name: str, u: np.ndarray, src: str, shape: tuple) -> np.ndarray:
        if self.arch.gated:
            f = self.arch.ffn
            self.note(name + ".g", u[..., :f])
            self.note(name + ".u", u[..., f:])
        return self.note(name, self._act(u))

    async def attention(self, i: int, x: np.ndarray, s: StepShape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The plain composition (as the 12-hop route), also recording the 8-hop route's magnitudes."""
        a, n = self.arch, f"L{i}"
        h, att, x = await attention_block(self, a, i, x, s)
        if a.qk_norm:  # the fused op does not take QK-normed attention (PrivateOps.attention)
            return h, att, x
        W = self.w[f"{n}.qkv"]
        b = self.w.get(f"{n}.qkv.b")
        q_raw = split_heads(a, h @ W.T + (0.0 if b is None else b))[0]
        w_k = np.swapaxes(split_heads(a, W.T)[1], -1, -2)   # (kv, 1, d, hidden)
        self.note(f"{n}.w", q_raw @ w_k)                     # q̂·W_k: sizes the 8-hop w-linear's mask
        return h, att, x


async def calibrate(weights: ModelWeights, n_tokens: int = 32, seed: int = 0,
                    headroom: float = 2.0) -> dict[str, float]:
    """Public mask magnitudes: headroom × the max |value| of each op on a pseudo-random token sequence,
    rounded up to a power of two (:func:`public_bounds`).

    Run by the model party (it holds the weights), with no knowledge of any prompt (but the public ``bos_id``
    every prompt starts with, where the model has one); the result is sent to the user and the helper in the
    setup phase.
    """
    a = weights.arch
    n = max(2, min(n_tokens, a.max_positions - 2))
    ids = np.random.default_rng(seed).integers(0, a.vocab, size=n)
    if a.bos_id >= 0:  # the model's own first token: Gemma's residual stream is ~4× larger at <bos> (its sink)
        ids[0] = a.bos_id
    ops = PlainOps(weights)
    fwd = Forward(a)
    await fwd.step(ops, ids[:-1], StepShape(a, n - 1, 0))
    await fwd.step(ops, ids[-1:], StepShape(a, n - 1, 1))
    return public_bounds(ops.mags, headroom)


def public_bounds(mags: dict[str, Any], headroom: float = 2.0) -> dict[str, float]:
    """What the setup may publish of recorded magnitudes: one scalar per op, headroom × its max, rounded up
    to a power of two — no per-column (per-vocabulary-entry) maxima, which were a free model query and a
    fingerprint of the weights."""
    return {k: 2.0 ** math.ceil(math.log2(max(headroom * float(np.max(v)), 1e-3)))
            for k, v in mags.items() if not k.endswith("|col")}


def _traced(fn: Callable) -> Callable:
    """Profile a PrivateOps op under its name (a no-op unless the party is tracing)."""
    async def wrapper(self: "PrivateOps", name: str, *args: Any, **kw: Any) -> Any:
        if self.p is None:  # a budget run: no party
            return await fn(self, name, *args, **kw)
        async with self.p.traced(name):
            return await fn(self, name, *args, **kw)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@dataclass(frozen=True)
class RingPlan:
    """The public fixed-point precision of a ring session (docs/ring.md): fractional bits of U's
    encodings — ``a`` norm outputs, ``p`` probabilities, ``s`` activation outputs, ``emb`` the lookup's
    output, ``res`` the residual stream re-encoded at each norm — ``wb`` significant bits per weight,
    ``c`` of the RoPE rotation, and ``pq`` the scale q and k are truncated to before q·Kᵀ. With ``wide``
    the attention block (norm1's output and residual through q·Kᵀ, softmax, P·V and the o projection to
    norm2's input) runs on the wide ring Z_N, N ≈ 2^104 (:mod:`permllm.protocols.crt`), without truncation.

    ``a_bits``, ``p_bits``, ``s_bits``: the rings Z_2^k U reshares the decoder layers' norm outputs, the
    probabilities and the activation outputs on (where they are not on Z_N), so that their messages travel in
    k/8 bytes an element: a share needs to be right mod 2^k only when every value computed from it before the
    next clear view fits k bits (:func:`narrow_plan` takes the narrowest that do)."""

    a: int
    wb: int
    c: int
    pq: int
    p: int
    s: int
    emb: int = 24
    res: int = 24
    wide: bool = False
    a_bits: int = RING_BITS
    p_bits: int = RING_BITS
    s_bits: int = RING_BITS

    def to_list(self) -> list[int]:
        return [self.a, self.wb, self.c, self.pq, self.p, self.s, self.emb, self.res, int(self.wide), self.a_bits,
                self.p_bits, self.s_bits]

    @classmethod
    def from_list(cls, v: object) -> "RingPlan":
        if not (isinstance(v, list) and len(v) == 12 and all(type(b) is int for b in v)
                and all(0 <= b <= 40 for b in v[:8]) and v[8] in (0, 1)
                and all(8 <= b <= RING_BITS and b % 8 == 0 for b in v[9:])):
            raise ValueError(f"bad ring precision plan {v!r}")
        return cls(*v[:8], wide=bool(v[8]), a_bits=v[9], p_bits=v[10], s_bits=v[11])

    def full_width(self) -> "RingPlan":
        """This precision with every reshare on Z_2^64 (the candidates of :data:`PLAN_ORDER`)."""
        return replace(self, a_bits=RING_BITS, p_bits=RING_BITS, s_bits=RING_BITS)


# Candidate precisions, finest first (a, wb, c, pq, p, s): the session takes the first whose every value fits
# Z_2^64 with the model's published bounds (choose_ring_plan); docs/ring.md has the measured frontier.
RING_FRONTIER = [RingPlan(14, 18, 14, 14, 14, 18), RingPlan(13, 17, 13, 13, 13, 17), RingPlan(12, 16, 12, 12, 12, 16),
                 RingPlan(12, 15, 12, 12, 11, 16), RingPlan(11, 15, 12, 12, 10, 16), RingPlan(10, 14, 12, 12, 10, 16),
                 RingPlan(10, 13, 10, 10, 10, 16), RingPlan(9, 12, 10, 10, 9, 14), RingPlan(8, 11, 9, 9, 8, 12)]


RING_FLOOR = RING_FRONTIER[2]  # "auto" takes the ring only at this precision or finer: float-like tokens
# Where Z_2^64 cannot hold the attention block at RING_FLOOR (SmolLM2's massive activations), these run it on Z_N.
WIDE_FRONTIER = [RingPlan(14, 18, 14, 14, 14, 18, wide=True), RingPlan(13, 17, 13, 13, 13, 17, wide=True),
                 RingPlan(12, 16, 12, 12, 12, 16, wide=True)]
_FLOOR_AT = RING_FRONTIER.index(RING_FLOOR)
PLAN_ORDER = RING_FRONTIER[:_FLOOR_AT + 1] + WIDE_FRONTIER + RING_FRONTIER[_FLOOR_AT + 1:]


def resolve_arith(arith: str, possible: bool, weights: ModelWeights, mags: dict[str, Any],
                  route: str = "12", layer: int | None = None) -> tuple[str, RingPlan | None]:
    """The model party's choice of arithmetic for a session: ("ring", plan) or ("float", None).

    "ring" takes the first plan of :data:`PLAN_ORDER` that fits (RingOverflow if none does); "auto" takes the
    ring where it is built (``possible``) and its plan is at least :data:`RING_FLOOR` on Z_2^64 or a wide plan,
    else real numbers; "float" is float. ``layer``: the plan of that decoder layer alone
    (:func:`choose_ring_plan`).
    """
    if arith == "float" or (arith == "auto" and not possible):
        return "float", None
    try:
        plan = choose_ring_plan(weights, mags, route, layer)
    except RingOverflow:
        if arith == "ring":
            raise
        return "float", None
    if arith == "auto" and PLAN_ORDER.index(plan) > PLAN_ORDER.index(WIDE_FRONTIER[-1]):
        return "float", None
    return "ring", narrow_plan(weights, mags, plan, layer)


class Fx:
    """A ring share (``v``: uint64 words, or None where the party holds none) with its public encoding:
    ``scale`` fractional bits on Z_2^``bits`` (64, or less after a local truncation). A wide value (on Z_N,
    ``bits`` = crt.WIDE_BITS) also has ``rs``: its residues mod each of crt.PRIMES (None where the party holds
    none)."""

    __slots__ = ("v", "scale", "bits", "rs")

    def __init__(self, v: Any, scale: int, bits: int = RING_BITS, rs: list | None = None) -> None:
        self.v, self.scale, self.bits, self.rs = v, scale, bits, rs

    @property
    def wide(self) -> bool:
        return self.rs is not None

    def with_value(self, v: Any, rs: list | None = None) -> "Fx":
        return Fx(v, self.scale, self.bits, rs if rs is not None or self.rs is None else [None] * len(self.rs))


def wide_weights(arch: Arch, route: str = "12") -> list[str]:
    """The weights a wide plan also sets up mod each prime: those of the attention block's linears (and the
    8-hop route's masked qkv bias)."""
    route = plan_route(arch, route)
    extra = ((("res_in",) if arch.residual == "alpha" else ()) + (("qkv.b",) if route == "8" and arch.qkv_bias else ())
             + (("qn", "kn") if arch.qk_norm else ()) + (("post_attn",) if arch.post_norms else ()))
    return [f"L{i}.{k}" for i in range(arch.layers) for k in ("qkv", "o", *extra)]


def weight_fracs(arch: Arch, weights: ModelWeights, plan: RingPlan, route: str = "12",
                 layer: int | None = None) -> dict[str, int]:
    """The fractional bits of every private weight under ``plan`` (what the setup announces): ``plan.wb``
    significant bits, but the 8-hop route's qkv bias at the scale of the product it is added to. ``layer``:
    only that decoder layer's weights (:func:`layer_weight_names`)."""
    names = weight_names(arch, route) if layer is None else layer_weight_names(arch, layer, route)
    out = {n: weight_frac(public_scale(np.asarray(weights[n], dtype=np.float64)), plan.wb) for n, _ in names}
    for n in out:
        if n.endswith(".qkv.b"):
            out[n] = plan.a + out[n[:-2]]
    return out


def choose_ring_plan(weights: ModelWeights, mags: dict[str, Any], route: str = "12",
                     layer: int | None = None) -> RingPlan:
    """The first plan of :data:`PLAN_ORDER` (Z_2^64 down to :data:`RING_FLOOR`, then the wide plans, then coarser
    Z_2^64 ones; the 8-hop route where it runs, :func:`plan_route`: the wide plans only) whose every shared value
    fits its ring with one bit to spare (a scales-only run of the forward over a prefill and a decode step);
    RingOverflow if none does.

    ``layer``: the scales-only run is of that decoder layer alone (a benchmark of one layer holds only its
    weights), from the embedding's scale and again from its own output's scale and ring (:func:`layer_output`: what
    every later layer receives)."""
    last: Exception | None = None
    for plan in (WIDE_FRONTIER if plan_route(weights.arch, route) == "8" else PLAN_ORDER):
        last = _misfit(weights, mags, plan, layer)
        if last is None:
            return plan
    raise RingOverflow(f"no fixed-point precision fits this model's activations in Z_2^64 (the coarsest: {last}); "
                       "use --arith float")


def narrow_plan(weights: ModelWeights, mags: dict[str, Any], plan: RingPlan, layer: int | None = None) -> RingPlan:
    """``plan`` with U's reshares as narrow as their consumers allow (``RingPlan.s_bits``, ``a_bits``,
    ``p_bits``, in that order; a wide plan's probabilities are on Z_N): for each, the smallest ring of whole bytes
    on which the scales-only forward still fits. Every value computed from a reshared one carries its ring
    (``Fx.bits``) up to the next clear view, so the run checks each consumer; the values themselves do not change
    (they are the same mod the next reveal's ring)."""
    for field in ("s_bits", "a_bits") + (() if plan.wide else ("p_bits",)):
        for bits in range(RING_BITS - 8, 0, -8):
            narrower = replace(plan, **{field: bits})
            if _misfit(weights, mags, narrower, layer) is not None:
                break
            plan = narrower
    return plan


def _misfit(weights: ModelWeights, mags: dict[str, Any], plan: RingPlan, layer: int | None) -> RingOverflow | None:
    """Why ``plan`` does not fit (the first value beyond its ring in a scales-only run of a prefill and a decode
    step: of the model, or of decoder layer ``layer`` alone, see :func:`choose_ring_plan`), or None if it does."""
    arch = weights.arch
    ops = PrivateOps(None, arch, mags, None, "", plan=plan, fracs=weight_fracs(arch, weights, plan, layer=layer))
    shapes = [StepShape(arch, 8, step) for step in (0, 1)]
    try:
        if layer is None:
            for shape in shapes:
                _run_budget(Forward(arch).step(ops, None, shape))
        else:
            for x in (Fx(None, plan.emb), layer_output(ops, layer)):
                for shape in shapes:
                    _run_budget(Forward(arch).layer(ops, layer, x, shape))
    except RingOverflow as e:
        return e
    return None


def layer_output(ops: "PrivateOps", layer: int) -> Fx:
    """Decoder layer ``layer``'s output (scale and ring, no value) under a scales-only ``ops``, from an input at the
    embedding's scale: every later layer's input, since each layer restarts the residual stream's scale at its norms
    (``plan.res``; ChatGLM's α residual at the norm outputs). RingOverflow where a value does not fit."""
    arch = ops.arch
    out = _run_budget(Forward(arch).layer(ops, layer, Fx(None, ops.plan.emb), StepShape(arch, 8, 0)))
    return Fx(None, out.scale, out.bits)


def layer_weight_names(arch: Arch, layer: int, route: str = "12") -> list[tuple[str, str]]:
    """(name, kind) of decoder layer ``layer``'s private weights (those of :func:`weight_names`)."""
    return [(n, k) for n, k in weight_names(arch, route) if n.startswith(f"L{layer}.")]


def _run_budget(coro: Any) -> Any:
    """Drive a scales-only coroutine (a forward step or layer) to completion and return its value (its ops never
    await anything)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a scales-only forward awaited a message")


_RESIDUAL = re.compile(r"^(L\d+\.x2?|final\.x)$")
_LAYER_OP = re.compile(r"^L\d+\.")


def _family(name: str) -> str:
    """The name shared by one op's values in every layer (the residual stream's points share one)."""
    return "residual" if _RESIDUAL.match(name) else re.sub(r"^L\d+\.", "L*.", name)


def _ring_ranges(mags: dict[str, Any]) -> dict[str, int]:
    """log2 of the largest published bound of each :func:`_family`: a real prompt's spike in one layer
    (SmolLM2's massive activations arrive at different layers for different tokens) must not overflow
    where the calibration happened to see small values; the ring's budget is set by the largest anyway."""
    out: dict[str, int] = {}
    for k, v in mags.items():
        if "|" not in k:
            f = _family(k)
            out[f] = max(out.get(f, -64), math.ceil(math.log2(float(np.max(v)))))
    return out


_WIDE_NORMS = (".n1", ".qkn", ".na")


class PrivateOps:
    """One party's branch of the forward: values are its shares; ops are protocol ops.

    On the ring (``Party.ring``) every value is an :class:`Fx`: the share with its public scale,
    tracked op by op from the session's :class:`RingPlan` and the weights' fractional bits, and
    checked against the op's published bound (RingOverflow naming the op if it cannot fit). With
    ``p=None`` it runs the scales only (:func:`choose_ring_plan`).
    """

    def __init__(self, p: Party | None, arch: Arch, mags: dict[str, float], weights: ModelWeights | None,
                 cache_prefix: str, plan: RingPlan | None = None, fracs: dict[str, int] | None = None) -> None:
        self.p, self.arch, self.mags, self.w = p, arch, mags, weights
        self.prefix = cache_prefix
        self._norm_op = rms_norm if arch.norm == "rms" else layer_norm
        self.ring = p is None or p.ring
        if self.ring and plan is None:
            raise ValueError("ring arithmetic needs the session's precision plan")
        self.plan = plan
        self.fracs = fracs
        self._ranges = _ring_ranges(mags) if self.ring else {}
        self.pace: Callable[[int], Awaitable[None]] | None = None  # the session's per-layer pacing of a step

    async def gate(self, layer: int) -> None:
        """Before layer ``layer`` (``arch.layers``: the final norm and head): let the session pace the
        step, so that a long prompt's offline phase runs a few layers ahead of its online phase."""
        if self.pace is not None:
            await self.pace(layer)

    def _mag(self, name: str) -> float:
        """Calibrated bound of |value| (a scalar)."""
        try:
            return float(self.mags[name])
        except KeyError:
            raise KeyError(f"no calibrated magnitude for {name!r}") from None

    def _col(self, name: str) -> float | np.ndarray:
        """Per-column bound (last axis) where calibrated, else the scalar bound: sizes U's new share."""
        v = self.mags.get(name + "|col")
        return self._mag(name) if v is None else np.asarray(v, dtype=np.float64)

    # -- ring bookkeeping --------------------------------------------------------------
    def _range(self, name: str) -> int:
        """log2 of the bound a ring value must stay within: its op's published bound, the largest over the
        layers (the residual stream's over every point of it)."""
        try:
            return self._ranges[_family(name)]
        except KeyError:
            raise KeyError(f"no calibrated magnitude for {name!r}") from None

    def _fx(self, name: str, v: Any, scale: int, bits: int = RING_BITS, rs: list | None = None) -> Fx:
        """``v`` as a value at ``scale`` on Z_2^bits (with residues ``rs``: on Z_N), after checking that ``name``'s
        bound fits there."""
        need = scale + self._range(name) + 2
        if need > bits:
            raise RingOverflow(f"{name}: a value bounded by 2^{self._range(name)} at 2^-{scale} needs {need} bits; "
                               f"it lives on {'Z_N, N ≈ 2^' if rs is not None else 'Z_2^'}{bits}")
        return Fx(v, scale, bits, rs)

    def _wide(self, name: str, scale: int) -> Fx:
        """An output on Z_N (no values yet): residues None."""
        return self._fx(name, None, scale, crt.WIDE_BITS, [None] * len(crt.PRIMES))

    def _enc(self, name: str, x: Fx) -> ring.Enc:
        return ring.Enc(x.scale, x.bits, self._range(name))

    def _frac(self, weight: str) -> int:
        if self.fracs is not None:
            return self.fracs[weight]
        return self.p.weights[weight].frac  # type: ignore[union-attr]

    def _views(self) -> list[Party]:
        """This party's residue views, one per prime (the wide ring's other residues)."""
        return [self.p.residue(q) for q in crt.PRIMES]  # type: ignore[union-attr]

    # -- local ops ---------------------------------------------------------------------
    def note(self, name: str, x: Value) -> Value:
        if self.ring and name in self.mags:
            self._fx(name, None, x.scale, x.bits, x.rs)
        return x

    def local(self, fn: Callable, x: Value) -> Value:
        if self.ring:
            rs = None if x.rs is None else [None if r is None else fn(r) for r in x.rs]
            return Fx(None if x.v is None else fn(x.v), x.scale, x.bits, rs)
        return None if x is None else fn(x)

    def local_multi(self, fn: Callable, x: Value, n: int) -> tuple:
        if self.ring:
            vs = (None,) * n if x.v is None else fn(x.v)
            if x.rs is None:
                return tuple(Fx(v, x.scale, x.bits) for v in vs)
            rss = [(None,) * n if r is None else fn(r) for r in x.rs]
            return tuple(Fx(v, x.scale, x.bits, [rr[j] for rr in rss]) for j, v in enumerate(vs))
        return (None,) * n if x is None else fn(x)

    def add(self, x: Value, y: Value) -> Value:
        if self.ring:  # align on the finer scale: shifting a share up is exact
            sc, bits = max(x.scale, y.scale), min(x.bits, y.bits)
            if x.wide != y.wide:
                raise RingOverflow(f"adding a value on Z_N to one on Z_2^64 (plan {self.plan})")
            if x.v is None or y.v is None:
                return Fx(None, sc, bits, None if x.rs is None else [None] * len(x.rs))
            v = ring.shift_up(x.v, sc - x.scale) + ring.shift_up(y.v, sc - y.scale)
            rs = None
            if x.wide:
                rs = [crt.reduce(crt.reduce(a, q) * float(pow(2, sc - x.scale, q))
                                 + crt.reduce(b, q) * float(pow(2, sc - y.scale, q)), q)
                      for a, b, q in zip(x.rs, y.rs, crt.PRIMES)]
            return Fx(v, sc, bits, rs)
        return None if x is None or y is None else x + y

    async def rope(self, name: str, x: Value, s: StepShape, layer: int | None = None) -> Value:
        """RoPE on each share; on the ring the rotation is encoded at ``plan.c`` bits and q, k are then truncated
        locally (no message) to ``plan.pq`` fractional bits, on the smaller ring Z_2^(64−f); on Z_N (a wide plan)
        each residue is rotated and nothing is truncated."""
        a = self.arch
        if not self.ring:
            return self.local(lambda z: rope(a, z, s.pos, s.block, layer=layer), x)
        c = rope_bits(a, self.plan.c)  # type: ignore[union-attr]
        v = None if x.v is None else rope(a, x.v, s.pos, s.block, c, layer=layer)
        if x.wide:
            rs = [None if r is None else rope(a, r, s.pos, s.block, c, q, layer) for r, q in zip(x.rs, crt.PRIMES)]
            return self._fx(name, v, x.scale + c, x.bits, rs)
        y = self._fx(name, v, x.scale + c, x.bits)
        f = max(0, y.scale - self.plan.pq)  # type: ignore[union-attr]
        return self._fx(name, None if y.v is None else ring.trunc(y.v, f), y.scale - f, y.bits - f)

    # -- protocol ops ------------------------------------------------------------------
    @_traced
    async def embed(self, name: str, ids: Any, T: int, pos: np.ndarray | None = None) -> Value:
        """The lookup of U's ids in M's ring table ``embed.ring`` (the light mode: real weight ``embed``); M adds
        the learned positions' rows ``pos`` (a table of its own, public indices)."""
        out = self._fx(name, None, self.plan.emb) if self.ring else None  # type: ignore[union-attr]
        if self.p is None:
            return out
        add = self.w["pos_embed"][pos] if self.p.is_model and pos is not None else None  # type: ignore[index]
        v = await embed(self.p, name, ids, weight="embed", table=RING_TABLE, vocab=self.arch.vocab, n_tokens=T,
                        mag_out=self._col(name), add=add, out_scale=None if out is None else out.scale)
        if self.p.config.offline == "he" and self.arch.embed_scale != 1.0 and v is not None:
            if out is not None:
                raise RingOverflow(f"{name}: the light mode's lookup of a scaled embedding runs on real numbers")
            v = v * self.arch.embed_scale  # the light lookup reads the unscaled weight: a public scale of each share
        return v if out is None else out.with_value(v)

    @_traced
    async def linear(self, name: str, x: Value, weight: str, src: str, kind: str = "dense") -> Value:
        if not self.ring:
            bias = self.w.get(weight + ".b") if self.p.is_model else None  # type: ignore[union-attr]
            return await linear(self.p, name, x, weight, mag_in=self._mag(src), mag_out=self._col(name), kind=kind,
                                bias=bias, l2_in=self._mag(src + "|l2"))
        scale = x.scale + self._frac(weight)
        out = self._wide(name, scale) if x.wide else self._fx(name, None, scale, x.bits)
        if self.p is None:
            return out
        bias = self.w.get(weight + ".b") if self.p.is_model else None  # type: ignore[union-attr]
        b64, brs = None, [None] * len(crt.PRIMES)
        if bias is not None:
            b64, brs = crt.encode(bias, scale, f"{name} bias") if x.wide else (
                ring.encode(bias, scale, RING_BITS, f"{name} bias"), brs)
        kw = dict(mag_in=self._mag(src), mag_out=self._col(name), kind=kind, l2_in=self._mag(src + "|l2"))
        jobs = [linear(self.p, name, x.v, weight, bias=b64, **kw)]
        if x.wide:
            jobs += [linear(v, f"{name}#q{i}", r, f"{weight}#q{i}", bias=b, **kw)
                     for i, (v, r, b) in enumerate(zip(self._views(), x.rs, brs))]
        got = await asyncio.gather(*jobs)
        return out.with_value(got[0], list(got[1:]) if x.wide else None)

    @_traced
    async def norm(self, name: str, x: Value, src: str, shape: tuple, residual: bool = False) -> tuple[Value, Value]:
        """(norm(x), x); on the ring U re-encodes the residual stream x at ``plan.res`` in the same hop. A wide plan
        puts norm1's output and residual (the attention block's start) on Z_N."""
        if not self.ring:
            h = await self._norm_op(self.p, name, x, mag_in=self._mag(src), eps=self.arch.norm_eps, shape=shape,
                                    mag_out=self._mag(name), mag_share=self._col(name))
            return h, x
        self._fx(src, None, x.scale, x.bits, x.rs)
        # On a wide plan the attention block is on Z_N: norm1's output, and inside it the QK-norm's and the
        # attention output's norm (Gemma); norm2 brings the stream back to Z_2^64.
        wide_out = self.plan.wide and name.endswith(_WIDE_NORMS)  # type: ignore[union-attr]

        def make(n: str, scale: int, bits: int = RING_BITS) -> Fx:
            return self._wide(n, scale) if wide_out else self._fx(n, None, scale, bits)
        # U reshares a decoder layer's norm output on the plan's ring; the final norm's feeds the logits (full ring).
        plan = self.plan
        out = make(name, plan.a, plan.a_bits if _LAYER_OP.match(name) else RING_BITS)  # type: ignore[union-attr]
        res = make(src, plan.res) if residual else None  # type: ignore[union-attr]
        if self.p is None:
            return out, (res or x)
        if not (wide_out or x.wide):
            enc = dict(encs_in=[self._enc(src, x)], enc_out=self._enc(name, out),
                       residual=None if res is None else self._enc(src, res))
            got = await self._norm_op(self.p, name, x.v, mag_in=self._mag(src), eps=self.arch.norm_eps, shape=shape,
                                      mag_out=self._mag(name), mag_share=self._col(name), **enc)
            if res is None:
                return out.with_value(got), x
            return out.with_value(got[0]), res.with_value(got[1])
        fn = _norm_fn(self.arch)
        got = await apply_permuted_wide(
            self.p, name, x.v, x.rs, fn, mag_in=self._mag(src), mag_out=self._mag(name), enc_in=self._enc(src, x),
            enc_out=self._enc(name, out), wide_out=wide_out, residual=None if res is None else self._enc(src, res),
            residual_wide=wide_out, mode="rows", shape=shape, mag_share=self._col(name))
        (h, hrs), r = (got, None) if res is None else got
        out = out.with_value(h, hrs)
        return (out, x) if res is None else (out, res.with_value(r[0], r[1]))

    @_traced
    async def smm(self, name: str, a: Value, b_new: Value, cache: str, transpose_b: bool,
                  src_a: str, src_b: str, valid: np.ndarray | None = None) -> Value:
        """q·Kᵀ or P·V against the cache; ``valid``: the rows' causal prefixes (the messages carry those only)."""
        kw = dict(transpose_b=transpose_b, valid=valid, mag_a=self._mag(src_a), mag_b=self._mag(src_b),
                  mag_out=self._mag(name) if transpose_b else self._col(name),  # scores: keys vary
                  l2_a=self._mag(src_a + "|l2"), l2_b=self._mag(src_b + "|cols|l2"))
        if not self.ring:
            return await matmul_shared(self.p, name, a, b_new, f"{self.prefix}{cache}", **kw)
        if a.wide != b_new.wide:
            raise RingOverflow(f"{name}: a product of a value on Z_N and one on Z_2^64")
        scale = a.scale + b_new.scale
        out = self._wide(name, scale) if a.wide else self._fx(name, None, scale, min(a.bits, b_new.bits))
        if self.p is None:
            return out
        jobs = [matmul_shared(self.p, name, a.v, b_new.v, f"{self.prefix}{cache}", **kw)]
        if a.wide:
            jobs += [matmul_shared(v, f"{name}#q{i}", ra, rb, f"{self.prefix}{cache}#q{i}", **kw)
                     for i, (v, ra, rb) in enumerate(zip(self._views(), a.rs, b_new.rs))]
        got = await asyncio.gather(*jobs)
        return out.with_value(got[0], list(got[1:]) if a.wide else None)

    @_traced
    async def softmax(self, name: str, s: Value, valid: np.ndarray, scale: float, src: str, shape: tuple) -> Value:
        if not self.ring:
            return await softmax(self.p, name, s, mag_in=self._mag(src), valid=valid, scale=scale, shape=shape)
        plan = self.plan
        out = self._wide(name, plan.p) if s.wide else self._fx(name, None, plan.p, plan.p_bits)  # type: ignore[union-attr]
        if self.p is None:
            return out
        if not s.wide:
            v = await softmax(self.p, name, s.v, mag_in=self._mag(src), valid=valid, scale=scale, shape=shape,
                              encs_in=[self._enc(src, s)], enc_out=self._enc(name, out))
            return out.with_value(v)
        rows = np.broadcast_to(np.asarray(valid), tuple(shape)[:-1])
        (v, rs) = await apply_permuted_wide(
            self.p, name, s.v, s.rs, lambda z: F.softmax(z, rows, scale), mag_in=self._mag(src), mag_out=1.0,
            enc_in=self._enc(src, s), enc_out=self._enc(name, out), wide_out=True, mode="rows", valid=valid,
            shape=shape)
        return out.with_value(v, rs)

    async def attention(self, i: int, x: Value, s: StepShape) -> tuple[Value, Value, Value]:
        """norm1 … P·V: the fused 8-hop op in decode when the session's route is "8", else the 12-hop ops.

        Prefill (T > 1) and a decode step past :data:`ATTN8_MAX_KEYS` keys take the 12-hop ops; both routes
        share the KV caches. On the ring the fused op
        runs the wide plan's encodings (norm1's output through P·V on Z_N). Returns (norm output, attention
        output, residual stream).
        """
        a, n = self.arch, f"L{i}"
        if self.p is None or not takes_fused(a, self.p.config.attention_route, i, s):
            return await attention_block(self, a, i, x, s)
        one = np.array([1])  # a generic position: which columns RoPE mixes (public)
        mix = np.abs(rope(a, np.eye(a.head_dim), one, None if s.block is None else one, layer=i)) > 0
        c = rope_bits(a, self.plan.c) if self.ring else None  # type: ignore[union-attr]
        spec = AttnSpec(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, norm=a.norm, eps=a.norm_eps,
                        scale=a.score_scale, split=lambda z: split_heads(a, z),
                        rope=lambda z, q: rope(a, z, s.pos, s.block, c, q, i), mix=mix)
        m = AttnMags(x=self._mag(f"{n}.x"), h=self._mag(f"{n}.n1"), h_col=self._col(f"{n}.n1"),
                     h_l2=self._mag(f"{n}.n1|l2"), qkv_col=self._col(f"{n}.qkv"), q=self._mag(f"{n}.q"),
                     q_l2=self._mag(f"{n}.q|l2"), k=self._mag(f"{n}.k"), k_l2=self._mag(f"{n}.k|cols|l2"),
                     v=self._mag(f"{n}.v"), v_l2=self._mag(f"{n}.v|cols|l2"), w=self._mag(f"{n}.w"),
                     w_l2=self._mag(f"{n}.w|l2"), att_col=self._col(f"{n}.att"), q_col=self._col(f"{n}.q"),
                     k_col=self._col(f"{n}.k"), v_col=self._col(f"{n}.v"))
        enc, outs = None, None
        if self.ring:
            enc, outs = self._attention_encs(n, x)
        async with self.p.traced(f"{n}.att8"):
            h, att, res = await attention_decode(self.p, f"{n}.att8", None if x is None else (x.v if self.ring else x),
                                                 spec=spec, mags=m, weight=f"{n}.qkv", cache_k=f"{self.prefix}{n}.K",
                                                 cache_v=f"{self.prefix}{n}.V", enc=enc, valid=s.valid,
                                                 bias_weight=f"{n}.qkv.b" if a.qkv_bias else None)
        if outs is None:
            return (h[0] if h else None), (att[0] if att else None), x
        fh, fatt, fres = outs
        wrap = lambda fx, v: fx.with_value(v[0], list(v[1:])) if v else fx  # noqa: E731
        return wrap(fh, h), wrap(fatt, att), (x if fres is None else wrap(fres, res))

    def _attention_encs(self, n: str, x: Fx) -> tuple[AttnEnc, tuple[Fx, Fx, Fx | None]]:
        """The fused op's encodings on the ring (the wide plan's, as the 12-hop ops would track them) and its
        outputs' Fx: norm output, attention output, re-encoded residual (None for ChatGLM's α residual)."""
        a, plan = self.arch, self.plan
        if not plan.wide or x.wide:  # type: ignore[union-attr]
            raise RingOverflow(f"{n}: the 8-hop route on the ring runs the wide plan (plan {plan})")
        h = self._wide(f"{n}.n1", plan.a)  # type: ignore[union-attr]
        res = self._wide(f"{n}.x", plan.res) if a.residual != "alpha" else None  # type: ignore[union-attr]
        qkv = self._wide(f"{n}.qkv", h.scale + self._frac(f"{n}.qkv"))
        c = rope_bits(a, plan.c)  # type: ignore[union-attr]
        q, k = self._wide(f"{n}.q", qkv.scale + c), self._wide(f"{n}.k", qkv.scale + c)
        self._wide(f"{n}.v", qkv.scale)
        sc = self._wide(f"{n}.s", q.scale + k.scale)
        pr = self._wide(f"{n}.p", plan.p)  # type: ignore[union-attr]
        att = self._wide(f"{n}.att", pr.scale + qkv.scale)
        enc = AttnEnc(x=self._enc(f"{n}.x", x), h=self._enc(f"{n}.n1", h), s=self._enc(f"{n}.s", sc),
                      p=self._enc(f"{n}.p", pr), res=None if res is None else self._enc(f"{n}.x", res))
        return enc, (h, att, res)

    @_traced
    async def act(self, name: str, u: Value, src: str, shape: tuple) -> Value:
        out = self._fx(name, None, self.plan.s, self.plan.s_bits) if self.ring else None  # type: ignore[union-attr]
        if self.p is None:
            return out
        uv = u.v if self.ring else u
        if self.arch.gated:
            f = self.arch.ffn
            g_, u_ = (None, None) if uv is None else (uv[..., :f], uv[..., f:])
            enc = {} if out is None else dict(encs_in=[self._enc(name + ".g", u), self._enc(name + ".u", u)],
                                              enc_out=self._enc(name, out))
            v = await glu(self.p, name, g_, u_, act=_GATE[self.arch.act], mag_g=self._mag(name + ".g"),
                          mag_u=self._mag(name + ".u"), shape=shape, mag_out=self._mag(name),
                          mag_share=self._col(name), **enc)
        else:
            enc = {} if out is None else dict(encs_in=[self._enc(src, u)], enc_out=self._enc(name, out))
            v = await gelu(self.p, name, uv, mag_in=self._mag(src), approximate=self.arch.act == "gelu_tanh",
                           shape=shape, mag_out=self._mag(name), mag_share=self._col(name), **enc)
        return v if out is None else out.with_value(v)

"""Bit budget of Z_2^64 fixed-point sharing on a real model, and the fidelity it buys.

Exact ring sharing carries every value as round(x·2^scale) mod 2^64. Multiplying by an
encoded constant (a weight at ``w`` fractional bits, a RoPE cosine at ``c`` bits) adds
its fractional bits to the scale; the user re-encodes values only where it sees them in
the clear (the permuted non-linear inputs). A truncation without a new round trip exists
(each party shifts its own share: exact up to one unit, perfectly hiding) but the result
lives mod 2^(64−f): it frees ring bits only for a *product of two shared values*
(q·Kᵀ), never along a chain of public-constant multiplications. So between two clear
views every chain must fit, with its largest value, in 63 bits:

* scores   a + w_qk + c + P_q + m_S + 1 ≤ 64   (norm → q/k → RoPE → truncate to P_q → q·Kᵀ)
* attn-out p + a + w_v + w_o + m_h + 1 ≤ 64    (norm → V, softmax → P·V → W_o → + residual)
* mlp-out  s + w_down + m_h + 1 ≤ 64           (SwiGLU → W_down → + residual)

where m_* are the public magnitude exponents (calibrated, ×2 headroom, rounded up to a
power of two) and m_h is the residual stream's. This bench prints those budgets for the
model's own exponents and simulates the encodings (rounding at every encode point,
stochastic rounding at truncations) in plaintext, against the float64 forward: greedy
ids over ``--tokens`` tokens and the first step's max logit error. It models what the
ring protocol computes; it does not run the protocol.

    .venv/bin/python bench/ring_budget.py --tokens 64            # the frontier table
    .venv/bin/python bench/ring_budget.py --config 12,16,12,12,12,16 --tokens 64
"""
from __future__ import annotations

import argparse
import asyncio
import math

import numpy as np

from permllm.model import Forward, PlainOps, StepShape, calibrate, layout, load_model
from permllm.model.forward import attention_block
from permllm.protocols import functions as F

PROMPTS = ["What is the capital of France?", "Write a short story about a robot who learns to paint."]
# (a, weight bits, rope bits, P_q, p, s): norm output, weight, RoPE, truncated q/k, softmax, SwiGLU scales
FRONTIER = [(12, 16, 12, 12, 12, 16), (11, 15, 12, 12, 10, 16), (10, 14, 12, 12, 10, 16), (10, 13, 10, 10, 10, 16)]


def _exp(v: float) -> int:
    """Power-of-two exponent of a public bound (what the ring arithmetic needs published)."""
    return math.ceil(math.log2(max(float(v), 2.0**-20)))


class FixedOps(PlainOps):
    """The plaintext forward with every ring encode point rounded: the ring protocol's plaintext model."""

    def __init__(self, weights, cfg: tuple[int, ...], rng: np.random.Generator) -> None:
        super().__init__(weights)
        self.a, self.wb, self.c, self.pq, self.p, self.s = cfg
        self.rng = rng
        self.qw: dict[str, np.ndarray] = {}

    @staticmethod
    def q(x: np.ndarray, scale: int) -> np.ndarray:
        return np.round(x * 2.0**scale) / 2.0**scale

    def trunc(self, x: np.ndarray, scale: int) -> np.ndarray:
        y = x * 2.0**scale
        lo = np.floor(y)
        return (lo + (self.rng.random(y.shape) < y - lo)) / 2.0**scale

    def weight(self, name: str) -> np.ndarray:
        if name not in self.qw:
            W = self.w[name]
            self.qw[name] = self.q(W, self.wb - _exp(np.max(np.abs(W))))
        return self.qw[name]

    async def embed(self, name, ids, T, pos=None):
        x = self.weight("embed")[np.asarray(ids)]
        return x if pos is None else x + self.w["pos_embed"][pos]

    async def linear(self, name, x, weight, src, kind="dense"):
        W = self.weight(weight)
        y = x * W if kind == "diag" else x @ W.T
        b = self.w.get(weight + ".b")
        return y if b is None else y + b

    async def norm(self, name, x, src, shape, residual=False):
        return self.q(self._norm(x), self.a), x

    async def softmax(self, name, s, valid, scale, src, shape):
        return self.q(F.softmax(s, valid, scale), self.p)

    async def act(self, name, u, src, shape):
        return self.q(self._act(u), self.s)

    async def attention(self, i, x, s):
        return await attention_block(self, self.arch, i, x, s)

    def rotate(self, x: np.ndarray, pos: np.ndarray, theta: float, frac: int | None = None) -> np.ndarray:
        """RoPE with c-bit cosines and sines, then q/k truncated to P_q fractional bits."""
        d = x.shape[-1]
        ang = np.asarray(pos, dtype=np.float64)[:, None] / theta ** (np.arange(0, d, 2) / d)[None, :]
        ang = np.concatenate([ang, ang], -1)
        rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return self.trunc(x * self.q(np.cos(ang), self.c) + rot * self.q(np.sin(ang), self.c), self.pq)


def budgets(weights, mags: dict, cfg: tuple[int, ...], layers: int) -> dict[str, int]:
    """Bits each chain needs in its worst layer, for the model's public exponents; ≤ 64 fits Z_2^64."""
    a, wb, c, pq, p, s = cfg

    def w(i: int, k: str) -> int:  # fractional bits of layer i's weight k: wb significant bits for max|W|
        return wb - _exp(np.max(np.abs(weights[f"L{i}.{k}"])))

    m_h = max(_exp(mags[f"L{i}.{k}"]) for i in range(layers) for k in ("x", "x2"))  # the residual stream
    worst = lambda f: max(f(i) for i in range(layers))  # noqa: E731
    return {"scores": worst(lambda i: a + w(i, "qkv") + c + pq + _exp(mags[f"L{i}.s"]) + 1),
            "attn-out": worst(lambda i: p + a + w(i, "qkv") + w(i, "o") + m_h + 1),
            "mlp-out": worst(lambda i: s + w(i, "mlp_out") + m_h + 1)}


async def greedy(ops: PlainOps, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    fwd, a = Forward(ops.arch), ops.arch
    ops.reset()
    logits = first = await fwd.step(ops, ids, StepShape(a, len(ids), 0))
    out = []
    for step in range(1, n + 1):
        out.append(int(np.argmax(logits)))
        if step < n:
            logits = await fwd.step(ops, [out[-1]], StepShape(a, len(ids), step))
    return out, first


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a,wbits,rope,pq,p,s (default: the frontier table)")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    lm = load_model("smollm2")
    mags = await calibrate(lm.weights)
    cfgs = [tuple(int(v) for v in args.config.split(","))] if args.config else FRONTIER
    refs = []
    for prompt in PROMPTS:
        ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        refs.append((ids, *await greedy(PlainOps(lm.weights), ids, args.tokens)))
    print("| a, w, c, P_q, p, s | scores | attn-out | mlp-out | fits 64 | identical ids (per prompt) | max first-step logit error |")
    print("|---|---|---|---|---|---|---|")
    orig = layout._rotate
    for cfg in cfgs:
        ops = FixedOps(lm.weights, cfg, np.random.default_rng(0))
        layout._rotate = ops.rotate  # the simulation's RoPE (the forward calls layout.rope)
        try:
            same, err = [], 0.0
            for ids, want, first in refs:
                got, lg = await greedy(ops, ids, args.tokens)
                same.append(next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), len(want)))
                err = max(err, float(np.max(np.abs(lg - first))))
        finally:
            layout._rotate = orig
        b = budgets(lm.weights, mags, cfg, lm.arch.layers)
        fits = "yes" if max(b.values()) <= 64 else "no"
        print(f"| {', '.join(map(str, cfg))} | {b['scores']} | {b['attn-out']} | {b['mlp-out']} | {fits} | "
              f"{' / '.join(f'{n}/{args.tokens}' for n in same)} | {err:.3f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

"""Fidelity and cost of the attention block in decode: the fused 8-hop op vs the 12-hop ops.

One attention block with SmolLM2-135M's shapes (hidden 576, 9 heads, 3 KV heads,
head_dim 64, RoPE, qkv bias) or ChatGLM-6B's (``--shape chatglm6b``: hidden 4096, 32
heads, head_dim 128, 2-D RoPE) and random weights: a prompt of ``--prompt`` keys enters
the KV caches through the 12-hop products, then ``--steps`` decode tokens run either
through :func:`~permllm.protocols.attention.attention_decode` (route 8) or through
norm → linear → q·Kᵀ → softmax → P·V as separate ops (route 12). For each mask
ratio R it reports the max abs error of the attention output and of the scores'
softmax input against plaintext float64, the online hops and bytes per token.
Usage:

    .venv/bin/python bench/attention8_fidelity.py [--ratios 8 10 12 14 16] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math

import numpy as np

from permllm.model.arch import Arch
from permllm.model.layout import positions, rope, split_heads
from permllm.protocols import ShareConfig, functions as F, linear, matmul_shared, rms_norm, setup_weight, softmax
from permllm.protocols.attention import AttnMags, AttnSpec, attention_decode
from permllm.runtime import DealtInput, local_trio, run_offline, run_online, run_setup

SHAPES = {
    "smollm2": Arch(family="llama", vocab=10, hidden=576, layers=1, heads=9, kv_heads=3, head_dim=64, ffn=10,
                    norm="rms", norm_eps=1e-5, act="swiglu", pos="rope", max_positions=256, rope_theta=10000.0,
                    qkv_bias=True),
    "chatglm6b": Arch(family="chatglm", vocab=10, hidden=4096, layers=1, heads=32, kv_heads=32, head_dim=128,
                      ffn=10, norm="rms", norm_eps=1e-5, act="swiglu", pos="rope2d", max_positions=2048,
                      prefix_bidirectional=True, qkv_bias=True),
}
ARCH = SHAPES["smollm2"]


class Case:
    def __init__(self, prompt: int, steps: int, seed: int = 0) -> None:
        a, rng = ARCH, np.random.default_rng(seed)
        n, d = a.hidden, a.head_dim
        self.prompt, self.steps = prompt, steps
        self.W = rng.normal(size=(a.qkv_out, n)) * 2 / math.sqrt(n)
        self.b = rng.normal(size=a.qkv_out) * 0.3
        hs = F.rms_norm(rng.normal(size=(prompt, n)), 1e-5)
        qkv0 = hs @ self.W.T + self.b
        q0, k0, self.v0 = split_heads(a, qkv0)
        pos0, blk0 = positions(a, prompt, 0)
        self.q0, self.k0 = rope(a, q0, pos0, blk0), rope(a, k0, pos0, blk0)
        self.xs = [rng.normal(size=(1, n)) * 2 for _ in range(steps)]
        K, V = self.k0, self.v0
        self.out: list[np.ndarray] = []
        cols, mags = np.abs(qkv0).max(0), {}
        cq, ck, cv = np.abs(self.q0).max((0, 1, 2)), np.abs(self.k0).max((0, 1, 2)), np.abs(self.v0).max((0, 1, 2))

        def note(k: str, v: float) -> None:
            mags[k] = max(mags.get(k, 0.0), float(v))
        for s, x in enumerate(self.xs):
            pos, blk = positions(a, prompt, s + 1)
            h = F.rms_norm(x, 1e-5)
            qkv = h @ self.W.T + self.b
            qr, kr, v = split_heads(a, qkv)
            q, k = rope(a, qr, pos, blk), rope(a, kr, pos, blk)
            K, V = np.concatenate([K, k], 2), np.concatenate([V, v], 2)
            S = q @ np.swapaxes(K, -1, -2)
            self.out.append(F.softmax(S, None, 1 / math.sqrt(d)) @ V)
            w = qr @ np.swapaxes(split_heads(a, self.W.T)[1], -1, -2)
            cols = np.maximum(cols, np.abs(qkv[0]))
            cq, ck, cv = (np.maximum(c, np.abs(z).max((0, 1, 2))) for c, z in ((cq, q), (ck, k), (cv, v)))
            for key, val in (("x", np.abs(x).max()), ("h", np.abs(h).max()), ("hl2", np.linalg.norm(h)),
                             ("q", np.abs(q).max()), ("ql2", np.linalg.norm(q, axis=-1).max()),
                             ("k", np.abs(K).max()), ("kl2", np.linalg.norm(K, axis=-1).max()),
                             ("v", np.abs(V).max()), ("vl2", np.linalg.norm(V, axis=-2).max()),
                             ("w", np.abs(w).max()), ("wl2", np.linalg.norm(w, axis=-1).max()),
                             ("s", np.abs(S).max()), ("o", np.abs(self.out[-1]).max())):
                note(key, val)
        self.m = {k: 2.0 * v for k, v in mags.items()}
        self.cols = 2.0 * cols
        m = self.m
        self.mags = AttnMags(x=m["x"], h=m["h"], h_col=m["h"], h_l2=m["hl2"], qkv_col=self.cols, q=m["q"],
                             q_l2=m["ql2"], k=m["k"], k_l2=m["kl2"], v=m["v"], v_l2=m["vl2"], w=m["w"],
                             w_l2=m["wl2"], att_col=m["o"], q_col=2.0 * cq, k_col=2.0 * ck, v_col=2.0 * cv)

    async def run(self, R: float, route: str) -> dict:
        a, m = ARCH, self.m
        trio = await local_trio("memory", ShareConfig(ratio=R, route=route))
        try:
            await run_setup(trio, lambda p: setup_weight(p, "W", self.W if p.is_model else None))
            await run_setup(trio, lambda p: setup_weight(p, "Wb", self.b if p.is_model else None))
            sq, sk = DealtInput(trio, "q0", self.q0, m["q"]), DealtInput(trio, "k0", self.k0, m["k"])
            P0 = F.softmax(np.zeros(self.q0.shape[:-1] + (self.prompt,)), np.arange(1, self.prompt + 1))
            sp, sv = DealtInput(trio, "p0", P0, 1.0), DealtInput(trio, "v0", self.v0, m["v"])

            async def prefill(p):
                await matmul_shared(p, "s0", sq.of(p), sk.of(p), "K", transpose_b=True, mag_a=m["q"],
                                    mag_b=m["k"], mag_out=m["s"])
                return await matmul_shared(p, "o0", sp.of(p), sv.of(p), "V", transpose_b=False, mag_a=1.0,
                                           mag_b=m["v"], mag_out=m["o"])
            await run_offline(trio, prefill, 0)
            await run_online(trio, prefill, 0)
            errs, hops, nbytes = [], [], []
            for s, x in enumerate(self.xs, 1):
                pos = positions(a, self.prompt, s)
                dx = DealtInput(trio, f"x{s}", x, m["x"])
                t = self.prompt + s
                g = self._graph8(dx, pos) if route == "8" else self._graph12(dx, pos, t)
                await run_offline(trio, g, s)
                b0 = sum(p.meter.total("online").bytes_sent for p in trio.parties)
                for p in trio.parties:
                    p.meter.clock["online"] = 0
                om, ou = await run_online(trio, g, s)
                hops.append(max(p.meter.hops("online") for p in (trio.model, trio.user)))
                nbytes.append(sum(p.meter.total("online").bytes_sent for p in trio.parties) - b0)
                errs.append(float(np.max(np.abs(om + ou - self.out[s - 1]))))
            return {"route": route, "ratio": R, "max_err": max(errs), "out_mag": float(np.max(np.abs(self.out))),
                    "hops_per_token": max(hops), "online_bytes_per_token": float(np.mean(nbytes))}
        finally:
            await trio.close()

    def _graph8(self, dx: DealtInput, pos: tuple):
        a, one = ARCH, np.array([1])
        spec = AttnSpec(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, norm="rms", eps=1e-5,
                        scale=1 / math.sqrt(a.head_dim), split=lambda z: split_heads(a, z),
                        rope=lambda z, q: rope(a, z, *pos),
                        mix=np.abs(rope(a, np.eye(a.head_dim), one, None if pos[1] is None else one)) > 0)

        async def g(p):
            _, o, _ = await attention_decode(p, "att", dx.of(p), spec=spec, mags=self.mags, weight="W", cache_k="K",
                                             cache_v="V", bias_weight="Wb")
            return o[0] if o else None
        return g

    def _graph12(self, dx: DealtInput, pos: tuple, t: int):
        a, m = ARCH, self.m

        async def g(p):
            h = await rms_norm(p, "n1", dx.of(p), mag_in=m["x"], eps=1e-5, shape=(1, a.hidden), mag_out=m["h"])
            qkv = await linear(p, "qkv", h, "W", mag_in=m["h"], mag_out=self.cols, l2_in=m["hl2"],
                               bias=self.b if p.is_model else None)
            q, k, v = (None,) * 3 if qkv is None else split_heads(a, qkv)
            q = None if q is None else rope(a, q, *pos)
            k = None if k is None else rope(a, k, *pos)
            sc = await matmul_shared(p, "s", q, k, "K", transpose_b=True, mag_a=m["q"], mag_b=m["k"],
                                     mag_out=m["s"], l2_a=m["ql2"], l2_b=m["kl2"])
            pr = await softmax(p, "p", sc, mag_in=m["s"], scale=1 / math.sqrt(a.head_dim),
                               shape=(a.kv_heads, a.group, 1, t))
            return await matmul_shared(p, "o", pr, v, "V", transpose_b=False, mag_a=1.0, mag_b=m["v"],
                                       mag_out=m["o"], l2_b=m["vl2"])
        return g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", nargs="+", type=float, default=[8, 10, 12, 14, 16], help="log2 of R")
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    global ARCH
    ARCH = SHAPES[a.shape]
    case = Case(a.prompt, a.steps)
    rows = [asyncio.run(case.run(2.0 ** e, route)) for e in a.ratios for route in ("12", "8")]
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"attention block, {a.shape} shapes, {a.prompt}-key prompt + {a.steps} decode tokens; "
          f"max |output| {rows[0]['out_mag']:.2f}")
    print(f"{'R':>8}{'route':>6}{'max |Δo|':>11}{'hops/tok':>9}{'online kB/tok':>14}")
    for r in rows:
        print(f"{'2^%g' % math.log2(r['ratio']):>8}{r['route']:>6}{r['max_err']:>11.2e}{r['hops_per_token']:>9}"
              f"{r['online_bytes_per_token'] / 1e3:>14.1f}")


if __name__ == "__main__":
    main()

"""A tour of the protocol ops: each run by all three parties and checked against plaintext.

For every op at SmolLM2-like shapes this reports the online messages, dependent
hops and bytes it cost and its max error against the plaintext twin. It is the
main job until private generation lands, and the source of the per-op table in
the README (``bench/ops_fidelity.py``).
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import numpy as np

from ..protocols import (ShareConfig, embed, functions as F, gelu, layer_norm, linear, matmul_shared, reshare,
                         rms_norm, setup_weight, silu, softmax, swiglu)
from ..protocols.party import Party
from ..protocols.embedding import setup_table
from .mesh import DealtInput, Trio, local_trio, run_offline, run_online, run_setup

__all__ = ["op_report", "format_report"]

Case = tuple[str, Callable[[Trio], Awaitable[tuple[Callable[[Party], Awaitable[Any]], np.ndarray]]]]


def _cases(rng: np.random.Generator) -> list[Case]:
    d, ff, T, heads, hd = 576, 1536, 8, 9, 64
    x = rng.normal(size=(T, d))
    W = rng.normal(size=(ff, d)) * 0.05
    E = rng.normal(size=(1000, d)) * 0.1
    ids = rng.integers(0, 1000, size=T)
    g_, u_ = rng.normal(size=(T, ff)) * 2, rng.normal(size=(T, ff)) * 2
    scores = rng.normal(size=(heads, T, T)) * 4
    q = rng.normal(size=(3, 3, T, hd))
    k = rng.normal(size=(3, 1, T, hd))
    P = F.softmax(rng.normal(size=(3, 3, T, T)), np.arange(1, T + 1))

    async def c_linear(t: Trio):
        await run_setup(t, lambda p: setup_weight(p, "W", W if p.is_model else None))
        s = DealtInput(t, "x", x, 4.0)
        return (lambda p: linear(p, "lin", s.of(p), "W", mag_in=4.0, mag_out=8.0)), x @ W.T

    async def c_embed(t: Trio):
        await run_setup(t, lambda p: setup_table(p, "E", E if p.is_model else None))
        return (lambda p: embed(p, "emb", ids if p.is_user else None, weight="E", table="E", vocab=1000, n_tokens=T,
                                mag_out=1.0)), E[ids]

    def unary(op: Callable, ref: Callable, arr: np.ndarray, mag: float, **kw: Any):
        async def case(t: Trio):
            s = DealtInput(t, "x", arr, mag)
            return (lambda p: op(p, "f", s.of(p), mag_in=mag, shape=arr.shape, **kw)), ref(arr)
        return case

    async def c_reshare(t: Trio):
        s = DealtInput(t, "x", x, 4.0)
        return (lambda p: reshare(p, "rs", s.of(p), mag=4.0)), x

    async def c_swiglu(t: Trio):
        sg, su = DealtInput(t, "g", g_, 8.0), DealtInput(t, "u", u_, 8.0)
        return (lambda p: swiglu(p, "sw", sg.of(p), su.of(p), mag_g=8.0, mag_u=8.0, shape=g_.shape)), \
            F.swiglu(g_, u_)

    async def c_softmax(t: Trio):
        s = DealtInput(t, "s", scores, 16.0)
        valid = np.arange(1, T + 1)
        return (lambda p: softmax(p, "sm", s.of(p), mag_in=16.0, valid=valid, scale=1.0, shape=scores.shape)), \
            F.softmax(scores, valid)

    async def c_qk(t: Trio):
        sq, sk = DealtInput(t, "q", q, 4.0), DealtInput(t, "k", k, 4.0)
        return (lambda p: matmul_shared(p, "qk", sq.of(p), sk.of(p), "K", transpose_b=True, mag_a=4.0, mag_b=4.0,
                                        mag_out=32.0)), q @ np.swapaxes(k, -1, -2)

    async def c_pv(t: Trio):
        sp, sv = DealtInput(t, "p", P, 1.0), DealtInput(t, "v", k, 4.0)
        return (lambda p: matmul_shared(p, "pv", sp.of(p), sv.of(p), "V", transpose_b=False, mag_a=1.0, mag_b=4.0,
                                        mag_out=4.0)), P @ k

    return [
        ("linear (zero-round)", c_linear),
        ("embedding lookup", c_embed),
        ("reshare", c_reshare),
        ("gelu", unary(gelu, F.gelu, g_, 8.0)),
        ("silu", unary(silu, F.silu, g_, 8.0)),
        ("swiglu gate", c_swiglu),
        ("layer_norm", unary(layer_norm, F.layer_norm, x * 3, 16.0)),
        ("rms_norm", unary(rms_norm, F.rms_norm, x * 3, 16.0)),
        ("softmax (causal)", c_softmax),
        ("q·Kᵀ (shared×shared)", c_qk),
        ("P·V (shared×shared)", c_pv),
    ]


async def op_report(dtype: str = "float64", transport: str = "memory", ratio: float | None = None,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Run every op once; per op: online messages, hops, bytes, seconds, and errors vs plaintext."""
    config = ShareConfig(dtype) if ratio is None else ShareConfig(dtype, ratio)
    rows = []
    for label, case in _cases(np.random.default_rng(seed)):
        async with await local_trio(transport, config) as t:
            graph, want = await case(t)
            await run_offline(t, graph)
            for p in t.parties:
                p.meter.reset()
            t0 = time.perf_counter()
            m, u = await run_online(t, graph)
            dt = time.perf_counter() - t0
            got = m + u
            rows.append({
                "op": label, "dtype": dtype, "ratio": config.ratio,
                "online_msgs": sum(p.meter.total("online").msgs_sent for p in (t.model, t.user)),
                "online_hops": max(p.meter.hops("online") for p in (t.model, t.user)),
                "online_bytes": sum(p.meter.total("online").bytes_sent for p in (t.model, t.user)),
                "online_ms": dt * 1e3,
                "max_abs_err": float(np.max(np.abs(got - want))),
                "max_rel_err": float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-300)),
            })
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`op_report` rows."""
    head = f"{'op':<24}{'dtype':>8}{'R':>8}{'msgs':>6}{'hops':>6}{'bytes':>10}{'ms':>8}{'max abs err':>13}{'rel err':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['op']:<24}{r['dtype']:>8}{r['ratio']:>8.0f}{r['online_msgs']:>6}{r['online_hops']:>6}"
                     f"{r['online_bytes']:>10}{r['online_ms']:>8.1f}{r['max_abs_err']:>13.2e}{r['max_rel_err']:>10.1e}")
    return "\n".join(lines)

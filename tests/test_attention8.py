"""The 8-hop attention route (protocols/attention.py) against plaintext.

* the fused op for several decode tokens after a 12-hop prefill (same KV caches), with
  GQA, qkv bias and LLaMA / ChatGLM 2-D RoPE: exactly 4 online hops per token;
* a whole decode step through the forward: 8 hops per layer (12 on the 12-hop route);
* whole-model greedy ids with route "8" equal the plaintext ones (random LLaMA with GQA,
  reduced ChatGLM);
* what M receives is masked: the sum of U's and H's score messages is q_U·K_Mᵀ plus the
  pad ρ (wide), never the exact product; U cannot match K̃'s rows to its own key shares.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import permllm
from permllm.model import Forward, LoadedModel, PlainOps, PrivateOps, StepShape, calibrate, load_model
from permllm.model.arch import Arch
from permllm.model.forward import setup_embedding, weight_names
from permllm.model.layout import rope, split_heads
from permllm.protocols import Role, ShareConfig, functions as F, matmul_shared, setup_weight
from permllm.protocols.attention import AttnMags, AttnSpec, _W, attention_decode
from permllm.runtime import DealtInput, local_trio, run_offline, run_online, run_setup

from .test_generation import _llama_dir, _reduced_chatglm, hf_greedy

rng = np.random.default_rng(11)


def _arch(pos: str) -> Arch:
    return Arch(family="llama" if pos == "rope" else "chatglm", vocab=10, hidden=24, layers=1, heads=6,
                kv_heads=2, head_dim=8, ffn=10, norm="rms", norm_eps=1e-6, act="swiglu", pos=pos,
                max_positions=64, rope_theta=500.0, qkv_bias=True)


def _positions(pos: str, prompt: int, step: int):
    """(pos, block) of decode step ``step`` ≥ 1 after a prompt of ``prompt`` tokens."""
    if pos == "rope2d":
        return np.array([prompt - 1]), np.array([step])
    return np.array([prompt + step - 1]), None


class _Case:
    """A random attention block: weights, a prompt's K/V, decode inputs, and the plaintext outputs."""

    def __init__(self, pos: str, prompt: int = 3, steps: int = 3) -> None:
        a = self.arch = _arch(pos)
        n, d = a.hidden, a.head_dim
        self.W = rng.normal(size=(a.qkv_out, n)) * 0.3
        self.b = rng.normal(size=a.qkv_out) * 0.5
        self.k0 = rng.normal(size=(a.kv_heads, 1, prompt, d)) * 2
        self.v0 = rng.normal(size=(a.kv_heads, 1, prompt, d)) * 2
        self.q0 = rng.normal(size=(a.kv_heads, a.group, prompt, d)) * 2
        self.xs = [rng.normal(size=(1, n)) * 3 for _ in range(steps)]
        self.prompt = prompt
        K, V = self.k0, self.v0
        self.h, self.out, self.scores = [], [], []
        cols = np.zeros(a.qkv_out)
        mags: dict[str, float] = {}

        def note(k: str, v: float) -> None:
            mags[k] = max(mags.get(k, 0.0), float(v))
        for s, x in enumerate(self.xs, 1):
            p_, b_ = _positions(pos, prompt, s)
            h = F.rms_norm(x, 1e-6)
            qkv = h @ self.W.T + self.b
            qr, kr, v = split_heads(a, qkv)
            q, k = rope(a, qr, p_, b_), rope(a, kr, p_, b_)
            K, V = np.concatenate([K, k], 2), np.concatenate([V, v], 2)
            S = q @ np.swapaxes(K, -1, -2)
            self.h.append(h)
            self.scores.append(S)
            self.out.append(F.softmax(S, None, 1 / math.sqrt(d)) @ V)
            w = qr @ np.swapaxes(split_heads(a, self.W.T)[1], -1, -2)
            cols = np.maximum(cols, np.abs(qkv[0]))
            for key, val in (("x", np.abs(x).max()), ("h", np.abs(h).max()), ("hl2", np.linalg.norm(h)),
                             ("q", np.abs(q).max()), ("ql2", np.linalg.norm(q, axis=-1).max()),
                             ("k", np.abs(K).max()), ("kl2", np.linalg.norm(K, axis=-1).max()),
                             ("v", np.abs(V).max()), ("vl2", np.linalg.norm(V, axis=-2).max()),
                             ("w", np.abs(w).max()), ("wl2", np.linalg.norm(w, axis=-1).max()),
                             ("o", np.abs(self.out[-1]).max())):
                note(key, val)
        m = {k: 2.0 * v for k, v in mags.items()}  # calibration headroom
        self.mags = AttnMags(x=m["x"], h=m["h"], h_col=m["h"], h_l2=m["hl2"], qkv_col=2.0 * cols, q=m["q"],
                             q_l2=m["ql2"], k=m["k"], k_l2=m["kl2"], v=m["v"], v_l2=m["vl2"], w=m["w"],
                             w_l2=m["wl2"], att_col=m["o"])

    def spec(self, step: int) -> AttnSpec:
        a = self.arch
        p_, b_ = _positions(a.pos, self.prompt, step)
        return AttnSpec(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, norm="rms", eps=1e-6,
                        scale=1 / math.sqrt(a.head_dim), split=lambda z: split_heads(a, z),
                        rope=lambda z, q: rope(a, z, p_, b_))

    async def setup(self, trio) -> None:
        await run_setup(trio, lambda p: setup_weight(p, "W", self.W if p.is_model else None))
        await run_setup(trio, lambda p: setup_weight(p, "Wb", self.b if p.is_model else None))
        # The prompt's keys and values enter the caches through the 12-hop ops.
        sq, sk = DealtInput(trio, "q0", self.q0, 8.0), DealtInput(trio, "k0", self.k0, 8.0)
        P0 = np.full(self.q0.shape[:-1] + (self.prompt,), 1 / self.prompt)
        sp, sv = DealtInput(trio, "p0", P0, 1.0), DealtInput(trio, "v0", self.v0, 8.0)

        async def prefill(p):
            await matmul_shared(p, "s0", sq.of(p), sk.of(p), "K", transpose_b=True, mag_a=8.0, mag_b=8.0,
                                mag_out=64.0)
            return await matmul_shared(p, "o0", sp.of(p), sv.of(p), "V", transpose_b=False, mag_a=1.0, mag_b=8.0,
                                       mag_out=8.0)
        await run_offline(trio, prefill, 0)
        await run_online(trio, prefill, 0)

    def graph(self, trio, step: int):
        s = DealtInput(trio, f"x{step}", self.xs[step - 1], self.mags.x)
        return lambda p: attention_decode(p, "att", s.of(p), spec=self.spec(step), mags=self.mags, weight="W",
                                          cache_k="K", cache_v="V", bias_weight="Wb")


def _hops(trio) -> int:
    return max(p.meter.hops("online") for p in (trio.model, trio.user))


@pytest.mark.parametrize("pos", ["rope", "rope2d"])
async def test_fused_decode_matches_plaintext_in_4_hops(pos):
    case = _Case(pos)
    trio = await local_trio("memory", ShareConfig(route="8"))
    try:
        await case.setup(trio)
        for step in range(1, len(case.xs) + 1):
            g = case.graph(trio, step)
            await run_offline(trio, g, step)
            for p in trio.parties:
                p.meter.clock["online"] = 0
            (hm, om, _), (hu, ou, _) = await run_online(trio, g, step)
            (hm,), (om,), (hu,), (ou,) = hm, om, hu, ou  # one lane: real numbers
            assert _hops(trio) == 4
            want = case.out[step - 1]
            assert np.max(np.abs(om + ou - want)) < 5e-3 * np.max(np.abs(want))  # R³ terms: see module doc
            assert np.max(np.abs(hm + hu - case.h[step - 1])) < 1e-8
            assert trio.model.caches["K/bm"].shape[-2] == case.prompt + step
    finally:
        await trio.close()


async def test_what_the_model_party_receives_is_masked(monkeypatch):
    """e + η (U's and H's score messages, which M can add) = q_U·K_Mᵀ − ρ: the pad is wide, never the product."""
    from permllm.protocols import Party
    case = _Case("rope")
    trio = await local_trio("memory", ShareConfig(route="8"))
    got: dict = {}
    orig = Party.recv

    async def spy(self, frm, tag, **kw):  # record what M and U receive in the fused op
        out = await orig(self, frm, tag, **kw)
        if tag[0] == "attn8":
            got[(self.role, frm, tag[-1])] = out
        return out
    monkeypatch.setattr(Party, "recv", spy)
    try:
        await case.setup(trio)
        step = 1
        g = case.graph(trio, step)
        await run_offline(trio, g, step)
        await run_online(trio, g, step)
        a, R, t = case.arch, trio.model.ratio, case.prompt + 1
        e = got[(Role.MODEL, Role.USER, "2")][1]          # hop 2: U's score terms (t per query head)
        eta = got[(Role.MODEL, Role.HELPER, "corr")][1]   # offline: H's
        # U's share of q is the qkv linear's output mask r (H-derivable); M's cached key shares:
        u = trio.user.view("offline", step)
        r = u.mask("uh", "att.qkv", "r", (1, a.qkv_out), R * np.asarray(case.mags.qkv_col))
        q_u = rope(a, split_heads(a, r)[0], *_positions(a.pos, case.prompt, step))
        K_m = trio.model.caches["K/bm"][..., :t - 1, :]
        exact = q_u @ np.swapaxes(K_m, -1, -2)          # q_U·K_Mᵀ over the cached keys
        summed = (e + eta)[..., :t - 1]
        W = _W(u, case.spec(step), case.mags, t, a.hidden, trio.user.weights["W"].scale,
               trio.user.weights["Wb"].scale)
        rho = u.mask("uh", "att", "rho", (a.kv_heads, a.group, 1, t), W.rho)[..., :t - 1]
        np.testing.assert_allclose(summed + rho, exact, rtol=0, atol=1e-6 * np.max(np.abs(exact)))
        secret = np.max(np.abs(case.scores[0]))          # |q·K| scale: what ρ must drown
        assert np.min(np.abs(summed - exact)) > 0 and np.std(summed - exact) > R * secret / 10
        # Each message alone is padded as well (τ), and is not the product with U's masked key copy.
        O = trio.user.caches["K/opened"][..., :t - 1, :]
        assert np.std(e[..., :t - 1] - q_u @ np.swapaxes(O, -1, -2)) > R * secret / 10
        # U cannot match the rows of K̃ = π₂(K_U + Γ) to its own key shares K_U: Γ is R times wider.
        Kt = got[(Role.USER, Role.HELPER, "u")][1]
        K_u = trio.user.caches["K/bu"][..., :t, :]
        spread = np.max(np.abs(K_u))
        dist = np.abs(Kt[:, :, :, None, :] - K_u[:, :, None, :, :]).max(-1)   # every K̃ row vs every K_U row
        assert dist.min() > 10 * spread
    finally:
        await trio.close()


async def _step_hops(lm: LoadedModel, route: str) -> tuple[int, float]:
    """Online hops of one decode step through the forward, and its logits' max error vs plaintext."""
    a, weights = lm.arch, lm.weights
    mags = await calibrate(weights)
    prompt, new = [5, 17, 42], [99]
    plain = PlainOps(weights)
    fwd = Forward(a)
    await fwd.step(plain, prompt, StepShape(a, len(prompt), 0))
    want = await fwd.step(plain, new, StepShape(a, len(prompt), 1))
    trio = await local_trio("memory", ShareConfig(route=route))
    try:
        for name, _ in weight_names(a, route):
            await run_setup(trio, lambda p, name=name: setup_weight(p, name, weights[name] if p.is_model else None))
        await run_setup(trio, lambda p: setup_embedding(p, weights if p.is_model else None, a))

        def graph(ids, step):
            return lambda p: fwd.step(PrivateOps(p, a, mags, weights if p.is_model else None, "g0."),
                                      ids if (p.is_user and p.phase == "online") else None,
                                      StepShape(a, len(prompt), step))
        await run_offline(trio, graph(prompt, 0), 0)
        await run_online(trio, graph(prompt, 0), 0)
        await run_offline(trio, graph(new, 1), 1)
        for p in trio.parties:
            p.meter.clock["online"] = 0
        m, u = await run_online(trio, graph(new, 1), 1)
        return _hops(trio), float(np.max(np.abs(m + u - want)))
    finally:
        await trio.close()


async def test_decode_layer_costs_8_hops(tmp_path):
    d, _ = _llama_dir(tmp_path)
    lm = load_model(str(d))
    L = lm.arch.layers
    h8, err8 = await _step_hops(lm, "8")
    h12, err12 = await _step_hops(lm, "12")
    # embedding 3 hops (the one-hot, the lift to real shares) + layers + final norm 2 hops
    assert (h8, h12) == (3 + 8 * L + 2, 3 + 12 * L + 2)
    assert err8 < 1e-3 and err12 < 1e-6


async def _route8_ids(lm: LoadedModel, prompt: list[int], n: int) -> list[int]:
    async with await permllm.local(lm, config=ShareConfig(route="8")) as s:
        ids = [t async for t in s.generate_ids(prompt, n)]
        assert s.last.online_hops > 0
        return ids


async def test_random_llama_greedy_route8(tmp_path):
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    prompt = [5, 17, 42, 99, 123, 250, 7, 3]
    assert await _route8_ids(lm, prompt, 12) == hf_greedy(hf, prompt, 12)


async def test_reduced_chatglm_greedy_route8():
    lm, ref = _reduced_chatglm()
    prompt = [5, 17, 42, 99, 123, 250, 7]
    assert await _route8_ids(lm, prompt, 10) == ref.generate(prompt, 10)


async def test_routes_must_agree():
    """A user on route 8 and a model party on route 12 fail at setup with a clear error."""
    from permllm.protocols import ProtocolError
    from permllm.runtime.session import HelperSession, ModelSession, UserSession
    from permllm.runtime import gather_fail_fast
    lm, _ = _reduced_chatglm()
    trio = await local_trio("memory", ShareConfig(route="12"), seeds=False)
    trio.user.config = ShareConfig(route="8")
    try:
        with pytest.raises(ProtocolError, match="attention route"):
            await gather_fail_fast([ModelSession(trio.model, lm.weights).setup(), UserSession(trio.user).setup(),
                                    HelperSession(trio.helper).setup()])
    finally:
        await trio.close()

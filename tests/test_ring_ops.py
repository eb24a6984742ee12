"""Exact ring arithmetic (Z_2^64, docs/ring.md): each op against its plaintext twin, the messages' uniformity,
private generation equal to transformers', the precision plan and the overflow errors."""
from __future__ import annotations

import numpy as np
import pytest

import permllm
from permllm.model import load_model
from permllm.model.forward import RING_FRONTIER, RingPlan, resolve_arith
from permllm.protocols import (ShareConfig, functions as F, linear, matmul_shared, reshare, rms_norm, setup_weight,
                               softmax)
from permllm.protocols import ring
from permllm.protocols.ring import Enc, RingOverflow
from permllm.runtime import DealtInput, local_trio, run_offline, run_online, run_setup

from .conftest import online_counts, rel_err
from .test_generation import _gpt2_dir, _llama_dir, hf_greedy

rng = np.random.default_rng(11)
RING = ShareConfig(arith="ring")


@pytest.fixture(params=["memory", "tcp"])
async def rtrio(request):
    t = await local_trio(request.param, RING)
    yield t
    await t.close()


def _dec(m: np.ndarray, u: np.ndarray, scale: int, bits: int = 64) -> np.ndarray:
    return ring.decode(ring.mod(m + u, 64) if bits == 64 else (m + u) & np.uint64((1 << bits) - 1), scale, bits, "t")


async def _both(trio, g):
    await run_offline(trio, g, 0)
    return await run_online(trio, g, 0)


async def test_ring_linear_is_exact_and_sends_nothing_online(rtrio):
    W = rng.normal(size=(24, 16)) * 0.3
    b = rng.normal(size=24)
    x = rng.normal(size=(5, 16))
    frac = 16 - 0  # public_scale(W) = 1 or 2: weight_frac gives 16 − e
    await run_setup(rtrio, lambda p: setup_weight(p, "W", W if p.is_model else None, sig_bits=16))
    fw = rtrio.model.weights["W"].frac
    assert fw == rtrio.user.weights["W"].frac == rtrio.helper.weights["W"].frac and fw <= frac
    s = DealtInput(rtrio, "x", x, mag=4.0, scale=20)
    assert rtrio.user.weights["W"].value.dtype == np.uint64  # D = W̃ − U_W mod 2^64

    async def g(p):
        bias = ring.encode(b, 20 + fw, 64, "b") if p.is_model else None
        return await linear(p, "lin", s.of(p), "W", mag_in=4.0, mag_out=8.0, bias=bias)

    m, u = await _both(rtrio, g)
    Wq = np.rint(W * 2.0**fw) / 2.0**fw  # the only error: the encodings' rounding
    xq = np.rint(x * 2.0**20) / 2.0**20
    np.testing.assert_allclose(_dec(m, u, 20 + fw), xq @ Wq.T + np.rint(b * 2.0**(20 + fw)) / 2.0**(20 + fw),
                               rtol=0, atol=2.0**-(20 + fw))
    assert online_counts(rtrio) == (0, 0)


async def test_ring_norm_reshares_the_residual_in_the_same_hop(rtrio):
    x = rng.normal(size=(3, 32)) * 5
    s = DealtInput(rtrio, "x", x, mag=32.0, scale=30)

    async def g(p):
        return await rms_norm(p, "n", s.of(p), mag_in=32.0, shape=x.shape, encs_in=[Enc(30, 64, 5)],
                              enc_out=Enc(14, 64, 3), residual=Enc(20, 64, 5))

    (hm, rm), (hu, ru) = await _both(rtrio, g)
    assert rel_err(_dec(hm, hu, 14), F.rms_norm(x)) < 2.0**-12
    np.testing.assert_allclose(_dec(rm, ru, 20), x, atol=2.0**-20)
    assert online_counts(rtrio) == (3, 2)  # reveal M → U; the norm and the residual U → M, one hop


async def test_ring_reshare_on_a_smaller_ring_travels_in_its_bytes(rtrio):
    """A norm output reshared on Z_2^24 (enc_out.bits): 3 bytes an element U → M, shares right mod 2^24."""
    from permllm.runtime.profile import enable

    x = rng.normal(size=(3, 32)) * 5
    s = DealtInput(rtrio, "x", x, mag=32.0, scale=30)

    async def g(p):
        async with p.traced("n"):
            return await rms_norm(p, "n", s.of(p), mag_in=32.0, shape=x.shape, encs_in=[Enc(30, 64, 5)],
                                  enc_out=Enc(14, 24, 3))

    records = enable(rtrio.parties)
    hm, hu = await _both(rtrio, g)
    assert rel_err(_dec(hm, hu, 14, 24), F.rms_norm(x)) < 2.0**-12
    sent = {k: v for r in records[1] if r.phase == "online" for k, v in r.by_message.items()}
    assert sent == {"unperm.y": x.size * 3}

    async def bad(p):
        return await rms_norm(p, "n2", s.of(p), mag_in=32.0, shape=x.shape, encs_in=[Enc(30, 64, 5)],
                              enc_out=Enc(14, 20, 3))
    with pytest.raises(ValueError, match="whole bytes"):
        await run_offline(rtrio, bad, 1)


async def test_ring_narrow_plan_takes_the_narrowest_rings_that_fit(tmp_path):
    """U's reshares on the narrowest rings whose every consumer still fits; one byte less overflows."""
    from dataclasses import replace

    from permllm.model import calibrate
    from permllm.model.forward import _misfit

    d, _ = _llama_dir(tmp_path)
    w = load_model(str(d)).weights
    mags = await calibrate(w)
    arith, plan = resolve_arith("ring", True, w, mags)
    assert arith == "ring" and plan.s_bits < 64  # the norms' and the softmax's outputs feed q·Kᵀ and o: 64
    assert _misfit(w, mags, plan, None) is None
    for field in ("s_bits", "a_bits", "p_bits"):
        assert _misfit(w, mags, replace(plan, **{field: getattr(plan, field) - 8}), None) is not None
    assert RingPlan.from_list(plan.to_list()) == plan


async def test_ring_value_outside_its_range_fails_naming_the_op(rtrio):
    x = rng.normal(size=(2, 8)) * 50  # |x| up to ~150, published bound 2^4
    s = DealtInput(rtrio, "x", x, mag=16.0, scale=20)

    async def g(p):
        return await softmax(p, "L3.p", s.of(p), mag_in=16.0, shape=x.shape, encs_in=[Enc(20, 64, 4)],
                             enc_out=Enc(14, 64, 1))

    with pytest.raises(RingOverflow, match="L3.p"):
        await _both(rtrio, g)


async def test_ring_shared_matmul_with_local_truncation(rtrio):
    """q·Kᵀ on shares truncated locally by f bits (no message): exact to one unit on Z_2^(64−f)."""
    q = rng.normal(size=(1, 2, 3, 8))
    k = rng.normal(size=(1, 1, 3, 8))
    f, sc = 20, 36
    sq, sk = DealtInput(rtrio, "q", q, mag=4.0, scale=sc), DealtInput(rtrio, "k", k, mag=4.0, scale=sc)

    async def g(p):
        a, b = sq.of(p), sk.of(p)
        if p.is_model and p.phase == "offline":
            return await matmul_shared(p, "s", None, None, "K", transpose_b=True, mag_a=4.0, mag_b=4.0, mag_out=64.0)
        return await matmul_shared(p, "s", ring.trunc(a, f), ring.trunc(b, f), "K", transpose_b=True, mag_a=4.0,
                                   mag_b=4.0, mag_out=64.0)

    m, u = await _both(rtrio, g)
    got = _dec(m, u, 2 * (sc - f), 64 - f)
    np.testing.assert_allclose(got, q @ np.swapaxes(k, -1, -2), atol=8 * 2.0 ** -(sc - f) * 4 * 2)
    assert online_counts(rtrio) == (2, 2)


async def test_ring_messages_are_uniform_whatever_the_value(rtrio, tmp_path):
    """Everything M receives in a reshare and a norm is a masked ring word: uniform (the transcript audit's χ²
    and repeat tests) even for an all-zero secret."""
    from permllm.protocols.transcript import Transcript, audit

    x = np.zeros((64, 64))
    s = DealtInput(rtrio, "x", x, mag=1.0, scale=20)
    rtrio.model.transcript = Transcript(tmp_path, "model")

    async def g(p):
        y = await reshare(p, "r", s.of(p), mag=1.0)
        h = await rms_norm(p, "n", y, mag_in=1.0, shape=x.shape, encs_in=[Enc(20, 64, 1)], enc_out=Enc(14, 64, 3))
        return await rms_norm(p, "n8", y, mag_in=1.0, shape=x.shape, encs_in=[Enc(20, 64, 1)],
                              enc_out=Enc(14, 40, 3))  # U's reshare on Z_2^40: 5 uniform bytes an element

    for t in range(3):
        await run_offline(rtrio, g, t)
        await run_online(rtrio, g, t)
    rtrio.model.transcript.close()
    rep = audit(tmp_path)["model"]
    assert rep["counts"]["uniform"] >= 9 and rep["counts"]["statistical"] == 0
    assert all(v["pass"] for v in rep["uniformity"].values()), rep["uniformity"]
    assert all(v["pass"] for v in rep["repeats"].values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
async def test_private_generation_on_the_ring_equals_transformers(tmp_path, family):
    d, hf = (_llama_dir if family == "llama" else _gpt2_dir)(tmp_path)
    lm = load_model(str(d))
    prompt = [5, 17, 42, 99, 123, 250, 7, 3]
    async with await permllm.local(lm) as s:  # "auto": these models fit the ring at the finest plan
        assert s.trio.user.ring and s.trio.model.ring and s.trio.helper.ring
        ids = [t async for t in s.generate_ids(prompt, 12)]
    assert ids == hf_greedy(hf, prompt, 12)


async def test_float_arithmetic_stays_selectable(tmp_path):
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    prompt = [5, 17, 42, 99]
    async with await permllm.local(lm, config=ShareConfig(arith="float")) as s:
        assert not s.trio.user.ring
        ids = [t async for t in s.generate_ids(prompt, 6)]
    assert ids == hf_greedy(hf, prompt, 6)


async def test_published_bounds_too_small_fail_instead_of_a_wrong_token(tmp_path, monkeypatch):
    """A value beyond its op's published bound is detected where U decodes it, with the op's name."""
    import permllm.runtime.session as session

    d, _ = _llama_dir(tmp_path)
    lm = load_model(str(d))
    real = session.calibrate

    async def small(weights, *a, **kw):
        mags = await real(weights, *a, **kw)
        return {k: (v / 64 if k.endswith(".s") else v) for k, v in mags.items()}

    monkeypatch.setattr(session, "calibrate", small)
    async with await permllm.local(lm, config=RING) as s:
        with pytest.raises(RingOverflow, match=r"L\d\.p"):
            [t async for t in s.generate_ids([5, 17, 42, 99, 123, 250, 7, 3], 4)]


def test_ring_is_refused_where_it_is_not_built():
    assert ShareConfig(arith="ring", route="8").ring_possible  # the 8-hop route runs on the ring (wide)
    with pytest.raises(ValueError, match="ring arithmetic"):
        ShareConfig(arith="ring", offline="he")
    with pytest.raises(ValueError, match="share arithmetic"):
        ShareConfig(arith="fixed")


async def test_smollm2_takes_the_wide_ring_for_its_attention_block():
    """SmolLM2's massive activations (|x| ~ 2^15 in the residual stream) leave Z_2^64 only a coarse plan, so
    "auto" and "ring" take a wide plan (the attention block on Z_N, N ≈ 2^104) at the finest precision."""
    from permllm.model import calibrate
    from permllm.model.forward import WIDE_FRONTIER

    w = load_model("smollm2").weights
    mags = await calibrate(w)
    arith, plan = resolve_arith("auto", True, w, mags)
    assert arith == "ring" and plan.full_width() == WIDE_FRONTIER[0]
    assert resolve_arith("ring", True, w, mags) == (arith, plan)
    assert resolve_arith("auto", False, w, mags) == ("float", None)


def test_crt_residues_are_exact():
    from permllm.protocols import crt

    x = np.array([-3.5, 1e4, -2.0**40, 12345.678, 0.0, -1e-6, 2.0**15 + 0.3, -(2.0**15) - 0.7])
    for scale in (20, 50, 62):
        lo, rs = crt.encode(x, scale, "x")
        want = np.rint(x * 2.0**scale) / 2.0**scale
        np.testing.assert_allclose(crt.decode(lo, rs, scale, "x", 60), want, rtol=2.0**-52, atol=2.0**-scale)
    with pytest.raises(RingOverflow, match="x"):
        crt.encode(np.array([2.0**30]), 80, "x")
    a = rng.integers(0, crt.PRIMES[0], size=(3, 5000)).astype(float)
    b = rng.integers(0, crt.PRIMES[0], size=(5000, 4)).astype(float)
    exact = (a.astype(np.int64).astype(object) @ b.astype(np.int64).astype(object)) % crt.PRIMES[0]
    assert np.array_equal(crt.matmul(a, b, crt.PRIMES[0]).astype(np.int64), exact.astype(np.int64))
    big = rng.integers(-2**52, 2**52, size=10000).astype(float)
    assert np.array_equal(crt.reduce(big, crt.PRIMES[1]),
                          np.array([int(v) % crt.PRIMES[1] for v in big.astype(np.int64)], dtype=float))
    w = rng.integers(-2**18, 2**18, size=(40, 24)).astype(float)
    xw = rng.integers(0, 2**63, size=(5, 24), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    for rows in (xw, xw[:1]):  # several rows: one BLAS product of the limbs; one row: a GEMV per limb
        assert np.array_equal(ring.matmul_small(rows, w, True, w_bits=19),
                              ring.matmul(rows, w.astype(np.int64).view(np.uint64), 64, True))
    assert np.array_equal(ring.matmul_small(xw, w.T.copy(), False), ring.matmul(xw, w.T.copy().astype(np.int64).view(
        np.uint64), 64, False))


@pytest.mark.parametrize("family,route", [("llama", "12"), ("gpt2", "12"), ("llama", "8"), ("gpt2", "8")])
async def test_wide_ring_generation_equals_transformers_and_its_messages_are_uniform(tmp_path, family, route,
                                                                                     monkeypatch):
    """The attention block on Z_N (forced here on route 12; SmolLM2 needs it; the 8-hop route always runs it):
    ids equal transformers', and every array the model party (and on route 8 the user) receives in the
    residues is uniform mod its modulus (the transcript audit). The 8-hop route saves 4 hops per layer and
    decode step."""
    import permllm.model.forward as fwd
    from permllm.protocols import crt
    from permllm.protocols.transcript import audit

    monkeypatch.setattr(fwd, "PLAN_ORDER", list(fwd.WIDE_FRONTIER))
    d, hf = (_llama_dir if family == "llama" else _gpt2_dir)(tmp_path)
    lm = load_model(str(d))
    prompt = [5, 17, 42, 99, 123, 250, 7, 3]
    out = tmp_path / "transcript"
    n = 10
    async with await permllm.local(lm, config=ShareConfig(arith="ring", route=route), transcript=out) as s:
        assert s.trio.model.ring and any(k.endswith("#q1") for k in s.trio.user.weights)
        ids = [t async for t in s.generate_ids(prompt, n)]
        hops = s.last.online_hops
    assert ids == hf_greedy(hf, prompt, n)
    L = lm.arch.layers
    assert hops == 1 + (12 * L + 8) + (n - 1) * ((8 if route == "8" else 12) * L + 8)
    report = audit(out)
    for role in ("model", "user") if route == "8" else ("model",):
        rep = report[role]
        assert rep["counts"]["statistical"] == 0 and rep["uniformity"]
        assert all(t["pass"] for t in rep["uniformity"].values() if t["pass"] is not None), rep["uniformity"]
        assert all(t["pass"] for t in rep["repeats"].values())
    import json
    index = json.loads((out / "model" / "index.json").read_text())
    assert {e["modulus"] for e in index if e["kind"] == "uniform"} >= {2**64, *crt.PRIMES}
    if route == "8":
        assert any(e["tag"][0] == "attn8" for e in index)


def test_a_residue_travels_in_3_bytes_and_out_of_range_ones_are_refused():
    """A residue view's arrays go out mod q in 3 bytes an element and come back as the same integers; a value at
    or above q, or a message of another width, is refused."""
    from permllm.protocols import crt
    from permllm.protocols.party import ProtocolError, _reduced, _widened
    q = crt.PRIMES[0]
    x = rng.integers(-3 * q, 3 * q, size=(4, 5)).astype(np.float64)
    wire = _reduced([x.T, x[:1]], q)
    assert all(w.dtype == np.uint8 and w.shape[-1] == 3 for w in wire)
    back = _widened(wire, q)
    assert np.array_equal(back[0], np.mod(x.T, q)) and np.array_equal(back[1], np.mod(x[:1], q))
    bad = _reduced(np.array([float(q - 1)]), q)
    bad[..., 0] += 1  # q itself
    with pytest.raises(ProtocolError, match="out of range"):
        _widened(bad, q)
    with pytest.raises(ProtocolError, match="3 bytes"):
        _widened(np.zeros((2, 4), dtype=np.uint8), q)

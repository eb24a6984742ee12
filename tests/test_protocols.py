"""Every protocol op run by all three parties, against its plaintext twin.

Each test also checks what the op costs online: messages sent and dependent hops
(the zero-round linear sends nothing; a non-linear costs exactly 2 hops).
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from permllm.protocols import (Party, ProtocolError, ShareConfig, embed, functions as F, gelu, layer_norm, linear,
                               matmul_shared, reshare, rms_norm, setup_weight, silu, softmax, swiglu)
from permllm.protocols.embedding import TABLE_SIG, setup_table
from permllm.runtime import local_trio, run_offline, run_online, run_setup

from .conftest import REL_TOL, Shares, online_counts, rel_err, run_both

rng = np.random.default_rng(7)


async def _setup(trio, name, W):
    await run_setup(trio, lambda p: setup_weight(p, name, W if p.is_model else None))


@pytest.mark.parametrize("kind", ["dense", "diag"])
async def test_linear_zero_round(trio, kind):
    W = rng.normal(size=(24, 16)) * 0.2 if kind == "dense" else rng.normal(size=16)
    b = rng.normal(size=W.shape[0])
    x = rng.normal(size=(5, 16))
    await _setup(trio, "W", W)
    s = Shares(trio, "x", x, mag=4.0)

    async def g(p):
        return await linear(p, "lin", s.of(p), "W", mag_in=4.0, mag_out=8.0, kind=kind,
                            bias=b if p.is_model else None)

    m, u = await run_both(trio, g)
    want = (x @ W.T if kind == "dense" else x * W) + b
    assert rel_err(m + u, want) < REL_TOL["float64"]
    assert online_counts(trio) == (0, 0)


async def test_linear_one_message_variant(trio):
    """A U share H cannot derive (here: a clear input of U) costs one message U → M."""
    W = rng.normal(size=(8, 6))
    x = rng.normal(size=(3, 6))

    async def g(p):
        xin = x if (p.is_user and p.phase == "online") else None
        return await linear(p, "lin", xin, "W", mag_in=4.0, mag_out=8.0, derivable=False, in_shape=x.shape)

    await _setup(trio, "W", W)
    m, u = await run_both(trio, g)
    assert rel_err(m + u, x @ W.T) < REL_TOL["float64"]
    assert online_counts(trio) == (1, 1)


@pytest.mark.parametrize("op", ["gelu", "gelu_tanh", "silu", "layer_norm", "rms_norm"])
async def test_unary_nonlinear(trio, op):
    x = rng.normal(size=(4, 32)) * 3 + 1
    s = Shares(trio, "x", x, mag=10.0)
    call = {
        "gelu": (lambda p, v: gelu(p, "f", v, mag_in=10.0, shape=x.shape), F.gelu),
        "gelu_tanh": (lambda p, v: gelu(p, "f", v, mag_in=10.0, approximate=True, shape=x.shape), F.gelu_tanh),
        "silu": (lambda p, v: silu(p, "f", v, mag_in=10.0, shape=x.shape), F.silu),
        "layer_norm": (lambda p, v: layer_norm(p, "f", v, mag_in=10.0, shape=x.shape), F.layer_norm),
        "rms_norm": (lambda p, v: rms_norm(p, "f", v, mag_in=10.0, shape=x.shape), F.rms_norm),
    }[op]
    m, u = await run_both(trio, lambda p: call[0](p, s.of(p)))
    assert rel_err(m + u, call[1](x)) < REL_TOL["float64"]
    assert online_counts(trio) == (2, 2)


async def test_plaintext_twins_match_torch():
    import torch
    x = rng.normal(size=(3, 40)) * 4
    t = torch.from_numpy(x)
    np.testing.assert_allclose(F.gelu(x), torch.nn.functional.gelu(t).numpy(), atol=1e-12)
    np.testing.assert_allclose(F.gelu_tanh(x), torch.nn.functional.gelu(t, approximate="tanh").numpy(), atol=1e-12)
    np.testing.assert_allclose(F.silu(x), torch.nn.functional.silu(t).numpy(), atol=1e-12)
    np.testing.assert_allclose(F.layer_norm(x), torch.nn.functional.layer_norm(t, (40,)).numpy(), atol=1e-10)
    np.testing.assert_allclose(F.rms_norm(x, 1e-6), torch.nn.functional.rms_norm(t, (40,), eps=1e-6).numpy(),
                               atol=1e-10)
    mask = torch.ones(3, 40, dtype=torch.bool).tril()
    ref = torch.softmax(t.masked_fill(~mask, float("-inf")), -1).numpy()
    np.testing.assert_allclose(F.softmax(x, np.arange(1, 4)), ref, atol=1e-12)


async def test_swiglu_same_permutation(trio):
    g_, u_ = rng.normal(size=(3, 20)) * 2, rng.normal(size=(3, 20)) * 2
    sg, su = Shares(trio, "g", g_, 8.0), Shares(trio, "u", u_, 8.0)
    m, u = await run_both(trio, lambda p: swiglu(p, "sw", sg.of(p), su.of(p), mag_g=8.0, mag_u=8.0,
                                                 shape=g_.shape))
    assert rel_err(m + u, F.swiglu(g_, u_)) < REL_TOL["float64"]
    assert online_counts(trio) == (2, 2)


@pytest.mark.parametrize("causal", [False, True])
async def test_softmax_rows(trio, causal):
    heads, t = 3, 6
    x = rng.normal(size=(heads, t, t)) * 3
    valid = np.arange(1, t + 1) if causal else None
    s = Shares(trio, "s", x, 16.0)
    m, u = await run_both(trio, lambda p: softmax(p, "sm", s.of(p), mag_in=16.0, valid=valid, scale=0.5,
                                                  shape=x.shape))
    want = F.softmax(x, valid, 0.5)
    assert np.max(np.abs(m + u - want)) < 1e-6
    if causal:
        assert np.max(np.abs((m + u)[:, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]])) < 1e-6
    assert online_counts(trio) == (2, 2)


async def test_user_sees_no_masked_score(trio):
    """A causal prefill reveals each row's valid prefix only: U's view holds zeros past it, the
    messages carry the valid entries alone, and both shares of a masked probability are exactly 0."""
    from permllm.protocols import permute_reveal
    heads, t = 2, 7
    x = rng.normal(size=(heads, t, t)) * 3 + 50.0  # no true score is 0
    valid = np.arange(1, t + 1)
    keep = np.arange(t)[None, :] < valid[:, None]
    s = Shares(trio, "s", x, 64.0)
    g = lambda p: permute_reveal(p, "pr", [s.of(p)], mags=[64.0], mode="rows", valid=valid, shape=x.shape)  # noqa: E731
    await run_offline(trio, g)
    _, seen = await run_online(trio, g)
    seen = seen[0]
    assert np.all(seen[:, ~keep] == 0)
    np.testing.assert_allclose(np.sort(seen[:, keep].reshape(heads, -1)), np.sort(x[:, keep].reshape(heads, -1)),
                               atol=1e-8)
    got = trio.user.meter.total("online")
    assert got.msgs_recv == 1 and got.bytes_recv <= heads * int(keep.sum()) * 8 + 64

    s2 = Shares(trio, "s2", x, 64.0)
    m, u = await run_both(trio, lambda p: softmax(p, "sm", s2.of(p), mag_in=64.0, valid=valid, shape=x.shape),
                          token=1)
    assert np.all(m[:, ~keep] == 0) and np.all(u[:, ~keep] == 0)
    assert np.max(np.abs(m + u - F.softmax(x, valid))) < 1e-6


async def test_user_sees_a_permutation_of_x(trio):
    """U's clear view is π(x): the same multiset of values per row, in another order."""
    from permllm.protocols import permute_reveal
    x = rng.normal(size=(2, 50))
    s = Shares(trio, "x", x, 4.0)
    g = lambda p: permute_reveal(p, "pr", [s.of(p)], mags=[4.0], mode="rows", shape=x.shape)  # noqa: E731
    await run_offline(trio, g)
    _, seen = await run_online(trio, g)
    seen = seen[0]
    np.testing.assert_allclose(np.sort(seen, axis=1), np.sort(x, axis=1), atol=1e-8)
    assert not np.allclose(seen, x)


async def test_attention_products_with_growing_cache(trio):
    """q·Kᵀ then P·V for 3 decode tokens with GQA broadcasting: 2 hops per product per token."""
    kv, g, d = 2, 2, 8
    K = np.zeros((kv, 1, 0, d))
    V = np.zeros((kv, 1, 0, d))
    for tok in range(3):
        q = rng.normal(size=(kv, g, 1, d))
        k = rng.normal(size=(kv, 1, 1, d))
        v = rng.normal(size=(kv, 1, 1, d))
        K, V = np.concatenate([K, k], 2), np.concatenate([V, v], 2)
        P = F.softmax(rng.normal(size=(kv, g, 1, tok + 1)))
        sq, sk, sv, sp = (Shares(trio, f"{n}{tok}", a, 4.0) for n, a in
                          (("q", q), ("k", k), ("v", v), ("p", P)))

        async def graph(p):  # two independent products in flight at once
            return await asyncio.gather(
                matmul_shared(p, "qk", sq.of(p), sk.of(p), "K", transpose_b=True,
                              mag_a=4.0, mag_b=4.0, mag_out=32.0),
                matmul_shared(p, "pv", sp.of(p), sv.of(p), "V", transpose_b=False,
                              mag_a=1.0, mag_b=4.0, mag_out=4.0))

        h0 = max(p.meter.hops("online") for p in (trio.model, trio.user))
        await run_offline(trio, graph, tok)
        (sm, om), (su, ou) = await run_online(trio, graph, tok)
        assert rel_err(sm + su, q @ np.swapaxes(K, -1, -2)) < REL_TOL["float64"]
        assert rel_err(om + ou, P @ V) < REL_TOL["float64"]
        h1 = max(p.meter.hops("online") for p in (trio.model, trio.user))
        assert h1 - h0 == 2  # concurrent, so 2 dependent hops for both


async def test_embedding_lookup(trio):
    """Exact ring lookup: M's messages are uniform mod 2^32 whatever the ids; 3 hops (one-hot, lift)."""
    vocab, hidden = 50, 12
    E = rng.normal(size=(vocab, hidden))
    ids = [3, 49, 0, 3]
    await run_setup(trio, lambda p: setup_table(p, "E", E if p.is_model else None))
    g = lambda p: embed(p, "emb", ids if p.is_user else None, weight="E", table="E", vocab=vocab,  # noqa: E731
                        n_tokens=len(ids), mag_out=4.0)
    m, u = await run_both(trio, g)
    assert np.max(np.abs(m + u - E[ids])) < 2.0**-(TABLE_SIG - 2) + 1e-9  # the table's encoding step
    assert online_counts(trio) == (3, 3)
    # M's first online message is onehot − r mod 2^32, r uniform: no entry tells a chosen id from the others.
    assert trio.model.meter.total("online").msgs_recv == 2


async def test_embedding_messages_are_uniform_whatever_the_ids(monkeypatch):
    """Everything M receives in the lookup is uniform mod 2^32: the same id 2000 times gives uniform bytes
    in every message (χ² over the byte values), at the chosen id's entries as elsewhere."""
    vocab, hidden, n = 8, 4, 2000
    E = rng.normal(size=(vocab, hidden))
    t = await local_trio("memory", ShareConfig())
    seen: list[np.ndarray] = []
    orig = Party.recv

    async def spy(self, frm, tag, **kw):
        got = await orig(self, frm, tag, **kw)
        if self.is_model and self.phase != "setup" and isinstance(got, np.ndarray):
            seen.append(got)
        return got
    monkeypatch.setattr(Party, "recv", spy)
    try:
        await run_setup(t, lambda p: setup_table(p, "E", E if p.is_model else None))
        g = lambda p: embed(p, "emb", [5] * n if p.is_user else None, weight="E", table="E",  # noqa: E731
                            vocab=vocab, n_tokens=n, mag_out=4.0)
        await run_both(t, g)
    finally:
        await t.close()
    onehot = next(a for a in seen if a.shape == (n, vocab, 4))
    for col in (5, 0):  # the chosen id's column and another
        counts = np.bincount(onehot[:, col, :].ravel(), minlength=256)
        chi2 = float(np.sum((counts - counts.mean()) ** 2 / counts.mean()))
        assert chi2 < 400, (col, chi2)  # 255 degrees of freedom: mean 255, sd 22.6
    for a in seen:
        if a.dtype == np.uint8 and a.size >= 4000:
            counts = np.bincount(a.ravel(), minlength=256)
            assert float(np.sum((counts - counts.mean()) ** 2 / counts.mean())) < 400


async def test_embedding_lookup_of_a_power_of_two_maximum():
    """A table whose largest entry is a power of two, looked up at that entry, plus added rows: in range."""
    E = rng.normal(size=(6, 5)) * 0.2
    E[2, 3] = 1.0
    add = np.full((1, 5), 0.5)
    t = await local_trio("memory", ShareConfig())
    try:
        await run_setup(t, lambda p: setup_table(p, "E", E if p.is_model else None, added=0.5))
        g = lambda p: embed(p, "emb", [2] if p.is_user else None, weight="E", table="E", vocab=6,  # noqa: E731
                            n_tokens=1, mag_out=4.0, add=add if p.is_model else None)
        m, u = await run_both(t, g)
    finally:
        await t.close()
    assert np.max(np.abs(m + u - (E[[2]] + add))) < 1e-6


async def test_embedding_rejects_bad_ids(trio):
    await run_setup(trio, lambda p: setup_table(p, "E", rng.normal(size=(10, 4)) if p.is_model else None))
    g = lambda p: embed(p, "emb", [10] if p.is_user else None, weight="E", table="E", vocab=10,  # noqa: E731
                        n_tokens=1, mag_out=4.0)
    await run_offline(trio, g)
    with pytest.raises(ProtocolError, match="out of range"):
        await run_online(trio, g)


async def test_reshare_makes_user_share_derivable(trio):
    x = rng.normal(size=(3, 4))
    s = Shares(trio, "x", x, 4.0)
    m, u = await run_both(trio, lambda p: reshare(p, "rs", s.of(p), mag=4.0))
    np.testing.assert_allclose(m + u, x, atol=1e-9)
    # U's new share is exactly what H derives from s_UH.
    trio.helper.token = 0
    np.testing.assert_array_equal(u, trio.helper.mask("uh", "rs", "r", x.shape, trio.helper.ratio * 4.0))


async def test_online_without_offline_is_a_clear_error(trio):
    await _setup(trio, "W", rng.normal(size=(4, 4)))
    s = Shares(trio, "x", rng.normal(size=(1, 4)), 1.0)
    with pytest.raises(ProtocolError, match="offline"):
        await run_online(trio, lambda p: linear(p, "lin", s.of(p), "W", mag_in=1.0, mag_out=1.0))


async def test_chain(trio):
    """The whole chain linear → RMSNorm → SwiGLU at the default ratio."""
    W1 = rng.normal(size=(16, 16)) * 0.3
    W2 = rng.normal(size=(16, 16)) * 0.3
    x = rng.normal(size=(2, 16)) * 2
    await _setup(trio, "W1", W1)
    await _setup(trio, "W2", W2)
    s = Shares(trio, "x", x, 8.0)

    async def g(p):
        h = await rms_norm(p, "n", s.of(p), mag_in=8.0, shape=x.shape)
        a = await linear(p, "a", h, "W1", mag_in=4.0, mag_out=8.0)
        b = await linear(p, "b", h, "W2", mag_in=4.0, mag_out=8.0)
        return await swiglu(p, "sw", a, b, mag_g=8.0, mag_u=8.0, shape=x.shape)

    m, u = await run_both(trio, g)
    h = F.rms_norm(x)
    want = F.swiglu(h @ W1.T, h @ W2.T)
    assert rel_err(m + u, want) < REL_TOL["float64"]
    assert (m + u).dtype == np.float64
    assert online_counts(trio) == (4, 4)


def test_float32_is_refused():
    """float32 shares hide nothing (an audit identified every token id from the embedding messages)."""
    with pytest.raises(ValueError, match=r"float32 shares are refused: float32 masks of ratio 2\*\*4 do not hide "
                                         r"the inputs \(an audit identified 32 of 32 token ids"):
        ShareConfig(dtype="float32")
    with pytest.raises(ValueError, match="share dtype must be one of float64, not 'float16'"):
        ShareConfig(dtype="float16")


async def test_traced_message_received_after_its_op_ended(trio):
    """A task started inside a traced op may receive after the op ends (the light mode's HE
    products): the message counts for that op, and nothing fails."""
    from permllm.protocols import Role
    from permllm.runtime.profile import enable
    [_, u_trace, _] = enable(trio.parties)
    u, m = trio.user.view("online", 0), trio.model.view("online", 0)
    async with u.traced("op"):
        late = asyncio.create_task(u.recv(Role.MODEL, ("late", 1)))
        await asyncio.sleep(0)
    m.send(Role.USER, ("late", 1), np.arange(3.0))
    assert (await late).tolist() == [0.0, 1.0, 2.0]
    [rec] = u_trace
    assert rec.name == "op" and rec.msgs_recv == 1

"""Token selection: sampling on permuted logits, dealt index retrieval, select_token.

The sampling rules are checked for permutation equivariance and against the exact
truncated softmax; retrieval and select_token run with all three parties over
memory and TCP and are checked for correctness, hops and who sees what.
"""
from __future__ import annotations

import numpy as np
import pytest

from permllm.protocols import Party, ProtocolError, Role, Sampler, choose, make_rng, retrieve, select_token
from permllm.runtime import DealtInput, local_trio, run_offline, run_online, run_setup

from .conftest import online_counts

rng = np.random.default_rng(11)

# Chi-square critical values at p = 0.001 for 1..8 degrees of freedom.
CHI2_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124}


def _truncated_softmax(x: np.ndarray, s: Sampler) -> np.ndarray:
    """The exact distribution choose() samples from, written independently (by value rank)."""
    order = np.argsort(-x, kind="stable")[:s.top_k or None]
    p = np.exp((x[order] - x[order[0]]) / s.temperature)
    p /= p.sum()
    keep = next(i + 1 for i, c in enumerate(np.cumsum(p)) if c >= s.top_p - 1e-12)
    out = np.zeros_like(x)
    out[order[:keep]] = p[:keep] / p[:keep].sum()
    return out


# -- sampling -----------------------------------------------------------------------------
def test_sampler_validation():
    for bad in ({"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            Sampler(**bad)
    with pytest.raises(ValueError, match="rng"):
        choose(np.zeros(3), Sampler(temperature=1.0), None)


def test_greedy_is_argmax():
    for _ in range(20):
        x = rng.normal(size=100) * 5
        assert choose(x, Sampler(), None) == int(np.argmax(x))


def test_same_seed_same_true_token_for_any_permutation():
    x = rng.normal(size=300) * 3
    s = Sampler(temperature=1.3, top_k=50, top_p=0.95, seed=1234)
    want = choose(x, s, make_rng(s))
    for _ in range(100):
        perm = rng.permutation(x.size)  # U sees x[perm]; its pick j is true token perm[j]
        assert perm[choose(x[perm], s, make_rng(s))] == want
    # ... and a whole sequence of draws from one generator agrees as well.
    g1, g2 = make_rng(s), make_rng(s)
    for _ in range(50):
        perm = rng.permutation(x.size)
        assert perm[choose(x[perm], s, g1)] == choose(x, s, g2)


def test_sampling_matches_truncated_softmax():
    # Top-5 cuts 0.85 (next to the 5th value, 0.9); top-p 0.9 then cuts 0.9 (cumulative 0.93 at the 4th).
    x = np.array([0.3, 1.6, -1.0, 2.0, 0.85, 1.5, -0.2, 0.9, 1.8, 0.1, -2.0, 0.6])
    s = Sampler(temperature=0.7, top_k=5, top_p=0.9, seed=5)
    want = _truncated_softmax(x, s)
    support = np.flatnonzero(want)
    assert set(support) == {1, 3, 5, 8}
    g = make_rng(s)
    draws = 20_000
    counts = np.bincount([perm[choose(x[perm], s, g)] for perm in (rng.permutation(12) for _ in range(draws))],
                         minlength=12)
    assert counts[want == 0].sum() == 0  # nothing outside top-k / top-p, ever
    expected = want[support] * draws
    chi2 = float(np.sum((counts[support] - expected) ** 2 / expected))
    assert chi2 < CHI2_001[support.size - 1], (chi2, counts, want)


def test_top_k_one_and_tiny_top_p_are_greedy():
    g = make_rng(Sampler(seed=0))
    for _ in range(20):
        x = rng.normal(size=40)
        assert choose(x, Sampler(temperature=2.0, top_k=1), g) == int(np.argmax(x))
        assert choose(x, Sampler(temperature=0.1, top_p=1e-9), g) == int(np.argmax(x))


# -- dealt retrieval ----------------------------------------------------------------------
def _retrieve_graph(table: np.ndarray, j: int | None):
    def g(p):
        return retrieve(p, "r", j if p.is_user and p.phase == "online" else None,
                        table if p.is_helper else None, length=table.size)
    return g


@pytest.mark.parametrize("vocab", [200, 1000, 130528])
async def test_retrieve_table_entry(trio, vocab):
    table = rng.permutation(vocab)
    for tok, j in enumerate([0, vocab - 1, int(rng.integers(vocab))]):
        for p in trio.parties:
            p.meter.reset()
        g = _retrieve_graph(table, j)
        assert await run_offline(trio, g, tok) == [None, None, None]
        dealt = trio.helper.meter.total("offline", "pir")
        assert dealt.msgs_sent == 1 and dealt.bytes_sent >= vocab * (1 if vocab <= 256 else 2 if vocab <= 65536 else 4)
        assert trio.model.meter.total("offline").msgs_recv == 0
        m, u = await run_online(trio, g, tok)
        assert m is None and u == table[j]
        assert online_counts(trio) == (2, 2)
        assert trio.model.meter.total("online").bytes_recv < 100  # an integer, not a query of ciphertexts
        assert trio.helper.meter.total("online").msgs_recv == trio.helper.meter.total("online").msgs_sent == 0


async def test_retrieve_views_are_uniform(trio, monkeypatch):
    """What M receives (U's shifted index) does not depend on the index, and U's table is padded."""
    vocab = 50
    table = rng.permutation(vocab)
    seen_m, seen_u = [], []
    recv = Party.recv

    async def spy(self, frm, tag, **kw):
        msg = await recv(self, frm, tag, **kw)
        (seen_m if self.is_model else seen_u).append(msg)
        return msg

    monkeypatch.setattr(Party, "recv", spy)
    draws = 600
    for tok in range(draws):
        g = _retrieve_graph(table, 7)  # always the same index
        await run_offline(trio, g, tok)
        _, u = await run_online(trio, g, tok)
        assert u == table[7]
    js = np.bincount(seen_m, minlength=vocab)
    expected = draws / vocab
    chi2 = float(np.sum((js - expected) ** 2 / expected))
    assert chi2 < 100, js  # 49 degrees of freedom: p = 0.001 at 85.4; a fixed j would give ~29400
    tables = [t for t in seen_u if isinstance(t, np.ndarray)]
    assert len(tables) == draws
    assert not any(np.array_equal(np.sort(t), np.arange(vocab)) for t in tables)  # never the bare permutation


@pytest.mark.parametrize("bad", [-1, 10 ** 6, "3", 1.5, None, True])
async def test_malformed_index_is_a_protocol_error(bad):
    async with await local_trio("memory") as trio:
        vocab = 5000
        table = rng.permutation(vocab)
        await run_offline(trio, _retrieve_graph(table, None))

        async def g(p):
            if p.is_user:
                p.send(Role.MODEL, p.tag("pir", "r", "index"), bad)
                return None
            return await retrieve(p, "r", None, None, length=vocab)

        with pytest.raises(ProtocolError, match="retrieve"):
            await run_online(trio, g)


async def test_malformed_table_is_a_protocol_error():
    async with await local_trio("memory") as trio:
        async def g(p):
            if p.is_helper:
                p.send(Role.USER, p.tag("pir", "r", "table"), np.zeros(10, dtype=np.uint32))
                return None
            return await retrieve(p, "r", None, None, length=100)

        with pytest.raises(ProtocolError, match="retrieve"):
            await run_offline(trio, g)


# -- select_token -------------------------------------------------------------------------
def _select_graph(x: DealtInput, vocab: int, sampler: Sampler, mag: float):
    gen = make_rng(sampler)

    def g(p):
        return select_token(p, "sel", x.of(p), sampler=sampler, rng=gen if p.is_user else None,
                            mag=mag, vocab=vocab)
    return g


async def _select_once(transport: str, logits: np.ndarray, sampler: Sampler, mag: float = 30.0) -> int:
    async with await local_trio(transport) as trio:
        x = DealtInput(trio, "logits", logits, mag)
        g = _select_graph(x, logits.size, sampler, mag)
        assert await run_offline(trio, g) == [None, None, None]
        m, u = await run_online(trio, g)
        assert m is None
        assert online_counts(trio)[1] == 3
        return u


async def test_select_token_greedy(trio):
    vocab = 5000
    for tok in range(2):  # a fresh π per token
        logits = rng.normal(size=vocab) * 8
        x = DealtInput(trio, f"logits{tok}", logits, 30.0)
        g = _select_graph(x, vocab, Sampler(), 30.0)
        await run_offline(trio, g, tok)
        for p in trio.parties:
            p.meter.reset()
        m, u = await run_online(trio, g, tok)
        assert m is None and u == int(np.argmax(logits))
        assert online_counts(trio) == (3, 3)
        assert trio.helper.meter.total("online").msgs_sent == 0


async def test_select_token_sampling_reproducible_across_sessions():
    logits = rng.normal(size=2000) * 4
    s = Sampler(temperature=0.9, top_k=40, top_p=0.9, seed=77)
    a = await _select_once("memory", logits, s)
    b = await _select_once("tcp", logits, s)
    assert a == b == choose(logits, s, make_rng(s))

"""The light client's CKKS products (permllm.protocols.he_matmul) and the light-mode linear op.

The slot layouts are checked exactly by a plaintext model of the ciphertext algorithm
(rotations are np.roll), for many shapes; then with real CKKS on a few shapes; then as
the offline phase of the linear op with all three parties: the same correlation as the
dealt mode, zero online messages, nothing sent by the helper, nothing model-sized at
the user.
"""
from __future__ import annotations

import numpy as np
import pytest
from Pyfhel import Pyfhel

from permllm.protocols import ProtocolError, ShareConfig, he_matmul as H, linear, setup_weight
from permllm.protocols.he_matmul import SLOTS, Layout, pack, plan, unpack
from permllm.runtime import gather_fail_fast, local_trio, run_online, run_setup

from .conftest import Shares, online_counts, rel_err

rng = np.random.default_rng(11)


def simulate(W: np.ndarray, X: np.ndarray, L: Layout) -> np.ndarray:
    """x·Wᵀ through the layout's baby-step/giant-step algorithm on plaintext slot vectors."""
    V = pack(X, L)
    out = np.zeros((L.cts, len(L.groups), SLOTS), dtype=np.complex128)
    for o in range(len(L.groups)):
        for g in reversed(range(L.giant(o))):
            part = np.zeros((L.cts, SLOTS), dtype=np.complex128)
            for c in range(len(L.chunks)):
                if g * L.b1 >= L.width(o, c):
                    continue
                for b, d in enumerate(H._diagonals(W, L, o, c, g)):
                    part += np.repeat(d, L.gc) * np.roll(V[:, c], -b * L.gc, axis=-1)  # rot by b·gc
            out[:, o] = np.roll(out[:, o], -L.b1 * L.gc, axis=-1) + part
        step = L.groups[o][1]
        while L.copies(o) > 1 and step < L.K:  # every copy of the group's rows gets the sum of all
            out[:, o] += np.roll(out[:, o], -step * L.gc, axis=-1)
            step *= 2
    return unpack(out, L)


@pytest.mark.parametrize("n_out,n_in,rows", [(24, 16, 5), (200, 48, 9), (48, 100, 9), (300, 48, 4), (48, 300, 17),
                                             (960, 576, 43), (576, 1536, 37), (576, 49152, 3), (49152, 576, 2),
                                             (7, 3, 130), (5, 5, 600)])
def test_layout_computes_the_product(n_out, n_in, rows):
    L = plan(n_in, n_out, rows)
    assert SLOTS % L.K == 0 and L.K % L.b1 == 0 and all(L.K % P == 0 for _, P in L.chunks)
    assert sum(P for _, P in L.chunks) == n_in and sum(R for _, R in L.groups) == n_out
    W = rng.normal(size=(n_out, n_in))
    X = rng.normal(size=(rows, n_in))
    np.testing.assert_allclose(simulate(W, X, L), X @ W.T, atol=1e-9 * max(1, n_in))


def test_diagonal_layout():
    w, X = rng.normal(size=576), rng.normal(size=(3, 576))
    L = plan(576, 576, 3, diag=True)
    assert L.b1 == 1 and all(L.giant(o) == 1 for o in range(len(L.groups)))  # no rotation at all
    np.testing.assert_allclose(simulate(w, X, L), X * w, atol=1e-12)


def test_plan_is_deterministic_and_rejects_bad_shapes():
    assert plan(576, 960, 43) == plan(576, 960, 43)
    with pytest.raises(ValueError):
        plan(0, 4, 1)
    with pytest.raises(ValueError):
        plan(4, 5, 1, diag=True)


@pytest.fixture(scope="module")
def keys():
    st_u, msg = H._user_keys()
    return st_u, H._model_keys(msg), msg


@pytest.mark.parametrize("n_out,n_in,rows,diag", [(24, 16, 5, False), (48, 300, 17, False), (300, 48, 4, False),
                                                  (48, 48, 3, True)])
def test_ckks_product(keys, n_out, n_in, rows, diag):
    """Real CKKS, the whole exchange: M gets x_U·W − r; what U decrypts is uniform modulo q."""
    st_u, st_m, _ = keys
    W = rng.normal(size=n_in if diag else (n_out, n_in)) * 0.1
    X = rng.uniform(-2.0**13, 2.0**13, size=(rows, n_in))   # x_U: width R·mag_in with R = 2^12, mag_in = 4
    r = rng.uniform(-2.0**14, 2.0**14, size=(rows, n_out))
    L = plan(n_in, n_out, rows, diag)
    x_bits, w_bits = H.scales(4096.0, 4.0, float(np.abs(W).max()), n_in, 8.0, diag)
    blobs, masks = H.model_product(st_m, W, L, H.user_encrypt(st_u, X, L, x_bits), x_bits, w_bits, 7)
    V = H.user_unmask(st_u, blobs, H.pack_out(r, L), 0, len(blobs))
    q = st_u.q[None, :, None].astype(float)
    assert abs(np.mean(V / q) - 0.5) < 0.01 and abs(np.std(V / q) - 12 ** -0.5) < 0.01  # uniform to U
    got = H.model_unmask(st_m, V, masks, L, 2.0 ** (x_bits + w_bits))
    want = X * W if diag else X @ W.T
    assert np.max(np.abs(got - (want - r))) < 1e-5


def test_ckks_setup_checks_the_users_context(keys):
    _, _, msg = keys
    with pytest.raises(ProtocolError, match="expected"):
        H._model_keys({"context": msg["context"]})
    with pytest.raises(ProtocolError, match="bad keys"):
        H._model_keys({**msg, "public_key": b"garbage"})
    st_u, st_m, _ = keys
    L = plan(16, 8, 2)
    with pytest.raises(ProtocolError, match="ciphertexts"):
        H.model_product(st_m, np.ones((8, 16)), L, [], 40, 40, 1)
    with pytest.raises(ProtocolError, match="at most"):
        H.model_product(st_m, np.ones((8, 16)), L, [b"x" * (st_m.ct_bytes + 1)] * L.cts * len(L.chunks), 40, 40, 1)
    with pytest.raises(ProtocolError, match="scale"):
        blob = st_u.he.encryptComplex(np.zeros(SLOTS, dtype=complex), scale=2.0 ** 30).to_bytes("none")
        H.model_product(st_m, np.ones((8, 16)), L, [blob] * L.cts * len(L.chunks), 40, 40, 1)
    masks = np.zeros((L.cts, H.LEVELS, H.RING), dtype=np.uint64)
    with pytest.raises(ProtocolError, match="reduced"):
        H.model_unmask(st_m, masks + np.uint64(2**62), masks, L, 2.0**80)


def test_security_parameters(keys):
    """128-bit security at N = 8192 allows a 218-bit modulus (HE standard); SEAL checks it at contextGen."""
    st_u, _, msg = keys
    assert H.RING == 8192 and sum(H.PRIME_BITS) <= 218
    assert [int(q).bit_length() for q in st_u.q] == list(H.PRIME_BITS[:-1])
    assert H.CAPACITY_BITS < sum(H.PRIME_BITS[:-1]) - 2
    x, w = H.scales(4096.0, 10.0, 2.0, 1536, 50.0, False)
    assert x + w + np.log2(5 * 4096 * 10 * 2 * np.sqrt(1536) + 4096 * 25) < H.CAPACITY_BITS
    other = Pyfhel()
    other.contextGen(scheme="ckks", n=8192, scale=2.0**40, qi_sizes=[60, 40, 60], sec=128)
    with pytest.raises(ProtocolError, match="differs"):
        H._model_keys({**msg, "context": other.to_bytes_context("none")})


# ----------------------------------------------------------------------------- the op
LIGHT = ShareConfig(offline="he")


async def _light_offline(trio, graph, tokens):
    """The offline phase of ``tokens`` as one HE batch (what the session's light runner does)."""
    async def party(p):
        if not p.is_helper:
            H.open_batch(p, tokens)
        for t in tokens:
            await graph(p.view("offline", t))
        if not p.is_helper:
            await H.close_batch(p)
    await gather_fail_fast([party(p) for p in trio.parties])


@pytest.mark.parametrize("kind,part", [("dense", 16), ("transposed", 16), ("diag", 16), ("dense", 1)])
async def test_light_linear_matches_plaintext(kind, part, monkeypatch):
    monkeypatch.setattr(H, "PART_CTS", part)  # 1: every ciphertext in a message of its own
    trio = await local_trio("memory", LIGHT)
    try:
        n = 16 if part > 1 else 200  # with 200 inputs, 3 chunks: several messages per direction
        W = {"dense": rng.normal(size=(24, n)) * 0.2, "transposed": rng.normal(size=(n, 24)) * 0.2,
             "diag": rng.normal(size=n)}[kind]
        b = rng.normal(size=n if kind == "diag" else 24)
        xs = {t: rng.normal(size=((5 if part > 1 else 298) if t == 0 else 1, n)) for t in (0, 1, 2)}
        shares = {t: Shares(trio, f"x{t}", x, mag=4.0) for t, x in xs.items()}
        await run_setup(trio, lambda p: setup_weight(p, "W", W if p.is_model else None))
        await run_setup(trio, H.setup_ckks)
        assert trio.user.weights["W"].value is None and trio.helper.weights["W"].value is None

        def graph(t):
            async def g(p):
                return await linear(p, "lin", shares[t].of(p), "W", mag_in=4.0, mag_out=8.0, kind=kind,
                                    bias=b if p.is_model else None)
            return g

        async def offline_graph(p):
            return await graph(p.token)(p)
        h_sent = trio.helper.meter.total("offline").msgs_sent
        await _light_offline(trio, offline_graph, [0, 1, 2])
        assert trio.helper.meter.total("offline").msgs_sent == h_sent  # H deals nothing for a linear
        for t, x in xs.items():
            m, u = await run_online(trio, graph(t), t)
            want = (x * W if kind == "diag" else x @ (W.T if kind == "dense" else W)) + b
            assert rel_err(m + u, want) < 1e-5
        assert online_counts(trio) == (0, 0)
    finally:
        await trio.close()


async def test_light_setup_sends_no_masked_weights():
    trio = await local_trio("memory", LIGHT)
    try:
        W = rng.normal(size=(300, 200))
        before = trio.user.meter.total("setup").bytes_recv
        await run_setup(trio, lambda p: setup_weight(p, "W", W if p.is_model else None))
        assert trio.user.meter.total("setup").bytes_recv - before < 1000  # shape and scale only
        assert trio.user.weights["W"].value is None
    finally:
        await trio.close()


async def test_light_batch_errors():
    trio = await local_trio("memory", LIGHT)
    try:
        with pytest.raises(ValueError):
            H.open_batch(trio.user, [])
        H.open_batch(trio.user, [3, 4])
        with pytest.raises(ProtocolError, match="already open"):
            H.open_batch(trio.user, [5])
        H.abort_batch(trio.user)
        with pytest.raises(ProtocolError, match="no HE batch"):
            await H.close_batch(trio.user)
    finally:
        await trio.close()


def test_light_mode_configuration():
    with pytest.raises(ValueError, match="route 12"):
        ShareConfig(offline="he", route="8")
    with pytest.raises(ValueError, match="offline mode"):
        ShareConfig(offline="fast")

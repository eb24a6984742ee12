"""Private token selection: permuted logits to U, then a one-time-table retrieval of the true id.

Part of :mod:`permllm.protocols` (above :mod:`permllm.net`, below
:mod:`permllm.model`); docs/design.md §5.1. The logits are shared [x] over the
vocabulary. :func:`select_token` reveals π(x) to U under a fresh π per token
(:func:`~permllm.protocols.permute.permute_reveal`, 1 hop M → U), U chooses an
index j in permuted space (:func:`~permllm.protocols.sampling.choose`), and U
learns the true token id π⁻¹(j) = ``pi.idx[j]`` by :func:`retrieve` (2 hops, a
few bytes each): U sends its index shifted by a secret offset, M answers with one
mask entry. Three online hops per token; M learns nothing of j.

Why not homomorphic retrieval (the reference design proposed BFV, U sending an
encrypted one-hot of j; docs/design.md §5.1): the helper already knows π (it derives
it from s_MH to deal the permutation correlations), so it can deal the retrieval
offline as well, like every other correlation. The one-time table costs the helper V
small integers offline per token and the online phase two integers, where BFV cost
32 ciphertexts (4.3 MB) and about 100 ms of HE work per token at ChatGLM-6B's
vocabulary, and it leaks nothing: U's view of the table is a one-time pad and M's
view is a uniform offset, where BFV without noise flooding could leak about the
table through the answer's noise.
"""
from __future__ import annotations

import numpy as np

from . import ring
from .party import Party, ProtocolError, Role, check_array
from .permute import _perm, permute_reveal
from .sampling import Sampler, Uniform, choose

__all__ = ["retrieve", "select_token"]


def _table_dtype(length: int) -> np.dtype:
    """The smallest unsigned dtype that holds every index below ``length`` (wire size of the table)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if length <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise ValueError(f"a table of {length} entries is too long (at most 2**32)")


def _offset(p: Party, name: str, length: int) -> int:
    """s: U's secret shift of its index, from s_UH (M never holds it)."""
    return int(p.gen("uh", name, "shift").integers(0, length))


def _pad(p: Party, name: str, length: int) -> np.ndarray:
    """k: the one-time pad of the table, from s_MH (U never holds it)."""
    dt = _table_dtype(length)
    return p.gen("mh", name, "pad").integers(0, np.iinfo(dt).max, size=length, dtype=dt, endpoint=True)


async def retrieve(p: Party, name: str, index: int | None, table: np.ndarray | None, *,
                   length: int) -> int | None:
    """U learns ``table[index]`` for its secret ``index``; dealt offline, 2 online hops.

    The table (a 1-D integer array of ``length`` entries with values in [0, length))
    is known to M and H and secret from U; ``length`` is public. Offline, H passes the
    table: it sends U the rotated, padded table τ[i] = table[(i + s) mod L] ⊕ k[i],
    with s from s_UH and k from s_MH (the smallest unsigned dtype that holds L); M
    and U pass nothing. Online, U passes ``index``, sends j = (index − s) mod L to
    M, M (passing nothing, or the table: it is not needed) answers k[j], and U gets
    τ[j] ⊕ k[j] = table[index]. M and H get None.

    Learns: M learns j, uniform because s is unknown to it, so nothing of
    ``index``. U learns table[index] and nothing else: every other entry of τ is
    under a pad entry it never sees (this holds for any j U sends, one value per
    query). H takes no online part and learns nothing of ``index``.
    """
    if length < 1:
        raise ValueError(f"retrieve {name!r}: the table's length must be positive, not {length}")
    dt = _table_dtype(length)
    if p.phase == "offline":
        if p.is_helper:
            if table is None:
                raise ValueError(f"retrieve {name!r}: the helper must pass the table")
            tab = np.asarray(table)
            if tab.shape != (length,) or tab.dtype.kind not in "iu" or not 0 <= tab.min() <= tab.max() < length:
                raise ValueError(f"retrieve {name!r}: the table must be {length} integers in [0, {length})")
            tau = np.roll(tab.astype(dt), -_offset(p, name, length)) ^ _pad(p, name, length)
            p.send(Role.USER, p.tag("pir", name, "table"), tau)
        elif p.is_user:
            tau = await p.recv(Role.HELPER, p.tag("pir", name, "table"), modulus=1 << (8 * dt.itemsize))
            check_array(tau, dt, (length,), f"retrieve {name!r}: the helper's table")
            p.keep(name + "/table", tau)
        return None
    if p.phase != "online":
        return None
    if p.is_helper:
        raise ProtocolError(f"retrieve {name!r}: the helper has no online branch")
    tag_q, tag_a = p.tag("pir", name, "index"), p.tag("pir", name, "pad")
    if p.is_user:
        if index is None or not 0 <= int(index) < length:
            raise ValueError(f"retrieve {name!r}: index {index} not in [0, {length})")
        tau = p.take(name + "/table")
        j = (int(index) - _offset(p, name, length)) % length
        p.send(Role.MODEL, tag_q, j)
        k = await p.recv(Role.MODEL, tag_a, modulus=1 << (8 * dt.itemsize))
        if not (isinstance(k, int) and 0 <= k <= np.iinfo(dt).max):
            raise ProtocolError(f"retrieve {name!r}: expected a pad entry (an integer) from the model party")
        out = int(tau[j]) ^ k
        if out >= length:
            raise ProtocolError(f"retrieve {name!r}: the retrieved entry {out} is not below {length}")
        return out
    j = await p.recv(Role.USER, tag_q, modulus=length)
    if not (isinstance(j, int) and not isinstance(j, bool) and 0 <= j < length):
        raise ProtocolError(f"retrieve {name!r}: expected an index in [0, {length}) from the user, got {j!r}")
    p.send(Role.USER, tag_a, int(_pad(p, name, length)[j]))
    return None


async def select_token(p: Party, name: str, logits: np.ndarray | None, *, sampler: Sampler,
                       rng: Uniform | None, mag: float, vocab: int,
                       enc: "ring.Enc | None" = None) -> int | None:
    """Choose the next token from shared logits of shape (vocab,); 3 online hops.

    Offline, U and H pass U's share and M passes None (the permute-and-reveal
    correlation: H sends δ to M; and the retrieval table: H sends τ to U). Online,
    M and U pass their shares; U passes its sampling ``rng`` (None is fine for
    greedy). ``mag`` bounds |logits|; on the ring ``enc`` is their encoding. Returns the true token id at U, None at M (and
    offline).

    Hops: π(x) M → U, U's shifted index U → M, the pad entry M → U. π is fresh per
    token and per ``name`` (from the s_MH stream), so U cannot rebuild logits
    across tokens.

    Learns: U learns π(x) (the PermLLM leakage, here the multiset of the logits)
    and the chosen token id; M learns nothing of the choice; H, which knows π,
    learns nothing of x or of the choice.
    """
    holds_share = p.is_user or (p.is_model if p.phase == "online" else p.is_helper)
    if logits is None and holds_share:
        raise ValueError(f"select_token {name!r}: the {p.role.value} party must pass its logits share")
    if logits is not None and np.shape(logits) != (vocab,):
        raise ValueError(f"select_token {name!r}: logits must have shape ({vocab},), got {np.shape(logits)}")
    clear = await permute_reveal(p, name, [logits], mags=[mag], mode="flat", shape=(vocab,),
                                 encs=None if enc is None else [enc])
    if p.phase == "offline":
        table = _perm(p, name, (vocab,), "flat", None).idx if p.is_helper else None
        return await retrieve(p, name + "/id", None, table, length=vocab)
    if p.phase != "online":
        return None
    if p.is_user:
        assert clear is not None
        x = clear[0] if enc is None else ring.decode(clear[0], enc.scale, enc.opened, f"{name!r} logits", enc.range)
        j = choose(x, sampler, rng)
        return await retrieve(p, name + "/id", j, None, length=vocab)
    p.take(name + "/pi")
    return await retrieve(p, name + "/id", None, None, length=vocab)

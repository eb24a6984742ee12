"""Private token selection: permuted logits to U, BFV index retrieval of the true id.

Part of :mod:`permllm.protocols` (above :mod:`permllm.net`, below
:mod:`permllm.model`); DESIGN.md §5. The logits are shared [x] over the
vocabulary. :func:`select_token` reveals π(x) to U under a fresh π per token
(:func:`~permllm.protocols.permute.permute_reveal`, 1 hop M → U), U chooses an
index j in permuted space (:func:`~permllm.protocols.sampling.choose`), and U
learns the true token id π⁻¹(j) = ``pi.idx[j]`` by :func:`retrieve` (2 hops):
U sends an encrypted one-hot of j, M answers with the encrypted dot product with
its table, U decrypts. Three online hops per token; M learns nothing of j.

The homomorphic encryption is BFV from Pyfhel (Microsoft SEAL 4.1): U owns the
key pair (:func:`setup_bfv`), M holds only the context and U's public key. The
helper takes no part in any of it.

Threads: the heavy HE calls go through :meth:`Party.compute`. Pyfhel's wrappers hold
the GIL inside each SEAL call (no ``nogil`` sections), so a worker thread runs no HE
work in parallel with the event loop, but the loop gets the GIL back between calls
(about 1 ms each at n = 4096): the loop stalled at most ~5 ms during a 130528-entry
retrieval in a worker thread against ~30 ms inline. Because of the GIL, calls on one
Pyfhel object from several threads never overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from Pyfhel import Pyfhel, PyCtxt

from .party import Party, ProtocolError, Role
from .permute import permute_reveal
from .sampling import Sampler, choose

__all__ = ["BFV_KEY", "setup_bfv", "retrieve", "select_token"]

BFV_KEY = ("bfv", -1)  # p.store entry of the session's BFV state (not per token)


@dataclass(slots=True)
class _Bfv:
    """A party's BFV state: U's holds the secret key, M's only the public key."""

    he: Pyfhel
    ct_bytes: int  # serialized size of a fresh ciphertext: the bound on anything received

    @property
    def n(self) -> int:
        return int(self.he.get_nSlots())

    @property
    def t(self) -> int:
        return int(self.he.t)


def _he_work(chunks: int, n: int) -> int:
    """Multiply-adds of ``chunks`` BFV operations (NTTs over 3 primes), for :meth:`Party.compute`."""
    return chunks * n * 3 * max(n.bit_length(), 1)


def _fresh_size(he: Pyfhel) -> int:
    return len(he.encryptInt(np.zeros(he.get_nSlots(), dtype=np.int64)).to_bytes("none"))


def _bfv(p: Party) -> _Bfv:
    st = p.store.get(BFV_KEY)
    if st is None:
        raise ProtocolError(f"{p.role.value}: no BFV context; run setup_bfv in the setup phase first")
    return st


def _user_keys(n: int, t_bits: int) -> tuple[_Bfv, dict]:
    he = Pyfhel()
    status = he.contextGen(scheme="bfv", n=n, t_bits=t_bits, sec=128)
    if "success" not in status:
        raise ValueError(f"BFV parameters n={n}, t_bits={t_bits} rejected: {status}")
    he.keyGen()
    msg = {"context": he.to_bytes_context("none"), "public_key": he.to_bytes_public_key("none")}
    return _Bfv(he, _fresh_size(he)), msg


def _model_keys(msg: object, n: int, t_bits: int) -> _Bfv:
    if not (isinstance(msg, dict) and isinstance(msg.get("context"), bytes)
            and isinstance(msg.get("public_key"), bytes)):
        raise ProtocolError("setup_bfv: expected {'context': bytes, 'public_key': bytes} from the user")
    he = Pyfhel()
    try:
        he.from_bytes_context(msg["context"])
        he.from_bytes_public_key(msg["public_key"])
    except Exception as e:  # Pyfhel raises RuntimeError, MemoryError, ValueError on bad bytes
        raise ProtocolError(f"setup_bfv: bad context or public key from the user ({type(e).__name__}: {e})") from e
    q_bits = sum(int(q).bit_length() for q in he.get_qi())
    if not (he.get_scheme() == 1 and he.batchEnabled() and he.get_nSlots() == n
            and int(he.t).bit_length() == t_bits and q_bits <= he.maxBitCount(n, 128)):
        raise ProtocolError(f"setup_bfv: the user's context is not BFV with n={n}, a {t_bits}-bit batching "
                            f"prime t and a 128-bit-secure modulus (got n={he.get_nSlots()}, t={he.t}, "
                            f"q of {q_bits} bits)")
    return _Bfv(he, _fresh_size(he))


async def setup_bfv(p: Party, *, n: int = 4096, t_bits: int = 20) -> None:
    """Setup: U makes a BFV key pair and sends the context and public key to M.

    Parameters (both parties pass the same; M checks U's context against them):
    n = 4096 slots, a t_bits-bit batching prime t (20 bits: t = 1032193 > 2¹⁷, so
    vocabularies up to 130528 fit), and SEAL's default coefficient modulus for 128-bit
    security at n = 4096: primes of 36 + 36 + 37 = 109 bits, the maximum the
    HomomorphicEncryption.org standard allows for 128-bit security (the 37-bit prime
    is the special prime; ciphertexts live modulo the other 72 bits). U's message is
    about 197 kB (uncompressed: this Pyfhel build has no zlib/zstd).

    Learns: M gets U's public key and the public parameters; H takes no part.
    The state goes to ``p.store[BFV_KEY]`` (per session, not per token).
    """
    if p.phase != "setup":
        raise ProtocolError(f"setup_bfv runs in the setup phase, not {p.phase!r}")
    if p.is_user:
        st, msg = await p.compute(_user_keys, n, t_bits, work=_he_work(8, n))
        p.send(Role.MODEL, ("bfv", "setup", "keys"), msg)
        p.store[BFV_KEY] = st
    elif p.is_model:
        msg = await p.recv(Role.USER, ("bfv", "setup", "keys"))
        p.store[BFV_KEY] = await p.compute(_model_keys, msg, n, t_bits, work=_he_work(2, n))


def _encrypt_query(st: _Bfv, index: int, chunks: int) -> list[bytes]:
    """U: the one-hot of ``index`` over ``chunks`` × n slots, one ciphertext per chunk."""
    n = st.n
    out = []
    for c in range(chunks):
        v = np.zeros(n, dtype=np.int64)
        if index // n == c:
            v[index % n] = 1
        out.append(st.he.encryptInt(v).to_bytes("none"))
    return out


def _answer(st: _Bfv, query: object, table: np.ndarray) -> bytes:
    """M: Σ_c query_c ⊙ table_c + Enc(r), r a zero-sum slot mask; serialized."""
    n, t, he = st.n, st.t, st.he
    chunks = -(-len(table) // n)
    if not (isinstance(query, list) and len(query) == chunks):
        raise ProtocolError(f"retrieve: expected a list of {chunks} ciphertexts from the user, "
                            f"got {type(query).__name__}"
                            + (f" of {len(query)}" if isinstance(query, list) else ""))
    padded = np.zeros(chunks * n, dtype=np.int64)
    padded[:len(table)] = table
    # Fresh randomness: r is uniform over the slot vectors that sum to 0 mod t, so U's
    # slot sum is exact while each slot alone is masked.
    r = np.random.default_rng().integers(0, t, n, dtype=np.int64)
    r[-1] = (-int(r[:-1].sum())) % t
    acc = he.encryptInt(r)
    for c, b in enumerate(query):
        if not isinstance(b, bytes) or not 0 < len(b) <= st.ct_bytes:
            raise ProtocolError(f"retrieve: ciphertext {c} must be at most {st.ct_bytes} bytes, "
                                f"got {type(b).__name__}" + (f" of {len(b)}" if isinstance(b, bytes) else ""))
        chunk = padded[c * n:(c + 1) * n]
        try:
            ct = PyCtxt(pyfhel=he, bytestring=b, scheme="bfv")
            if ct.size() != 2:
                raise ValueError(f"ciphertext of size {ct.size()}, expected 2")
            if chunk.any():  # a zero plaintext would make a transparent product
                he.multiply_plain(ct, he.encodeInt(chunk))
                he.add(acc, ct)
        except Exception as e:  # Pyfhel raises RuntimeError, MemoryError, ValueError on bad input
            raise ProtocolError(f"retrieve: ciphertext {c} from the user is invalid "
                                f"({type(e).__name__}: {e})") from e
    return acc.to_bytes("none")


def _decrypt_answer(st: _Bfv, answer: object) -> int:
    """U: decrypt M's answer and sum its slots mod t."""
    if not isinstance(answer, bytes) or not 0 < len(answer) <= st.ct_bytes:
        raise ProtocolError(f"retrieve: the answer must be at most {st.ct_bytes} bytes")
    try:
        ct = PyCtxt(pyfhel=st.he, bytestring=answer, scheme="bfv")
        if ct.size() != 2:
            raise ValueError(f"ciphertext of size {ct.size()}, expected 2")
        budget = st.he.noise_level(ct)
        slots = st.he.decryptInt(ct)
    except Exception as e:
        raise ProtocolError(f"retrieve: invalid answer from the model party ({type(e).__name__}: {e})") from e
    if budget <= 0:
        raise ProtocolError("retrieve: the answer has no noise budget left; it cannot be decrypted")
    return int(np.asarray(slots, dtype=np.int64).sum()) % st.t


async def retrieve(p: Party, name: str, index: int | None, table: np.ndarray | None, *,
                   length: int | None = None) -> int | None:
    """U learns ``table[index]`` for its secret ``index``; 2 online hops (U → M → U).

    U passes ``index`` and the table's public ``length``; M passes ``table`` (a 1-D
    integer array with values in [0, t)). U gets the entry, M gets None. Nothing
    happens offline (every party gets None); H has no part.

    U sends ceil(length / n) BFV ciphertexts of the one-hot of ``index`` (n slots
    each, 131 kB per ciphertext); M multiplies each slot-wise by its table chunk,
    sums them, adds a fresh encryption (under U's key) of a random slot vector
    that sums to 0 mod t, and returns the single ciphertext; U sums the decrypted
    slots mod t.

    Learns: M sees only ciphertexts under U's key, so nothing of ``index`` (IND-CPA
    of BFV at 128 bits). An honest U learns table[index]; each other slot it
    decrypts is masked by the zero-sum vector. Limits, stated plainly: this is
    semi-honest. M does not check that the query is a one-hot: a U that sends
    other slot values learns that linear combination Σ q_i·table[i] mod t (one
    value per query, thanks to the slot mask; without it, with length ≤ n, an
    all-ones query would give the whole table). There is no noise flooding: the
    answer's noise is a function of the table chunks and of U's own encryption
    noise, which U can compute with its secret key, so it may carry information
    about the table (for :func:`select_token`: about π) beyond table[index].
    Hiding it needs noise flooding with ~40 more bits of modulus (n = 8192).
    """
    if p.phase != "online":
        return None
    if p.is_helper:
        raise ProtocolError(f"retrieve {name!r}: the helper has no online branch")
    st = _bfv(p)
    tag_q, tag_a = p.tag("bfv", name, "query"), p.tag("bfv", name, "answer")
    if p.is_user:
        if length is None or length < 1:
            raise ValueError(f"retrieve {name!r}: the user must pass the table's length")
        if index is None or not 0 <= int(index) < length:
            raise ValueError(f"retrieve {name!r}: index {index} not in [0, {length})")
        chunks = -(-length // st.n)
        query = await p.compute(_encrypt_query, st, int(index), chunks, work=_he_work(chunks, st.n))
        p.send(Role.MODEL, tag_q, query)
        answer = await p.recv(Role.MODEL, tag_a)
        return await p.compute(_decrypt_answer, st, answer, work=_he_work(1, st.n))
    if table is None:
        raise ValueError(f"retrieve {name!r}: the model party must pass the table")
    tab = np.asarray(table)
    if tab.ndim != 1 or tab.size == 0 or tab.dtype.kind not in "iu":
        raise ValueError(f"retrieve {name!r}: the table must be a non-empty 1-D integer array")
    if length is not None and length != tab.size:
        raise ValueError(f"retrieve {name!r}: table of {tab.size} entries, expected {length}")
    if int(tab.min()) < 0 or int(tab.max()) >= st.t:
        raise ValueError(f"retrieve {name!r}: table values must be in [0, t = {st.t})")
    query = await p.recv(Role.USER, tag_q)
    chunks = -(-tab.size // st.n)
    answer = await p.compute(_answer, st, query, tab.astype(np.int64), work=_he_work(chunks, st.n))
    p.send(Role.USER, tag_a, answer)
    return None


async def select_token(p: Party, name: str, logits: np.ndarray | None, *, sampler: Sampler,
                       rng: np.random.Generator | None, mag: float, vocab: int) -> int | None:
    """Choose the next token from shared logits of shape (vocab,); 3 online hops.

    Offline, U and H pass U's share and M passes None (only the permute-and-reveal
    correlation is made: H sends δ to M). Online, M and U pass their shares; U
    passes its sampling ``rng`` (None is fine for greedy). ``mag`` bounds |logits|.
    Returns the true token id at U, None at M (and offline).

    Hops: π(x) M → U, the encrypted one-hot U → M, the answer M → U. π is fresh per
    token and per ``name`` (from the s_MH stream), so U cannot rebuild logits
    across tokens.

    Learns: U learns π(x) (the PermLLM leakage, here the multiset of the logits)
    and the chosen token id, plus what :func:`retrieve` may leak about π; M learns
    nothing of the choice; H learns nothing.
    """
    holds_share = p.is_user or (p.is_model if p.phase == "online" else p.is_helper)
    if logits is None and holds_share:
        raise ValueError(f"select_token {name!r}: the {p.role.value} party must pass its logits share")
    if logits is not None and np.shape(logits) != (vocab,):
        raise ValueError(f"select_token {name!r}: logits must have shape ({vocab},), got {np.shape(logits)}")
    if p.phase == "online" and not p.is_helper:
        t = _bfv(p).t
        if vocab >= t:
            raise ValueError(f"select_token {name!r}: a vocabulary of {vocab} tokens needs a BFV plaintext "
                             f"modulus t > {vocab}; this session has t = {t} (raise t_bits in setup_bfv)")
    clear = await permute_reveal(p, name, [logits], mags=[mag], mode="flat", shape=(vocab,))
    if p.phase != "online":
        return None
    if p.is_user:
        assert clear is not None
        j = choose(clear[0], sampler, rng)
        return await retrieve(p, name + "/id", j, None, length=vocab)
    pi = p.take(name + "/pi")
    return await retrieve(p, name + "/id", None, pi.idx, length=vocab)

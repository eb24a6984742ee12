"""Embedding lookup of token ids the user holds: exact ring arithmetic, its ring messages perfectly hiding.

**Dealt mode (the default)** — the table E (vocab × hidden) is encoded in Z_2^k
(k = :data:`TABLE_BITS`, :mod:`permllm.protocols.ring`) at the public scale 2^-s, s =
:data:`TABLE_SIG` − e with 2^e the least power of two above max|E| + max|added rows|
(:func:`table_scale`; the only published number besides the shape).

* setup (:func:`setup_table`): U_E uniform mod 2^k from s_MH; M sends D = E − U_E mod 2^k
  to U (uniform whatever the table), H regenerates U_E.
* offline: r uniform mod 2^k (T × vocab, from s_UH); U sends r·D + t, H sends r·U_E − t − r₂
  (t, r₂ from s_UH): M holds r·E − r₂.
* online hop 1, U → M: onehot − r mod 2^k, which is uniform whatever the ids; M computes
  x_M = (onehot − r)·E + r·E − r₂ = E[ids] − r₂, U's share is r₂: an exact ring sharing.
* hops 2–3, the lift to the real-number shares of the layers: M reveals π(x) to U (π from
  s_MH, one permutation per row; H dealt δ = π(r₂) − b mod 2^k), U decodes it, checks it
  against the encoding range (:class:`~permllm.protocols.ring.RingOverflow` otherwise)
  and reshares it with :func:`~permllm.protocols.permute.reshare_unpermute`.

Learns: the ring messages M receives — onehot − r, r·D + t, r·U_E − t − r₂ and δ — are
uniform mod 2^k whatever the ids and the table (t, r₂, r, b are fresh and uniform), so they
tell M nothing. U receives D (uniform) and, at the lift, π(E[ids] + positions): the
multiset the first norm reveals anyway (the PermLLM leakage). H receives nothing. On the
ring (the default, ``Party.ring``) the lift's reshare (hop 3) is on Z_2^64 too, at the
layers' encoding, so every message M receives is uniform: the lookup hides perfectly. With
``--arith float`` it is a real-number reshare, and M's view of its output
(π⁻¹(y′ − a′) + γ = E[ids] + positions − b′, b′ of width R × the public bound) is hidden
statistically: the exact consistency attack on that view (bench/lookup_leak.py) measures
0.011 bits of the id per SmolLM2 lookup on average, at most 1.4.

**Light mode** (``config.offline == "he"``) keeps the real-number lookup: U sends
onehot − r with r uniform over the integers in [−R/2, R/2) (int16 on the wire), then the
zero-round linear. That is statistical hiding (the measured audit: about 0.4 bits of each
id, and the exact id with probability 1/R per lookup) until the light client's HE
products are exact (docs/ring.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import ring
from .config import RING_BITS
from .linear import _chunk_rows as _rows, linear
from .party import Party, ProtocolError, Role
from .permute import _perm, reshare_unpermute

__all__ = ["embed", "setup_table", "table_scale", "TABLE_BITS", "TABLE_SIG"]

TABLE_BITS = 32  # Z_2^32: int32 products (torch), 4 bytes per one-hot entry online
TABLE_SIG = 24   # fractional bits below the largest entry: float32-like precision, ≥ 6 bits of headroom


@dataclass(slots=True)
class _Table:
    """What a party keeps of the ring-encoded table after setup."""

    shape: tuple[int, int]
    scale: int                        # public: fractional bits of the encoding
    value: np.ndarray | None = None   # M: E as ring words; U: D = E − U_E; H: U_E (regenerated lazily)


def _chunks(shape: tuple[int, int]) -> int:
    return -(-shape[0] // _rows(shape))


def _ue_chunk(p: Party, name: str, shape: tuple[int, int], i: int) -> np.ndarray:
    rows = _rows(shape)
    n = min(rows, shape[0] - i * rows)
    return _mask(p.view("setup", -1), "mh", name, f"UE{i}", (n, shape[1]))


def _mask(p: Party, which: str, name: str, purpose: str, shape: tuple[int, ...]) -> np.ndarray:
    return p.gen(which, name, purpose).ring(shape, TABLE_BITS).astype(ring.word(TABLE_BITS))


def table_scale(bound: float) -> int:
    """The public scale of a table whose lookups (with anything added) are at most ``bound`` in magnitude:
    :data:`TABLE_SIG` fractional bits below 2^e, the least power of two *above* the bound (|value| < 2^e
    strictly, which the lift checks)."""
    if not math.isfinite(bound):
        raise ValueError("the embedding table contains inf or nan")
    return TABLE_SIG - (math.floor(math.log2(bound)) + 1 if bound > 0 else 0)


async def setup_table(p: Party, name: str, table: np.ndarray | None = None, *,
                      shape: tuple[int, int] | None = None, added: float = 0.0) -> None:
    """Setup of the ring-encoded table ``name`` (M passes it, and ``added``: a bound of what it will add to a
    lookup, e.g. learned positions; U and H pass the ``shape`` they expect).

    Learns: U gets D = E − U_E mod 2^k, uniform whatever E; U and H get the shape and the scale
    (the power of two above max|E| + ``added``).
    """
    k = TABLE_BITS
    if p.is_model:
        if table is None or np.ndim(table) != 2:
            raise ValueError("the model party must pass the table (vocab × hidden)")
        E = np.asarray(table, dtype=np.float64)
        scale = table_scale((float(np.max(np.abs(E))) if E.size else 0.0) + added)
        Ei = ring.encode(E, scale, k, f"embedding table {name!r}")
        chunks = _chunks(E.shape)
        meta = {"shape": list(E.shape), "scale": scale, "bits": k, "chunks": chunks}
        p.send(Role.HELPER, ("setup", name, "meta"), meta)
        p.send(Role.USER, ("setup", name, "meta"), meta)
        rows = _rows(E.shape)
        for i in range(chunks):
            d = Ei[i * rows:(i + 1) * rows] - _ue_chunk(p, name, E.shape, i)
            p.send(Role.USER, ("setup", name, i), ring.pack(ring.mod(d, k), k))
            await p.channels[Role.USER].flush()  # bound memory: one chunk in flight
        p.weights[name] = _Table(E.shape, scale, Ei)
        return
    meta = await p.recv(Role.MODEL, ("setup", name, "meta"))
    if not (isinstance(meta, dict) and isinstance(meta.get("shape"), list) and len(meta["shape"]) == 2
            and all(type(n) is int and n > 0 for n in meta["shape"]) and type(meta.get("scale")) is int
            and 0 <= meta["scale"] <= 62 and meta.get("bits") == k and type(meta.get("chunks")) is int):
        raise ProtocolError(f"bad setup metadata for table {name!r}")
    shp = (meta["shape"][0], meta["shape"][1])
    if shape is not None and shp != tuple(shape):
        raise ProtocolError(f"setup metadata of table {name!r}: shape {shp}, expected {tuple(shape)}")
    if meta["chunks"] != _chunks(shp):
        raise ProtocolError(f"setup metadata of table {name!r}: {meta['chunks']} chunks for shape {shp}")
    t = _Table(shp, meta["scale"])
    if p.is_user:
        D = np.empty(shp, dtype=ring.word(k))
        rows = _rows(shp)
        for i in range(meta["chunks"]):
            n = min(rows, shp[0] - i * rows)
            got = await p.recv(Role.MODEL, ("setup", name, i), modulus=256)
            D[i * rows:i * rows + n] = _unpacked(got, (n, shp[1]), f"setup chunk {i} of {name!r}")
        t.value = D
    p.weights[name] = t


def _helper_table(p: Party, name: str) -> np.ndarray:
    """H's U_E, regenerated from the s_MH stream on first use and kept."""
    t = p.weights[name]
    if t.value is None:
        t.value = np.concatenate([_ue_chunk(p, name, t.shape, i) for i in range(_chunks(t.shape))])
    return t.value


async def embed(p: Party, name: str, ids: np.ndarray | list[int] | None, *, weight: str, vocab: int,
                n_tokens: int, mag_out: float | np.ndarray, table: str | None = None,
                add: np.ndarray | None = None, out_scale: int | None = None) -> np.ndarray | None:
    """[E[ids] (+ add)] as real-number shares, for ``n_tokens`` ids known to U only (U passes them online).

    ``table`` names the ring table of the dealt mode (:func:`setup_table`); ``weight`` the
    real-number weight of the light mode. On the ring (``Party.ring``) the lift reshares the
    result on Z_2^64 at ``out_scale`` fractional bits (exact), else as real numbers. ``add`` (M only): public-index rows of a table of
    M's (learned positions), added to the result. 3 online hops in the dealt mode, 1 in the
    light mode. See the module docstring for what each party learns.
    """
    if p.config.offline == "he":
        return await _embed_light(p, name, ids, weight=weight, vocab=vocab, n_tokens=n_tokens, mag_out=mag_out,
                                  add=add)
    if table is None or table not in p.weights:
        raise ProtocolError(f"embed {name!r}: the ring table {table!r} was not set up")
    t: _Table = p.weights[table]
    k, d = TABLE_BITS, t.shape[1]
    if t.shape[0] != vocab:
        raise ProtocolError(f"embed {name!r}: table of {t.shape[0]} rows for a vocabulary of {vocab}")
    oh, out_shape = name + ".onehot", (n_tokens, d)
    tag = lambda part: p.tag("embed", oh, part)  # noqa: E731
    if p.phase == "offline":
        if p.is_model:
            hb = await p.recv(Role.HELPER, tag("h"), modulus=256)
            ub = await p.recv(Role.USER, tag("u"), modulus=256)
            corr = _unpacked(ub, out_shape, f"embed {name!r} from the user") + _unpacked(
                hb, out_shape, f"embed {name!r} from the helper")
            p.keep(oh, ring.mod(corr, k))
            # π does not depend on any value: M draws it now, off the online path.
            p.keep(oh + "/lift", (await _recv_delta(p, name, out_shape), _perm(p, name, out_shape, "rows", None)))
        else:
            r = _mask(p, "uh", oh, "r", (n_tokens, vocab))
            y = await p.compute(ring.matmul, r, t.value if p.is_user else _helper_table(p, table), k,
                                work=r.size * d)
            tm = _mask(p, "uh", oh, "t", out_shape)
            if p.is_user:
                p.send(Role.MODEL, tag("u"), ring.pack(ring.mod(y + tm, k), k))
                p.keep(oh, r)
                p.keep(oh + "/lift", _mask(p, "uh", name, "b", out_shape))
            else:  # H: U's share r₂ of the lookup, and the lift's δ = π(r₂) − b
                x_u = _mask(p, "uh", oh, "r2", out_shape)
                p.send(Role.MODEL, tag("h"), ring.pack(ring.mod(y - tm - x_u, k), k))
                pi = _perm(p, name, out_shape, "rows", None)
                delta = ring.mod(pi.apply(x_u) - _mask(p, "uh", name, "b", out_shape), k)
                p.send(Role.MODEL, p.tag("lift", name, "delta"), ring.pack(delta, k))
        return await reshare_unpermute(p, name, None, mag=_scalar(mag_out), mode="rows", shape=out_shape,
                                       mag_share=mag_out)
    if p.is_helper:
        raise ProtocolError(f"embed {name!r}: the helper has no online branch")
    if p.is_user:
        ids = _check_ids(name, ids, n_tokens, vocab)
        msg = -p.take(oh)
        msg[np.arange(n_tokens), ids] += msg.dtype.type(1)
        p.send(Role.MODEL, tag("x"), ring.pack(ring.mod(msg, k), k))
        b = p.take(oh + "/lift")
        m = await p.recv(Role.MODEL, p.tag("lift", name, "m"), revealed=True)
        seen = ring.mod(_unpacked(m, out_shape, f"embed {name!r}: the lift from the model party") + b, k)
        # In range: |E[id] + added rows| < 2^(TABLE_SIG − scale) by the choice of the scale (table_scale).
        y = ring.decode(seen, t.scale, k, f"embed {name!r}", range_bits=TABLE_SIG - t.scale)
        if p.ring:
            if out_scale is None:
                raise ValueError(f"embed {name!r}: the ring needs the output's scale")
            y = ring.encode(y, out_scale, RING_BITS, f"embed {name!r}")
        return await reshare_unpermute(p, name, y, mag=_scalar(mag_out), mode="rows", mag_share=mag_out)
    corr = p.take(oh)
    delta, pi = p.take(oh + "/lift")
    dx = _unpacked(await p.recv(Role.USER, tag("x"), modulus=256), (n_tokens, vocab), f"embed {name!r} from the user")
    x = ring.mod(await p.compute(ring.matmul, dx, t.value, k, work=dx.size * d) + corr, k)
    if add is not None:
        x = ring.mod(x + ring.encode(add, t.scale, k, f"embed {name!r}: added rows"), k)
    p.keep(name + "/pi", pi)  # for the reshare-unpermute below
    p.send(Role.USER, p.tag("lift", name, "m"), ring.pack(ring.mod(pi.apply(x) + delta, k), k))
    return await reshare_unpermute(p, name, None, mag=_scalar(mag_out), mode="rows", shape=out_shape,
                                   mag_share=mag_out)


def _unpacked(b: object, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A received ring message as words, else ProtocolError naming it."""
    try:
        return ring.unpack(b, TABLE_BITS, shape, what)  # type: ignore[arg-type]
    except ValueError as e:
        raise ProtocolError(str(e)) from None


async def _recv_delta(p: Party, name: str, shape: tuple[int, int]) -> np.ndarray:
    got = await p.recv(Role.HELPER, p.tag("lift", name, "delta"), modulus=256)
    return _unpacked(got, shape, f"embed {name!r}: the lift from the helper")


def _check_ids(name: str, ids: np.ndarray | list[int] | None, n_tokens: int, vocab: int) -> np.ndarray:
    """U's token ids as int64, else ProtocolError (a wrong count, or an id outside the vocabulary)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.shape != (n_tokens,):
        raise ProtocolError(f"embed {name!r}: expected {n_tokens} token ids, got {ids.shape[0]}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ProtocolError(f"embed {name!r}: token id out of range [0, {vocab})")
    return ids


def _scalar(mag: float | np.ndarray) -> float:
    return float(np.max(mag))


def _wire_dtype(ratio: float) -> np.dtype:
    return np.dtype(np.int16) if ratio <= 2**15 else np.dtype(np.int32)


async def _embed_light(p: Party, name: str, ids: np.ndarray | list[int] | None, *, weight: str, vocab: int,
                       n_tokens: int, mag_out: float | np.ndarray, add: np.ndarray | None) -> np.ndarray | None:
    """The light mode's real-number lookup (module docstring): 1 online message U → M."""
    oh = name + ".onehot"
    half = int(p.ratio) // 2
    wire = _wire_dtype(p.ratio)

    def mask() -> np.ndarray:
        return p.gen("uh", oh, "r").integers(-half, half, size=(n_tokens, vocab), dtype=wire)

    if p.phase == "offline":
        x = None if p.is_model else mask().astype(p.dtype)
    elif p.is_user:
        ids = _check_ids(name, ids, n_tokens, vocab)
        r = mask()
        d = -r
        d[np.arange(n_tokens), ids] += 1
        p.send(Role.MODEL, p.tag("embed", oh, "u"), d)
        x = r  # online the linear needs only U's share's shape
    elif p.is_model:
        d = await p.recv(Role.USER, p.tag("embed", oh, "u"))
        if not (isinstance(d, np.ndarray) and d.dtype == wire and d.shape == (n_tokens, vocab)):
            raise ProtocolError(f"embed {name!r}: expected a ({n_tokens}, {vocab}) {wire.name} array from the user")
        x = d.astype(p.dtype)
    else:
        raise ProtocolError(f"embed {name!r}: the helper has no online branch")
    out = await linear(p, name, x, weight, mag_in=1.0, mag_out=mag_out, kind="transposed", l2_in=1.0)
    if add is not None and p.is_model and out is not None:
        out = out + add
    return out

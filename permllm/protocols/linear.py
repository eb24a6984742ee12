"""Linear layers with the model party's private weights (docs/design.md §3.2).

Setup, once per weight W (M holds it): U_W comes from the s_MH stream, so H can
regenerate it; M sends D = W − U_W to U. Per use, with the user's input share x_U
derivable by H (the *U-share invariant*):

* offline: U sends x_U·D + t to M; H sends x_U·U_W − t − r to M (t, r from s_UH);
  M adds them into x_U·W − r.
* online: M computes z_M = x_M·W + (x_U·W − r) + bias; U's share is z_U = r.
  **No online message**, and U's new share is again H-derivable.

When U's share is not H-derivable (a one-hot token it chose, the output of a
shared product), :func:`reshare` first swaps it for a derivable one: one online
message U → M.

Batches (dealt mode): U's and H's offline products are the whole offline cost, and a
decode step's product is a matrix-vector one that reads every weight for one row. Between
the start and end of a :func:`dealt_batch` block U and H defer them: each linear
returns U's share r at once (the graph needs nothing else), and the close computes one
product per op over the rows of all the batch's tokens (each weight read once), then
sends each token's message. M's branch is unchanged; it waits for the messages.

In the light mode (``config.offline == "he"``) no D = W − U_W leaves M: the setup sends
only each weight's public shape and scale, and the offline x_U·W − r comes from a CKKS
product between U and M (:mod:`permllm.protocols.he_matmul`); H only derives r. The
online phase is the same.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from . import crt, he_matmul, ring
from .config import RING_BITS
from .party import Party, ProtocolError, Role

__all__ = ["setup_weight", "linear", "reshare", "WeightKind", "dealt_batch", "public_scale", "weight_frac"]

WeightKind = str  # "dense": x @ W.T (W: out×in) · "transposed": x @ W (W: in×out) · "diag": x * w
SETUP_CHUNK = 1 << 22  # elements per setup message (32 MiB in float64)


@dataclass(slots=True)
class _Weight:
    """What one party keeps of a private weight after setup."""

    shape: tuple[int, ...]
    scale: float            # public: max |W| rounded up to a power of two; U_W has width R·scale
    value: np.ndarray | None = None   # M: W (on the ring: encoded); U: D = W − U_W; H: U_W (regenerated lazily)
    chunks: int = 1
    frac: int = 0           # public, ring only: W is carried as round(W·2^frac)
    extra: dict = field(default_factory=dict)

    @property
    def bits(self) -> int:
        """A bound of M's encoded weight: |round(W·2^frac)| < 2^bits (max|W| ≤ scale, a power of two)."""
        return math.frexp(self.scale)[1] + self.frac if self.scale > 0 else 1


def _chunk_rows(shape: tuple[int, ...]) -> int:
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, SETUP_CHUNK // max(row, 1))


def _uw_chunk(p: Party, name: str, shape: tuple[int, ...], scale: float, i: int, rows: int) -> np.ndarray:
    lo = i * rows
    n = min(rows, shape[0] - lo)
    # Weight masks are per weight, not per token: key them with token −1.
    return p.view("setup", -1).mask("mh", name, f"UW{i}", (n, *shape[1:]), p.ratio * scale)


async def setup_weight(p: Party, name: str, weight: np.ndarray | None = None, *,
                       shape: tuple[int, ...] | None = None, sig_bits: int | None = None,
                       frac: int | None = None) -> None:
    """Setup phase for one private weight (M passes it; U and H pass nothing, or the ``shape`` they expect).

    On the ring M encodes W with :func:`weight_frac` fractional bits (``sig_bits`` significant
    bits below its public scale), or ``frac`` itself where given, and U_W is uniform on Z_2^64.

    Learns: U gets D = W − U_W — on the ring uniform whatever W (perfect hiding), on real
    numbers W hidden by a uniform mask of width R·max|W| — plus the public shape, max|W|
    rounded up to a power of two and the fractional bits; H gets those only; M learns
    nothing. In the light mode U, like H, gets only shape and max|W|.
    """
    kind = "setup"
    light = p.config.offline == "he"
    if p.is_model:
        if weight is None:
            raise ValueError("the model party must pass the weight")
        W = np.ascontiguousarray(weight, dtype=np.float64)
        scale = public_scale(W)
        if not math.isfinite(scale):
            raise ValueError(f"weight {name!r} contains inf or nan")
        if not (p.ring or p.modq):
            frac = 0
        else:  # W̃ = round(W·2^frac): small signed integers kept as float64, for BLAS
            if frac is None:
                if sig_bits is None:
                    raise ValueError(f"weight {name!r}: the ring needs the weights' significant bits")
                frac = weight_frac(scale, sig_bits)
            W = np.rint(W * 2.0**frac)
        rows = _chunk_rows(W.shape)
        chunks = 0 if light else max(1, -(-W.shape[0] // rows))
        meta = {"shape": list(W.shape), "scale": scale, "chunks": chunks, "frac": frac}
        p.send(Role.HELPER, (kind, name, "meta"), meta)
        p.send(Role.USER, (kind, name, "meta"), meta)
        for i in range(chunks):
            uw = await p.compute(_uw_chunk, p, name, W.shape, scale, i, rows, work=rows * W[0].size)
            part = W[i * rows:i * rows + len(uw)]
            p.send(Role.USER, (kind, name, i), (_words(part) if p.ring else part) - uw)
            await p.channels[Role.USER].flush()  # bound memory: one chunk in flight
        p.weights[name] = _Weight(W.shape, scale, W, chunks, frac)
        return
    shape, scale, chunks, frac = _check_meta(await p.recv(Role.MODEL, (kind, name, "meta")), name, light, shape)
    w = _Weight(shape, scale, None, chunks, frac)
    if light:
        if w.chunks:
            raise ProtocolError(f"setup of weight {name!r}: the model party sends masked weights in the light mode")
        p.weights[name] = w
        return
    if p.is_helper:
        p.weights[name] = w
        await p.compute(_helper_uw, p, name, work=int(np.prod(shape)) * 4)
        return
    if p.is_user:
        D = np.empty(shape, dtype=p.dtype)
        rows = _chunk_rows(shape)
        for i in range(w.chunks):
            part = await p.recv_array(Role.MODEL, (kind, name, i))
            lo = i * rows
            if part.shape[1:] != shape[1:] or lo + len(part) > shape[0]:
                raise ProtocolError(f"setup chunk {i} of {name!r} has shape {part.shape}")
            D[lo:lo + len(part)] = part
        w.value = D
    p.weights[name] = w


def weight_frac(scale: float, sig_bits: int) -> int:
    """Fractional bits of a weight on the ring: ``sig_bits`` significant bits for its largest entries
    (|W| ≤ ``scale``, a power of two)."""
    return sig_bits - (math.frexp(scale)[1] - 1 if scale > 0 else 0)


def public_scale(W: np.ndarray) -> float:
    """The scale the setup publishes for a weight: max|W| rounded up to a power of two (0 for zeros;
    inf/nan stay so, for the caller to refuse) — not max|W| itself, a fingerprint of the weights."""
    m = float(np.max(np.abs(W))) if W.size else 0.0
    return 2.0 ** math.ceil(math.log2(m)) if 0 < m < math.inf else m


def _check_meta(meta: object, name: str, light: bool,
                expect: tuple[int, ...] | None) -> tuple[tuple[int, ...], float, int, int]:
    """The model party's setup metadata of one weight: (shape, scale, chunks, frac), else ProtocolError."""
    if not (isinstance(meta, dict) and isinstance(meta.get("shape"), list) and meta["shape"]
            and all(type(n) is int and n > 0 for n in meta["shape"])
            and isinstance(meta.get("scale"), float) and math.isfinite(meta["scale"]) and meta["scale"] >= 0
            and type(meta.get("chunks")) is int and type(meta.get("frac")) is int and -64 < meta["frac"] < 64):
        raise ProtocolError(f"bad setup metadata for weight {name!r}")
    shape = tuple(meta["shape"])
    if expect is not None and shape != tuple(expect):
        raise ProtocolError(f"setup metadata of weight {name!r}: shape {shape}, expected {tuple(expect)}")
    want = max(1, -(-shape[0] // _chunk_rows(shape)))
    if not light and meta["chunks"] != want:
        raise ProtocolError(f"setup metadata of weight {name!r}: {meta['chunks']} chunks for shape {shape}, "
                            f"expected {want}")
    return shape, meta["scale"], meta["chunks"], meta["frac"]


def _helper_uw(p: Party, name: str) -> np.ndarray:
    """H's copy of U_W, regenerated from the s_MH stream on first use and kept."""
    w = p.weights[name]
    if w.value is None:
        rows = _chunk_rows(w.shape)
        uw = np.empty(w.shape, dtype=p.dtype)
        for i in range(w.chunks):
            part = _uw_chunk(p, name, w.shape, w.scale, i, rows)
            uw[i * rows:i * rows + len(part)] = part
        w.value = uw
    return w.value


def _apply(kind: WeightKind, x: np.ndarray, W: np.ndarray, q: int = 0, w_bits: int = 21) -> np.ndarray:
    """x·W for a weight of ``kind``: real numbers, exactly mod 2^64 for ring words (M's own encoded W: |W| <
    2^``w_bits``), or exactly mod ``q``."""
    if q:
        if kind == "diag":
            return crt.reduce(crt.reduce(x, q) * W, q)
        return crt.matmul(x, W, q, transpose_b=kind == "dense", reduced_b=True)  # weights: reduced or small
    if x.dtype == np.uint64:
        if W.dtype != np.uint64:  # M's own W̃ (small integers as float64): BLAS on limbs
            if kind == "diag":
                return x * _words(W)
            if kind in ("dense", "transposed"):
                return ring.matmul_small(x, W, transpose_b=kind == "dense", w_bits=w_bits)
        elif kind == "diag":
            return x * W
        elif kind in ("dense", "transposed"):
            return ring.matmul(x, W, RING_BITS, transpose_b=kind == "dense")
    elif kind == "dense":
        return x @ W.T
    elif kind == "transposed":
        return x @ W
    elif kind == "diag":
        return x * W
    raise ValueError(f"unknown weight kind {kind!r}")


def _words(W: np.ndarray) -> np.ndarray:
    """Small integers held as float64 as ring words (two's complement mod 2^64)."""
    return W.astype(np.int64).view(np.uint64)


def _n_in(kind: WeightKind, shape: tuple[int, ...]) -> int:
    return 1 if kind == "diag" else (shape[1] if kind == "dense" else shape[0])


async def linear(p: Party, name: str, x: np.ndarray | None, weight: str, *, mag_in: float, mag_out: float,
                 kind: WeightKind = "dense", bias: np.ndarray | None = None, l2_in: float | None = None,
                 derivable: bool = True, in_shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """[z] = [x]·W (+ bias) with M's private weight ``weight``; zero online messages.

    ``mag_in``/``mag_out`` are public bounds of |x| and |z| entries and ``l2_in`` of the L2
    norm of an input row (default mag_in·√n); they size the masks.
    With ``derivable=False`` U's input share is first swapped by :func:`reshare`
    (one online message U → M; offline, ``in_shape`` gives the input's shape).

    Learns: M receives x_U·D + t (hidden by t of width R·|D·x|) and
    x_U·U_W − t − r; their sum x_U·W − r stays hidden by r (width R·mag_out).
    U and H learn nothing new. U's output share is r (H-derivable). In the light
    mode the offline messages are those of :mod:`~permllm.protocols.he_matmul` instead.
    """
    if not derivable:
        x = await reshare(p, name + ".in", x, mag=mag_in, shape=in_shape)
    w = p.weights.get(weight)
    if w is None:
        raise ProtocolError(f"weight {weight!r} was not set up")
    R = p.ratio
    light = p.config.offline == "he"
    if p.phase == "offline" and light:
        return await _light_offline(p, name, x, w, weight, kind=kind, mag_in=mag_in, mag_out=mag_out)
    if p.phase == "offline":
        if p.is_model:  # H's shape is the reference: a bad shape from U is then blamed on U
            b = await p.recv_array(Role.HELPER, p.tag("linear", name, "h"))
            a = await p.recv_array(Role.USER, p.tag("linear", name, "u"), b.shape)
            p.keep(name, a + b)
            return None
        assert x is not None
        n_in = _n_in(kind, w.shape)
        # t hides x_U·D, whose x-dependent part (M knows D and x_M) is x·D: for D uniform of
        # width R·max|W| each entry has standard deviation R·max|W|·‖x‖₂/√12.
        if kind == "diag":
            width_t = R * R * w.scale * mag_in
        else:
            l2 = mag_in * math.sqrt(n_in) if l2_in is None else l2_in
            width_t = R * R * w.scale * l2 / math.sqrt(12.0)
        op = _Deferred(name, weight, kind, width_t, mag_out, p.modq)
        out_shape = x.shape if kind == "diag" else (*x.shape[:-1], _product_shape(kind, w.shape)[0])
        r = p.mask("uh", name, "r", out_shape, R * mag_out)
        if p.is_user:
            p.keep(name, r)
        batch: _DealtBatch | None = p.store.get(DEALT_KEY)
        if batch is not None and p.token in batch.tokens:
            batch.add(op, p.token, x)
        else:
            await _send_products(p, op, [(p.token, x)])
        return r
    if p.phase != "online" or p.is_helper:
        raise ProtocolError(f"linear {name!r}: the {p.role.value} party has no {p.phase} branch")
    if p.is_user:
        return he_matmul.user_share(p, name, *_light_dims(x, w, kind), mag_out) if light else p.take(name)
    assert x is not None
    corr = p.take(name)
    z = await p.compute(_apply, kind, x, w.value, p.modq, w.bits,
                        work=x.size * w.value.size // max(_n_in(kind, w.shape), 1))
    if corr.shape != z.shape:
        raise ProtocolError(f"linear {name!r}: offline correlation of shape {corr.shape}, product {z.shape}")
    z += corr
    if bias is not None:
        z += bias
    return z


@dataclass(slots=True)
class _Deferred:
    """One dealt-mode offline product of U or H: what its messages need besides the rows."""

    name: str
    weight: str
    kind: WeightKind
    width_t: float
    mag_out: float | np.ndarray
    q: int = 0  # a residue view's prime: its products and masks are mod q


DEALT_KEY = ("dealt-batch", -1)  # p.store entry of the open batch (U and H)


@dataclass(slots=True)
class _DealtBatch:
    tokens: list[int]
    ops: dict[str, tuple[_Deferred, list[tuple[int, np.ndarray]]]] = field(default_factory=dict)

    def add(self, op: _Deferred, token: int, x: np.ndarray) -> None:
        _, rows = self.ops.setdefault(op.name, (op, []))
        if rows and rows[-1][0] >= token:
            raise ProtocolError(f"dealt batch: op {op.name!r} ran twice for token {token} or out of order")
        rows.append((token, np.asarray(x)))


@contextlib.asynccontextmanager
async def dealt_batch(p: Party, tokens: list[int]) -> AsyncIterator[None]:
    """Run the offline steps of ``tokens`` (increasing) inside: U and H (dealt mode) defer their
    products and, when the block ends without error, compute them once per op over all rows and
    send each token's message. A no-op at M and in the light mode."""
    if p.config.offline != "dealer" or p.is_model:
        yield
        return
    if not tokens or any(b <= a for a, b in zip(tokens, tokens[1:])):
        raise ValueError(f"a batch needs increasing tokens, got {tokens}")
    if p.store.get(DEALT_KEY) is not None:
        raise ProtocolError(f"{p.role.value}: a dealt batch is already open")
    batch = p.store[DEALT_KEY] = _DealtBatch(list(tokens))
    try:
        yield
        for op, rows in batch.ops.values():
            await _send_products(p, op, rows)
    finally:
        p.store.pop(DEALT_KEY, None)


async def _send_products(p: Party, op: _Deferred, rows: list[tuple[int, np.ndarray]]) -> None:
    """U: x_U·D + t, H: x_U·U_W − t − r, for each (token, x_U) in ``rows``, from one product."""
    if op.q and p.modq != op.q:  # deferred by a residue view, sent by the batch's party
        p = p.residue(op.q)
    w = p.weights[op.weight]
    W = w.value if p.is_user else _helper_uw(p, op.weight)
    X = rows[0][1] if len(rows) == 1 else np.concatenate([x for _, x in rows])
    Y = await p.compute(_apply, op.kind, X, W, p.modq, work=X.size * W.size // max(_n_in(op.kind, w.shape), 1))
    i = 0
    for token, x in rows:
        pv = p.view("offline", token)
        y = Y[i:i + len(x)]
        i += len(x)
        t = pv.mask("uh", op.name, "t", y.shape, op.width_t)
        if p.is_user:
            pv.send(Role.MODEL, pv.tag("linear", op.name, "u"), y + t)
        else:
            r = pv.mask("uh", op.name, "r", y.shape, p.ratio * op.mag_out)
            pv.send(Role.MODEL, pv.tag("linear", op.name, "h"), y - t - r)


def _product_shape(kind: WeightKind, shape: tuple[int, ...]) -> tuple[int, int]:
    """(n_out, n_in) of the product z = x·W for a weight of ``kind`` and ``shape``."""
    if kind == "dense":
        return shape[0], shape[1]
    if kind == "transposed":
        return shape[1], shape[0]
    if kind == "diag":
        return shape[0], shape[0]
    raise ValueError(f"unknown weight kind {kind!r}")


def _light_dims(x: np.ndarray | None, w: _Weight, kind: WeightKind) -> tuple[int, int]:
    """(rows, n_out) of U's share in the light mode (inputs are rows × n_in)."""
    n_out, n_in = _product_shape(kind, w.shape)
    if x is None or x.ndim != 2 or x.shape[1] != n_in:
        raise ProtocolError(f"light-mode linear: expected rows × {n_in} inputs, got "
                            f"{None if x is None else x.shape}")
    return x.shape[0], n_out


async def _light_offline(p: Party, name: str, x: np.ndarray | None, w: _Weight, weight: str, *,
                         kind: WeightKind, mag_in: float, mag_out: float | np.ndarray) -> np.ndarray | None:
    """Offline branch of the light mode: U and M run a CKKS product; H only derives U's new share.

    Learns: see :mod:`permllm.protocols.he_matmul` (M: ciphertexts under U's key, then
    x_U·W − r hidden by r; U: values uniform modulo q, nothing of W; H: nothing, it
    receives no message).
    """
    shape = _product_shape(kind, w.shape)
    common = dict(weight=weight, shape=shape, diag=kind == "diag", ratio_mag_in=(p.ratio, mag_in),
                  w_scale=w.scale, mag_out=mag_out)
    if p.is_model:
        W = w.value.T if kind == "transposed" else w.value
        await he_matmul.offline_product(p, name, None, W, **common)
        return None
    rows, n_out = _light_dims(x, w, kind)
    if p.is_user:
        await he_matmul.offline_product(p, name, np.asarray(x, dtype=p.dtype), None, **common)
    return he_matmul.user_share(p, name, rows, n_out, mag_out)


async def reshare(p: Party, name: str, x: np.ndarray | None, *, mag: float,
                  shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """Swap U's share for an H-derivable one; 1 online message U → M.

    U sends x_U − r (r from s_UH, width R·mag); M's share becomes x_M + x_U − r and U's
    becomes r. If M passes ``None`` its share is taken as 0 (U's clear input).
    Offline, U and H pass the share (only its shape is used) or ``shape``, and get r.

    Learns: M sees x − x_M − r, i.e. x hidden by r (ratio R). H learns nothing (no message).
    """
    if p.phase == "offline":
        if p.is_model:
            return None
        shp = tuple(shape) if x is None and shape is not None else getattr(x, "shape", None)
        if shp is None:
            raise ProtocolError(f"reshare {name!r}: offline needs the share's shape")
        r = p.mask("uh", name, "r", shp, p.ratio * mag)
        if p.is_user:
            p.keep(name, r)
        return r
    if p.is_user:
        r = p.take(name)
        if x is None or x.shape != r.shape:
            raise ProtocolError(f"reshare {name!r}: share shape differs from the offline one")
        p.send(Role.MODEL, p.tag("reshare", name, "u"), np.asarray(x, dtype=p.dtype) - r)
        return r
    if p.is_model:
        d = await p.recv_array(Role.USER, p.tag("reshare", name, "u"), None if x is None else x.shape)
        return d.copy() if x is None else x + d
    raise ProtocolError(f"reshare {name!r}: the helper has no online branch")

"""Permute-and-reveal and reshare-unpermute: how non-linear layers are evaluated.

M picks a fresh permutation π per op and token from the s_MH stream (so H knows it
and U does not). The user sees π(x) in the clear, applies a function that commutes
with π, and the result is shared again and un-permuted (docs/design.md §3.3):

* permute-and-reveal — offline: H sends δ = π(x_U) − b to M (b from s_UH);
  online, 1 hop M → U: m = π(x_M) + δ; U computes π(x) = m + b.
* reshare-unpermute of U's clear y′ — offline: H sends γ = π⁻¹(a′) − b′ to M;
  online, 1 hop U → M: U sends y′ − a′; M sets z_M = π⁻¹(y′ − a′) + γ; z_U = b′.

Permutations act either on all elements ("flat", for element-wise functions) or on
the last axis of each row independently ("rows", for softmax and norms), where each
row may have a valid prefix (a causal mask) that π keeps in front.

**Only the valid prefixes travel.** With a ``valid`` prefix per row (a causal softmax in a
prefill), the entries past it (the scores of "future" keys, q_i·k_j for j > i) are never
revealed: the reveal and the reshare send the valid entries of each row only (packed row
after row), U fills the rest of its view with zeros, and both new shares are exactly 0
there (the masks a′, b′ are zeroed past each prefix), which is the softmax's value at a
masked key. U therefore sees nothing of the masked scores — they are bilinear functions of
the weights — and the messages carry only the causal half.

In the light mode (``config.offline == "he"``) U keeps none of its masks b, a′, b′
from its offline steps: it draws them again from the same s_UH streams, for decode
steps when their batch's HE exchange is over (:meth:`Party.mask_plan`), else online.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

import numpy as np

from . import prefix, ring
from .config import RING_BITS
from .party import Party, ProtocolError, Role
from .prg import flat_permutation, row_permutation

__all__ = ["Perm", "permute_reveal", "reshare_unpermute", "apply_permuted"]


class Perm:
    """A permutation of all elements (``flat``) or of each row's last axis (``rows``)."""

    __slots__ = ("idx", "flat")

    def __init__(self, idx: np.ndarray, flat: bool) -> None:
        self.idx = idx
        self.flat = flat

    @classmethod
    def draw(cls, gen: np.random.Generator, shape: tuple[int, ...], mode: str,
             valid: np.ndarray | None = None) -> "Perm":
        if mode == "flat":
            return cls(flat_permutation(gen, int(np.prod(shape))), True)
        if mode == "rows":
            rows = int(np.prod(shape[:-1]))
            return cls(row_permutation(gen, rows, shape[-1], valid), False)
        raise ValueError(f"unknown permutation mode {mode!r}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """π(x): gather by the indices."""
        if self.flat:
            return x.reshape(-1)[self.idx].reshape(x.shape)
        x2 = x.reshape(-1, x.shape[-1])
        return np.take_along_axis(x2, self.idx, axis=1).reshape(x.shape)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """π⁻¹(y): scatter back to the original positions."""
        out = np.empty_like(y)
        if self.flat:
            out.reshape(-1)[self.idx] = y.reshape(-1)
            return out
        np.put_along_axis(out.reshape(-1, y.shape[-1]), self.idx, y.reshape(-1, y.shape[-1]), axis=1)
        return out


def _valid_rows(shape: tuple[int, ...], valid: np.ndarray | None) -> np.ndarray | None:
    """Broadcast a per-row valid length (over the last-but-one axes) to one per flattened row."""
    if valid is None:
        return None
    return np.broadcast_to(np.asarray(valid, dtype=np.int64), shape[:-1]).reshape(-1)


def _perm(p: Party, name: str, shape: tuple[int, ...], mode: str, valid: np.ndarray | None) -> Perm:
    return Perm.draw(p.gen("mh", name, "pi"), shape, mode, _valid_rows(shape, valid))


def _prefix(shape: tuple[int, ...], mode: str, valid: np.ndarray | None) -> np.ndarray | None:
    """Which entries lie in their row's valid prefix (π keeps them in front), or None when all do."""
    return prefix.mask(shape, valid) if mode == "rows" else None


async def permute_reveal(p: Party, name: str, xs: Sequence[np.ndarray | None], *, mags: Sequence[float],
                         mode: str = "flat", valid: np.ndarray | None = None,
                         shape: tuple[int, ...] | None = None,
                         encs: Sequence[ring.Enc] | None = None,
                         perm_name: str | None = None) -> list[np.ndarray] | None:
    """Reveal π(x) of each shared input to U, all under the same π; 1 hop M → U.

    ``shape`` is the inputs' shape (M passes it offline, when it has no values). On the ring
    ``encs`` gives each input's public encoding: its messages travel mod 2^wire (the bits its
    value needs, :class:`~permllm.protocols.ring.Enc`), and U gets the words mod 2^wire to decode.
    Returns U's clear permuted values; M and H get None (M keeps π for
    :func:`reshare_unpermute` of the same ``name``). π is that of ``perm_name`` (default ``name``): the
    residues of a wide value are revealed under one π.

    Learns: U learns π(x) (the PermLLM leakage) and nothing of π — with a ``valid`` prefix
    per row only the prefixes: the entries past them are never sent, U's view holds zeros
    there; M receives δ = π(x_U) − b, i.e. x hidden by b (on the ring uniform whatever x:
    perfect hiding; on real numbers width R·mag); H learns nothing.
    """
    R = p.ratio
    rg = p.ring
    pn = perm_name or name
    if rg and (encs is None or len(encs) != len(mags)):
        raise ValueError(f"permute_reveal {name!r}: the ring needs each input's encoding")
    wires = [e.wire for e in encs] if rg else [0] * len(mags)  # type: ignore[union-attr]

    def out(v: np.ndarray, bits: int) -> np.ndarray:  # what travels: the low bits/8 bytes of each ring word
        return ring.pack(v, bits) if rg else v

    def got(v: object, bits: int, n: tuple[int, ...], what: str) -> np.ndarray:
        if not rg:
            return v  # type: ignore[return-value]
        try:
            return ring.unpack(v, bits, n, what).astype(np.uint64)  # type: ignore[arg-type]
        except ValueError as e:
            raise ProtocolError(str(e)) from None

    if p.phase == "offline":
        if p.is_model:
            deltas = await p.recv(Role.HELPER, p.tag("perm", name, "delta"), modulus=256 if rg else p.modq or None)
            if not isinstance(deltas, list) or len(deltas) != len(mags):
                raise ProtocolError(f"permute_reveal {name!r}: bad correlation from the helper")
            # π does not depend on any value: draw it now, off the online path.
            pi = _perm(p, pn, tuple(shape), mode, valid) if shape is not None else None
            p.keep(name + "/reveal", (deltas, pi))
            return None
        shp = tuple(xs[0].shape)
        if p.is_user and p.config.offline == "he":  # the light client draws b again online
            for i, m in enumerate(mags):
                p.plan_mask("uh", name, f"b{i}", shp, m)
            return None
        bs = [p.mask("uh", name, f"b{i}", shp, R * m) for i, m in enumerate(mags)]
        if p.is_user:
            p.keep(name + "/reveal", bs)
            return None
        pi = _perm(p, pn, shp, mode, valid)
        keep = _prefix(shp, mode, valid)
        p.send(Role.MODEL, p.tag("perm", name, "delta"),
               [out(prefix.pack(pi.apply(x) - b, keep), w) for x, b, w in zip(xs, bs, wires)])
        return None
    if p.is_model:
        deltas, pi = p.take(name + "/reveal")
        shp = tuple(xs[0].shape)
        if pi is None:
            pi = _perm(p, pn, shp, mode, valid)
        if pn == name:  # a residue revealed under another op's π leaves π where that op keeps it
            p.keep(name + "/pi", pi)
        keep = _prefix(shp, mode, valid)
        want = shp if keep is None else (int(keep.sum()),)
        ms = []
        for x, d, w in zip(xs, deltas, wires):
            d = got(d, w, want, f"permute_reveal {name!r}: the helper's correlation")
            if tuple(d.shape) != want:
                raise ProtocolError(f"permute_reveal {name!r}: correlation shape {d.shape} != {want}")
            ms.append(out(prefix.pack(pi.apply(x), keep) + d, w))
        p.send(Role.USER, p.tag("perm", name, "m"), ms)
        return None
    if p.is_user:
        if p.config.offline == "he":
            if xs[0] is None:
                raise ProtocolError(f"permute_reveal {name!r}: the user must pass its shares")
            bs = [p.mask_again("uh", name, f"b{i}", tuple(xs[0].shape), R * m) for i, m in enumerate(mags)]
        else:
            bs = p.take(name + "/reveal")
        ms = await p.recv(Role.MODEL, p.tag("perm", name, "m"), revealed=True)
        if not isinstance(ms, list) or len(ms) != len(bs):
            raise ProtocolError(f"permute_reveal {name!r}: expected {len(bs)} arrays")
        keep = _prefix(tuple(bs[0].shape), mode, valid)
        res = []
        for m, b, w in zip(ms, bs, wires):
            b = prefix.pack(b, keep)
            m = got(m, w, b.shape, f"permute_reveal {name!r}: the model party's message")
            if not isinstance(m, np.ndarray) or m.shape != b.shape or m.dtype != b.dtype:
                raise ProtocolError(f"permute_reveal {name!r}: bad array from the model party")
            v = (m + b) & _low(w) if rg else m + b
            res.append(prefix.unpack(v, keep, f"permute_reveal {name!r}"))
        return res
    raise ProtocolError(f"permute_reveal {name!r}: the helper has no online branch")


def _low(bits: int) -> np.uint64:
    """The mask of the low ``bits`` bits of a uint64 word."""
    return np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)


async def reshare_unpermute(p: Party, name: str, y: np.ndarray | None, *, mag: float,
                            mode: str = "flat", valid: np.ndarray | None = None,
                            shape: tuple[int, ...] | None = None,
                            mag_share: float | np.ndarray | None = None,
                            a_ahead: np.ndarray | None = None, perm_name: str | None = None,
                            bits: int = RING_BITS) -> np.ndarray | None:
    """Share U's clear permuted ``y`` again and undo π; 1 hop U → M.

    π is that of the reveal named ``perm_name`` (default ``name``); on the ring U passes ``y``
    encoded (words of Z_2^64). Offline, U and H pass ``shape`` (y's shape). Returns the new share: M gets
    π⁻¹(y′ − a′) + γ = y − b′, U gets b′ (H-derivable). ``mag`` bounds |y| (a′ lives in
    permuted space, so its width is uniform); ``mag_share`` may give b′ a width per
    column of y (default ``mag``). A light-mode U may pass a′ drawn ahead (``a_ahead``,
    from :func:`apply_permuted`).

    On the ring, ``bits`` < 64 (a multiple of 8) reshares y on Z_2^bits: U sends y′ − a′ mod 2^bits in
    bits/8 bytes an element, so the new shares add up to y mod 2^bits only — enough where every value
    computed from them before the next reveal fits that ring (the session's plan checks it,
    ``RingPlan.a_bits``).

    With a ``valid`` prefix per row, only the prefixes' entries are sent and both new shares
    are 0 past them (a softmax over the prefix; U's ``y`` there is not used).

    Learns: M receives y′ − a′ (hidden by a′: on the ring uniform whatever y, mod 2^bits, on real numbers
    width R·mag) and γ = π⁻¹(a′) − b′; their combination y − b′ stays hidden by b′. H learns nothing.
    """
    narrow = p.ring and bits < RING_BITS
    if narrow and (bits % 8 or bits < 8):
        raise ValueError(f"reshare_unpermute {name!r}: a reshare travels in whole bytes, not {bits} bits")
    mag_b = mag if mag_share is None else mag_share
    perm_name = perm_name or name
    if p.phase == "offline":
        if shape is None:
            raise ProtocolError(f"reshare_unpermute {name!r}: offline needs the output shape")
        keep = _prefix(tuple(shape), mode, valid)
        if p.is_model:  # γ travels without the entries past each prefix (0 there: a′ and b′ are)
            gamma = await p.recv_array(Role.HELPER, p.tag("unperm", name, "gamma"),
                                       tuple(shape) if keep is None else (int(keep.sum()),))
            p.keep(name + "/unperm", prefix.unpack(gamma, keep, f"reshare_unpermute {name!r}: the helper's correlation"))
            return None
        b = prefix.zero_tail(_b_mask(p, name, shape, mag_b), keep)
        if p.is_user:
            if p.config.offline == "he":  # the light client draws a′ and b′ again online
                p.plan_mask("uh", name, "a'", shape, mag)
                p.plan_mask("uh", name, "b'", shape, mag_b)
            else:
                p.keep(name + "/unperm", (_a_mask(p, name, shape, mag), b))  # a′ past a prefix is never sent
        else:
            a = prefix.zero_tail(_a_mask(p, name, shape, mag), keep)
            pi = _perm(p, perm_name, tuple(shape), mode, valid)
            p.send(Role.MODEL, p.tag("unperm", name, "gamma"), prefix.pack(pi.invert(a) - b, keep))
        return b
    if p.is_user:
        light = p.config.offline == "he"
        if light:
            if y is None:
                raise ProtocolError(f"reshare_unpermute {name!r}: the user must pass its output")
            a = _a_mask(p, name, y.shape, mag, again=True) if a_ahead is None else a_ahead
            b = None
        else:
            a, b = p.take(name + "/unperm")
        if y is None or y.shape != a.shape:
            raise ProtocolError(f"reshare_unpermute {name!r}: output shape differs from the offline one")
        keep = _prefix(tuple(y.shape), mode, valid)
        msg = prefix.pack(np.asarray(y, dtype=p.dtype) - a, keep)
        p.send(Role.MODEL, p.tag("unperm", name, "y"), ring.pack(msg, bits) if narrow else msg)
        if light:  # drawn after the message has left: off the online critical path
            b = prefix.zero_tail(_b_mask(p, name, y.shape, mag_b, again=True), keep)
        return b
    if p.is_model:
        gamma = p.take(name + "/unperm")
        pi = p.take(name + "/pi") if perm_name == name else p.peek(perm_name + "/pi")
        keep = _prefix(tuple(gamma.shape), mode, valid)
        want = gamma.shape if keep is None else (int(keep.sum()),)
        tag = p.tag("unperm", name, "y")
        if narrow:
            try:
                d = ring.unpack(await p.recv(Role.USER, tag, modulus=256), bits, want,
                                f"reshare_unpermute {name!r}: the user's message").astype(np.uint64)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
        else:
            d = await p.recv_array(Role.USER, tag, want)
        return pi.invert(prefix.unpack(d, keep, f"reshare_unpermute {name!r}")) + gamma
    raise ProtocolError(f"reshare_unpermute {name!r}: the helper has no online branch")


async def apply_permuted(p: Party, name: str, xs: Sequence[np.ndarray | None],
                         f: Callable[..., np.ndarray], *, mags_in: Sequence[float], mag_out: float,
                         mode: str = "flat", valid: np.ndarray | None = None,
                         shape: tuple[int, ...] | None = None,
                         mag_share: float | np.ndarray | None = None,
                         encs_in: Sequence[ring.Enc] | None = None, enc_out: ring.Enc | None = None,
                         residual: ring.Enc | None = None) -> Any:
    """[f(x₀, x₁, …)] for f commuting with π: permute-and-reveal, f at U, reshare-unpermute.

    Exactly 2 online hops (M → U, U → M). ``f`` must map permuted inputs to a permuted
    output of the same shape. M passes ``shape`` offline (it has no values then).
    On the ring U decodes each input at its encoding ``encs_in`` (a value outside its
    published range raises :class:`~permllm.protocols.ring.RingOverflow` naming the op) and
    encodes the output at ``enc_out``, resharing it on Z_2^(``enc_out.bits``) (:func:`reshare_unpermute`). With ``residual`` (ring only) U also reshares x₀ itself
    re-encoded at that scale, in the same hop, and the op returns (output share, x₀'s new share):
    a residual stream restarts its scale at each norm.

    Learns: U learns π(x₀), π(x₁), … and f of them; M and H learn nothing (every message M
    receives is masked as in :func:`permute_reveal` and :func:`reshare_unpermute`).
    """
    shp = tuple(shape) if shape is not None else tuple(xs[0].shape)  # type: ignore[union-attr]
    rg = p.ring
    if rg and (encs_in is None or enc_out is None):
        raise ValueError(f"{name!r}: the ring needs the encodings of the inputs and the output")
    # A light-mode U draws a′ now, while M computes what it reveals, not between M's message and its answer.
    light_u = p.is_user and p.phase == "online" and p.config.offline == "he"
    a = _a_mask(p, name, shp, mag_out, again=True) if light_u else None
    clear = await permute_reveal(p, name, xs, mags=mags_in, mode=mode, valid=valid, shape=shp, encs=encs_in)
    y = x0 = None
    if clear is not None:
        if rg:
            clear = [ring.decode(c, e.scale, e.opened, f"{name!r} input", e.range) for c, e in zip(clear, encs_in)]
        y = f(*clear)
        if rg:
            y = ring.encode(y, enc_out.scale, RING_BITS, f"{name!r} output")  # type: ignore[union-attr]
            x0 = None if residual is None else ring.encode(clear[0], residual.scale, RING_BITS, f"{name!r} residual")
    res = None
    if residual is not None:
        res = await reshare_unpermute(p, name + "#res", x0, mag=mags_in[0], mode=mode, valid=valid, shape=shp,
                                      perm_name=name)
    out = await reshare_unpermute(p, name, y, mag=mag_out, mode=mode, valid=valid, shape=shp, mag_share=mag_share,
                                  a_ahead=a, bits=enc_out.bits if rg else RING_BITS)  # type: ignore[union-attr]
    return out if residual is None else (out, res)


async def apply_permuted_wide(p: Party, name: str, x: np.ndarray | None, xrs: Sequence[np.ndarray | None] | None,
                              f: Callable[[np.ndarray], np.ndarray], *, mag_in: float, mag_out: float,
                              enc_in: ring.Enc, enc_out: ring.Enc, wide_out: bool,
                              residual: ring.Enc | None = None, residual_wide: bool = False, mode: str = "flat",
                              valid: np.ndarray | None = None, shape: tuple[int, ...] | None = None,
                              mag_share: float | np.ndarray | None = None) -> tuple:
    """:func:`apply_permuted` for values on the wide ring Z_N (:mod:`permllm.protocols.crt`); 2 online hops.

    ``x`` is the share's residue mod 2^64 and ``xrs`` its residues mod each prime (None: the input lives
    on Z_2^64 only). Every residue is revealed under the same π (one hop M → U, all residues' messages
    together), U combines them and decodes at ``enc_in``, computes ``f`` and encodes at ``enc_out`` —
    on Z_N if ``wide_out``, else resharing on Z_2^(``enc_out.bits``) — and reshares every residue, and with ``residual`` the
    input itself (on Z_N if ``residual_wide``), in one hop U → M. Returns ((output mod 2^64, its
    residues or None), and with ``residual`` the same for the re-encoded input).

    Learns: U learns π(x) and f of it; M receives each residue's messages, each masked uniformly mod its
    modulus whatever the value (a mask uniform mod N is one uniform per residue); H learns nothing.
    """
    from . import crt

    shp = tuple(shape) if shape is not None else tuple(x.shape)  # type: ignore[union-attr]
    views = [p.residue(q) for q in crt.PRIMES]
    rn = [f"{name}#q{i}" for i in range(len(views))]
    what = f"{name!r} input"
    jobs = [permute_reveal(p, name, [x], mags=[mag_in], mode=mode, valid=valid, shape=shp, encs=[enc_in])]
    # The 2^64 residue travels mod 2^wire; where that holds the whole encoding (a value on Z_N whose scale and
    # bound need fewer than 64 bits, e.g. the QK-norm's input) it determines the value, and the prime
    # residues are not revealed at all (they would not combine with a truncated residue).
    lanes = xrs is not None and enc_in.wire >= RING_BITS
    if lanes:
        jobs += [permute_reveal(v, n, [r], mags=[mag_in], mode=mode, valid=valid, shape=shp, perm_name=name)
                 for v, n, r in zip(views, rn, xrs)]  # type: ignore[arg-type]
    got = await asyncio.gather(*jobs)
    y = y_rs = x0 = x0_rs = None
    if got[0] is not None:  # U: the clear permuted input
        if lanes:
            val = crt.decode(got[0][0], [crt.reduce(g[0], q) for g, q in zip(got[1:], crt.PRIMES)], enc_in.scale,
                             what, enc_in.range)
        else:
            val = ring.decode(got[0][0], enc_in.scale, enc_in.opened, what, enc_in.range)

        def enc(v: np.ndarray, scale: int, wide: bool, label: str) -> tuple:
            if wide:
                return crt.encode(v, scale, f"{name!r} {label}")
            return ring.encode(v, scale, RING_BITS, f"{name!r} {label}"), None

        y, y_rs = enc(f(val), enc_out.scale, wide_out, "output")
        if residual is not None:
            x0, x0_rs = enc(val, residual.scale, residual_wide, "residual")
    kw = dict(mode=mode, valid=valid, shape=shp)

    async def reshare_all(base: str, v64: np.ndarray | None, vrs: list | None, wide: bool, mag: float,
                          share: float | np.ndarray | None, last: bool, bits: int) -> tuple:
        outs = None
        if wide:
            outs = [await reshare_unpermute(v, f"{base}#q{i}", None if vrs is None else vrs[i], mag=mag,
                                            mag_share=share, perm_name=name, **kw) for i, v in enumerate(views)]
        main = await reshare_unpermute(p, base, v64, mag=mag, mag_share=share, perm_name=None if last else name,
                                       bits=RING_BITS if wide else bits, **kw)
        return main, outs

    res = None
    if residual is not None:
        res = await reshare_all(name + "#res", x0, x0_rs, residual_wide, mag_in, None, False, residual.bits)
    out = await reshare_all(name, y, y_rs, wide_out, mag_out, mag_share, True, enc_out.bits)
    return out if residual is None else (out, res)


def _a_mask(p: Party, name: str, shape: tuple[int, ...], mag: float, again: bool = False) -> np.ndarray:
    """a′ of :func:`reshare_unpermute` from s_UH (U and H offline; ``again``: a light-mode U online)."""
    return (p.mask_again if again else p.mask)("uh", name, "a'", tuple(shape), p.ratio * mag)


def _b_mask(p: Party, name: str, shape: tuple[int, ...], mag: float | np.ndarray, again: bool = False) -> np.ndarray:
    """b′ of :func:`reshare_unpermute` (U's new share) from s_UH (``again``: a light-mode U online)."""
    return (p.mask_again if again else p.mask)("uh", name, "b'", tuple(shape), p.ratio * mag)

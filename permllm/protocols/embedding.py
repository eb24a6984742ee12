"""Embedding lookup of token ids the user holds.

The user's one-hot rows are shared (M's share 0, U's the one-hot) and swapped for an
H-derivable share: U sends onehot − r where r is drawn uniformly from the *integers*
in [−R/2, R/2), so the message is integer-valued and travels as int16 (int32 for
R > 2¹⁵) — a quarter of float64's bytes, and exact. Then M's private embedding table
multiplies it with the zero-round linear (``kind="transposed"``: the table is
vocab × hidden, the same setup a tied LM head uses). 1 online message U → M.

Learns: M receives onehot − r, each entry hidden by a uniform integer mask over R
values (statistical distance 1/R per lookup, the real-number sharing trade-off; see
README); U and H learn nothing of the table.
"""
from __future__ import annotations

import numpy as np

from .linear import linear
from .party import Party, ProtocolError, Role

__all__ = ["embed"]


def _wire_dtype(ratio: float) -> np.dtype:
    return np.dtype(np.int16) if ratio <= 2**15 else np.dtype(np.int32)


async def embed(p: Party, name: str, ids: np.ndarray | list[int] | None, *, weight: str, vocab: int,
                n_tokens: int, mag_out: float | np.ndarray) -> np.ndarray | None:
    """[E[ids]] for ``n_tokens`` ids known to U only (U passes them online; others pass None)."""
    oh = name + ".onehot"
    half = int(p.ratio) // 2
    wire = _wire_dtype(p.ratio)

    def mask() -> np.ndarray:
        """r, in the wire dtype (U keeps it so: the online message is then integer work only)."""
        return p.gen("uh", oh, "r").integers(-half, half, size=(n_tokens, vocab), dtype=wire)

    if p.phase == "offline":
        x = None
        if not p.is_model:
            r = mask()
            if p.is_user and p.config.offline != "he":  # the light client draws r again online
                p.keep(oh, r)
            x = r.astype(p.dtype)
    elif p.is_user:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape != (n_tokens,):
            raise ProtocolError(f"embed {name!r}: expected {n_tokens} token ids, got {ids.shape[0]}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ProtocolError(f"embed {name!r}: token id out of range [0, {vocab})")
        r = mask() if p.config.offline == "he" else p.take(oh)
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
    return await linear(p, name, x, weight, mag_in=1.0, mag_out=mag_out, kind="transposed", l2_in=1.0)

"""Embedding lookup of token ids the user holds.

The user's one-hot rows are shared (M's share 0, U's the one-hot), swapped for an
H-derivable share by :func:`~permllm.protocols.linear.reshare` (1 message U → M),
then multiplied by M's private embedding table with the zero-round linear
(``kind="transposed"``: the table is vocab × hidden, the same setup a tied LM head
uses).

Learns: M receives onehot − r, each entry hidden by a uniform mask of width
R (statistical distance 1/R per lookup, the real-number sharing trade-off; see
README); U and H learn nothing of the table.
"""
from __future__ import annotations

import numpy as np

from .linear import linear, reshare
from .party import Party, ProtocolError

__all__ = ["embed"]


async def embed(p: Party, name: str, ids: np.ndarray | list[int] | None, *, weight: str, vocab: int,
                n_tokens: int, mag_out: float) -> np.ndarray | None:
    """[E[ids]] for ``n_tokens`` ids known to U only (U passes them online; others pass None)."""
    onehot = None
    if p.is_user and p.phase == "online":
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape != (n_tokens,):
            raise ProtocolError(f"embed {name!r}: expected {n_tokens} token ids, got {ids.shape[0]}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ProtocolError(f"embed {name!r}: token id out of range [0, {vocab})")
        onehot = np.zeros((n_tokens, vocab), dtype=p.dtype)
        onehot[np.arange(n_tokens), ids] = 1
    x = await reshare(p, name + ".onehot", onehot, mag=1.0, shape=(n_tokens, vocab))
    return await linear(p, name, x, weight, mag_in=1.0, mag_out=mag_out, kind="transposed", l2_in=1.0)

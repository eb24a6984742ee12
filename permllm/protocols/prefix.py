"""Causal valid prefixes: the entries of a (…, T, keys) array that a causal softmax uses, and their packing.

Row t of a step's scores attends to the first ``valid[t]`` keys; the entries past that prefix are
never revealed (permute.py) and, where both shares are known to be 0 there (the softmax's output),
never sent either (matmul.py): a message carries the valid entries only, row after row.
"""
from __future__ import annotations

import numpy as np

from .party import ProtocolError

__all__ = ["mask", "pack", "unpack", "zero_tail"]


def mask(shape: tuple[int, ...], valid: np.ndarray | None) -> np.ndarray | None:
    """Which entries of an array of ``shape`` lie in their row's valid prefix, or None when all do."""
    if valid is None:
        return None
    v = np.broadcast_to(np.asarray(valid, dtype=np.int64), shape[:-1])
    keep = np.arange(shape[-1]) < v[..., None]
    return None if keep.all() else keep


def pack(x: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """The entries of ``x`` inside the valid prefixes, row after row (all of ``x`` when ``keep`` is None)."""
    return x if keep is None else x[keep]


def unpack(packed: np.ndarray, keep: np.ndarray | None, what: str) -> np.ndarray:
    """Inverse of :func:`pack`: the valid entries in place, zeros past each prefix."""
    if keep is None:
        return packed
    if packed.shape != (int(keep.sum()),):
        raise ProtocolError(f"{what}: expected the {int(keep.sum())} valid entries, got shape {packed.shape}")
    out = np.zeros(keep.shape, dtype=packed.dtype)
    out[keep] = packed
    return out


def zero_tail(x: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """``x`` with the entries past each valid prefix set to 0 (a copy where it changes anything)."""
    return x if keep is None else np.where(keep, x, x.dtype.type(0))

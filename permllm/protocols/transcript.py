"""Transcripts for audits: every array a party receives, with the modulus it should be uniform on.

A party with a :class:`Transcript` (``Party.transcript``) saves each array it receives
(:meth:`Party.recv`) as one ``.npy`` file in ``DIR/<role>/`` and lists it in
``DIR/<role>/index.json`` as ``{"file", "from", "tag", "modulus", "kind"}``:

* ``modulus`` is an integer m where every element should be uniform on [0, m) whatever
  the secrets (ring shares, as their bytes: 256; a shifted vocabulary index: the
  vocabulary size; a padded table: 2^bits), and ``null`` otherwise;
* ``kind`` is ``"uniform"`` (a modulus is given), ``"revealed"`` (the party unmasks it by
  design: a permuted reveal, the PermLLM leakage) or ``"statistical"`` (a value masked by
  real-number sharing, or the light mode's integer one-hot: hidden only statistically,
  uniform on no modulus). Setup metadata and control messages are not arrays and are not
  listed. Scalars that are uniform (an index, a pad entry) are saved as 0-d arrays.

:func:`audit` is a smoke test of the ``"uniform"`` entries, not a proof: it checks each
element's marginal distribution and that no position repeats a value across tokens more
than chance allows, so it catches a mask that is missing, reused or biased; it cannot
catch a mask the receiving party could derive itself (drawn from the wrong seed), which
only reading the protocol shows.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Transcript", "audit"]

ALPHA = 1e-6  # false-alarm probability of each test


class Transcript:
    """The received arrays of one party, written under ``root/role``."""

    def __init__(self, root: str | Path, role: str) -> None:
        self.dir = Path(root) / role
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []

    def record(self, frm: str, tag: tuple, payload: Any, modulus: int | None, revealed: bool = False) -> None:
        """Save the arrays of one received ``payload`` (an array, a list of arrays, or an integer)."""
        items = payload if isinstance(payload, list) else [payload]
        kind = "revealed" if revealed else "uniform" if modulus is not None else "statistical"
        for i, item in enumerate(items):
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                item = np.asarray(item, dtype=np.int64)
            if not isinstance(item, np.ndarray):
                continue
            name = f"{len(self.entries):06d}.npy"
            np.save(self.dir / name, item)
            self.entries.append({"file": name, "from": frm, "tag": [*map(_json, tag), *([i] if len(items) > 1 else [])],
                                 "modulus": None if revealed else modulus, "kind": kind})

    def close(self) -> None:
        """Write ``index.json``."""
        (self.dir / "index.json").write_text(json.dumps(self.entries, indent=1))


def _json(x: Any) -> Any:
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def audit(root: str | Path, bins: int = 16) -> dict[str, dict[str, Any]]:
    """Per role: counts of each kind and two tests of the ``"uniform"`` entries.

    * ``uniformity``, per (sender, tag kind): χ² of the elements' bins ⌊bins·x/m⌋ against their
      expected counts (bins of unequal width when m is not a multiple of ``bins``); passes below
      the 1 − 10⁻⁶ quantile; ``None``: fewer than 5 expected per bin.
    * ``repeats``, per (sender, tag without the token index, shape): over the arrays of successive
      tokens, the largest number of times one value recurs at one position; passes when that is
      not less likely than 10⁻⁶ for uniform draws (union bound over the positions): a position
      whose mask is missing or reused shows the same value every token.
    """
    out: dict[str, dict[str, Any]] = {}
    for index in sorted(Path(root).glob("*/index.json")):
        entries = json.loads(index.read_text())
        counts = {"uniform": 0, "revealed": 0, "statistical": 0}
        hist: dict[str, np.ndarray] = {}
        stacks: dict[str, list[np.ndarray]] = {}
        mods: dict[str, int] = {}
        for e in entries:
            counts[e["kind"]] += 1
            if e["kind"] != "uniform":
                continue
            a = np.load(index.parent / e["file"])
            m = int(e["modulus"])
            if a.size and (a.min() < 0 or int(a.max()) >= m):
                raise ValueError(f"transcript {index.parent.name}/{e['file']}: a value outside [0, {m})")
            key = f"{e['from']}:{e['tag'][0]}"
            h = np.bincount(_bin(a.ravel(), m, bins), minlength=bins)
            hist[key] = hist.get(key, 0) + h
            mods[key] = m
            series = f"{e['from']}:{e['tag'][0]}/{'/'.join(map(str, e['tag'][1:2] + e['tag'][3:]))}:{a.shape}"
            stacks.setdefault(series, []).append(a.ravel())
            mods[series] = m
        out[index.parent.name] = {
            "counts": counts,
            "uniformity": {k: _chi2(h, _expected(mods[k], bins)) for k, h in hist.items()},
            "repeats": {k: _repeats(np.stack(v), mods[k]) for k, v in stacks.items() if len(v) > 1},
        }
    return out


def _bin(a: np.ndarray, m: int, bins: int) -> np.ndarray:
    """⌊bins·x/m⌋ in exact integer arithmetic (x < m ≤ 2^64)."""
    if m == 2**64 and bins & (bins - 1) == 0:  # ring words: the top bits
        return (a.astype(np.uint64) >> np.uint64(64 - bins.bit_length() + 1)).astype(np.int64)
    return np.array([bins * int(x) // m for x in a], dtype=np.int64) if m > 2**53 else \
        (a.astype(np.int64) * bins // m).astype(np.int64)


def _expected(m: int, bins: int) -> np.ndarray:
    """The probability of each bin for a uniform element of [0, m)."""
    edges = [-(-i * m // bins) for i in range(bins + 1)]  # the least x with ⌊bins·x/m⌋ ≥ i
    return np.diff(np.asarray(edges, dtype=np.float64)) / m


def _chi2(h: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    n = int(h.sum())
    exp = n * p
    keep = p > 0
    enough = bool(np.all(exp[keep] >= 5))
    chi2 = float(np.sum((h[keep] - exp[keep]) ** 2 / exp[keep])) if n else 0.0
    return {"elements": n, "chi2": round(chi2, 2), "pass": chi2 < _chi2_tail(int(keep.sum()) - 1) if enough else None}


def _repeats(stack: np.ndarray, m: int) -> dict[str, Any]:
    """The most times a value recurs at one position over the rows of ``stack`` (tokens × positions)."""
    n, positions = stack.shape
    s = np.sort(stack, axis=0)
    most = 1
    while most < n and np.any(s[most:] == s[:n - most]):  # some value fills `most + 1` rows at a position
        most += 1
    # P(some value recurs ≥ k times at one position) ≤ C(n, k)·m^(1−k); union bound over the positions.
    logp = math.lgamma(n + 1) - math.lgamma(most + 1) - math.lgamma(n - most + 1) + (1 - most) * math.log(m)
    return {"tokens": n, "positions": positions, "most": most,
            "pass": most == 1 or logp + math.log(positions) >= math.log(ALPHA)}


def _chi2_tail(dof: int) -> float:
    """An upper bound of χ²'s 1 − 10⁻⁶ quantile (Wilson–Hilferty, z = 4.9)."""
    if dof < 1:
        return math.inf
    z = 4.9
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3

"""Transcripts for audits: every array a party receives, with the modulus it should be uniform on.

A party with a :class:`Transcript` (``Party.transcript``) saves each array it receives
(:meth:`Party.recv`) as one ``.npy`` file in ``DIR/<role>/`` and lists it in
``DIR/<role>/index.json`` as ``{"file", "from", "tag", "modulus", "kind"}``:

* ``modulus`` is an integer m where every element should be uniform on [0, m) whatever
  the secrets (ring shares, as their bytes: 256; a shifted vocabulary index: the
  vocabulary size; a padded table: 2^bits), and ``null`` otherwise;
* ``kind`` is ``"uniform"`` (a modulus is given) or ``"statistical"`` (a value masked by
  real-number sharing, or the light mode's integer one-hot: hidden only statistically,
  not uniform on any modulus). Setup metadata and control messages are not arrays and
  are not listed.

:func:`audit` runs a χ² uniformity test over every ``"uniform"`` entry. Scalars that are
uniform (an index, a pad entry) are saved as 0-d arrays.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Transcript", "audit"]


class Transcript:
    """The received arrays of one party, written under ``root/role``."""

    def __init__(self, root: str | Path, role: str) -> None:
        self.dir = Path(root) / role
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []

    def record(self, frm: str, tag: tuple, payload: Any, modulus: int | None) -> None:
        """Save the arrays of one received ``payload`` (an array, a list of arrays, or an integer)."""
        items = payload if isinstance(payload, list) else [payload]
        for i, item in enumerate(items):
            if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                item = np.asarray(item, dtype=np.int64)
            if not isinstance(item, np.ndarray):
                continue
            kind = "uniform" if modulus is not None else "statistical"
            name = f"{len(self.entries):06d}.npy"
            np.save(self.dir / name, item)
            self.entries.append({"file": name, "from": frm, "tag": [*map(_json, tag), *([i] if len(items) > 1 else [])],
                                 "modulus": modulus, "kind": kind})

    def close(self) -> None:
        """Write ``index.json``."""
        (self.dir / "index.json").write_text(json.dumps(self.entries, indent=1))


def _json(x: Any) -> Any:
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


def audit(root: str | Path, bins: int = 16) -> dict[str, dict[str, Any]]:
    """Per role: counts of each kind and a pooled χ² test of the ``"uniform"`` entries, grouped by
    (sender, tag kind). Each element x of modulus m falls in bin ⌊bins·x/m⌋; a group passes when its
    χ² (bins − 1 degrees of freedom) is below the 10⁻⁶ tail (``None``: too few elements to test)."""
    out: dict[str, dict[str, Any]] = {}
    for index in sorted(Path(root).glob("*/index.json")):
        entries = json.loads(index.read_text())
        groups: dict[str, np.ndarray] = {}
        counts = {"uniform": 0, "statistical": 0}
        for e in entries:
            counts[e["kind"]] += 1
            if e["kind"] != "uniform":
                continue
            a = np.load(index.parent / e["file"]).astype(np.float64).ravel()
            m = float(e["modulus"])
            if a.size and (a.min() < 0 or a.max() >= m):
                raise ValueError(f"{index.parent.name}/{e['file']}: a value outside [0, {e['modulus']})")
            key = f"{e['from']}:{e['tag'][0]}"
            h = np.bincount(np.minimum((a * bins / m).astype(np.int64), bins - 1), minlength=bins)
            groups[key] = groups.get(key, np.zeros(bins, dtype=np.int64)) + h
        tests = {}
        for key, h in groups.items():
            n = int(h.sum())
            chi2 = float(np.sum((h - n / bins) ** 2 / (n / bins))) if n else 0.0
            enough = n >= 5 * bins  # χ² needs about 5 expected per bin; fewer elements are only counted
            tests[key] = {"elements": n, "chi2": round(chi2, 2), "pass": chi2 < _chi2_tail(bins - 1) if enough else None}
        out[index.parent.name] = {"counts": counts, "uniformity": tests}
    return out


def _chi2_tail(dof: int) -> float:
    """An upper bound of χ²'s 1 − 10⁻⁶ quantile (Wilson–Hilferty, z = 4.9)."""
    z = 4.9
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3

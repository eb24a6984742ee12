"""Share arithmetic configuration: the dtype of shares and the mask ratio R.

Every mask is drawn uniformly from [-w/2, w/2] with a width ``w = R * m`` where
``m`` is a public magnitude bound of the *secret-dependent part* of the value it
hides (docs/design.md §10). R trades hiding for precision: a value hidden with ratio R
is carried in numbers about R times larger, so float64 with R = 2**12 keeps
about 2**-29 relative error per zero-round linear layer. float32 shares are refused:
their precision allows only ratios near 2**4 (the paper's setting), which do not hide
the inputs (:data:`FLOAT32_REFUSED`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ShareConfig", "DEFAULT_RATIO", "DTYPES", "ROUTES", "ROUTE_CHOICES", "OFFLINE_MODES", "ARITHS", "RING_BITS", "FLOAT32_REFUSED",
           "check_dtype"]

DEFAULT_RATIO = 2.0**12
DTYPES = ("float64",)
ROUTES = ("12", "8")
ROUTE_CHOICES = ("auto", *ROUTES)  # "auto": 8 where it runs on the ring (the dealt mode, not --arith float), else 12
OFFLINE_MODES = ("dealer", "he")
# Share arithmetic: "ring" (exact fixed point on Z_2^64, every mask uniform: perfect hiding; docs/ring.md),
# "float" (real numbers with masks R times a public bound: statistical hiding; docs/design.md §10), or
# "auto": ring where it is built (the dealt mode, on either route) and the model's activations fit Z_2^64 at
# float-like precision (model/forward.py, RING_FLOOR), else float — the model party decides in the setup.
ARITHS = ("auto", "ring", "float")
RING_BITS = 64
FLOAT32_REFUSED = ("float32 shares are refused: float32 masks of ratio 2**4 do not hide the inputs (an audit "
                   "identified 32 of 32 token ids exactly from the embedding messages); use float64, see "
                   "'Precision and hiding' in the README")


def check_dtype(dtype: object) -> str:
    """``dtype`` if it is a share dtype (one of :data:`DTYPES`); else ValueError saying why."""
    if dtype == "float32":
        raise ValueError(FLOAT32_REFUSED)
    if dtype not in DTYPES:
        raise ValueError(f"share dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class ShareConfig:
    """Public parameters all three parties agree on for a session."""

    dtype: str = "float64"
    ratio: float = DEFAULT_RATIO
    # Attention route in decode: "12" (norm, q·Kᵀ, softmax and P·V as separate ops: 12 online
    # hops per layer) or "8" (the fused op of protocols/attention.py: 8 hops per layer); "auto" becomes
    # "8" in the dealt mode unless the arithmetic is "float" (whose 8-hop route carries R³ magnitudes,
    # docs/design.md §10), else "12".
    route: str = "auto"
    # Offline phase of the linear layers: "dealer" (U holds the masked weights W − U_W, H deals)
    # or "he" (the light client: CKKS products with M, no model-sized state at U; protocols/he_matmul.py).
    offline: str = "dealer"
    arith: str = "auto"

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if self.route not in ROUTE_CHOICES:
            raise ValueError(f"attention route must be one of {', '.join(ROUTE_CHOICES)}, not {self.route!r}")
        if not self.ratio >= 1.0:
            raise ValueError(f"mask ratio must be >= 1, not {self.ratio!r}")
        if self.offline not in OFFLINE_MODES:
            raise ValueError(f"offline mode must be one of {', '.join(OFFLINE_MODES)}, not {self.offline!r}")
        if self.offline == "he" and self.route == "8":
            raise ValueError("the light client (offline 'he') needs attention route 12 "
                             "(the 8-hop route uses the user's masked key weights)")
        if self.arith not in ARITHS:
            raise ValueError(f"share arithmetic must be one of {', '.join(ARITHS)}, not {self.arith!r}")
        if self.arith == "ring" and not self.ring_possible:
            raise ValueError("ring arithmetic runs in the dealt mode only (the light client still shares real "
                             "numbers): use --arith float or auto")

    @property
    def attention_route(self) -> str:
        """The decode route this configuration runs, "12" or "8" ("auto" resolved)."""
        if self.route != "auto":
            return self.route
        return "8" if self.offline == "dealer" and self.arith != "float" else "12"

    @property
    def ring_possible(self) -> bool:
        """Whether this configuration has a ring implementation (the dealt mode)."""
        return self.offline == "dealer"

    @property
    def np_dtype(self) -> np.dtype:
        """The dtype of a real-number share (a ring share is a uint64 word: ``Party.dtype``)."""
        return np.dtype(self.dtype)

"""Share arithmetic configuration: the dtype of shares and the mask ratio R.

Every mask is drawn uniformly from [-w/2, w/2] with a width ``w = R * m`` where
``m`` is a public magnitude bound of the *secret-dependent part* of the value it
hides (DESIGN.md §3). R trades hiding for precision: a value hidden with ratio R
is carried in numbers about R times larger, so float64 with R = 2**12 keeps
about 2**-29 relative error per zero-round linear layer, while float32 needs a
ratio near 2**4 (the paper's setting).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ShareConfig", "DEFAULT_RATIO", "FLOAT32_RATIO", "ROUTES", "OFFLINE_MODES"]

DEFAULT_RATIO = 2.0**12
ROUTES = ("12", "8")
OFFLINE_MODES = ("dealer", "he")
FLOAT32_RATIO = 2.0**4


@dataclass(frozen=True, slots=True)
class ShareConfig:
    """Public parameters all three parties agree on for a session."""

    dtype: str = "float64"
    ratio: float = DEFAULT_RATIO
    # Attention route in decode: "12" (norm, q·Kᵀ, softmax and P·V as separate ops: 12 online
    # hops per layer) or "8" (the fused op of protocols/attention.py: 8 hops per layer).
    route: str = "12"
    # Offline phase of the linear layers: "dealer" (U holds the masked weights W − U_W, H deals)
    # or "he" (the light client: CKKS products with M, no model-sized state at U; protocols/he_matmul.py).
    offline: str = "dealer"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"share dtype must be float32 or float64, not {self.dtype!r}")
        if self.route not in ROUTES:
            raise ValueError(f"attention route must be one of {', '.join(ROUTES)}, not {self.route!r}")
        if not self.ratio >= 1.0:
            raise ValueError(f"mask ratio must be >= 1, not {self.ratio!r}")
        if self.offline not in OFFLINE_MODES:
            raise ValueError(f"offline mode must be one of {', '.join(OFFLINE_MODES)}, not {self.offline!r}")
        if self.offline == "he" and (self.route != "12" or self.dtype != "float64"):
            raise ValueError("the light client (offline 'he') needs float64 shares and attention route 12 "
                             "(the 8-hop route uses the user's masked key weights)")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @classmethod
    def for_dtype(cls, dtype: str, route: str = "12") -> "ShareConfig":
        """The default ratio for a dtype: 2**12 in float64, 2**4 (paper-like) in float32."""
        return cls(dtype=dtype, ratio=DEFAULT_RATIO if dtype == "float64" else FLOAT32_RATIO, route=route)

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

__all__ = ["ShareConfig", "DEFAULT_RATIO", "FLOAT32_RATIO"]

DEFAULT_RATIO = 2.0**12
FLOAT32_RATIO = 2.0**4


@dataclass(frozen=True, slots=True)
class ShareConfig:
    """Public parameters all three parties agree on for a session."""

    dtype: str = "float64"
    ratio: float = DEFAULT_RATIO

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"share dtype must be float32 or float64, not {self.dtype!r}")
        if not self.ratio >= 1.0:
            raise ValueError(f"mask ratio must be >= 1, not {self.ratio!r}")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @classmethod
    def for_dtype(cls, dtype: str) -> "ShareConfig":
        """The default ratio for a dtype: 2**12 in float64, 2**4 (paper-like) in float32."""
        return cls(dtype=dtype, ratio=DEFAULT_RATIO if dtype == "float64" else FLOAT32_RATIO)

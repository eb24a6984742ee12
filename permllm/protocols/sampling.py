"""Choosing the next token from logits the user sees in a permuted order.

Part of :mod:`permllm.protocols` (above :mod:`permllm.net`, below
:mod:`permllm.model`); it runs at the user party only, inside
:func:`~permllm.protocols.select.select_token`, and sends nothing.

Every token the user receives π(logits) under a fresh permutation π it does not
know, so a rule here must be *permutation-equivariant* (choosing from π(x) picks
the entry that choosing from x would pick, moved by π) and, for sampling,
*reproducible*: with a fixed seed the same true token comes out whatever π is.
Both hold because sampling works on the logits sorted by value (a stable sort), an
order that π does not change except among exactly equal values, and draws a
single uniform number per token for an inverse-CDF walk over that order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["Sampler", "choose", "make_rng", "Uniform"]


class Uniform(Protocol):
    """What :func:`choose` draws from: one uniform number in [0, 1) per sampled token (a numpy Generator)."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class Sampler:
    """How the user picks a token: greedy (``temperature == 0``) or sampling.

    ``top_k`` keeps the k most likely tokens (0: off); ``top_p`` keeps the smallest
    most-likely prefix whose probability reaches ``top_p`` (1.0: off); both apply
    after the temperature, top-k first. ``seed`` seeds :func:`make_rng` (None: fresh
    OS entropy).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_rng(sampler: Sampler) -> np.random.Generator:
    """The user's sampling generator: one per generation, seeded by ``sampler.seed``."""
    return np.random.default_rng(sampler.seed)


def choose(logits: np.ndarray, sampler: Sampler, rng: Uniform | None = None) -> int:
    """An index into the 1-D ``logits`` chosen by ``sampler``.

    Greedy returns the index of the largest value; among exactly equal maxima it
    returns the first, i.e. one that depends on π (a tie of revealed float logits is
    practically impossible). Sampling sorts by value descending (stable), applies
    temperature, top-k and top-p, and walks the CDF of what is left with one
    ``rng.random()`` draw; ``rng`` is then required. ``-inf`` logits have
    probability 0; NaN and ``+inf`` are refused.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("logits contain NaN or +inf")
    if sampler.greedy:
        return int(np.argmax(x))
    if rng is None:
        raise ValueError("sampling needs an rng (see make_rng)")
    order = np.argsort(-x, kind="stable")
    if sampler.top_k:
        order = order[:sampler.top_k]
    z = x[order] / sampler.temperature
    if not np.isfinite(z[0]):
        raise ValueError("every logit is -inf")
    w = np.exp(z - z[0])
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    if sampler.top_p < 1.0:
        keep = min(int(np.searchsorted(cdf, sampler.top_p, side="left")) + 1, len(cdf))
        cdf = cdf[:keep] / cdf[keep - 1]
    pick = int(np.searchsorted(cdf, rng.random(), side="right"))
    return int(order[min(pick, len(cdf) - 1)])

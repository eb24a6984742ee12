"""Plaintext non-linear functions, as the user applies them to permuted values.

Each function commutes with the permutation it is used under: element-wise
functions with any permutation of the elements; row-wise normalisations with a
permutation inside each row. They are also the plaintext twins the tests and the
model reference use.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["softmax", "layer_norm", "rms_norm", "gelu", "gelu_tanh", "silu", "swiglu", "glu", "GATES"]


def softmax(x: np.ndarray, valid: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """Row softmax of ``scale·x`` over the last axis; entries at or past ``valid`` (per-row prefix) get 0."""
    z = x * scale
    if valid is not None:
        cols = np.arange(x.shape[-1])
        v = np.broadcast_to(np.asarray(valid), x.shape[:-1])[..., None]
        z = np.where(cols < v, z, -np.inf)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis without the affine part."""
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def rms_norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """RMSNorm over the last axis without the weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def gelu(x: np.ndarray) -> np.ndarray:
    """GeLU, exact (erf) form."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GeLU, tanh approximation (GPT-2, ChatGLM)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish: x·sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The SwiGLU gate silu(g)·u (LLaMA MLP)."""
    return silu(g) * u


def glu(act: str) -> "Callable[[np.ndarray, np.ndarray], np.ndarray]":
    """The gated unit act(g)·u for the gate activation ``act`` (one of :data:`GATES`): SwiGLU (silu, LLaMA),
    GeGLU (gelu_tanh, Gemma)."""
    try:
        f = GATES[act]
    except KeyError:
        raise ValueError(f"unknown gate activation {act!r} (one of {', '.join(GATES)})") from None
    return lambda g, u: f(g) * u


def _erf(x: np.ndarray) -> np.ndarray:
    import torch  # noqa: PLC0415 - numpy has no vectorised erf; torch's is exact and fast

    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(x))).numpy()


GATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"silu": silu, "gelu_tanh": gelu_tanh, "gelu": gelu}

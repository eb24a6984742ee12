"""Non-linear layers as permuted ops: softmax, LayerNorm, RMSNorm, GeLU, SiLU, gated units (SwiGLU, GeGLU).

Each is :func:`~permllm.protocols.permute.apply_permuted` with a public function
(2 online hops). Norms permute inside each row and carry no private parameters:
their affine part folds into the next linear layer, or runs as a zero-round
diagonal linear (:func:`~permllm.protocols.linear.linear` with ``kind="diag"``).

What each party learns is that of :func:`apply_permuted`: U sees the permuted
inputs in the clear (the PermLLM trade-off), M and H learn nothing.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import functions as F
from .party import Party
from .permute import apply_permuted

__all__ = ["softmax", "layer_norm", "rms_norm", "gelu", "silu", "swiglu", "glu"]

Share = np.ndarray | None
MagVec = float | np.ndarray | None  # width of U's new share, optionally per output column

# Every op takes optional ``mag_out`` (bound of |output|, sizing the mask in permuted space)
# and ``mag_share`` (per-column bound sizing U's new share); defaults are safe bounds. On the
# ring each also takes the encodings ``encs_in``/``enc_out`` (and a norm ``residual``) of
# :func:`~permllm.protocols.permute.apply_permuted`.


async def softmax(p: Party, name: str, x: Share, *, mag_in: float, valid: np.ndarray | None = None,
                  scale: float = 1.0, shape: tuple[int, ...] | None = None, **enc: Any) -> Share:
    """[softmax(scale·x)] over rows; ``valid`` gives each row's unmasked prefix length (causal mask).

    π keeps each row's valid prefix in front, so U knows which permuted entries are masked
    (public: positions) but not which key each entry belongs to.
    """
    def f(z: np.ndarray) -> np.ndarray:
        return F.softmax(z, None if valid is None else _rows_valid(z.shape, valid), scale)
    return await apply_permuted(p, name, [x], f, mags_in=[mag_in], mag_out=1.0, mode="rows",
                                valid=valid, shape=shape, **enc)


def _rows_valid(shape: tuple[int, ...], valid: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.asarray(valid), shape[:-1])


async def layer_norm(p: Party, name: str, x: Share, *, mag_in: float, eps: float = 1e-5,
                     shape: tuple[int, ...] | None = None, mag_out: float | None = None,
                     mag_share: MagVec = None, **enc: Any) -> Any:
    """[LayerNorm(x)] without affine (γ, β fold into the next linear)."""
    return await _norm(p, name, x, lambda z: F.layer_norm(z, eps), mag_in, shape, mag_out, mag_share, enc)


async def rms_norm(p: Party, name: str, x: Share, *, mag_in: float, eps: float = 1e-6,
                   shape: tuple[int, ...] | None = None, mag_out: float | None = None,
                   mag_share: MagVec = None, **enc: Any) -> Any:
    """[RMSNorm(x)] without the weight (it folds into the next linear)."""
    return await _norm(p, name, x, lambda z: F.rms_norm(z, eps), mag_in, shape, mag_out, mag_share, enc)


async def _norm(p: Party, name: str, x: Share, f: Callable[[np.ndarray], np.ndarray], mag_in: float,
                shape: tuple[int, ...] | None, mag_out: float | None, mag_share: MagVec, enc: dict) -> Any:
    """A row normalisation under a per-row permutation (with ``residual`` in ``enc``: also x re-encoded)."""
    shp = tuple(shape or x.shape)  # type: ignore[union-attr]
    return await apply_permuted(p, name, [x], f, mags_in=[mag_in], mag_out=mag_out or _norm_mag(shp), mode="rows",
                                shape=shp, mag_share=mag_share, **enc)


def _norm_mag(shape: tuple[int, ...]) -> float:
    # A normalised row has RMS 1, so no entry exceeds sqrt(n).
    return float(np.sqrt(shape[-1]))


async def gelu(p: Party, name: str, x: Share, *, mag_in: float, approximate: bool = False,
               shape: tuple[int, ...] | None = None, mag_out: float | None = None,
               mag_share: MagVec = None, **enc: Any) -> Share:
    """[GeLU(x)], exact or tanh form."""
    f = F.gelu_tanh if approximate else F.gelu
    return await apply_permuted(p, name, [x], f, mags_in=[mag_in], mag_out=mag_out or mag_in, shape=shape,
                                mag_share=mag_share, **enc)


async def silu(p: Party, name: str, x: Share, *, mag_in: float, shape: tuple[int, ...] | None = None,
               **enc: Any) -> Share:
    """[SiLU(x)]."""
    return await apply_permuted(p, name, [x], F.silu, mags_in=[mag_in], mag_out=mag_in, shape=shape, **enc)


async def glu(p: Party, name: str, g: Share, u: Share, *, act: str, mag_g: float, mag_u: float,
              shape: tuple[int, ...] | None = None, mag_out: float | None = None,
              mag_share: MagVec = None, **enc: Any) -> Share:
    """[act(g)·u], ``act`` a public gate activation (:data:`~permllm.protocols.functions.GATES`: "silu" for
    SwiGLU, "gelu_tanh" for Gemma's GeGLU): g and u are revealed under the same π, so U multiplies matching
    entries. U learns π(g) and π(u), as any permuted op's inputs; M and H learn nothing."""
    return await apply_permuted(p, name, [g, u], F.glu(act), mags_in=[mag_g, mag_u],
                                mag_out=mag_out or mag_g * mag_u, shape=shape, mag_share=mag_share, **enc)


async def swiglu(p: Party, name: str, g: Share, u: Share, *, mag_g: float, mag_u: float,
                 shape: tuple[int, ...] | None = None, mag_out: float | None = None,
                 mag_share: MagVec = None, **enc: Any) -> Share:
    """[silu(g)·u] (:func:`glu` with silu)."""
    return await glu(p, name, g, u, act="silu", mag_g=mag_g, mag_u=mag_u, shape=shape, mag_out=mag_out,
                     mag_share=mag_share, **enc)

"""Public, position-dependent linear maps of the attention block.

Splitting the fused QKV output into heads, merging heads back, rotary position
embeddings (1-D rotate-half as in LLaMA, with transformers' scaled frequencies and
partial rotary; ChatGLM's 2-D variant), and the per-row attention masks (causal, and
sliding windows). Every map here is linear and public, so each party
applies it to its own share locally (no message), and the user's share stays
helper-derivable.
"""
from __future__ import annotations

import numpy as np

from .arch import Arch

__all__ = ["split_heads", "merge_heads", "qk_rows", "from_qk_rows", "rope", "rope_bits", "positions", "pass_positions",
           "prompt_steps", "valid_lengths", "window_starts", "shift_rows"]


def split_heads(arch: Arch, qkv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, qkv_out) → q (kv, g, T, hd), k and v (kv, 1, T, hd); query head h uses kv head h // g."""
    T, hd, H, KV = qkv.shape[0], arch.head_dim, arch.heads, arch.kv_heads
    q = qkv[:, :H * hd].reshape(T, KV, arch.group, hd).transpose(1, 2, 0, 3)
    k = qkv[:, H * hd:(H + KV) * hd].reshape(T, KV, hd).transpose(1, 0, 2)[:, None]
    v = qkv[:, (H + KV) * hd:].reshape(T, KV, hd).transpose(1, 0, 2)[:, None]
    return q, k, v


def merge_heads(arch: Arch, o: np.ndarray) -> np.ndarray:
    """(kv, g, T, hd) → (T, heads·hd)."""
    T = o.shape[2]
    return o.transpose(2, 0, 1, 3).reshape(T, arch.heads * arch.head_dim)


def qk_rows(arch: Arch, qkv: np.ndarray) -> np.ndarray:
    """(T, qkv_out) → the q heads' rows then the k heads' rows, (T·(heads + kv_heads), hd): the rows of the
    QK-norm (one normalisation per head and token, in one op)."""
    T, hd, H, KV = qkv.shape[0], arch.head_dim, arch.heads, arch.kv_heads
    return qkv[:, :(H + KV) * hd].reshape(T, H + KV, hd).transpose(1, 0, 2).reshape((H + KV) * T, hd)


def from_qk_rows(arch: Arch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`qk_rows`, split: q (kv, g, T, hd), k (kv, 1, T, hd) as :func:`split_heads` lays them."""
    H, KV, hd = arch.heads, arch.kv_heads, arch.head_dim
    T = rows.shape[0] // (H + KV)
    z = rows.reshape(H + KV, T, hd)
    return z[:H].reshape(KV, arch.group, T, hd), z[H:].reshape(KV, 1, T, hd)


def _tables(arch: Arch, d: int, pos: np.ndarray, inv: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (T, r) of the rotation at positions ``pos``, r = 2·len(inv) (``inv``: the inverse
    frequencies; by default rope_theta's over all d). RoPE's attention factor is not in them: it scales
    the scores (:attr:`Arch.score_scale`), so the rotation keeps every norm."""
    if inv is None:
        inv = 1.0 / arch.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.asarray(pos, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang), np.sin(ang)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, frac: int | None, q: int = 0) -> np.ndarray:
    """Rotate-half RoPE over the first r dims of the last axis of x (…, T, d) with the tables (T, r) of
    :func:`_tables`; the other d − r dims pass through (partial rotary).

    With ``frac`` (ring words): cos and sin encoded as round(·2^frac), so the result is exact
    mod 2^64 at ``frac`` more fractional bits (a public linear map of each share); the pass-through
    dims are multiplied by 2^frac, the encoding of 1.
    """
    if frac is None:
        cos, sin, one = cos.astype(x.dtype), sin.astype(x.dtype), None
    elif q:  # a residue mod q (float64 integers): integer cosines, reduced so every product stays exact
        cos, sin = (np.rint(t * 2.0**frac) for t in (cos, sin))
        x, one = np.mod(x, float(q)), 2.0**frac
    else:
        cos, sin = (np.rint(t * 2.0**frac).astype(np.int64).view(np.uint64) for t in (cos, sin))
        one = np.uint64(1 << frac)
    r = cos.shape[-1]
    half = r // 2
    xr = x[..., :r]
    out = xr * cos + np.concatenate([-xr[..., half:], xr[..., :half]], -1) * sin
    if r < x.shape[-1]:
        rest = x[..., r:]
        out = np.concatenate([out, rest if one is None else rest * one], -1)
    return np.mod(out, float(q)) if q else out


def rope(arch: Arch, x: np.ndarray, pos: np.ndarray, block: np.ndarray | None, frac: int | None = None,
         q: int = 0, layer: int | None = None) -> np.ndarray:
    """Rotary embedding of q or k (…, T, hd) in layer ``layer`` (its frequencies: :meth:`Arch.freqs`); ChatGLM
    rotates each half by its own id. ``frac``: on ring words (or, with ``q``, residues mod q), the fractional
    bits of the encoded rotation (the result's scale grows by them)."""
    if arch.pos == "rope":
        f = arch.freqs(layer)
        inv = np.asarray(f, dtype=np.float64) if f else None
        return _rotate(x, *_tables(arch, x.shape[-1], pos, inv), frac, q)
    if arch.pos == "rope2d":
        h = x.shape[-1] // 2
        return np.concatenate([_rotate(x[..., :h], *_tables(arch, h, pos), frac, q),
                               _rotate(x[..., h:], *_tables(arch, h, block), frac, q)], -1)
    return x


def rope_bits(arch: Arch, frac: int) -> int:
    """The fractional bits :func:`rope` adds on ring words (none without rotary positions)."""
    return frac if arch.pos in ("rope", "rope2d") else 0


def prompt_steps(arch: Arch, prompt_len: int, chunk: int) -> int:
    """How many steps a prompt of ``prompt_len`` tokens takes: chunks of ``chunk`` tokens, each attending
    to the cache of the ones before (``chunk`` 0: one step). A bidirectional prompt (ChatGLM) is one step."""
    if chunk < 0:
        raise ValueError(f"prefill chunk must be >= 0, got {chunk}")
    if chunk == 0 or arch.prefix_bidirectional:
        return 1
    return max(1, -(-prompt_len // chunk))


def positions(arch: Arch, prompt_len: int, step: int, chunk: int = 0) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Position ids (and ChatGLM block ids) of the tokens fed at ``step``, and how many are cached before them.

    The prompt takes the first :func:`prompt_steps` steps (a chunk each); then one generated
    token per step. ChatGLM: the prompt has positions 0…c−1 and block 0; the k-th generated
    token keeps the position of the [gMASK] token (the last prompt token here) and has block position k.
    """
    n = prompt_steps(arch, prompt_len, chunk)
    if step < n:
        lo = step * chunk if n > 1 else 0
        pos = np.arange(lo, min(prompt_len, lo + chunk) if n > 1 else prompt_len)
        return pos, (np.zeros(len(pos), dtype=np.int64) if arch.pos == "rope2d" else None), lo
    k = step - n + 1  # the k-th generated token is fed (k >= 1)
    past = prompt_len + k - 1
    if arch.pos == "rope2d":
        return np.array([prompt_len - 1]), np.array([k]), past
    return np.array([past]), None, past


def pass_positions(arch: Arch, prompt_len: int, past: int, T: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Position ids (and ChatGLM block ids) of a verify pass: T generated tokens after ``past`` cached ones
    (positions past … past + T − 1; ChatGLM: the [gMASK] position and block positions k … k + T − 1, the
    k-th generated token first, as :func:`positions` places generated tokens one by one)."""
    if arch.pos == "rope2d":
        k = past - prompt_len + 1
        return np.full(T, prompt_len - 1), np.arange(k, k + T)
    return np.arange(past, past + T), None


def valid_lengths(arch: Arch, T: int, past: int) -> np.ndarray:
    """Per new row, how many keys (a prefix of the cache) it attends to."""
    if arch.prefix_bidirectional and past == 0:
        return np.full(T, T, dtype=np.int64)
    return past + np.arange(1, T + 1, dtype=np.int64)


def window_starts(arch: Arch, layer: int, valid: np.ndarray) -> np.ndarray:
    """Per new row, the first key it attends to in layer ``layer``: 0, or with a sliding window w the row
    attends to keys [valid − w, valid) (transformers: key > query − w)."""
    w = arch.window(layer)
    return np.maximum(valid - w, 0) if w else np.zeros_like(valid)


def shift_rows(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """x (…, T, n) with row t's columns rotated left by ``shift[t]``: entry j is column (j + shift[t]) mod n.

    A public permutation of each share: it moves a row's window [start, end) of keys to the front, so the
    permuted softmax sees it as the row's valid prefix (and nothing of the keys outside it).
    """
    n = x.shape[-1]
    idx = (np.arange(n)[None, :] + np.asarray(shift)[:, None]) % n
    return np.take_along_axis(x, np.broadcast_to(idx, x.shape), -1)

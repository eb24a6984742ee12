"""Architecture description: the one public description of a model all parties use.

An :class:`Arch` holds every dimension and switch (norm, activation, positions and their
RoPE frequencies, sliding windows, residual form, GQA, tied head). With a :class:`ModelWeights` (the model party's
prepared weights) it drives the plaintext reference and the private forward of
all three parties. The description itself is public: the user and the helper
receive it in the setup phase.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

__all__ = ["Arch", "ModelWeights"]


@dataclass(frozen=True)
class Arch:
    """Dimensions and switches of a decoder-only transformer."""

    family: str                 # "llama" | "gpt2" | "chatglm" | "gemma"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    norm: str                   # "rms" | "layer"
    norm_eps: float
    act: str                    # "swiglu" | "geglu_tanh" (gated: gelu_tanh(g)·u) | "gelu" | "gelu_tanh"
    pos: str                    # "rope" | "learned" | "rope2d"
    max_positions: int
    rope_theta: float = 10000.0
    residual: str = "pre"       # "pre": x + f(norm(x)); "alpha": α·norm(x) + f(norm(x)) (ChatGLM)
    prefix_bidirectional: bool = False   # the prompt attends to itself both ways (ChatGLM)
    tied_head: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    eos_ids: tuple[int, ...] = field(default=())
    # RoPE frequencies computed by transformers (scaled RoPE: linear, llama3, YaRN, longrope; partial
    # rotary): the inverse frequency of each rotated pair; the first 2·len dims of a head rotate, the rest
    # pass through. Empty: rope_theta's default over the whole head.
    rope_freqs: tuple[float, ...] = field(default=())
    rope_factor: float = 1.0    # the attention factor on cos and sin (YaRN, longrope): scores scale by its square
    windows: tuple[int, ...] = field(default=())   # per layer: sliding attention window (0: none); empty: none
    # Per layer, its own RoPE inverse frequencies (Gemma 3: local layers rope_local_base_freq, global ones
    # rope_theta); empty: every layer uses rope_freqs.
    layer_freqs: tuple[tuple[float, ...], ...] = field(default=())
    attn_scalar: float = 0.0    # the softmax scale is attn_scalar^-0.5 (Gemma's query_pre_attn_scalar); 0: head_dim
    embed_scale: float = 1.0    # the lookup's rows are scaled by it (Gemma: √hidden); a tied head uses E unscaled
    qk_norm: bool = False       # RMSNorm over head_dim of each q and k head before RoPE, weights L{i}.qn, L{i}.kn
    post_norms: bool = False    # RMSNorm of the attention and MLP outputs before the residual adds (Gemma's sandwich)
    bos_id: int = -1            # the token every prompt starts with (Gemma's <bos>; calibration includes it); -1: none

    def __post_init__(self) -> None:
        checks = {
            "family": self.family in ("llama", "gpt2", "chatglm", "gemma"),
            "norm": self.norm in ("rms", "layer"),
            "act": self.act in ("swiglu", "geglu_tanh", "gelu", "gelu_tanh"),
            "pos": self.pos in ("rope", "learned", "rope2d"),
            "residual": self.residual in ("pre", "alpha"),
            "heads": self.heads > 0 and self.kv_heads > 0 and self.heads % self.kv_heads == 0,
            "dims": min(self.vocab, self.hidden, self.layers, self.head_dim, self.ffn, self.max_positions) > 0,
            "rope_freqs": 2 * len(self.rope_freqs) <= self.head_dim and self.rope_factor > 0,
            "windows": len(self.windows) in (0, self.layers) and all(w >= 0 for w in self.windows),
            "layer_freqs": len(self.layer_freqs) in (0, self.layers)
            and all(2 * len(f) <= self.head_dim for f in self.layer_freqs),
            "scales": self.attn_scalar >= 0 and self.embed_scale > 0,
            "bos_id": -1 <= self.bos_id < self.vocab,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid architecture fields: {', '.join(bad)} ({self})")

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.heads // self.kv_heads

    @property
    def gated(self) -> bool:
        """Whether the MLP is gated (mlp_in is gate‖up, 2·ffn rows): SwiGLU, GeGLU."""
        return self.act in ("swiglu", "geglu_tanh")

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def alpha(self) -> float:
        """ChatGLM's residual scale sqrt(2·layers)."""
        return math.sqrt(2.0 * self.layers)

    @property
    def score_scale(self) -> float:
        """The softmax's scale of q·kᵀ: 1/sqrt(head_dim) (Gemma: 1/sqrt(query_pre_attn_scalar)), times the
        square of RoPE's attention factor (transformers scales both cos and sin by it, so q and k each carry it
        once)."""
        return self.rope_factor ** 2 / math.sqrt(self.attn_scalar or self.head_dim)

    def freqs(self, layer: int | None = None) -> tuple[float, ...]:
        """Layer ``layer``'s RoPE inverse frequencies (empty: rope_theta's default over the whole head)."""
        return self.layer_freqs[layer] if self.layer_freqs and layer is not None else self.rope_freqs

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding attention window (0: it attends to the whole causal prefix)."""
        return self.windows[layer] if self.windows else 0

    def to_dict(self) -> dict:
        """A JSON-ready description; the optional fields at their defaults are left out, so a model without
        them keeps the description (and fingerprint) it had before they existed."""
        d = asdict(self)
        for k in _OPTIONAL:
            if d[k] == _DEFAULTS[k]:
                del d[k]
        return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
                for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        try:
            return cls(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                          for k, v in d.items()})
        except TypeError as e:
            raise ValueError(f"not an architecture description: {e}") from None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_OPTIONAL = ("rope_freqs", "rope_factor", "windows", "layer_freqs", "attn_scalar", "embed_scale", "qk_norm",
             "post_norms", "bos_id")
_DEFAULTS = {f.name: f.default for f in fields(Arch)}


@dataclass
class ModelWeights:
    """The model party's prepared weights, in canonical names (norm affines folded).

    Names: ``embed`` (vocab × hidden); ``pos_embed`` (learned positions);
    per layer ``L{i}.qkv``, ``L{i}.o``, ``L{i}.mlp_in`` (gate‖up or fc), ``L{i}.mlp_out``,
    for ChatGLM ``L{i}.res_in``/``L{i}.res_post`` (diagonal: α·γ), for Gemma ``L{i}.qn``/``L{i}.kn`` (the
    QK-norms' 1 + w over head_dim) and ``L{i}.post_attn``/``L{i}.post_ff`` (the sandwich norms' 1 + w, all
    diagonal); ``final`` (diagonal
    γ of the final norm when the head is tied) and ``head`` (untied head). Biases are
    ``<name>.b``. Dense weights are out × in.
    """

    arch: Arch
    tensors: dict[str, np.ndarray]

    def get(self, name: str) -> np.ndarray | None:
        return self.tensors.get(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def digest(self) -> str:
        """A hash of the weights (M-side identity of the model file)."""
        h = hashlib.sha256(self.arch.fingerprint().encode())
        for k in sorted(self.tensors):
            a = np.ascontiguousarray(self.tensors[k])
            h.update(k.encode())
            h.update(a[: min(len(a), 64)].tobytes() if a.ndim else a.tobytes())
        return h.hexdigest()[:16]

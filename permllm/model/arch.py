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

    family: str                 # "llama" | "gpt2" | "chatglm"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    norm: str                   # "rms" | "layer"
    norm_eps: float
    act: str                    # "swiglu" | "gelu" | "gelu_tanh"
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

    def __post_init__(self) -> None:
        checks = {
            "family": self.family in ("llama", "gpt2", "chatglm"),
            "norm": self.norm in ("rms", "layer"),
            "act": self.act in ("swiglu", "gelu", "gelu_tanh"),
            "pos": self.pos in ("rope", "learned", "rope2d"),
            "residual": self.residual in ("pre", "alpha"),
            "heads": self.heads > 0 and self.kv_heads > 0 and self.heads % self.kv_heads == 0,
            "dims": min(self.vocab, self.hidden, self.layers, self.head_dim, self.ffn, self.max_positions) > 0,
            "rope_freqs": 2 * len(self.rope_freqs) <= self.head_dim and self.rope_factor > 0,
            "windows": len(self.windows) in (0, self.layers) and all(w >= 0 for w in self.windows),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid architecture fields: {', '.join(bad)} ({self})")

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.heads // self.kv_heads

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def alpha(self) -> float:
        """ChatGLM's residual scale sqrt(2·layers)."""
        return math.sqrt(2.0 * self.layers)

    @property
    def score_scale(self) -> float:
        """The softmax's scale of q·kᵀ: 1/sqrt(head_dim), times the square of RoPE's attention factor
        (transformers scales both cos and sin by it, so q and k each carry it once)."""
        return self.rope_factor ** 2 / math.sqrt(self.head_dim)

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
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except TypeError as e:
            raise ValueError(f"not an architecture description: {e}") from None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_OPTIONAL = ("rope_freqs", "rope_factor", "windows")
_DEFAULTS = {f.name: f.default for f in fields(Arch)}


@dataclass
class ModelWeights:
    """The model party's prepared weights, in canonical names (norm affines folded).

    Names: ``embed`` (vocab × hidden); ``pos_embed`` (learned positions);
    per layer ``L{i}.qkv``, ``L{i}.o``, ``L{i}.mlp_in`` (gate‖up or fc), ``L{i}.mlp_out``,
    for ChatGLM ``L{i}.res_in``/``L{i}.res_post`` (diagonal: α·γ); ``final`` (diagonal
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

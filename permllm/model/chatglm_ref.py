"""Independent plaintext reference of THUDM's ChatGLM-6B, used to check the private forward.

A direct, single-sequence transcription of THUDM's ``modeling_chatglm.py`` (ChatGLM-6B, GLM
architecture) with random weights, since real weights cannot be downloaded here. It deliberately
imports nothing from ``permllm.model`` or ``permllm.protocols`` so that it can serve as the
independent ground truth for the secret-shared forward.

Per layer (DeepNorm-style residuals on the LayerNorm *outputs*, alpha = sqrt(2 * num_layers))::

    a  = LN_in(h);    h' = alpha * a + Attn(a)
    m  = LN_post(h'); out = alpha * m + MLP(m)

Attention uses one fused QKV linear whose output is viewed per head as ``[q | k | v]``
(``(seq, heads, 3 * head_dim)``), 2-D rotary embeddings (first half of each head's q/k rotated
with the position id, second half with the block position id), scores scaled by
``1 / sqrt(head_dim)`` and a softmax in at least float32. THUDM's ``query_key_layer_scaling``
(divide q by ``layer_id + 1`` and multiply the scores back before the softmax) is omitted: it is
the identity up to rounding. THUDM fills masked scores with -10000 before the softmax; here they
are set to -inf, which gives the same probabilities (exactly 0) for any sane score range.

Sequence layout (see :meth:`ChatGLMRef.positions`): prompt tokens ``0..c-1`` have position ids
``0..c-1`` and block position 0 and attend to each other bidirectionally; generated tokens keep
the position id of the [gMASK] token (``mask_pos``), get block positions ``1, 2, ...`` and attend
causally (to the whole prompt, earlier generated tokens and themselves).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer ``(keys, values)``, each ``(tokens_so_far, num_heads, head_dim)``; keys are rotated."""

ROPE_BASE = 10000.0


@dataclass(frozen=True)
class ChatGLMConfig:
    """Shape hyper-parameters of ChatGLM-6B (defaults are the full model)."""

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 32
    ffn_hidden_size: int | None = None
    layernorm_eps: float = 1e-5
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.head_dim % 4:
            raise ValueError("head_dim must be a multiple of 4 (two rotary halves of even size)")

    @property
    def head_dim(self) -> int:
        """Per-head width (128 at full size)."""
        return self.hidden_size // self.num_heads

    @property
    def ffn(self) -> int:
        """MLP inner width (4 * hidden unless set)."""
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def alpha(self) -> float:
        """Residual scale sqrt(2 * num_layers)."""
        return math.sqrt(2 * self.num_layers)

    @classmethod
    def full(cls) -> ChatGLMConfig:
        """ChatGLM-6B as published: 28 layers, hidden 4096, 32 heads, vocab 130528."""
        return cls()

    @classmethod
    def reduced(cls) -> ChatGLMConfig:
        """A tiny model with the same structure, for fast tests (head_dim 16)."""
        return cls(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, max_positions=64)


def layer_param_shapes(cfg: ChatGLMConfig, i: int) -> dict[str, tuple[int, ...]]:
    """THUDM parameter names and shapes of layer ``i``."""
    h, f, p = cfg.hidden_size, cfg.ffn, f"transformer.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
        p + "attention.query_key_value.weight": (3 * h, h), p + "attention.query_key_value.bias": (3 * h,),
        p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
        p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
        p + "mlp.dense_h_to_4h.weight": (f, h), p + "mlp.dense_h_to_4h.bias": (f,),
        p + "mlp.dense_4h_to_h.weight": (h, f), p + "mlp.dense_4h_to_h.bias": (h,),
    }


def param_shapes(cfg: ChatGLMConfig) -> dict[str, tuple[int, ...]]:
    """All THUDM parameter names and shapes (the LM head is tied to the word embeddings)."""
    shapes: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        shapes.update(layer_param_shapes(cfg, i))
    shapes["transformer.final_layernorm.weight"] = (cfg.hidden_size,)
    shapes["transformer.final_layernorm.bias"] = (cfg.hidden_size,)
    return shapes


def init_weights(cfg: ChatGLMConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Random weights under THUDM's names that keep activations sane over many layers.

    Linear weights and embeddings ~ N(0, 0.02^2); biases and LayerNorm biases ~ N(0, 0.01^2);
    LayerNorm weights 1 + N(0, 0.01^2). Each tensor is drawn in float32 from its own generator
    (seeded by ``seed`` and the tensor's name) and then cast to ``dtype``, so a float64 model is an
    exact upcast of the float32 one and a partial init equals the same tensors of a full init.

    ``layers``: if given, only those layers' parameters are made (no embeddings, no final
    LayerNorm) -- for checking full-size shapes without materialising the whole 6B model.
    """
    if layers is None:
        shapes = param_shapes(cfg)
    else:
        shapes = {}
        for i in layers:
            if not 0 <= i < cfg.num_layers:
                raise ValueError(f"layer {i} out of range for {cfg.num_layers} layers")
            shapes.update(layer_param_shapes(cfg, i))
    return {name: init_tensor(name, shape, seed).to(dtype) for name, shape in shapes.items()}


def init_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The float32 tensor ``name`` of :func:`init_weights` (its own generator): one tensor of a full init without
    the others, e.g. the word embeddings for a benchmark of one layer's edges."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))  # CPU seeds are 32-bit
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if "layernorm.weight" in name:
        return 1.0 + 0.01 * noise
    if name.endswith(".bias"):
        return 0.01 * noise
    return 0.02 * noise


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """THUDM's GeLU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def rotary_tables(rot_dim: int, n_positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(n_positions, rot_dim)``, as THUDM's RotaryEmbedding over ``rot_dim`` dims.

    ``inv_freq = 1 / 10000^(arange(0, rot_dim, 2) / rot_dim)``, angles ``t * inv_freq`` duplicated
    as ``cat(freqs, freqs)``. ``rot_dim`` is head_dim / 2 for ChatGLM's 2-D RoPE.
    """
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, rot_dim, 2, dtype=dtype) / rot_dim)
    freqs = torch.outer(torch.arange(n_positions, dtype=dtype), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(seq, heads, rot_dim)`` by per-token positions ``pos`` ``(seq,)``."""
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    return x * c + rotate_half(x) * s


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    position_ids: torch.Tensor, block_position_ids: torch.Tensor) -> torch.Tensor:
    """ChatGLM 2-D RoPE of q or k ``(seq, heads, head_dim)``: first half by position, second by block position."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((apply_rotary(x1, cos, sin, position_ids), apply_rotary(x2, cos, sin, block_position_ids)), -1)


def split_qkv(mixed: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused QKV output ``(seq, 3 * hidden)`` -> q, k, v ``(seq, heads, head_dim)``.

    THUDM's layout: view as ``(seq, heads, 3 * head_dim)`` and split the last dim into q | k | v,
    i.e. head ``n``'s q is columns ``[3 n d, 3 n d + d)`` of the fused output.
    """
    seq = mixed.shape[0]
    per_head = mixed.view(seq, num_heads, -1)
    return per_head.chunk(3, dim=-1)


def _ids(x: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t


class ChatGLMRef:
    """Plaintext ChatGLM-6B forward for one sequence, with a KV cache; computes in the weights' dtype."""

    def __init__(self, cfg: ChatGLMConfig, weights: dict[str, torch.Tensor]) -> None:
        for name, shape in param_shapes(cfg).items():
            if name not in weights:
                raise KeyError(f"missing weight {name}")
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(weights[name].shape)}, expected {shape}")
        self.dtype = weights["transformer.word_embeddings.weight"].dtype
        if any(weights[n].dtype != self.dtype for n in param_shapes(cfg)):
            raise ValueError("all weights must share one dtype")
        self.cfg = cfg
        self.w = weights
        self.cos, self.sin = rotary_tables(cfg.head_dim // 2, cfg.max_positions, self.dtype)
        # Softmax in at least float32 (THUDM upcasts half-precision scores).
        self.softmax_dtype = torch.promote_types(self.dtype, torch.float32)

    def positions(self, prompt_len: int, n_generated: int, mask_pos: int | None = None) -> tuple[list[int], list[int]]:
        """(position ids, block position ids) for ``prompt_len`` prompt tokens then ``n_generated`` new ones.

        Prompt: positions ``0..c-1``, block 0. Generated token ``j``: position ``mask_pos``
        (default ``c - 1``, the [gMASK] token), block ``j + 1``.
        """
        if prompt_len < 1 or n_generated < 0:
            raise ValueError("need prompt_len >= 1 and n_generated >= 0")
        mask_pos = prompt_len - 1 if mask_pos is None else mask_pos
        if not 0 <= mask_pos < prompt_len:
            raise ValueError(f"mask_pos {mask_pos} outside the prompt [0, {prompt_len})")
        pos = list(range(prompt_len)) + [mask_pos] * n_generated
        block = [0] * prompt_len + list(range(1, n_generated + 1))
        return pos, block

    def forward(self, input_ids: Sequence[int] | torch.Tensor, position_ids: Sequence[int] | torch.Tensor,
                block_position_ids: Sequence[int] | torch.Tensor, past: KVCache | None,
                prompt_len: int) -> tuple[torch.Tensor, KVCache]:
        """Logits ``(seq, vocab)`` for each input token and the extended KV cache.

        The tokens continue ``past`` (absolute indices from the cached length on). Key ``j`` is visible to
        query ``i`` iff ``j < prompt_len`` (bidirectional prompt) or ``j <= i`` (causal). The whole
        prompt must be in one call (prefill, ``past`` None); after that, any number of tokens may
        follow per call (decode is one). ``past`` is not modified.
        """
        cfg = self.cfg
        ids = _ids(input_ids, "input_ids")
        pos = _ids(position_ids, "position_ids")
        block = _ids(block_position_ids, "block_position_ids")
        seq = ids.shape[0]
        if seq == 0 or pos.shape[0] != seq or block.shape[0] != seq:
            raise ValueError("input_ids, position_ids and block_position_ids must have the same non-zero length")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError("token id out of vocabulary")
        for name, t in (("position", pos), ("block position", block)):
            if int(t.min()) < 0 or int(t.max()) >= cfg.max_positions:
                raise ValueError(f"{name} ids must lie in [0, {cfg.max_positions})")
        past_len = 0 if past is None else past[0][0].shape[0]
        if past is not None and len(past) != cfg.num_layers:
            raise ValueError(f"past has {len(past)} layers, expected {cfg.num_layers}")
        if prompt_len < 1 or not (past_len == 0 and seq >= prompt_len or past_len >= prompt_len):
            raise ValueError("the whole prompt must be given in the first (prefill) call")

        q_idx = torch.arange(past_len, past_len + seq).unsqueeze(1)
        k_idx = torch.arange(past_len + seq).unsqueeze(0)
        visible = (k_idx < prompt_len) | (k_idx <= q_idx)  # (seq, past_len + seq)

        h = self.w["transformer.word_embeddings.weight"][ids]
        present: KVCache = []
        for i in range(cfg.num_layers):
            h, kv = self._layer(i, h, pos, block, None if past is None else past[i], visible)
            present.append(kv)
        h = F.layer_norm(h, (cfg.hidden_size,), self.w["transformer.final_layernorm.weight"],
                         self.w["transformer.final_layernorm.bias"], cfg.layernorm_eps)
        return h @ self.w["transformer.word_embeddings.weight"].T, present

    def _layer(self, i: int, h: torch.Tensor, pos: torch.Tensor, block: torch.Tensor,
               past: tuple[torch.Tensor, torch.Tensor] | None,
               visible: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One GLM block on ``h`` ``(seq, hidden)``; returns its output and the layer's (keys, values)."""
        cfg, w, p = self.cfg, self.w, f"transformer.layers.{i}."
        ln = (cfg.hidden_size,)
        a = F.layer_norm(h, ln, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], cfg.layernorm_eps)
        mixed = F.linear(a, w[p + "attention.query_key_value.weight"], w[p + "attention.query_key_value.bias"])
        q, k, v = split_qkv(mixed, cfg.num_heads)
        q = apply_rotary_2d(q, self.cos, self.sin, pos, block)
        k = apply_rotary_2d(k, self.cos, self.sin, pos, block)
        if past is not None:
            k, v = torch.cat((past[0], k)), torch.cat((past[1], v))
        scores = torch.einsum("qhd,khd->hqk", q, k).to(self.softmax_dtype) / math.sqrt(cfg.head_dim)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(self.dtype)
        ctx = torch.einsum("hqk,khd->qhd", probs, v).reshape(h.shape[0], cfg.hidden_size)
        attn = F.linear(ctx, w[p + "attention.dense.weight"], w[p + "attention.dense.bias"])
        h2 = cfg.alpha * a + attn
        m = F.layer_norm(h2, ln, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"],
                         cfg.layernorm_eps)
        inner = gelu_tanh(F.linear(m, w[p + "mlp.dense_h_to_4h.weight"], w[p + "mlp.dense_h_to_4h.bias"]))
        out = cfg.alpha * m + F.linear(inner, w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"])
        return out, (k, v)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, mask_pos: int | None = None) -> list[int]:
        """Greedy decoding (prefill, then one token per step with the KV cache); returns the new ids.

        No end-of-sequence stop: exactly ``max_new_tokens`` tokens are produced.
        """
        c = len(prompt_ids)
        pos, block = self.positions(c, max_new_tokens, mask_pos)
        if max_new_tokens == 0:
            return []
        logits, past = self.forward(prompt_ids, pos[:c], block[:c], None, c)
        new: list[int] = []
        for j in range(max_new_tokens):
            if j:
                logits, past = self.forward([new[-1]], pos[c + j - 1:c + j], block[c + j - 1:c + j], past, c)
            new.append(int(logits[-1].argmax()))
        return new

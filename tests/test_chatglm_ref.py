"""The plaintext ChatGLM-6B reference: KV cache, masks, 2-D RoPE, THUDM layout and shapes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from permllm.model.chatglm_ref import (ChatGLMConfig, ChatGLMRef, apply_rotary_2d, init_weights, layer_param_shapes,
                                       rotary_tables, split_qkv)

CFG = ChatGLMConfig.reduced()
PROMPT = [5, 17, 42, 99, 123, 250, 7]


def make(dtype: torch.dtype = torch.float64, seed: int = 0) -> ChatGLMRef:
    return ChatGLMRef(CFG, init_weights(CFG, seed=seed, dtype=dtype))


def full_logits(model: ChatGLMRef, ids: list[int], prompt_len: int, mask_pos: int | None = None) -> torch.Tensor:
    """Logits of the whole sequence recomputed from scratch (no cache)."""
    pos, block = model.positions(prompt_len, len(ids) - prompt_len, mask_pos)
    return model.forward(ids, pos, block, None, prompt_len)[0]


def rope_elementwise(x: torch.Tensor, p: int, b: int) -> torch.Tensor:
    """Per-element 2-D RoPE of one head vector: pairs (i, i + d/4) in each half, angle t * 10000^(-2i/(d/2))."""
    d = x.shape[0]
    d2, d4 = d // 2, d // 4
    out = torch.empty_like(x)
    for half, t in ((0, p), (1, b)):
        o = half * d2
        for i in range(d4):
            ang = t * 10000.0 ** (-(2 * i) / d2)
            x1, x2 = x[o + i], x[o + d4 + i]
            out[o + i] = x1 * math.cos(ang) - x2 * math.sin(ang)
            out[o + d4 + i] = x2 * math.cos(ang) + x1 * math.sin(ang)
    return out


def thudm_style_logits(cfg: ChatGLMConfig, w: dict[str, torch.Tensor], ids: list[int], context_length: int,
                       mask_position: int) -> torch.Tensor:
    """A line-by-line transcription of THUDM's forward ([seq, batch, heads, head_dim] layout,
    get_masks / get_position_ids, query_key_layer_scaling, masked_fill(-10000), baddbmm)."""
    seq_length, hn, np_ = len(ids), cfg.head_dim, cfg.num_heads
    attention_mask = torch.ones((1, seq_length, seq_length))
    attention_mask.tril_()
    attention_mask[..., :context_length] = 1
    attention_mask = (attention_mask.unsqueeze(1) < 0.5).bool()
    position_ids = torch.arange(seq_length).unsqueeze(0)
    position_ids[0, context_length:] = mask_position
    block_position_ids = torch.cat((torch.zeros(context_length, dtype=torch.long),
                                    torch.arange(seq_length - context_length) + 1)).unsqueeze(0)
    position_ids = torch.stack((position_ids, block_position_ids), dim=1)

    dtype = w["transformer.word_embeddings.weight"].dtype
    rot = hn // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).to(dtype) / rot))
    freqs = torch.einsum("i,j->ij", torch.arange(int(position_ids.max()) + 1, dtype=dtype), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

    def rotate_half(x):
        x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=x1.ndim - 1)

    def apply_rotary_pos_emb_index(q, k, cos, sin, position_id):
        cos = F.embedding(position_id, cos.squeeze(1)).unsqueeze(2)
        sin = F.embedding(position_id, sin.squeeze(1)).unsqueeze(2)
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)

    def ln(x, name):
        return F.layer_norm(x, (cfg.hidden_size,), w[name + ".weight"], w[name + ".bias"], cfg.layernorm_eps)

    def lin(x, name):
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    hidden_states = w["transformer.word_embeddings.weight"][torch.tensor([ids])].transpose(0, 1)  # [s, b, h]
    alpha = (2 * cfg.num_layers) ** 0.5
    for layer_id in range(cfg.num_layers):
        p = f"transformer.layers.{layer_id}."
        attention_input = ln(hidden_states, p + "input_layernorm")
        mixed_raw_layer = lin(attention_input, p + "attention.query_key_value")
        mixed_raw_layer = mixed_raw_layer.view(*mixed_raw_layer.size()[:-1], np_, 3 * hn)
        query_layer, key_layer, value_layer = torch.split(mixed_raw_layer, hn, dim=-1)
        q1, q2 = query_layer.chunk(2, dim=(query_layer.ndim - 1))
        k1, k2 = key_layer.chunk(2, dim=(key_layer.ndim - 1))
        pids = position_ids[:, 0, :].transpose(0, 1).contiguous()
        bids = position_ids[:, 1, :].transpose(0, 1).contiguous()
        q1, k1 = apply_rotary_pos_emb_index(q1, k1, cos, sin, pids)
        q2, k2 = apply_rotary_pos_emb_index(q2, k2, cos, sin, bids)
        query_layer, key_layer = torch.concat([q1, q2], dim=-1), torch.concat([k1, k2], dim=-1)
        # attention_fn
        coeff = float(layer_id + 1)
        query_layer = query_layer / (math.sqrt(hn) * coeff)
        sq, b, sk = query_layer.size(0), query_layer.size(1), key_layer.size(0)
        q_ = query_layer.view(sq, b * np_, -1)
        k_ = key_layer.view(sk, b * np_, -1)
        matmul_result = torch.baddbmm(torch.zeros(b * np_, sq, sk, dtype=dtype), q_.transpose(0, 1),
                                      k_.transpose(0, 1).transpose(1, 2), beta=0.0, alpha=1.0)
        attention_scores = matmul_result.view(b, np_, sq, sk)
        attention_scores.masked_fill_(attention_mask, -10000.0)
        attention_scores = attention_scores.to(torch.promote_types(dtype, torch.float32)) * coeff
        attention_probs = F.softmax(attention_scores, dim=-1).to(dtype)
        v_ = value_layer.view(sk, b * np_, -1)
        context_layer = torch.bmm(attention_probs.view(b * np_, sq, -1), v_.transpose(0, 1))
        context_layer = context_layer.view(b, np_, sq, hn).permute(2, 0, 1, 3).contiguous().view(sq, b, -1)
        hidden_states = attention_input * alpha + lin(context_layer, p + "attention.dense")
        mlp_input = ln(hidden_states, p + "post_attention_layernorm")
        x = lin(mlp_input, p + "mlp.dense_h_to_4h")
        x = 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))
        hidden_states = mlp_input * alpha + lin(x, p + "mlp.dense_4h_to_h")
    hidden_states = ln(hidden_states, "transformer.final_layernorm")
    return F.linear(hidden_states, w["transformer.word_embeddings.weight"]).permute(1, 0, 2)[0]


def test_config_shapes():
    full = ChatGLMConfig.full()
    assert (full.head_dim, full.ffn, full.num_layers, full.vocab_size) == (128, 16384, 28, 130528)
    assert full.alpha == pytest.approx(math.sqrt(56))
    assert CFG.head_dim == 16 and CFG.ffn == 256 and CFG.alpha == pytest.approx(2.0)


def test_init_one_full_size_layer():
    full = ChatGLMConfig.full()
    w = init_weights(full, layers=range(1))
    assert {k: tuple(v.shape) for k, v in w.items()} == layer_param_shapes(full, 0)
    assert w["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * 4096, 4096)
    assert w["transformer.layers.0.mlp.dense_4h_to_h.weight"].shape == (4096, 16384)
    assert all(v.dtype == torch.float32 for v in w.values())
    assert "transformer.word_embeddings.weight" not in w
    assert float(w["transformer.layers.0.mlp.dense_h_to_4h.weight"].std()) == pytest.approx(0.02, rel=0.01)


def test_partial_init_matches_full_init_and_dtypes_agree():
    w32, w64 = init_weights(CFG), init_weights(CFG, dtype=torch.float64)
    part = init_weights(CFG, layers=[1])
    assert part.keys() == layer_param_shapes(CFG, 1).keys()
    assert all(torch.equal(part[k], w32[k]) for k in part)
    assert all(torch.equal(w64[k], w32[k].double()) for k in w32)
    assert not torch.equal(init_weights(CFG, seed=1)["transformer.word_embeddings.weight"],
                           w32["transformer.word_embeddings.weight"])


def test_qkv_layout_is_per_head():
    h, d = CFG.hidden_size, CFG.head_dim
    mixed = torch.arange(3 * h, dtype=torch.float64).repeat(2, 1)
    q, k, v = split_qkv(mixed, CFG.num_heads)
    for n in range(CFG.num_heads):
        assert torch.equal(q[1, n], mixed[1, 3 * n * d:3 * n * d + d])
        assert torch.equal(k[1, n], mixed[1, 3 * n * d + d:3 * n * d + 2 * d])
        assert torch.equal(v[1, n], mixed[1, 3 * n * d + 2 * d:3 * n * d + 3 * d])


def test_matches_thudm_transcription():
    model = make(torch.float64)
    ids = PROMPT + [11, 3, 200]
    for mask_pos in (len(PROMPT) - 1, 2):
        want = thudm_style_logits(CFG, model.w, ids, len(PROMPT), mask_pos)
        got = full_logits(model, ids, len(PROMPT), mask_pos)
        assert torch.allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("mask_pos", [None, 3])
def test_kv_cache_matches_recompute(dtype, tol, mask_pos):
    model = make(dtype)
    c, n = len(PROMPT), 6
    new = model.generate(PROMPT, n, mask_pos)
    pos, block = model.positions(c, n, mask_pos)
    logits, past = model.forward(PROMPT, pos[:c], block[:c], None, c)
    rows = [logits]
    for j in range(n - 1):
        step, past = model.forward([new[j]], pos[c + j:c + j + 1], block[c + j:c + j + 1], past, c)
        rows.append(step)
        assert past[0][0].shape == (c + j + 1, CFG.num_heads, CFG.head_dim)
        # Recompute everything seen so far from scratch, same masks and positions.
        ref = full_logits(model, PROMPT + new[:j + 1], c, mask_pos)
        assert (torch.cat(rows) - ref).abs().max() < tol
    assert [int(r[-1].argmax()) for r in rows] == new


def test_prompt_is_bidirectional():
    model = make()
    changed = PROMPT[:-1] + [PROMPT[-1] + 1]
    a, b = full_logits(model, PROMPT, len(PROMPT)), full_logits(model, changed, len(PROMPT))
    assert (a[0] - b[0]).abs().max() > 1e-6  # a later prompt token reaches the first position


def test_generated_tokens_are_causal():
    model = make()
    c = len(PROMPT)
    ids = PROMPT + [11, 3, 200, 42]
    changed = ids.copy()
    changed[c + 1] = 77
    a, b = full_logits(model, ids, c), full_logits(model, changed, c)
    assert torch.allclose(a[:c + 1], b[:c + 1], rtol=0, atol=1e-12)  # nothing before it moves
    assert (a[c + 1:] - b[c + 1:]).abs().amax(dim=-1).min() > 1e-6  # itself and everything after do


def test_mask_pos_only_affects_generated_tokens():
    model = make()
    c = len(PROMPT)
    ids = PROMPT + [11, 3]
    a, b = full_logits(model, ids, c), full_logits(model, ids, c, mask_pos=1)
    assert torch.allclose(a[:c], b[:c], rtol=0, atol=1e-12)
    assert (a[c:] - b[c:]).abs().amax(dim=-1).min() > 1e-6


def test_positions():
    model = make()
    assert model.positions(4, 3) == ([0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3])
    assert model.positions(4, 2, mask_pos=1) == ([0, 1, 2, 3, 1, 1], [0, 0, 0, 0, 1, 2])
    with pytest.raises(ValueError):
        model.positions(4, 2, mask_pos=4)


def test_rope_2d_matches_elementwise_formula():
    d = CFG.head_dim
    cos, sin = rotary_tables(d // 2, CFG.max_positions, torch.float64)
    x = torch.randn(3, 2, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pos, block = torch.tensor([0, 5, 5]), torch.tensor([0, 1, 2])
    got = apply_rotary_2d(x, cos, sin, pos, block)
    for s in range(3):
        for hd in range(2):
            assert torch.allclose(got[s, hd], rope_elementwise(x[s, hd], int(pos[s]), int(block[s])), atol=1e-12)
    # The halves rotate independently: scores depend only on position and block-position differences.
    q, k = x[0:1], x[1:2]

    def score(pq, bq, pk, bk):
        rq = apply_rotary_2d(q, cos, sin, torch.tensor([pq]), torch.tensor([bq]))
        rk = apply_rotary_2d(k, cos, sin, torch.tensor([pk]), torch.tensor([bk]))
        return (rq * rk).sum(-1)

    assert torch.allclose(score(9, 2, 4, 0), score(19, 7, 14, 5), atol=1e-12)
    assert not torch.allclose(score(9, 2, 4, 0), score(9, 3, 4, 0), atol=1e-6)


def test_cached_key_of_generated_token_uses_mask_and_block_position():
    model = make()
    c, mask_pos, n = len(PROMPT), 2, 3
    new = model.generate(PROMPT, n, mask_pos)
    pos, block = model.positions(c, n, mask_pos)
    ids = PROMPT + new
    _, past = model.forward(ids, pos, block, None, c)
    w, d, p = model.w, CFG.head_dim, "transformer.layers.0."
    j = 1  # second generated token: position mask_pos, block position 2
    a = F.layer_norm(w["transformer.word_embeddings.weight"][ids[c + j]], (CFG.hidden_size,),
                     w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], CFG.layernorm_eps)
    mixed = w[p + "attention.query_key_value.weight"] @ a + w[p + "attention.query_key_value.bias"]
    for head in range(CFG.num_heads):
        raw_k = mixed[3 * head * d + d:3 * head * d + 2 * d]
        raw_v = mixed[3 * head * d + 2 * d:3 * head * d + 3 * d]
        assert torch.allclose(past[0][0][c + j, head], rope_elementwise(raw_k, mask_pos, j + 1), atol=1e-12)
        assert torch.allclose(past[0][1][c + j, head], raw_v, atol=1e-12)


def test_generate_is_deterministic():
    a = make(torch.float32).generate(PROMPT, 5)
    assert a == make(torch.float32).generate(PROMPT, 5) == make(torch.float32).generate(PROMPT, 5)
    assert len(a) == 5 and all(0 <= t < CFG.vocab_size for t in a)
    assert make(torch.float32).generate(PROMPT, 0) == []


def test_rejects_split_prompt_and_bad_ids():
    model = make()
    pos, block = model.positions(len(PROMPT), 0)
    with pytest.raises(ValueError):
        model.forward(PROMPT[:3], pos[:3], block[:3], None, len(PROMPT))
    with pytest.raises(ValueError):
        model.forward([CFG.vocab_size], [0], [0], None, 1)
    with pytest.raises(ValueError):
        model.forward([1], [CFG.max_positions], [0], None, 1)

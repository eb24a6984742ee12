"""Gemma 3 text models through transformers' own config and weights: (1 + w) RMSNorms, the √hidden
embedding scale, query_pre_attn_scalar, per-head QK-norm, the sandwich norms, GeGLU (tanh), interleaved
local (sliding-window) and global layers with their own RoPE bases; and Gemma 3 270M's real weights.

Private greedy generation (all three parties in this process, ring arithmetic) must give exactly
transformers' greedy ids.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import permllm
from permllm.model import Arch, ModelFileError, from_transformers, load_model
from permllm.model.forward import plan_route, weight_names, wide_weights
from permllm.protocols import ShareConfig

from .test_families import _NO_TOKENS, _save, PROMPT, NEW
from .test_generation import hf_greedy


def _gemma3_config(**kw):
    from transformers import Gemma3TextConfig
    # Odd query heads over one kv head (GQA), a window of 4 under a 9-token prompt, local/global layers with
    # their own RoPE bases, query_pre_attn_scalar ≠ head_dim.
    base = dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=64,
                rope_theta=1000.0, rope_local_base_freq=50.0)
    return Gemma3TextConfig(**{**base, **kw}, **_NO_TOKENS)


@pytest.mark.parametrize("route", ["12", "8"])
async def test_gemma3_matches_transformers(tmp_path, route):
    from transformers import Gemma3ForCausalLM
    d, m = _save(tmp_path, Gemma3ForCausalLM, _gemma3_config(), seed=5)
    lm = load_model(str(d))
    a = lm.arch
    assert a.family == "gemma" and a.act == "geglu_tanh" and a.qk_norm and a.post_norms and a.tied_head
    assert a.windows == (4, 0, 4) and a.attn_scalar == 24.0 and a.embed_scale == pytest.approx(48 ** 0.5)
    assert a.layer_freqs[0] == a.layer_freqs[2] != a.layer_freqs[1]
    np.testing.assert_allclose(a.layer_freqs[1], 1.0 / 1000.0 ** (np.arange(0, 16, 2) / 16), rtol=1e-6)
    # QK-norm keeps the fused op away: route 8 sets up what route 12 does (no wide ring, no masked qkv bias)
    assert plan_route(a, route) == "12" and weight_names(a, route) == weight_names(a, "12")
    assert wide_weights(a, route) == wide_weights(a, "12")
    async with await permllm.local(lm, config=ShareConfig(route=route)) as s:
        assert all(p.ring for p in (s.trio.user, s.trio.model, s.trio.helper))
        got = [t async for t in s.generate_ids(PROMPT, NEW)]
    assert got == hf_greedy(m, PROMPT, NEW)


def test_gemma3_unsupported_variants_are_refused():
    from transformers import Gemma3ForCausalLM
    for kw, msg in [(dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
                    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
                    (dict(hidden_activation="silu"), "activation 'silu'")]:
        with pytest.raises(ModelFileError, match=msg):
            from_transformers(Gemma3ForCausalLM(_gemma3_config(num_hidden_layers=1, layer_types=None, **kw)))


def test_gemma_arch_fields_round_trip():
    base = dict(family="llama", vocab=10, hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, ffn=8, norm="rms",
                norm_eps=1e-6, act="swiglu", pos="rope", max_positions=16)
    old = Arch(**base)
    for k in ("layer_freqs", "attn_scalar", "embed_scale", "qk_norm", "post_norms"):
        assert k not in old.to_dict()  # fingerprints of the other families kept
    new = Arch(**{**base, "family": "gemma", "act": "geglu_tanh"}, layer_freqs=((1.0, 0.5), (1.0, 0.1)),
               attn_scalar=6.0, embed_scale=2.5, qk_norm=True, post_norms=True)
    back = Arch.from_dict(json.loads(json.dumps(new.to_dict())))
    assert back == new and back.fingerprint() == new.fingerprint()
    assert new.freqs(1) == (1.0, 0.1) and new.score_scale == pytest.approx(6.0 ** -0.5)
    with pytest.raises(ValueError, match="layer_freqs"):
        Arch(**base, layer_freqs=((1.0,),))


GEMMA_PROMPTS = ["The capital of France is", "def fibonacci(n):"]  # a base model: raw text
GEMMA_NEW = 8


async def test_gemma3_270m_real_weights_match_transformers():
    """Gemma 3 270M (Q4_K_M GGUF, dequantized by transformers' GGUF loader) on the default route and ring plan:
    the private greedy ids are transformers' on the same converted model, for two raw-text prompts."""
    import gc

    from transformers import AutoModelForCausalLM

    from permllm.model.loaders import gemma3_dir
    hf = AutoModelForCausalLM.from_pretrained(gemma3_dir(), dtype=torch.float32).eval()
    lm = load_model("gemma3-270m")
    a = lm.arch
    assert (a.family, a.vocab, a.layers, a.heads, a.kv_heads, a.head_dim) == ("gemma", 262144, 18, 4, 1, 256)
    assert a.windows == tuple(0 if i % 6 == 5 else 512 for i in range(18)) and a.attn_scalar == 256.0
    prompts = [lm.tokenizer(p).input_ids for p in GEMMA_PROMPTS]
    assert all(ids[0] == a.bos_id == 2 for ids in prompts)
    want = [hf_greedy(hf, ids, GEMMA_NEW) for ids in prompts]
    del hf  # three parties in this process hold the 262,144 × 640 head and table each: free what is not needed
    gc.collect()
    async with await permllm.local(lm) as s:  # the default configuration (route 8, set up as route 12: QK-norm)
        assert all(p.ring for p in (s.trio.user, s.trio.model, s.trio.helper))
        got = [[t async for t in s.generate_ids(ids, GEMMA_NEW)] for ids in prompts]
    assert got == want

"""The LLaMA-structured families through transformers' configs: Qwen2, LLaMA 3.x RoPE scalings,
Mistral's sliding window, Phi-3's fused projections and partial rotary.

Each random model is built by transformers, saved with ``save_pretrained`` and loaded from its
directory; private greedy generation (all three parties in this process) must give exactly
transformers' greedy ids. Shapes: odd head counts, GQA, tied and untied heads.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import permllm
from permllm.model import Arch, ModelFileError, from_transformers, load_model
from permllm.model.layout import rope, shift_rows, window_starts
from permllm.protocols import ShareConfig

from .test_generation import hf_greedy

PROMPT = [5, 17, 3, 99, 42, 7, 250, 11, 64]  # 9 tokens
NEW = 8


def _save(tmp_path, cls, cfg, seed: int = 0):
    """A random ``cls(cfg)`` with non-trivial norm weights and biases, saved to tmp_path; (directory, model).
    The first seed from ``seed`` on whose greedy choices have no near-tie (:func:`_margin`)."""
    for s in range(seed, seed + 20):
        torch.manual_seed(s)
        m = cls(cfg).eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.3)
                elif n.endswith(".bias"):  # transformers initialises biases to 0
                    p.normal_(0.0, 0.5)
        m.generation_config.eos_token_id = None
        if _margin(m) > 0.02:
            break
    else:
        raise AssertionError("no seed without a near-tie")
    d = tmp_path / cfg.model_type
    m.save_pretrained(d)
    return d, m


def _margin(m) -> float:
    """The smallest gap between transformers' two largest logits over the greedy steps: the test needs a model
    whose choices are no near-ties (the ring's fixed point moves a logit by ~1e-3)."""
    with torch.no_grad():
        out = m.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    top = [torch.topk(lg[0].double(), 2).values for lg in out.logits]
    return min(float(t[0] - t[1]) for t in top)


# initializer_range 0.2 (transformers: 0.02): attention far from uniform, so the greedy ids depend on the
# positions (a wrong frequency or window changes them).
_NO_TOKENS = dict(eos_token_id=None, bos_token_id=None, pad_token_id=None, initializer_range=0.2)


async def _matches(d, m, route: str = "12") -> None:
    """Private greedy ids equal transformers', on the ring (the default arithmetic) on either route."""
    lm = load_model(str(d))
    async with await permllm.local(lm, config=ShareConfig(route=route)) as s:
        assert all(p.ring for p in (s.trio.user, s.trio.model, s.trio.helper))
        got = [t async for t in s.generate_ids(PROMPT, NEW)]
    assert got == hf_greedy(m, PROMPT, NEW)


@pytest.mark.parametrize("tied", [True, False])
async def test_qwen2_matches_transformers(tmp_path, tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    # Untied: a sliding window on the layers from max_window_layers on (Qwen2's per-layer windows), on the
    # 8-hop route: layer 0's decode steps take the fused op, layer 1's (windowed) the 12-hop ops.
    win = {} if tied else dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    cfg = Qwen2Config(vocab_size=320, hidden_size=60, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-6,
                      tie_word_embeddings=tied, rope_theta=1000.0, **win, **_NO_TOKENS)
    d, m = _save(tmp_path, Qwen2ForCausalLM, cfg)
    a = load_model(str(d)).arch
    assert a.qkv_bias and not a.o_bias and a.tied_head == tied
    assert a.windows == (() if tied else (0, 4))
    await _matches(d, m, "12" if tied else "8")


ROPES = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "linear": dict(rope_type="linear", factor=3.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
}


@pytest.mark.parametrize("kind", list(ROPES))
async def test_llama_rope_scaling_matches_transformers(tmp_path, kind):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, rope_parameters={"rope_theta": 500.0, **ROPES[kind]}, **_NO_TOKENS)
    d, m = _save(tmp_path, LlamaForCausalLM, cfg, seed=2)
    a = load_model(str(d)).arch
    default = 1.0 / 500.0 ** (np.arange(0, 16, 2) / 16)
    if kind == "dynamic":  # transformers rescales only past max_position_embeddings, where the context ends
        np.testing.assert_allclose(a.rope_freqs, default, rtol=1e-6)
    else:
        assert not np.allclose(a.rope_freqs, default, rtol=1e-3)
    assert (a.rope_factor > 1.0) == (kind == "yarn")
    await _matches(d, m)


@pytest.mark.parametrize("route", ["12", "8"])
async def test_mistral_sliding_window_matches_transformers(tmp_path, route):
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=400, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                        sliding_window=5, rope_theta=100.0, tie_word_embeddings=False, **_NO_TOKENS)
    d, m = _save(tmp_path, MistralForCausalLM, cfg, seed=3)
    assert load_model(str(d)).arch.windows == (5, 5)
    await _matches(d, m, route)  # the 8-hop route's decode steps are windowed: they take the 12-hop ops


async def test_mistral_user_receives_only_the_window_of_scores(tmp_path):
    """U's revealed softmax inputs hold each row's window only: heads × Σ_rows min(pos + 1, window) entries."""
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, sliding_window=5,
                        **_NO_TOKENS)
    torch.manual_seed(0)
    d = tmp_path / "mistral"
    MistralForCausalLM(cfg).save_pretrained(d)
    async with await permllm.local(load_model(str(d)), transcript=tmp_path / "t") as s:
        [t async for t in s.generate_ids(PROMPT, 3)]
    index = json.loads((tmp_path / "t" / "user" / "index.json").read_text())
    got = [len(np.load(tmp_path / "t" / "user" / e["file"])) for e in index if e["tag"][:2] == ["perm", "L0.p"]]
    rows = [range(9), [9], [10]]  # the prefill's positions, then one per decode step
    assert got == [4 * sum(min(p + 1, 5) for p in r) for r in rows] == [140, 20, 20]


def _phi3(tmp_path, **kw):
    from transformers import Phi3Config, Phi3ForCausalLM
    cfg = Phi3Config(vocab_size=300, hidden_size=60, intermediate_size=72, num_hidden_layers=2,
                     num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=64,
                     tie_word_embeddings=False, **kw, **_NO_TOKENS)
    return _save(tmp_path, Phi3ForCausalLM, cfg, seed=4)


async def test_phi3_partial_rotary_matches_transformers(tmp_path):
    d, m = _phi3(tmp_path, partial_rotary_factor=0.5, rope_theta=300.0)
    a = load_model(str(d)).arch
    assert len(a.rope_freqs) == 3 and a.head_dim == 12 and a.max_positions == 64
    await _matches(d, m)


async def test_phi3_longrope_short_factors_within_the_original_context(tmp_path):
    # transformers uses the short factors (and the attention factor) up to original_max_position_embeddings and
    # re-prefills with the long ones past it; a session's context ends there.
    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 1.2, 1.1, 3.0],
            "long_factor": [2.0, 4.0, 6.0, 8.0, 3.0, 5.0], "original_max_position_embeddings": 20}
    d, m = _phi3(tmp_path, rope_parameters=rope, sliding_window=7, original_max_position_embeddings=20)
    a = load_model(str(d)).arch
    assert a.max_positions == 20 and a.rope_factor > 1.0 and a.windows == (7, 7)
    await _matches(d, m)


def test_unsupported_variants_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=32, **_NO_TOKENS)
    m = LlamaForCausalLM(cfg)
    m.config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0}
    with pytest.raises(ModelFileError, match="RoPE type 'proportional' is not supported"):
        from_transformers(m)
    m.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(ModelFileError, match="RoPE type 'llama3': incomplete parameters"):
        from_transformers(m)
    (tmp_path / "gemma2").mkdir()  # Gemma 2 (logit soft-capping) is not supported; Gemma 3 is (test_gemma3.py)
    (tmp_path / "gemma2" / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(ModelFileError, match="unsupported model_type 'gemma2'"):
        load_model(str(tmp_path / "gemma2"))


def test_arch_descriptions_round_trip_and_old_ones_load():
    base = dict(family="llama", vocab=10, hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, ffn=8, norm="rms",
                norm_eps=1e-6, act="swiglu", pos="rope", max_positions=16)
    old = Arch(**base)
    assert "windows" not in old.to_dict() and "rope_freqs" not in old.to_dict()  # fingerprints kept
    assert Arch.from_dict(old.to_dict()) == old
    new = Arch(**base, rope_freqs=(1.0,), rope_factor=1.2, windows=(3, 0))
    back = Arch.from_dict(json.loads(json.dumps(new.to_dict())))
    assert back == new and back.fingerprint() == new.fingerprint() != old.fingerprint()
    with pytest.raises(ValueError, match="windows"):
        Arch(**base, windows=(3,))


def test_window_shift_and_partial_rotary_on_ring_words():
    a = Arch(family="llama", vocab=10, hidden=8, layers=1, heads=1, kv_heads=1, head_dim=6, ffn=8, norm="rms",
             norm_eps=1e-6, act="swiglu", pos="rope", max_positions=16, rope_freqs=(1.0, 0.1), windows=(3,))
    valid = np.arange(1, 6)
    start = window_starts(a, 0, valid)
    assert start.tolist() == [0, 0, 0, 1, 2]
    x = np.arange(25.0).reshape(5, 5)
    y = shift_rows(x, start)
    assert y[4, :3].tolist() == x[4, 2:5].tolist() and np.array_equal(shift_rows(y, -start), x)
    # The ring rotation at 12 bits is the real one, pass-through dims included, up to the cosines' rounding.
    v = np.random.default_rng(0).normal(size=(2, 5, 6))
    pos = np.arange(5)
    words = rope(a, np.rint(v * 2**10).astype(np.int64).view(np.uint64), pos, None, frac=12)
    back = words.view(np.int64) / 2.0**22
    np.testing.assert_allclose(back, rope(a, v, pos, None), atol=2e-3)
    np.testing.assert_array_equal(rope(a, v, pos, None)[..., 4:], v[..., 4:])

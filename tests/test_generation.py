"""Private generation end to end, against transformers and the ChatGLM reference.

Greedy private generation must give exactly the plaintext token ids. Random-weight
models use dimensions unlike SmolLM2's (other head counts, GQA ratio, FFN width).
"""
from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

import permllm
from permllm.model import LoadedModel, from_chatglm, from_transformers, load_model
from permllm.model.chatglm_ref import ChatGLMConfig, ChatGLMRef, init_weights
from permllm.protocols.sampling import Sampler
from permllm.runtime.session import ContextTooLong


async def private_ids(lm: LoadedModel, prompt: list[int], n: int, sampler: Sampler | None = None,
                      transport: str = "memory") -> list[int]:
    async with await permllm.local(lm, transport=transport) as s:
        return [t async for t in s.generate_ids(prompt, n, sampler)]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def _llama_dir(tmp_path, vocab=300):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500.0, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():  # non-trivial norm weights so the folding is tested
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    m.generation_config.eos_token_id = None
    d = tmp_path / "llama"
    m.save_pretrained(d)
    return d, m


def _gpt2_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=257, n_positions=48, n_embd=40, n_layer=3, n_head=5, bos_token_id=None,
                     eos_token_id=None)
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ln_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    m.generation_config.eos_token_id = None
    d = tmp_path / "gpt2"
    m.save_pretrained(d)
    return d, m


async def test_random_llama_matches_transformers(tmp_path):
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    assert lm.arch.kv_heads == 2 and lm.arch.heads == 6 and not lm.arch.tied_head
    prompt = [5, 17, 42, 99, 123, 250, 7, 3]
    assert await private_ids(lm, prompt, 12) == hf_greedy(hf, prompt, 12)


async def test_offline_products_are_batched(tmp_path, monkeypatch):
    """U and H compute each op's decode products in batches of DEALT_BATCH steps (the prefill alone),
    and the tokens stay exact, with the offline phase running ahead or done first."""
    import importlib
    linear = importlib.import_module("permllm.protocols.linear")
    from permllm.runtime.session import DEALT_BATCH
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    rows: list[int] = []
    apply = linear._apply

    def spy(kind, x, W, *args):
        if x.shape[-1] == lm.arch.hidden and W.shape == (lm.arch.vocab, lm.arch.hidden):  # the LM head
            rows.append(len(x))
        return apply(kind, x, W, *args)

    monkeypatch.setattr(linear, "_apply", spy)
    prompt, n = [5, 17, 42, 99], 2 * DEALT_BATCH + 1
    want = hf_greedy(hf, prompt, n)
    async with await permllm.local(lm) as s:
        for first in (False, True):
            rows.clear()
            assert [t async for t in s.generate_ids(prompt, n, offline_first=first)] == want
            # online: M's n products of one row; offline: U's and H's, the prefill's row, then batches
            assert sorted(rows) == sorted([1] * n + 2 * [1, DEALT_BATCH, DEALT_BATCH]), rows


@pytest.mark.parametrize("offline,transport,closing", [("dealer", "tcp", False), ("he", "memory", True)])
async def test_a_caller_that_stops_early_leaves_the_session_clean(tmp_path, offline, transport, closing):
    """Breaking out of generate_ids ends the generation at M and H too (at once when the caller
    closes the generator, else when asyncio finalizes it): the next one runs and matches
    transformers, and no party keeps messages or correlations of the steps that never ran."""
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    prompt = [5, 17, 42]
    want = hf_greedy(hf, prompt, 5)
    async with await permllm.local(lm, offline=offline, transport=transport) as s:
        got = []
        gen = s.generate_ids(prompt, 30, stop_at_eos=False)
        async with (contextlib.aclosing(gen) if closing else contextlib.nullcontext(gen)) as tokens:
            async for t in tokens:
                got.append(t)
                if len(got) == 3:
                    break
        del gen, tokens
        assert got == want[:3]
        if closing:  # the result of the stopped generation is complete
            assert s.last.token_ids == got and len(s.last.step_s) == 3 and s.last.online_bytes > 0

        async def again() -> list[int]:
            return [t async for t in s.generate_ids(prompt, 5, stop_at_eos=False)]

        assert await asyncio.wait_for(again(), 120) == want
        for p in s.trio.parties:
            left = [k for k in p.store if type(k[1]) is int and k[1] >= 0]
            assert not left, f"{p.role.value} kept {left[:3]}"
            assert not p.caches, f"{p.role.value} kept the KV caches {list(p.caches)[:3]}"
            assert all(ch.unread == 0 for ch in p.channels.values()), (p.role.value, [ch.unread for ch in
                                                                                       p.channels.values()])


async def test_random_gpt2_matches_transformers(tmp_path):
    d, hf = _gpt2_dir(tmp_path)
    lm = load_model(str(d))
    assert lm.arch.family == "gpt2" and lm.arch.pos == "learned"
    prompt = [3, 200, 31, 4, 99]
    assert await private_ids(lm, prompt, 12, transport="tcp") == hf_greedy(hf, prompt, 12)


def _reduced_chatglm() -> tuple[LoadedModel, ChatGLMRef]:
    """A reduced random ChatGLM-6B and its independent plaintext reference."""
    cfg = ChatGLMConfig.reduced()
    tensors = init_weights(cfg, seed=3, dtype=torch.float64)
    return LoadedModel(from_chatglm(cfg, tensors), None, "chatglm-reduced"), ChatGLMRef(cfg, tensors)


async def test_reduced_chatglm_matches_reference():
    lm, ref = _reduced_chatglm()
    prompt = [5, 17, 42, 99, 123, 250, 7]
    assert await private_ids(lm, prompt, 10) == ref.generate(prompt, 10)


async def test_private_logits_close_to_plaintext(tmp_path):
    """The first-token logits of the private run vs transformers (max abs error, float64 shares)."""
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    prompt = [1, 2, 3, 4, 5]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1].double().numpy()
    from permllm.model import Forward, PlainOps, StepShape
    got_ref = await Forward(lm.arch).step(PlainOps(lm.weights), prompt, StepShape(lm.arch, len(prompt), 0))
    assert np.max(np.abs(got_ref[0] - want)) < 1e-4  # float64 reference vs float32 transformers


async def test_sampling_reproducible_and_distributed_like_plaintext(tmp_path):
    d, hf = _llama_dir(tmp_path, vocab=40)
    lm = load_model(str(d))
    prompt = [1, 2, 3]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].double().numpy()
    temp, k = 0.5, 6
    s1 = Sampler(temperature=temp, top_k=k, seed=123)
    a = await private_ids(lm, prompt, 6, s1)
    b = await private_ids(lm, prompt, 6, s1)
    assert a == b  # fresh permutations, same seed → same tokens
    # Distribution of the first token over many seeds vs the exact truncated softmax.
    order = np.argsort(-logits, kind="stable")[:k]
    z = logits[order] / temp
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    n = 300
    counts = dict.fromkeys(order.tolist(), 0)
    async with await permllm.local(lm) as s:
        for seed in range(n):
            tok = [t async for t in s.generate_ids(prompt, 1, Sampler(temperature=temp, top_k=k, seed=seed))][0]
            assert tok in counts, "a token outside the top-k was sampled"
            counts[tok] += 1
    obs = np.array([counts[t] for t in order.tolist()])
    exp = probs * n
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    assert chi2 < 20.5, (obs, exp)  # χ² critical value, 5 degrees of freedom, p = 0.001


async def test_prompt_longer_than_context_fails_before_any_work(tmp_path):
    d, _ = _llama_dir(tmp_path)
    lm = load_model(str(d))
    async with await permllm.local(lm) as s:
        before = sum(m.total("offline").msgs_sent + m.total("online").msgs_sent for m in s._meters)
        with pytest.raises(ContextTooLong, match="context of 64"):
            [t async for t in s.generate_ids(list(range(60)), 10)]
        after = sum(m.total("offline").msgs_sent + m.total("online").msgs_sent for m in s._meters)
        assert before == after
        # The session is still usable afterwards.
        assert len([t async for t in s.generate_ids([1, 2], 2)]) == 2


def test_bad_model_paths(tmp_path):
    from permllm.model import ModelFileError
    with pytest.raises(ModelFileError, match="no such directory"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="config.json missing"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelFileError, match="unsupported model_type"):
        load_model(str(tmp_path / "bad"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable config.json"):
        load_model(str(tmp_path / "broken"))

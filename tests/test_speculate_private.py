"""Speculative decoding through the private protocol (issue 15): verify passes on both attention routes.

Greedy private speculation must give transformers' greedy ids whatever the drafts (a prompt that repeats
itself: many acceptances; a perturbed copy of the model as the draft model: many rejections); sampling
with a seed must give the very ids of plain private sampling with that seed; M refuses a malformed
control map; and a copying prompt takes fewer online hops per token than plain decoding.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import permllm
from permllm.model import load_model
from permllm.net import Channel
from permllm.protocols import ProtocolError, Role, Sampler, ShareConfig
from permllm.runtime.speculate import AdaptiveK, CostAwareK, DraftModel, PromptLookup, Speculator

from .test_generation import _llama_dir, hf_greedy

PROMPT = [5, 17, 42, 99, 123, 250, 7, 3] * 3  # a prompt that repeats itself
N = 24


def _clean(s: permllm.Session) -> None:
    """No party keeps correlations, KV caches or unread messages of a generation that ended."""
    for p in s.trio.parties:
        left = [k for k in p.store if type(k[1]) is int and k[1] >= 0]
        assert not left, f"{p.role.value} kept {left[:3]}"
        assert not p.caches, f"{p.role.value} kept the KV caches {list(p.caches)[:3]}"
        assert all(ch.unread == 0 for ch in p.channels.values()), p.role.value


@pytest.mark.parametrize("route", ["12", "8"])
async def test_prompt_lookup_greedy_equals_transformers(tmp_path, route):
    """Many acceptances; a caller that stops inside a pass leaves every party clean."""
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    want = hf_greedy(hf, PROMPT, N)
    async with await permllm.local(lm, config=ShareConfig(route=route)) as s:
        spec = Speculator(PromptLookup(), AdaptiveK(k_max=4))
        assert [t async for t in s.generate_ids(PROMPT, N, stop_at_eos=False, speculate=spec)] == want
        r = s.last
        assert sum(r.accepted) >= 5 and r.passes == N - 1 - sum(r.accepted) and len(r.step_s) == N
        assert r.to_dict()["accepted"] == r.accepted
        got = []
        async with contextlib.aclosing(s.generate_ids(PROMPT, N, stop_at_eos=False,
                                                      speculate=Speculator(PromptLookup(), AdaptiveK.fixed(4)))) as g:
            async for t in g:
                got.append(t)
                if len(got) == 18:
                    break
        assert got == want[:18]
        _clean(s)
        assert [t async for t in s.generate_ids(PROMPT, 6, stop_at_eos=False)] == want[:6]
        _clean(s)


@pytest.mark.parametrize("route", ["12", "8"])
async def test_draft_model_greedy_equals_transformers(tmp_path, route):
    """A perturbed copy of the model drafts: many rejections, the same ids."""
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    draft = copy.deepcopy(hf)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std())
    draft.save_pretrained(tmp_path / "draft")
    prompt = [1, 2, 3, 4, 5, 6]
    want = hf_greedy(hf, prompt, N)
    async with await permllm.local(lm, config=ShareConfig(route=route)) as s:
        spec = Speculator(DraftModel(tmp_path / "draft"), AdaptiveK.fixed(3))
        assert [t async for t in s.generate_ids(prompt, N, stop_at_eos=False, speculate=spec)] == want
        r = s.last
        assert sum(d - a for d, a in zip(r.drafted, r.accepted)) >= 10, (r.drafted, r.accepted)  # rejected drafts
        assert sum(r.accepted) >= 1


async def test_sampling_with_a_seed_gives_plain_sampling_ids(tmp_path):
    """The k-th token takes the k-th draw of the seeded rng either way: the very same ids."""
    d, hf = _llama_dir(tmp_path, vocab=40)
    lm = load_model(str(d))
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    async with await permllm.local(lm) as s:
        for seed in (0, 1, 2):
            sampler = Sampler(temperature=0.4, top_k=8, seed=seed)
            plain = [t async for t in s.generate_ids(prompt, 16, sampler, stop_at_eos=False)]
            spec = Speculator(DraftModel(hf), AdaptiveK.fixed(3))
            got = [t async for t in s.generate_ids(prompt, 16, sampler, stop_at_eos=False, speculate=spec)]
            assert got == plain, seed
            assert sum(s.last.accepted) >= 1 and s.last.passes < 15


@pytest.mark.parametrize("bad,why", [({"go": True, "keep": 3, "next": 1}, "keeps 3 drafts"),
                                     ({"go": True, "keep": 0, "next": 99}, "would pass the generation's"),
                                     ({"go": 1, "keep": 0, "next": 1}, "malformed speculation control"),
                                     (True, "malformed speculation control")])
async def test_model_party_refuses_a_malformed_control_map(tmp_path, monkeypatch, bad, why):
    d, _ = _llama_dir(tmp_path)
    lm = load_model(str(d))
    s = await permllm.local(lm)
    to_model = s.trio.user.channels[Role.MODEL]
    send = Channel.send

    def tamper(ch, tag, payload, **kw):
        if ch is to_model and tag[0] == "ctl" and isinstance(payload, dict) and payload.get("go"):
            payload = bad
        return send(ch, tag, payload, **kw)

    monkeypatch.setattr(Channel, "send", tamper)
    with pytest.raises(ProtocolError, match=why):
        async with s:
            [t async for t in s.generate_ids(PROMPT, 8, stop_at_eos=False, speculate=Speculator(PromptLookup()))]


async def test_fewer_online_hops_per_token_on_a_copying_prompt(tmp_path):
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    async with await permllm.local(lm) as s:
        plain = [t async for t in s.generate_ids(PROMPT, N, stop_at_eos=False)]
        per_plain = s.last.online_hops / len(plain)
        spec = [t async for t in s.generate_ids(PROMPT, N, stop_at_eos=False,
                                                speculate=Speculator(PromptLookup(), AdaptiveK(k_max=4)))]
        per_spec = s.last.online_hops / len(spec)
    assert spec == plain
    assert per_spec < 0.8 * per_plain, (per_spec, per_plain)


async def test_the_hop_model_is_what_a_generation_takes(tmp_path, monkeypatch):
    """Session.pass_hops (what CostAwareK weighs) equals the online hops each verify pass takes: the fused op
    for a pass without drafts (8 hops a layer), the 12-hop ops with drafts and past the fused op's keys."""
    from permllm.model import forward

    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    L = lm.arch.layers
    monkeypatch.setattr(forward, "ATTN8_MAX_KEYS", len(PROMPT) + 12)
    want = hf_greedy(hf, PROMPT, N)
    async with await permllm.local(lm, config=ShareConfig(route="8")) as s:
        assert (s.pass_hops(0, 30), s.pass_hops(3, 30)) == (8 * L + 8, 12 * L + 8)
        assert s.pass_hops(0, len(PROMPT) + 13) == 12 * L + 8  # the new row would be key ATTN8_MAX_KEYS + 1
        [t async for t in s.generate_ids(PROMPT, 1, stop_at_eos=False)]
        prefill = s.last.online_hops
        spec = s.speculator(PromptLookup())
        assert isinstance(spec.policy, CostAwareK)
        assert [t async for t in s.generate_ids(PROMPT, N, stop_at_eos=False, speculate=spec)] == want
        r = s.last
        context, model = len(PROMPT) + 1, 0
        for k, kept in zip(r.drafted, r.accepted):
            model += s.pass_hops(k, context)
            context += kept + 1
        assert r.online_hops - prefill == model, (r.drafted, r.accepted)
        assert 0 in r.drafted and max(r.drafted) > 0

"""Long prompts: a prefill in chunks that attend to the cache, and the offline window that bounds memory.

The prompt is fed in steps of ``prefill_chunk`` tokens; the private greedy ids must equal
transformers' (one pass over the whole prompt) on the ring, on both routes, with learned
positions, GQA and a sliding window shorter than a chunk boundary's reach. The helper deals
at most its window ahead of U's online steps, and a chunked prefill holds a fraction of the
offline material a whole-prompt prefill holds.
"""
from __future__ import annotations

import numpy as np
import pytest

import permllm
from permllm.model import load_model
from permllm.protocols import ShareConfig
from permllm.runtime import session as sess

from .test_families import _NO_TOKENS, _save
from .test_generation import _gpt2_dir, _llama_dir, hf_greedy

PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 250, 26)]  # 26 tokens: chunks 6, 6, 6, 6, 2
CHUNK = 6
NEW = 6


async def _chunked_ids(d, route: str = "8", chunk: int = CHUNK) -> list[int]:
    async with await permllm.local(load_model(str(d)), config=ShareConfig(route=route)) as s:
        assert s.trio.user.ring
        return [t async for t in s.generate_ids(PROMPT, NEW, prefill_chunk=chunk)]


@pytest.mark.parametrize("route", ["12", "8"])
async def test_chunked_prefill_llama_matches_transformers(tmp_path, route):
    d, m = _llama_dir(tmp_path)
    assert await _chunked_ids(d, route) == hf_greedy(m, PROMPT, NEW)


async def test_chunked_prefill_gpt2_learned_positions(tmp_path):
    d, m = _gpt2_dir(tmp_path)
    assert await _chunked_ids(d, "12") == hf_greedy(m, PROMPT, NEW)


async def test_chunked_prefill_sliding_window_across_chunks(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=400, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                        sliding_window=9, rope_theta=100.0, tie_word_embeddings=False, **_NO_TOKENS)
    d, m = _save(tmp_path, MistralForCausalLM, cfg, seed=3)  # a window of 9 reaches back over a chunk of 6
    assert await _chunked_ids(d) == hf_greedy(m, PROMPT, NEW)


def _record(monkeypatch) -> list[tuple[str, str, int, str]]:
    """Log (role, phase, step, "start"/"end") of every step each party runs, in order."""
    log: list[tuple[str, str, int, str]] = []
    orig = sess._Party.step

    async def step(self, phase, g, s, *a, **kw):
        log.append((self.p.role.value, phase, s, "start"))
        out = await orig(self, phase, g, s, *a, **kw)
        log.append((self.p.role.value, phase, s, "end"))
        return out
    monkeypatch.setattr(sess._Party, "step", step)
    return log


async def test_helper_deals_within_its_window_of_the_users_online_steps(tmp_path, monkeypatch):
    d, m = _llama_dir(tmp_path)
    log = _record(monkeypatch)
    new = 3 * sess.OFFLINE_AHEAD
    async with await permllm.local(load_model(str(d))) as s:
        got = [t async for t in s.generate_ids(PROMPT, new, prefill_chunk=CHUNK)]
    assert got == hf_greedy(m, PROMPT, new)
    g = sess._Gen(0, 0, len(PROMPT), new, chunk=CHUNK, first=5)
    assert g.steps == 4 + new
    done = 0  # U's online steps over so far
    dealt = []
    for role, phase, step, ev in log:
        if (role, phase, ev) == ("user", "online", "end"):
            done = step + 1
        elif (role, phase, ev) == ("helper", "offline", "start"):
            dealt.append(step)
            assert sum(g.units(s) for s in range(done, step + 1)) <= g.ahead, (step, done)
    assert dealt == list(range(g.steps))  # and it dealt every step, in order


async def test_chunked_prefill_holds_a_fraction_of_the_offline_material(tmp_path, monkeypatch):
    """The parties' stored correlations at their peak (sampled at each online step): chunks of 6 of a
    26-token prompt hold at most two chunks' worth, well under the whole prompt's."""
    d, _ = _llama_dir(tmp_path)
    orig = sess._Party.step
    peak = {}

    def stored(p) -> int:
        return sum(v.nbytes for v in _arrays(p.store))

    async def step(self, phase, g, s, *a, **kw):
        if phase == "online":
            peak[g.chunk] = max(peak.get(g.chunk, 0), stored(self.p))
        return await orig(self, phase, g, s, *a, **kw)
    monkeypatch.setattr(sess._Party, "step", step)
    async with await permllm.local(load_model(str(d))) as s:
        for chunk in (0, CHUNK):
            [t async for t in s.generate_ids(PROMPT, 2, prefill_chunk=chunk)]
    assert peak[CHUNK] < 0.6 * peak[0], peak


def _arrays(x):
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _arrays(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _arrays(v)


async def test_bad_chunk_requests_are_refused(tmp_path):
    d, _ = _llama_dir(tmp_path)
    async with await permllm.local(load_model(str(d))) as s:
        with pytest.raises(ValueError, match="prefill chunk"):
            [t async for t in s.generate_ids(PROMPT, 2, prefill_chunk=-1)]


async def test_route8_decode_past_its_key_limit_takes_the_12_hop_ops(tmp_path, monkeypatch):
    """Past ATTN8_MAX_KEYS keys a decode step leaves the fused op (its offline copies of the cache grow
    with the context): mid-generation, on the same caches, the ids stay transformers'."""
    from permllm.model import forward
    d, m = _llama_dir(tmp_path)
    monkeypatch.setattr(forward, "ATTN8_MAX_KEYS", len(PROMPT) + 2)
    fused = []
    orig = forward.attention_decode

    async def spy(p, name, *a, **kw):
        fused.append(p.token)
        return await orig(p, name, *a, **kw)
    monkeypatch.setattr(forward, "attention_decode", spy)
    assert await _chunked_ids(d, "8") == hf_greedy(m, PROMPT, NEW)
    steps = sorted({t for t in fused})  # token indices of the steps that took the fused op
    assert len(steps) == 2  # decode steps with 27 and 28 keys; the later ones (29 … 31) took the 12-hop ops


async def test_prefill_sends_only_the_causal_half_of_its_score_sized_messages(tmp_path):
    """q·Kᵀ's helper correlation and user share (to M) carry each row's causal prefix only: heads × Σ_rows
    valid entries, for every chunk (P·V's opened P as well), with ids still transformers'."""
    import json
    d, m = _llama_dir(tmp_path)  # 6 heads
    async with await permllm.local(load_model(str(d)), transcript=tmp_path / "t") as s:
        got = [t async for t in s.generate_ids(PROMPT, 2, prefill_chunk=CHUNK)]
    assert got == hf_greedy(m, PROMPT, 2)

    def sizes(role: str, tag: list) -> list[int]:
        index = json.loads((tmp_path / "t" / role / "index.json").read_text())
        out = []
        for e in index:
            if e["tag"][:2] == tag[:2] and e["tag"][3] == tag[2]:
                a = np.load(tmp_path / "t" / role / e["file"], allow_pickle=False)
                out.append(a.size)
        return out
    chunks = [(past, min(CHUNK, len(PROMPT) - past)) for past in range(0, len(PROMPT), CHUNK)]
    want = [6 * sum(past + t + 1 for t in range(T)) for past, T in chunks]  # the decode step: the fused op
    assert sizes("model", ["smm", "L0.s", "u"]) == want
    assert sizes("model", ["smm", "L0.s", "c"]) == want
    assert sizes("user", ["smm", "L0.att", "open"])[::2] == want  # [P_M − α packed, V_M,new − β] per chunk

"""Speculative decoding at the user party (permllm/runtime/speculate.py), in plaintext.

Prompt lookup against a brute-force reference; the acceptance rule; the adaptive K; a simulation
with a real (random, tiny) Llama whose greedy choices verify the drafts, which must give plain
greedy's ids over a long generation with many rejections; and sampling: the speculative procedure's
distribution of emitted sequences is the non-speculative one (χ²), and with position-keyed draws
the very same sequences.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from permllm.protocols import Sampler, choose
from permllm.runtime.speculate import (AdaptiveK, CostAwareK, Drafter, DraftModel, GreedyVerifier, PromptLookup,
                                       Speculator, accept, speculative_generate)

from .test_generation import hf_greedy

# χ² critical value at p = 0.001 for 26 degrees of freedom (27 cells)
CHI2_001_26 = 54.052


# -- prompt lookup ------------------------------------------------------------------------
def _lookup_reference(ids: list[int], k: int, ngram_max: int = 3, ngram_min: int = 1) -> list[int]:
    """Prompt lookup written directly: the most recent earlier start of the longest matching suffix."""
    L = len(ids)
    for n in range(min(ngram_max, L), ngram_min - 1, -1):
        starts = [i for i in range(L - n) if ids[i:i + n] == ids[L - n:]]
        if starts:
            s = list(ids)
            for j in range(k):
                s.append(s[starts[-1] + n + j])
            return s[L:]
    return []


def test_prompt_lookup_edges():
    d = PromptLookup()
    assert d.draft([], 4) == []
    assert d.draft([7], 4) == []
    assert d.draft([7, 8, 9], 4) == []  # nothing occurred twice
    assert d.draft([7, 8, 7], 0) == []
    assert PromptLookup(ngram_min=2).draft([1, 2, 3, 1], 3) == []  # (3, 1) never occurred before
    with pytest.raises(ValueError):
        PromptLookup(ngram_max=1, ngram_min=2)


def test_prompt_lookup_copies():
    d = PromptLookup()
    text = [10, 11, 12, 13, 14, 15, 16, 17]
    assert d.draft(text + [40, 41] + text[:3], 4) == [13, 14, 15, 16]
    # the longest suffix wins: (1, 2, 3) continued with 4 at the start; the 1-gram (3,) more recently with 5
    assert d.draft([1, 2, 3, 4, 9, 3, 5, 1, 2, 3], 1) == [4]
    # among occurrences of that suffix, the most recent one
    assert d.draft([1, 2, 7, 1, 2, 8, 1, 2], 4) == [8, 1, 2, 8]
    # overlapping copies continue periodically
    assert d.draft([5, 5, 5], 4) == [5, 5, 5, 5]
    assert d.draft([1, 2, 1, 2, 1], 5) == [2, 1, 2, 1, 2]
    assert d.draft([9, 1, 2, 1, 2, 1], 3) == [2, 1, 2]


def test_prompt_lookup_incremental_index_matches_reference():
    """Growing contexts (the index is extended) and unrelated ones (it starts again) against the reference."""
    g = np.random.default_rng(3)
    d = PromptLookup()
    for _ in range(12):
        ctx: list[int] = []
        for _ in range(60):
            ctx += g.integers(0, 4, size=int(g.integers(1, 4))).tolist()
            k = int(g.integers(0, 7))
            assert d.draft(ctx, k) == _lookup_reference(ctx, k), ctx
        assert d.draft(ctx[:-3], 3) == _lookup_reference(ctx[:-3], 3)  # a shorter context: indexed afresh
    two = PromptLookup(ngram_max=2, ngram_min=2)
    ctx = g.integers(0, 3, size=80).tolist()
    assert two.draft(ctx, 5) == _lookup_reference(ctx, 5, 2, 2)


def test_prompt_lookup_is_fast():
    """A step costs the new tokens, not a scan of the context: 6,000 one-token steps in well under a second."""
    d, ctx = PromptLookup(), np.random.default_rng(0).integers(0, 50, size=6000).tolist()
    t0 = time.perf_counter()
    for n in range(1, len(ctx) + 1):
        d.draft(ctx[:n], 8)
    assert time.perf_counter() - t0 < 3.0


# -- acceptance rule and K ----------------------------------------------------------------
def test_accept():
    assert accept([], [7]) == (0, [7])
    assert accept([1, 2, 3], [1, 2, 3, 4]) == (3, [1, 2, 3, 4])  # all accepted, plus the bonus token
    assert accept([1, 2, 3], [1, 5, 3, 4]) == (1, [1, 5])  # a match after a rejection does not count
    assert accept([1, 2, 3], [9, 2, 3, 4]) == (0, [9])
    for bad in ([1, 2], [1, 2, 3, 4, 5]):
        with pytest.raises(ValueError):
            accept([1, 2, 3], bad)


def test_adaptive_k():
    a = AdaptiveK(k_max=8, k_min=0, k_start=2)
    for drafted, accepted, want in [(2, 2, 4), (4, 4, 8), (8, 8, 8), (8, 3, 4), (4, 0, 2), (2, 0, 1), (1, 0, 0),
                                    (0, 0, 0), (1, 1, 1), (1, 1, 2)]:
        a.update(drafted, accepted)
        assert a.k == want, (drafted, accepted)
    f = AdaptiveK.fixed(4)
    for drafted, accepted in [(4, 0), (4, 4), (2, 1)]:
        f.update(drafted, accepted)
        assert f.k == 4
    with pytest.raises(ValueError):
        AdaptiveK(k_max=2, k_start=4)
    with pytest.raises(ValueError):
        a.update(2, 3)


class _Script(Drafter):
    """Drafts ``hint`` at every step (a deterministic drafter for the speculator's bookkeeping)."""

    def __init__(self, hint: int) -> None:
        self.hint = hint

    def draft(self, context_ids: list[int], k: int) -> list[int]:
        return [self.hint] * k


def test_speculator_drafts_in_hindsight_at_k0():
    """At K = 0 the pass sends no draft, but a hindsight draft that would have matched brings K back."""
    s = Speculator(_Script(5), AdaptiveK(k_max=4, k_min=0, k_start=0))
    assert s.propose([1, 2], 10) == []
    assert s.settle([], [6]) == [6] and s.policy.k == 0  # the hindsight draft 5 would have been rejected
    assert s.propose([1, 2, 6], 10) == []
    assert s.settle([], [5]) == [5] and s.policy.k == 1  # ... and this one accepted
    assert s.propose([1, 2, 6, 5], 10) == [5]
    assert s.propose([1, 2, 6, 5], 0) == []  # the generation's last token: no drafts
    assert (s.stats.passes, s.stats.rows, s.stats.drafted, s.stats.accepted) == (2, 2, 0, 0)
    assert Speculator(_Script(5), AdaptiveK.fixed(3), eos_ids=[5]).propose([1], 10) == []  # stops before an end id


# -- greedy: a real model verifies ----------------------------------------------------------
PROMPT = [5, 17, 3, 9, 42, 7, 25, 11, 5, 17, 3, 9]
NEW = 200


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random tiny Llama (float64, the target) and a perturbed float32 copy saved as an HF directory (the
    draft model: it agrees with the target about half the time)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, eos_token_id=None,
                      bos_token_id=None, pad_token_id=None)
    target = LlamaForCausalLM(cfg).eval().double()
    target.generation_config.eos_token_id = None
    draft = copy.deepcopy(target).float()
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.std())
    d = tmp_path_factory.mktemp("draft") / "llama"
    draft.save_pretrained(d)
    yield target, d
    torch.set_num_threads(threads)


def test_speculative_greedy_equals_greedy(llama):
    target, draft_dir = llama
    want = hf_greedy(target, PROMPT, NEW)
    for drafter in (PromptLookup(), DraftModel(str(draft_dir))):
        for policy in (AdaptiveK.fixed(4), AdaptiveK()):
            s = Speculator(drafter, policy)
            assert speculative_generate(GreedyVerifier(target), s, PROMPT, NEW) == want, (drafter, policy.k_max)
            rejected = s.stats.drafted - s.stats.accepted
            assert s.stats.accepted >= 10 and rejected >= 20, s.stats  # both outcomes, many times
            assert s.stats.passes < NEW
    s = Speculator(DraftModel(target), AdaptiveK.fixed(4))  # the target drafting for itself: all accepted
    assert speculative_generate(GreedyVerifier(target), s, PROMPT, NEW) == want
    assert s.stats.accepted == s.stats.drafted and s.stats.passes == NEW // 5


def test_speculative_greedy_stops_at_eos(llama):
    target, _ = llama
    want = hf_greedy(target, PROMPT, 60)
    eos = want[40]
    s = Speculator(DraftModel(target), AdaptiveK.fixed(8), eos_ids=[eos])
    got = speculative_generate(GreedyVerifier(target), s, PROMPT, 60, eos_ids=[eos])
    assert got == want[:want.index(eos) + 1]
    assert s.stats.rows == len(got)  # a perfect drafter, whose drafts stop before the end id


# -- sampling ------------------------------------------------------------------------------
V, LENGTH = 3, 3  # a toy model over 3 tokens; sequences of 3 new tokens: 27 outcomes
TOY = Sampler(temperature=0.8)


def _toy_logits(prefix: list[int]) -> np.ndarray:
    """The toy model: logits as a fixed pseudo-random function of the whole prefix."""
    return np.random.default_rng([11, len(prefix), *prefix]).normal(size=V) * 1.2


def _toy_p(prefix: list[int]) -> np.ndarray:
    z = _toy_logits(prefix) / TOY.temperature
    w = np.exp(z - z.max())
    return w / w.sum()


class _ToyDrafter(Drafter):
    """Greedy on another pseudo-random model: a deterministic drafter right about half the time."""

    def draft(self, context_ids: list[int], k: int) -> list[int]:
        ids = list(context_ids)
        for _ in range(k):
            ids.append(int(np.argmax(np.random.default_rng([12, len(ids), *ids]).normal(size=V) + _toy_logits(ids))))
        return ids[len(context_ids):]


def _sampling_verifier(draws):
    """The private pass with sampling: at position i a token from p(· | context + d_1 … d_i), drawn by
    ``draws(absolute position)``, the generator U's sampler uses there."""
    def verify(context: list[int], drafts: list[int]) -> list[int]:
        return [choose(_toy_logits(context + drafts[:i]), TOY, draws(len(context) + i)) for i in range(len(drafts) + 1)]
    return verify


def _chi2(counts: dict[tuple[int, ...], int], prompt: list[int], runs: int) -> float:
    """χ² of the emitted sequences' counts against the exact distribution of non-speculative sampling."""
    stat = 0.0
    for seq in np.ndindex(*(V,) * LENGTH):
        prob = float(np.prod([_toy_p(prompt + list(seq[:i]))[seq[i]] for i in range(LENGTH)]))
        assert prob * runs > 5  # every cell well populated
        stat += (counts.get(seq, 0) - prob * runs) ** 2 / (prob * runs)
    return stat


def test_speculative_sampling_distribution():
    """Drafts accepted while the sampled token equals them: the emitted sequences are distributed as
    non-speculative sampling's (χ², 27 outcomes); emitting the choices after a rejection is not."""
    prompt, runs = [0], 12_000
    g = np.random.default_rng(7)
    verify = _sampling_verifier(lambda position: g)
    counts: dict[tuple[int, ...], int] = {}
    wrong: dict[tuple[int, ...], int] = {}
    spec = Speculator(_ToyDrafter(), AdaptiveK.fixed(2))
    for _ in range(runs):
        seq = tuple(speculative_generate(verify, spec, prompt, LENGTH))
        counts[seq] = counts.get(seq, 0) + 1
        drafts = _ToyDrafter().draft(prompt, LENGTH - 1)
        bad = tuple(verify(prompt, drafts))  # every choice kept, even those after a rejected draft
        wrong[bad] = wrong.get(bad, 0) + 1
    assert 0.2 < spec.stats.accepted / spec.stats.drafted < 0.8  # drafts both accepted and rejected
    assert _chi2(counts, prompt, runs) < CHI2_001_26
    assert _chi2(wrong, prompt, runs) > 5 * CHI2_001_26  # the test tells a wrong rule apart


def test_speculative_sampling_with_position_keyed_draws_is_pathwise_exact():
    """When each position's draw comes from (seed, position), speculation emits the very tokens that
    non-speculative sampling with the same seed emits."""
    prompt = [1, 2]
    for seed in range(40):
        draws = lambda position: np.random.default_rng([seed, position])  # noqa: E731
        ids = list(prompt)
        for _ in range(12):
            ids.append(choose(_toy_logits(ids), TOY, draws(len(ids))))
        got = speculative_generate(_sampling_verifier(draws), Speculator(_ToyDrafter(), AdaptiveK()), prompt, 12)
        assert got == ids[len(prompt):], seed


def test_cost_aware_k():
    """K maximises expected tokens per hop: none while drafts are rejected and a pass with drafts costs more
    hops than a decode step, all of k_max once they are accepted, and any K when drafts cost no hops."""
    hops = {0: 248}
    a = CostAwareK(lambda k, keys: hops.get(k, 368), k_max=8)
    assert a.acceptance == 0.5 and a.choose(10) > 0  # at a = 1/2 a pass yields up to 2 tokens: > 368/248
    for _ in range(6):
        a.update(1, 0)
    assert a.acceptance < 0.2 and a.choose(10) == 0
    a.update(0, 0)  # nothing drafted: nothing learnt
    assert a.acceptance < 0.2
    for _ in range(8):
        a.update(8, 8)
    assert a.acceptance > 0.9 and a.choose(10) == 8
    seen = []
    flat = CostAwareK(lambda k, keys: seen.append(keys) or 368, k_max=4, row_cost=0)  # no hop saved at K = 0
    for _ in range(6):
        flat.update(1, 0)
    assert flat.choose(300) == 4 and set(seen) == {300}
    with pytest.raises(ValueError):
        CostAwareK(lambda k, keys: 1, decay=0)
    with pytest.raises(ValueError):
        a.update(2, 3)

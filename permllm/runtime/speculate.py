"""Speculative decoding at the user party: drafts, the acceptance rule, and how many drafts to send.

Part of :mod:`permllm.runtime`; it runs at U only, in plaintext, and sends nothing itself.
U knows its whole context in the clear, so it can guess the next tokens at no privacy cost;
the private model then verifies K drafts d_1 … d_K in one multi-token pass over K + 1
positions (the last context token and the K drafts), private token selection chooses a
token c_i at each of them, and U keeps the longest prefix of drafts that selection agrees
with plus the first token it chose after it (:func:`accept`). Every pass emits at least one
token, so a pass is never worse in dependent hops than a decode step; it is the number of
passes per generated token that speculation reduces.

* :class:`Drafter` — what proposes drafts: :class:`PromptLookup` (the context's own n-grams:
  copies, extraction, edits) or :class:`DraftModel` (a small public model with the same
  tokenizer, greedy, run by U with its own KV cache).
* :func:`accept` — the acceptance rule; exact for greedy and for sampling (its docstring).
* :class:`AdaptiveK` — how many drafts the next pass verifies, from recent acceptance;
  :class:`CostAwareK` also weighs what a pass costs with and without drafts (its hops).
* :class:`Speculator` and :func:`speculative_generate` — U's loop around a verify pass;
  :class:`GreedyVerifier` is the plaintext stand-in for the private pass (tests, benchmarks).

torch and transformers are imported only by :class:`DraftModel` and :class:`GreedyVerifier`.
"""
from __future__ import annotations

import abc
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["Drafter", "PromptLookup", "DraftModel", "make_drafter", "accept", "AdaptiveK", "CostAwareK", "SpecStats",
           "Speculator", "speculative_generate", "GreedyVerifier", "Verify"]

Verify = Callable[[list[int], list[int]], list[int]]  # (context, K drafts) -> the K + 1 chosen tokens


class Drafter(abc.ABC):
    """Proposes the tokens that follow a context; its proposal must be a deterministic function of the
    context (see :func:`accept` for why sampling stays exact then)."""

    @abc.abstractmethod
    def draft(self, context_ids: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens guessed to follow ``context_ids`` (fewer, possibly none, when it has no guess)."""


class PromptLookup(Drafter):
    """Drafts by copying: the longest suffix n-gram of the context (``ngram_max`` down to ``ngram_min``
    tokens) is looked up among its earlier occurrences in the context (prompt and generated text), the
    most recent one wins, and the tokens that followed it are proposed.

    A copy that runs into the suffix itself continues periodically (the context "x y x y" proposes
    "x y x …"). The index of n-grams grows with the context, so a call costs the new tokens plus one
    comparison of the context with the indexed one (a different context is indexed afresh).
    """

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self._ids: list[int] = []
        # per n: n-gram -> the most recent position e at which it ended with a token after it (ids[e])
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(ngram_min, ngram_max + 1)}

    def _sync(self, context: list[int]) -> None:
        """Index ``context``: append to the index when it extends the indexed context, else start again."""
        n = len(self._ids)
        if len(context) < n or context[:n] != self._ids:
            self._ids, n = [], 0
            for idx in self._index.values():
                idx.clear()
        ids = self._ids
        for t in range(n, len(context)):  # the n-grams ending at t now have a continuation, context[t]
            for m, idx in self._index.items():
                if t >= m:
                    idx[tuple(ids[t - m:t])] = t
            ids.append(int(context[t]))

    def draft(self, context_ids: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens copied from after the most recent earlier occurrence of the longest matching
        suffix; none when no suffix of ``ngram_min`` tokens or more occurred before."""
        self._sync(context_ids)
        ids, length = self._ids, len(self._ids)
        if k <= 0:
            return []
        for m in range(min(self.ngram_max, length), self.ngram_min - 1, -1):
            e = self._index[m].get(tuple(ids[length - m:]))
            if e is not None:
                out: list[int] = []
                for j in range(k):  # s = ids + out; s[length + j] = s[e + j] (periodic past the end)
                    out.append(ids[e + j] if e + j < length else out[e + j - length])
                return out
        return []


class _CachedLM:
    """A transformers causal LM with one KV cache over the ids it last saw, trimmed to what a new call
    shares with them (what U's drafter and the plaintext verifier both need)."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.model = model.eval()
        self._new_cache = DynamicCache
        self.cache = DynamicCache()
        self.ids: list[int] = []
        # transformers 5 names the cache argument ``cache``; earlier versions ``past_key_values``
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def logits(self, ids: list[int], rows: int) -> Any:
        """Logits (rows, vocab) at the last ``rows`` positions of ``ids``, reusing the cached common prefix."""
        import torch

        keep = min(len(ids) - rows, len(self.ids))
        if ids[:keep] != self.ids[:keep]:  # not an extension (a rejected draft): the common prefix
            keep = next(i for i in range(keep) if ids[i] != self.ids[i])
        if keep == 0:
            self.cache = self._new_cache()
        elif self.cache.get_seq_length() > keep:
            self.cache.crop(keep - self.cache.get_seq_length())  # a negative crop removes that many positions
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids[keep:]]), use_cache=True, **{self._cache_arg: self.cache})
        self.ids = list(ids)
        return out.logits[0, -rows:]


def _load(model: "str | Path | Any", dtype: str) -> Any:
    """A transformers model: loaded (offline) from a named model (``smollm2``) or an HF directory, or as given."""
    if not isinstance(model, (str, Path)):
        return model
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.loaders import model_dir

    return AutoModelForCausalLM.from_pretrained(model_dir(str(model)), dtype=getattr(torch, dtype))


class DraftModel(Drafter):
    """Drafts with a small public model that shares the private model's tokenizer, run by U in plaintext:
    greedy, so the draft is a deterministic function of the context. Its KV cache keeps the context and
    the drafts it fed; the next call trims it to the prefix the new context shares (the accepted drafts)."""

    def __init__(self, path_or_name: "str | Path | Any", dtype: str = "float32") -> None:
        self._lm = _CachedLM(_load(path_or_name, dtype))
        self.max_positions = int(getattr(self._lm.model.config, "max_position_embeddings", 1 << 62))

    def draft(self, context_ids: list[int], k: int) -> list[int]:
        """``k`` greedy tokens after ``context_ids`` (fewer at the end of the model's context; none for an
        empty context)."""
        k = min(k, self.max_positions - len(context_ids))
        if k <= 0 or not context_ids:
            return []
        ids, out = list(context_ids), []
        for _ in range(k):
            out.append(int(self._lm.logits(ids, 1)[-1].argmax()))
            ids.append(out[-1])
        return out


def make_drafter(mode: str, draft: "str | Path | None" = None) -> Drafter | None:
    """The drafter a user's ``speculate`` setting names: None for "off", :class:`PromptLookup` for
    "prompt-lookup", a :class:`DraftModel` of ``draft`` for "draft"."""
    if mode == "off":
        return None
    if mode == "prompt-lookup":
        return PromptLookup()
    if mode != "draft":
        raise ValueError(f"speculate must be off, prompt-lookup or draft, got {mode!r}")
    if not draft:
        raise ValueError("speculate = 'draft' needs a draft model (a named model or an HF directory)")
    return DraftModel(draft)


def accept(drafts: list[int], chosen: list[int]) -> tuple[int, list[int]]:
    """How many of the K ``drafts`` the pass accepted, and the tokens to emit.

    ``chosen`` are the K + 1 tokens private selection chose at the verified positions: chosen[i] is
    chosen given the context and drafts d_1 … d_i. The drafts are accepted while chosen[i] == d_{i+1};
    the emitted tokens are the n accepted drafts and chosen[n], the first choice after them (the
    bonus token chosen[K] when all are accepted): n + 1 tokens.

    Why this is exact. Position i's choice conditions on the drafts before it, which equal the emitted
    tokens as long as every earlier draft was accepted; so every emitted token c_i is chosen exactly as
    a non-speculative step would choose it after the same prefix, and choices made after a rejected
    draft (conditioned on a wrong prefix) are dropped unseen.

    * Greedy: c_i is the argmax given the true prefix, so the emitted ids are non-speculative greedy's.
    * Sampling: c_i ~ p_i independently at each position, and the drafter's proposal q_i is a point mass
      on d_i (it is deterministic given the context). Speculative sampling accepts d_i with probability
      min(1, p_i(d_i)/q_i(d_i)) = p_i(d_i) — here the event c_i = d_i — and on rejection draws from the
      residual ∝ max(0, p_i − q_i), i.e. p_i without d_i, renormalised — here c_i conditioned on
      c_i ≠ d_i. So this rule is speculative sampling with q = δ_d, and the emitted sequence has the
      distribution of non-speculative sampling. (If each position's uniform draw is a function of the
      seed and the position alone, the emitted tokens are even the very ones non-speculative sampling
      with those draws emits.)
    """
    if len(chosen) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} chosen tokens, got {len(chosen)}")
    n = next((i for i, (d, c) in enumerate(zip(drafts, chosen)) if d != c), len(drafts))
    return n, list(chosen[:n + 1])


class AdaptiveK:
    """How many drafts the next pass verifies (:attr:`k`), from the acceptance of the last one.

    A fully accepted pass doubles K (up to ``k_max``; from 0 to 1); a pass that accepted n of its
    drafts, 0 < n < K, asks for n + 1 next; a pass that accepted none halves K (down to ``k_min``). At
    K = 0 the pass is a plain decode step, and the :class:`Speculator` still drafts one token in hindsight
    (U's own plaintext work) and reports whether it would have been accepted, so that K comes back when
    the text turns predictable. Every extra verified position costs compute and bytes, and on the 8-hop
    route a pass with drafts takes the 12-hop ops (:class:`CostAwareK` weighs that); an open question,
    where drafts rarely match, settles near K = 0.
    ``AdaptiveK.fixed(k)`` always asks for k.
    """

    def __init__(self, k_max: int = 8, k_min: int = 0, k_start: int = 2) -> None:
        if not 0 <= k_min <= k_start <= k_max:
            raise ValueError(f"need 0 <= k_min <= k_start <= k_max, got {k_min}, {k_start}, {k_max}")
        self.k_max, self.k_min, self.k = k_max, k_min, k_start

    @classmethod
    def fixed(cls, k: int) -> "AdaptiveK":
        """A policy that always asks for ``k`` drafts."""
        return cls(k, k, k)

    def choose(self, keys: int) -> int:
        """K for the next pass, after ``keys`` tokens of context (this policy: :attr:`k`, whatever ``keys``)."""
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt K after a pass that verified ``drafted`` drafts (or a hindsight draft) and accepted ``accepted``."""
        _check(drafted, accepted)
        if drafted == 0:  # the drafter had nothing: nothing learnt
            return
        if accepted == drafted:
            k = max(1, 2 * self.k)
        elif accepted:
            k = accepted + 1
        else:
            k = self.k // 2
        self.k = max(self.k_min, min(self.k_max, k))


def _check(drafted: int, accepted: int) -> None:
    if not 0 <= accepted <= drafted:
        raise ValueError(f"accepted {accepted} of {drafted} drafts")


class CostAwareK(AdaptiveK):
    """K that maximises the expected tokens per unit of cost, for a pass whose cost depends on K.

    On the 8-hop route a pass without drafts is a decode step on the fused op (8 hops a layer) while a
    pass with drafts has causal rows and takes the 12-hop ops: drafting pays only when enough drafts are
    accepted. The policy models each draft as accepted with probability a once the ones before it were;
    a pass with K drafts then emits E(K) = 1 + a + … + a^K tokens. a is estimated from recent passes
    (accepted drafts as successes, a rejection as a failure; both discounted by ``decay`` per pass,
    starting from one of each), and :meth:`choose` takes the K ≤ ``k_max`` with the largest
    E(K) / (cost(K, keys) + ``row_cost``·K), where ``cost(K, keys)`` is the pass's cost after ``keys``
    tokens (e.g. :meth:`~permllm.runtime.api.Session.pass_hops`) and ``row_cost`` the price of a verified
    row (compute and bytes) in the same unit. At K = 0 the :class:`Speculator` still drafts one token in
    hindsight, so a rises again when the text turns predictable.
    """

    def __init__(self, cost: Callable[[int, int], float], k_max: int = 16, decay: float = 0.7,
                 row_cost: float = 2.0) -> None:
        super().__init__(k_max, 0, 0)
        if not 0 < decay <= 1 or row_cost < 0:
            raise ValueError(f"need 0 < decay <= 1 and row_cost >= 0, got {decay}, {row_cost}")
        self.cost, self.decay, self.row_cost = cost, decay, row_cost
        self.hits, self.misses = 1.0, 1.0

    @property
    def acceptance(self) -> float:
        """The estimated probability a that a draft is accepted once the drafts before it were."""
        return self.hits / (self.hits + self.misses)

    def choose(self, keys: int) -> int:
        """The K ≤ ``k_max`` with the most expected tokens per cost after ``keys`` tokens (the smallest on a tie)."""
        a = self.acceptance

        def value(k: int) -> float:
            return sum(a ** i for i in range(k + 1)) / (self.cost(k, keys) + self.row_cost * k)
        self.k = max(range(self.k_max + 1), key=lambda k: (value(k), -k))
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        """Count a pass that verified ``drafted`` drafts (or a hindsight draft) and accepted ``accepted``."""
        _check(drafted, accepted)
        if drafted == 0:
            return
        self.hits = self.decay * self.hits + accepted
        self.misses = self.decay * self.misses + (accepted < drafted)


@dataclass
class SpecStats:
    """What a speculative generation cost: verify passes, verified positions (Σ K + 1), drafts sent and
    accepted."""

    passes: int = 0
    rows: int = 0
    drafted: int = 0
    accepted: int = 0


class Speculator:
    """U's side of speculative decoding around a verify pass: :meth:`propose` the drafts, then
    :meth:`settle` what selection chose into the tokens to emit, adapting K as it goes."""

    def __init__(self, drafter: Drafter, policy: AdaptiveK | None = None, eos_ids: Iterable[int] = ()) -> None:
        self.drafter, self.policy = drafter, policy or AdaptiveK()
        # drafts stop before an end id: the row after the drafts chooses it as well, and nothing after it is emitted
        self.eos = set(eos_ids)
        self.stats = SpecStats()
        self._hindsight: list[int] = []  # at K = 0: the one draft that was not sent

    def propose(self, context: list[int], limit: int) -> list[int]:
        """The drafts to verify after ``context`` in the next pass: at most :attr:`AdaptiveK.k` and ``limit``
        (the tokens the generation may still emit, less the one every pass emits), and none from an end id on."""
        want = self.policy.choose(len(context))
        k = min(want, limit)
        self._hindsight = []
        if k <= 0:
            if want == 0 and limit > 0:
                self._hindsight = self.drafter.draft(context, 1)[:1]
            return []
        drafts = [int(t) for t in self.drafter.draft(context, k)[:k]]
        end = next((i for i, t in enumerate(drafts) if t in self.eos), len(drafts))
        return drafts[:end]

    def settle(self, drafts: list[int], chosen: list[int]) -> list[int]:
        """The tokens the pass emits (:func:`accept`); records the pass and adapts K."""
        n, out = accept(drafts, chosen)
        if drafts:
            self.policy.update(len(drafts), n)
        elif self._hindsight:
            self.policy.update(1, int(self._hindsight[0] == chosen[0]))
        s = self.stats
        s.passes += 1
        s.rows += len(chosen)
        s.drafted += len(drafts)
        s.accepted += n
        return out


def speculative_generate(verify: Verify, speculator: Speculator, prompt: list[int], max_new: int,
                         eos_ids: Iterable[int] = ()) -> list[int]:
    """Generate up to ``max_new`` tokens after ``prompt`` by verify passes (stopping after an id in
    ``eos_ids``: give the speculator the same ones); ``verify(context, drafts)`` returns the K + 1 tokens
    chosen at the verified positions."""
    eos = set(eos_ids)
    ids, out = list(prompt), []
    while len(out) < max_new:
        drafts = speculator.propose(ids, max_new - len(out) - 1)
        for t in speculator.settle(drafts, verify(ids, drafts)):
            ids.append(t)
            out.append(t)
            if t in eos:
                return out
    return out


class GreedyVerifier:
    """The plaintext stand-in for the private verify pass: the model's greedy choices at the K + 1
    positions, over a KV cache trimmed to the accepted prefix (what the private step must do to its own)."""

    def __init__(self, model: "str | Path | Any", dtype: str = "float32") -> None:
        self._lm = _CachedLM(_load(model, dtype))

    def __call__(self, context: list[int], drafts: list[int]) -> list[int]:
        """The greedy tokens after ``context`` + d_1 … d_i for i = 0 … K."""
        return [int(t) for t in self._lm.logits(list(context) + list(drafts), len(drafts) + 1).argmax(-1)]

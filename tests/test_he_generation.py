"""Private generation in the light mode (``offline="he"``) against transformers, on reduced random models.

The light client must give the plaintext greedy ids exactly, hold no weight-sized
state, receive only public numbers in the setup, and leave the online phase unchanged
(the same messages and hops as the dealt mode).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

import permllm
from permllm.model import load_model
from permllm.protocols import Party, ShareConfig
from permllm.protocols import party as party_module
from permllm.protocols.he_matmul import BATCH_KEY, CKKS_KEY
from permllm.runtime import local_trio
from permllm.runtime import session as S
from permllm.runtime.session import HelperSession, ModelSession, UserSession

from .test_generation import _gpt2_dir, _llama_dir, hf_greedy


async def test_light_llama_matches_transformers_and_holds_no_weights(tmp_path):
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    prompt = [5, 17, 42, 99, 123, 250, 7, 3]
    async with await permllm.local(lm, offline="he") as s:
        user, model = s.trio.user, s.trio.model
        assert all(w.value is None for w in user.weights.values())
        setup_recv = user.meter.total("setup").bytes_recv
        weights = sum(np.asarray(lm.weights[n]).size for n in user.weights) * 8
        assert setup_recv < 0.05 * weights + 100_000  # public numbers (architecture, magnitudes, shapes) only
        ids = [t async for t in s.generate_ids(prompt, 12)]
        hops = s.last.online_hops
        assert BATCH_KEY not in user.store and BATCH_KEY not in model.store
        assert CKKS_KEY in user.store and CKKS_KEY in model.store and CKKS_KEY not in s.trio.helper.store
        again = [t async for t in s.generate_ids(prompt[:3], 5)]  # a second generation in the same session
    assert ids == hf_greedy(hf, prompt, 12)
    assert again == hf_greedy(hf, prompt[:3], 5)
    async with await permllm.local(lm, config=ShareConfig(route="12")) as s:
        # the dealt mode on the light client's route: its exact ring lookup adds the lift's 2 hops a step
        assert [t async for t in s.generate_ids(prompt, 12)] == ids
        assert s.last.online_hops == hops + 2 * 12


async def test_light_gpt2_over_tcp_matches_transformers(tmp_path):
    """Learned positions, LayerNorm with biases, GeLU; loopback TCP; batches of 2, 3 and 3 steps."""
    d, hf = _gpt2_dir(tmp_path)
    lm = load_model(str(d))
    prompt = [3, 200, 31, 4, 99]
    async with await permllm.local(lm, transport="tcp", offline="he") as s:
        old = S.LIGHT_FIRST, S.LIGHT_BATCH
        S.LIGHT_FIRST, S.LIGHT_BATCH = 2, 3
        try:
            ids = [t async for t in s.generate_ids(prompt, 8)]
        finally:
            S.LIGHT_FIRST, S.LIGHT_BATCH = old
    assert ids == hf_greedy(hf, prompt, 8)


async def test_parties_must_agree_on_the_offline_mode(tmp_path):
    d, _ = _llama_dir(tmp_path)
    lm = load_model(str(d))
    trio = await local_trio("memory", ShareConfig(), seeds=False)
    trio.user.config = ShareConfig(offline="he")
    try:
        ms, us, hs = ModelSession(trio.model, lm.weights), UserSession(trio.user), HelperSession(trio.helper)
        with pytest.raises(Exception, match="offline mode"):
            await permllm.runtime.gather_fail_fast([ms.setup(), us.setup(), hs.setup()])
    finally:
        await trio.close()


async def test_light_user_draws_decode_masks_after_the_exchange_and_forgets_unused_state(tmp_path, monkeypatch):
    """Decode steps find U's small masks drawn after their batch's HE exchange (none drawn online,
    the prefill's are; larger ones than PLAN_MAX are drawn online); a generation that stops early
    leaves no per-token state at U or M."""
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    prompt = [5, 17, 42, 99]
    drawn: Counter = Counter()
    mask = Party.mask

    def counted(self, *args, **kwargs):
        if self.is_user and self.phase == "online":
            drawn[self.token] += 1
        return mask(self, *args, **kwargs)

    monkeypatch.setattr(Party, "mask", counted)
    want = hf_greedy(hf, prompt, 6)
    async with await permllm.local(lm, offline="he") as s:
        user, model = s.trio.user, s.trio.model
        assert [t async for t in s.generate_ids(prompt, 6, stop_at_eos=False)] == want
        assert drawn[0] > 0 and all(drawn[t] == 0 for t in range(1, 6))
        # Rows 48 wide are now drawn online; the scores (6 heads × ctx) of the first steps are not.
        monkeypatch.setattr(party_module, "PLAN_MAX", 47)
        drawn.clear()
        assert [t async for t in s.generate_ids(prompt, 6, stop_at_eos=False)] == want
        decode = [drawn[t] for t in range(7, 12)]
        assert all(0 < n <= drawn[6] for n in decode) and min(decode) < drawn[6], drawn
        s._user.arch = dataclasses.replace(s._user.arch, eos_ids=(want[2],))
        assert [t async for t in s.generate_ids(prompt, 6)] == hf_greedy(hf, prompt, 3)  # stops after 3 of 6
        assert [t async for t in s.generate_ids(prompt, 1)] == want[:1]  # M has ended the last one by now
        for p in (user, model):
            left = [k for k in p.store if type(k[1]) is int and k[1] >= 0]
            assert not left, f"{p.role.value} kept {left[:3]}"
            assert not p.caches, f"{p.role.value} kept the KV caches {list(p.caches)[:3]}"

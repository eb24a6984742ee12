"""The light client on the real model: SmolLM2-135M-Instruct, "What is the capital of France?".

The greedy tokens of the light mode must be transformers' exactly, and the user must
have received no weight-sized data. (bench/light_client.py measures memory and time.)
"""
from __future__ import annotations

import permllm

from .test_smollm2 import FRANCE, chat_ids, hf, hf_greedy, smol  # noqa: F401 (fixtures)


async def test_smollm2_light_client_matches_transformers(smol, hf):  # noqa: F811
    prompt = chat_ids(smol.tokenizer, FRANCE)
    async with await permllm.local(smol, offline="he") as s:
        user = s.trio.user
        assert all(w.value is None for w in user.weights.values())
        # Only public numbers: the architecture, the per-column mask magnitudes (~3.5 MB), weight shapes.
        assert user.meter.total("setup").bytes_recv < 8_000_000   # vs ~1 GB of masked weights in the dealt mode
        text = "".join([piece async for piece in s.generate(FRANCE, 8)])
        ids = s.last.token_ids
    assert "Paris" in text
    assert ids == hf_greedy(hf, prompt, 8)

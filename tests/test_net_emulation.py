"""Tests of permllm.net.emulation: the link model analytically, and end to end through a Channel."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from permllm.net import LinkEmulator, Meter, encode_message, memory_pair, open_channel


def test_schedule_analytic():
    link = LinkEmulator(delay_s=0.05, bandwidth_bps=8e6)  # 1 byte per microsecond
    assert link.schedule(1000, now=10.0) == pytest.approx(10.0 + 0.001 + 0.05)
    # handed over while the link is still busy: queues behind the first frame
    assert link.schedule(2000, now=10.0005) == pytest.approx(10.001 + 0.002 + 0.05)
    # handed over after the link went idle: starts at once
    assert link.schedule(1000, now=11.0) == pytest.approx(11.0 + 0.001 + 0.05)
    assert link.busy_until == pytest.approx(11.001)


def test_schedule_without_bandwidth_limit_and_from_spec():
    link = LinkEmulator(delay_s=0.01)
    assert [link.schedule(10**9, now=t) for t in (1.0, 1.0, 2.0)] == pytest.approx([1.01, 1.01, 2.01])
    spec = LinkEmulator.from_spec(rtt_ms=40, bandwidth_mbit=100)
    assert spec.delay_s == pytest.approx(0.02) and spec.bandwidth_bps == pytest.approx(100e6)
    assert LinkEmulator.from_spec().schedule(123, now=5.0) == 5.0
    with pytest.raises(ValueError):
        LinkEmulator(delay_s=-1)
    with pytest.raises(ValueError):
        LinkEmulator(bandwidth_bps=0)


async def test_burst_over_emulated_link():
    ta, tb = memory_pair("user", "helper")
    ca, cb = await asyncio.gather(
        open_channel(ta, Meter(), role="user", peer_role="helper", session="s",
                     link=LinkEmulator(delay_s=0.020, bandwidth_bps=80e6)),
        open_channel(tb, Meter(), role="helper", peer_role="user", session="s"),
    )
    loop = asyncio.get_running_loop()
    n, size = 10, 100_000
    payload = np.zeros(size - 43, np.uint8)  # frame on the wire: 100 kB with envelope and prefix
    assert len(encode_message(("burst", 0), "online", 1, payload)) + 4 == size
    arrivals: dict[int, float] = {}

    async def receive(i: int) -> None:
        await cb.recv(("burst", i))
        arrivals[i] = loop.time()

    receivers = [asyncio.create_task(receive(i)) for i in range(n)]
    await asyncio.sleep(0)
    t0 = loop.time()
    for i in range(n):
        ca.send(("burst", i), payload)
    assert loop.time() - t0 < 0.020  # the sender never sleeps
    await asyncio.wait_for(asyncio.gather(*receivers), 5)
    assert arrivals[0] - t0 == pytest.approx(size * 8 / 80e6 + 0.020, abs=0.030)
    assert arrivals[n - 1] - t0 == pytest.approx(n * size * 8 / 80e6 + 0.020, abs=0.030)
    assert [arrivals[i] for i in range(n)] == sorted(arrivals.values())  # FIFO
    await ca.close()
    await cb.close()

"""Shared fixtures: three connected parties over memory pairs or loopback TCP."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from permllm.protocols import ShareConfig
from permllm.runtime import DealtInput, Trio, local_trio, run_offline, run_online

# Max abs error of one op against plaintext, relative to the output's magnitude, per share dtype.
# Measured (see bench/ops_fidelity.py): ~1e-9 in float64 at R=2**12.
REL_TOL = {"float64": 1e-6}


@pytest.fixture(params=["memory", "tcp"])
async def trio(request) -> Trio:
    t = await local_trio(request.param, ShareConfig())
    yield t
    await t.close()


Shares = DealtInput


async def run_both(trio: Trio, graph, token: int = 0):
    """Offline then online; returns (model output, user output) of the online phase."""
    await run_offline(trio, graph, token)
    m, u = await run_online(trio, graph, token)
    return m, u


def online_counts(trio: Trio) -> tuple[int, int]:
    """(online messages sent by M and U, dependent online hops)."""
    msgs = sum(p.meter.total("online").msgs_sent for p in (trio.model, trio.user))
    hops = max(p.meter.hops("online") for p in (trio.model, trio.user))
    return msgs, hops


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))

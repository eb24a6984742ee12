"""Wire the three parties of one session together on this machine.

:func:`local_trio` builds the embedded default — model, user and helper in one
process — over either in-memory pairs or real loopback TCP (each link handshaken
with role and session id), each party with its own :class:`~permllm.net.Meter`.
:func:`run_setup`, :func:`run_offline` and :func:`run_online` run one coroutine
graph — the same function for every party — in a phase.
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

from ..net import Channel, LinkEmulator, Meter, memory_pair, open_channel, tcp_connect, tcp_serve
from ..protocols import Party, Role, ShareConfig, ring
from ..protocols.config import RING_BITS
from ..protocols.linear import dealt_batch

__all__ = ["Trio", "local_trio", "run_setup", "run_offline", "run_offline_batch", "run_online", "gather_fail_fast", "DealtInput"]

Graph = Callable[[Party], Awaitable[Any]]


@dataclass
class Trio:
    """The three parties of one local session."""

    model: Party
    user: Party
    helper: Party
    _servers: list = field(default_factory=list)

    @property
    def parties(self) -> tuple[Party, Party, Party]:
        return (self.model, self.user, self.helper)

    def emulate(self, link: LinkEmulator | None) -> None:
        """Emulate ``link`` on every direction of every link from now on (each direction its own copy)."""
        for p in self.parties:
            for ch in p.channels.values():
                ch.emulate(_copy(link))

    async def close(self) -> None:
        for p in self.parties:
            for ch in p.channels.values():
                await ch.close()
        for s in self._servers:
            s.close()
            await s.wait_closed()

    async def __aenter__(self) -> "Trio":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _pair_memory(a: Role, b: Role, session: str, meters: dict[Role, Meter],
                       link: LinkEmulator | None) -> tuple[Channel, Channel]:
    ta, tb = memory_pair(a.value, b.value)
    return await asyncio.gather(
        open_channel(ta, meters[a], role=a.value, peer_role=b.value, session=session, link=_copy(link)),
        open_channel(tb, meters[b], role=b.value, peer_role=a.value, session=session, link=_copy(link)))


async def _pair_tcp(a: Role, b: Role, session: str, meters: dict[Role, Meter],
                    link: LinkEmulator | None, servers: list) -> tuple[Channel, Channel]:
    """``b`` listens on a loopback port, ``a`` connects."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_transport(t: Any) -> None:
        if not accepted.done():
            accepted.set_result(t)

    server = await tcp_serve("127.0.0.1", 0, on_transport, peer=a.value)
    servers.append(server)
    port = server.sockets[0].getsockname()[1]
    ta = await tcp_connect("127.0.0.1", port, peer=b.value)
    tb = await accepted
    return await asyncio.gather(
        open_channel(ta, meters[a], role=a.value, peer_role=b.value, session=session, link=_copy(link)),
        open_channel(tb, meters[b], role=b.value, peer_role=a.value, session=session, link=_copy(link)))


def _copy(link: LinkEmulator | None) -> LinkEmulator | None:
    return None if link is None else LinkEmulator(link.delay_s, link.bandwidth_bps)


async def local_trio(transport: str = "memory", config: ShareConfig | None = None, *,
                     link: LinkEmulator | None = None, seeds: bool = True) -> Trio:
    """Three connected parties in this process over ``"memory"`` pairs or loopback ``"tcp"``.

    ``link`` emulates every direction of every link (one-way delay, bandwidth).
    With ``seeds`` the setup-phase seed exchange runs before returning.
    """
    config = config or ShareConfig()
    session = secrets.token_hex(8)
    meters = {r: Meter() for r in Role}
    servers: list = []
    chans: dict[Role, dict[Role, Channel]] = {r: {} for r in Role}
    for a, b in ((Role.USER, Role.MODEL), (Role.MODEL, Role.HELPER), (Role.USER, Role.HELPER)):
        if transport == "memory":
            ca, cb = await _pair_memory(a, b, session, meters, link)
        elif transport == "tcp":
            ca, cb = await _pair_tcp(a, b, session, meters, link, servers)
        else:
            raise ValueError(f"unknown transport {transport!r} (memory or tcp)")
        chans[a][b], chans[b][a] = ca, cb
    trio = Trio(*(Party(r, chans[r], config, meters[r]) for r in Role), _servers=servers)
    if seeds:
        await run_setup(trio, lambda p: p.establish_seeds())
    return trio


async def _run(parties: list[Party], phase: str, token: int, graph: Graph) -> list[Any]:
    return await gather_fail_fast([graph(p.view(phase, token)) for p in parties])


async def gather_fail_fast(coros: list[Awaitable[Any]]) -> list[Any]:
    """Await all; on the first failure cancel the rest and raise that failure (nothing hangs)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_setup(trio: Trio, graph: Graph) -> list[Any]:
    """Run ``graph`` in the setup phase at all three parties; returns [model, user, helper] results."""
    return await _run(list(trio.parties), "setup", 0, graph)


async def run_offline(trio: Trio, graph: Graph, token: int = 0) -> list[Any]:
    """Run ``graph`` in the offline phase for ``token`` at all three parties."""
    return await _run(list(trio.parties), "offline", token, graph)


async def run_offline_batch(trio: Trio, graphs: list[tuple[int, Graph]]) -> None:
    """Run the offline phase of several (token, graph) pairs, in order at each party, as one
    batch: in the dealt mode U and H compute each linear op's products once for all of them."""
    tokens = [t for t, _ in graphs]

    async def run(p: Party) -> None:
        async with dealt_batch(p, tokens):
            for token, graph in graphs:
                await graph(p.view("offline", token))
    await gather_fail_fast([run(p) for p in trio.parties])


async def run_online(trio: Trio, graph: Graph, token: int = 0) -> list[Any]:
    """Run ``graph`` in the online phase for ``token`` at the model and user parties."""
    return await _run([trio.model, trio.user], "online", token, graph)


class DealtInput:
    """A value secret-shared by the local harness (tests, demo, benchmarks): x = x_M + x_U.

    U's share comes from the s_UH stream (so H derives it, the U-share invariant) and
    M's is x − x_U. A real session never deals inputs this way: the user's tokens
    enter through :func:`~permllm.protocols.embed`.
    """

    __slots__ = ("xm", "xu")

    def __init__(self, trio: Trio, name: str, x: np.ndarray, mag: float, scale: int | None = None) -> None:
        u = trio.user
        saved, u.token = u.token, 0
        try:
            self.xu = u.mask("uh", "input:" + name, "x", np.shape(x), u.ratio * mag)
        finally:
            u.token = saved
        if u.ring:  # x encoded at ``scale`` fractional bits on Z_2^64
            if scale is None:
                raise ValueError("a ring input needs its scale")
            self.xm = ring.encode(x, scale, RING_BITS, "input " + name) - self.xu
        else:
            self.xm = np.asarray(x, dtype=u.dtype) - self.xu

    def of(self, p: Party) -> np.ndarray | None:
        """This party's share for the current phase (M has none offline)."""
        if p.is_model:
            return None if p.phase == "offline" else self.xm
        return self.xu

"""Keep-alives over loopback TCP: a peer that is alive but has nothing to send is not declared dead; one
whose event loop or process stops is, within about the link timeout; keep-alives never reach a mailbox, the
meter or the hop clock."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from permllm.net import (
    PROTOCOL_VERSION, FrameError, HandshakeError, Meter, PeerAborted, PeerTimeout, encode_message, memory_pair,
    open_channel, packb, tcp_connect, tcp_serve,
)
from permllm.net.channel import KEEPALIVE_MIN, accept_channel, keepalive_interval
from permllm.net.codec import encode_keepalive

from .test_net_channel import GUARD, tcp_pair

LIMIT = 0.5  # the link timeout under test (keep-alives every 0.125 s)
DEAD = r"peer '\w+' sent and accepted nothing for 0.5 s while this party waited for \('x',\)"


async def _open(ta, tb, a_timeout: float | None = LIMIT, b_timeout: float | None = LIMIT):
    ma, mb = Meter(), Meter()
    ca, cb = await asyncio.wait_for(asyncio.gather(
        open_channel(ta, ma, role="user", peer_role="helper", session="s1", bind=True, link_timeout=a_timeout),
        open_channel(tb, mb, role="helper", peer_role="user", session="s1", bind=True, link_timeout=b_timeout),
    ), GUARD)
    return ca, cb, ma, mb


def _net_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("permllm-net-") and not t.done()]


async def test_idle_peer_is_alive_and_keepalives_stay_out_of_mailboxes_and_meters():
    async with tcp_pair() as (ta, tb):
        ca, cb, ma, mb = await _open(ta, tb)
        pending = asyncio.ensure_future(ca.recv(("x",)))
        await asyncio.sleep(3 * LIMIT)  # the peer says nothing for 3 link timeouts
        assert not pending.done()
        cb.send(("x",), [1, 2, 3])
        assert await asyncio.wait_for(pending, GUARD) == [1, 2, 3]
        sent, got = ca.keepalives
        assert got >= 6 and cb.keepalives[0] == got and sent == cb.keepalives[1]
        assert not ca._mailbox and not cb._mailbox and ca.unread == cb.unread == 0
        hello = ma.total("setup").bytes_sent + mb.total("setup").bytes_sent  # both hellos
        nbytes = len(encode_message(("x",), "online", 1, [1, 2, 3], ca._bind)) + 4
        for m in (ma, mb):
            assert set(m.stats) == {("setup", "handshake"), ("online", "x")}
            assert m.total("setup").bytes_sent + m.total("setup").bytes_recv == hello
        assert (ma.total("online").bytes_recv, ma.total("online").msgs_recv) == (nbytes, 1)
        assert (mb.total("online").bytes_sent, mb.total("online").msgs_sent) == (nbytes, 1)
        assert (ma.hops("online"), mb.hops("online"), ma.hops("setup"), mb.hops("setup")) == (1, 0, 0, 0)
        with pytest.raises(ValueError, match="reserved for keep-alive frames"):
            ca.send(("!alive",), None)
        await ca.close()
        await cb.close()
        assert not _net_tasks()


async def test_keepalives_follow_what_each_peer_asks_for():
    async with tcp_pair() as (ta, tb):
        ca, cb, *_ = await _open(ta, tb, a_timeout=0.4, b_timeout=None)  # only the user has a link timeout
        await asyncio.sleep(0.6)
        assert ca.keepalives[0] == 0 and cb.keepalives[1] == 0  # the helper asked for none
        assert 3 <= cb.keepalives[0] <= 7  # every 0.1 s
        assert len(ca._tasks) == 2 and len(cb._tasks) == 3
        await ca.abort("done")
        with pytest.raises(PeerAborted):
            await cb.recv(("x",))
        await asyncio.wait([cb._tasks[2]], timeout=GUARD)
        assert cb._tasks[2].cancelled()  # the failed link sends no more keep-alives, even before close()
        await cb.close()
        assert not _net_tasks()
    assert keepalive_interval(120) == 30 and keepalive_interval(0.01) == KEEPALIVE_MIN


async def test_busy_sender_sends_no_keepalives():
    async with tcp_pair() as (ta, tb):
        ca, cb, *_ = await _open(ta, tb)
        for i in range(10):  # a message every 0.05 s is sign of life enough
            cb.send(("m", i), i)
            await asyncio.sleep(0.05)
        assert [await ca.recv(("m", i)) for i in range(10)] == list(range(10))
        assert cb.keepalives[0] <= 1
        await ca.close()
        await cb.close()


class _ThreadPeer:
    """The helper's end of a TCP link, run by its own event loop in another thread so that it can hang."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def run(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def hang(self, seconds: float) -> None:
        """Block the peer's loop with synchronous work, as a long computation on the loop thread would."""
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(GUARD)
        self.loop.close()


@contextlib.asynccontextmanager
async def _served():
    """(transport queue, port) of a TCP server in this loop."""
    accepted: asyncio.Queue = asyncio.Queue()
    server = await tcp_serve("127.0.0.1", 0, accepted.put, peer="helper")
    try:
        yield accepted, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_peer_whose_event_loop_hangs_is_declared_dead():
    peer = _ThreadPeer()
    try:
        async with _served() as (accepted, port):
            async def connect():
                t = await tcp_connect("127.0.0.1", port, peer="user")
                return await open_channel(t, Meter(), role="helper", peer_role="user", session="s1")

            theirs = asyncio.ensure_future(peer.run(connect()))
            ts = await asyncio.wait_for(accepted.get(), GUARD)
            ours = await open_channel(ts, Meter(), role="user", peer_role="helper", session="s1", link_timeout=LIMIT)
            far = await theirs
            pending = asyncio.ensure_future(ours.recv(("x",)))
            await asyncio.sleep(3 * LIMIT)
            assert not pending.done()  # alive in its own thread, nothing to send
            peer.hang(3 * LIMIT)
            t0 = time.monotonic()
            with pytest.raises(PeerTimeout, match=DEAD):
                await asyncio.wait_for(pending, GUARD)
            assert time.monotonic() - t0 < 2 * LIMIT
            await ours.close()
            await peer.run(far.close())
    finally:
        peer.stop()


_PEER = """
import asyncio, sys
from permllm.net import Meter, open_channel, tcp_connect

async def main():
    t = await tcp_connect("127.0.0.1", int(sys.argv[1]), peer="user")
    ch = await open_channel(t, Meter(), role="helper", peer_role="user", session="s1")
    print("ready", flush=True)
    await ch.wait_failed()

asyncio.run(main())
"""


async def test_peer_process_stopped_is_declared_dead():
    root = Path(__file__).resolve().parents[1]
    async with _served() as (accepted, port):
        proc = subprocess.Popen([sys.executable, "-c", _PEER, str(port)], cwd=root, stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(root)})
        try:
            ts = await asyncio.wait_for(accepted.get(), 30)
            ours = await open_channel(ts, Meter(), role="user", peer_role="helper", session="s1", link_timeout=LIMIT)
            assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
            pending = asyncio.ensure_future(ours.recv(("x",)))
            await asyncio.sleep(3 * LIMIT)
            assert not pending.done() and ours.keepalives[1] >= 6
            proc.send_signal(signal.SIGSTOP)  # the process hangs: its socket stays open, it sends nothing
            t0 = time.monotonic()
            with pytest.raises(PeerTimeout, match=DEAD):
                await asyncio.wait_for(pending, GUARD)
            assert time.monotonic() - t0 < 2 * LIMIT
            await ours.close()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


async def test_silent_socket_is_declared_dead():
    """A peer that did the handshake by hand and sends nothing (no keep-alives either) times out as before."""
    async with _served() as (accepted, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ts = await asyncio.wait_for(accepted.get(), GUARD)
        hello = packb({"permllm": PROTOCOL_VERSION, "role": "helper", "session": "s1"})
        writer.write(struct.pack("!I", len(hello)) + hello)
        ours = await open_channel(ts, Meter(), role="user", peer_role="helper", session="s1", link_timeout=LIMIT)
        (n,) = struct.unpack("!I", await reader.readexactly(4))
        assert b"alive" in await reader.readexactly(n)
        body = encode_keepalive()
        writer.write(struct.pack("!I", len(body)) + body)  # one keep-alive: not a message
        t0 = time.monotonic()
        with pytest.raises(PeerTimeout, match=DEAD):
            await asyncio.wait_for(ours.recv(("x",)), GUARD)
        assert LIMIT * 0.9 < time.monotonic() - t0 < 2 * LIMIT
        assert ours.keepalives == (0, 1) and not ours._mailbox
        await ours.close()
        writer.transport.abort()


@pytest.mark.parametrize("frame, why", [
    (lambda bind: encode_message(("!alive",), "setup", 0, "x", bind), r"bad keep-alive frame: .* got a payload"),
    (lambda bind: encode_message(("!alive", 1), "online", 0, None, bind),
     r"bad keep-alive frame: .* got a longer tag, another phase"),
    (lambda bind: encode_keepalive(b"12345678"), r"frame of another session"),
    (lambda bind: encode_keepalive(), r"bad message: a frame without a session binding on a session-bound channel"),
], ids=["payload", "tag-and-phase", "other-session", "unbound"])
async def test_malformed_keepalive_fails_the_channel(frame, why):
    async with tcp_pair() as (ta, tb):
        ca, cb, *_ = await _open(ta, tb, a_timeout=None, b_timeout=None)
        await tb.send(frame(ca._bind))  # as the helper's end, past its channel
        with pytest.raises(FrameError, match=r"malformed frame from peer 'helper': " + why):
            await asyncio.wait_for(ca.recv(("x",)), GUARD)
        await ca.close()
        await cb.close()


@pytest.mark.parametrize("alive", [-1, 0, "1", True, float("nan"), float("inf")])
async def test_hello_with_a_bad_keepalive_interval_is_refused(alive):
    ta, tb = memory_pair("user", "model")
    hello = {"permllm": PROTOCOL_VERSION, "role": "user", "session": "s1", "alive": alive}
    await ta.send(packb(hello))
    with pytest.raises(HandshakeError, match=r"malformed handshake from peer 'user': alive must be a positive"):
        await accept_channel(tb, Meter(), role="model", peer_roles={"user"})
    await ta.close()

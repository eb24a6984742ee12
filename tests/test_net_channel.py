"""Tests of permllm.net transports, channels, handshake and meter over real in-memory pairs and TCP loopback."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import struct
import subprocess

import numpy as np
import pytest

from permllm.net import (
    PROTOCOL_VERSION,
    Channel,
    FrameError,
    FrameTooLarge,
    HandshakeError,
    Meter,
    PeerClosed,
    encode_message,
    memory_pair,
    open_channel,
    packb,
    tcp_connect,
    tcp_serve,
)

GUARD = 5.0  # hang guard only; the behaviour under test must be much faster


@contextlib.asynccontextmanager
async def tcp_pair(max_client: int | None = None, max_server: int | None = None):
    """(client transport, server transport) over TCP loopback."""
    accepted: asyncio.Queue = asyncio.Queue()
    kw_s = {} if max_server is None else {"max_frame": max_server}
    kw_c = {} if max_client is None else {"max_frame": max_client}
    server = await tcp_serve("127.0.0.1", 0, accepted.put, peer="user", **kw_s)
    port = server.sockets[0].getsockname()[1]
    try:
        tc = await tcp_connect("127.0.0.1", port, peer="helper", **kw_c)
        ts = await asyncio.wait_for(accepted.get(), GUARD)
        try:
            yield tc, ts
        finally:
            await tc.close()
            await ts.close()
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def transport_pair(kind: str):
    if kind == "memory":
        ta, tb = memory_pair("user", "helper")  # ta is the user's end: its peer is "helper"
        try:
            yield ta, tb
        finally:
            await ta.close()
            await tb.close()
    else:
        async with tcp_pair() as pair:
            yield pair


async def open_pair(ta, tb, **kw):
    ma, mb = Meter(), Meter()
    ca, cb = await asyncio.wait_for(asyncio.gather(
        open_channel(ta, ma, role="user", peer_role="helper", session="s1", **kw),
        open_channel(tb, mb, role="helper", peer_role="user", session="s1", **kw),
    ), GUARD)
    return ca, cb, ma, mb


@pytest.fixture(params=["memory", "tcp"])
async def chans(request):
    async with transport_pair(request.param) as (ta, tb):
        ca, cb, ma, mb = await open_pair(ta, tb)
        yield ca, cb, ma, mb
        await ca.close()
        await cb.close()


@contextlib.asynccontextmanager
async def raw_tcp_peer(max_frame: int | None = None):
    """A channel served over TCP, and a raw (reader, writer) client that already did the handshake by hand."""
    channels: asyncio.Queue = asyncio.Queue()

    async def on_transport(t):
        await channels.put(await open_channel(t, Meter(), role="helper", peer_role="user", session="s1"))

    kw = {} if max_frame is None else {"max_frame": max_frame}
    server = await tcp_serve("127.0.0.1", 0, on_transport, peer="user", **kw)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = packb({"permllm": PROTOCOL_VERSION, "role": "user", "session": "s1"})
    writer.write(struct.pack("!I", len(hello)) + hello)
    (n,) = struct.unpack("!I", await reader.readexactly(4))
    await reader.readexactly(n)
    ch = await asyncio.wait_for(channels.get(), GUARD)
    try:
        yield ch, reader, writer
    finally:
        await ch.close()
        writer.transport.abort()
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------- out-of-order delivery and counters


async def test_out_of_order_recvs_and_counters(chans):
    ca, cb, ma, mb = chans
    n = 50
    recvs = [asyncio.create_task(cb.recv(("data", "L0", i))) for i in range(n)]
    aux = asyncio.create_task(ca.recv(("ack",)))
    await asyncio.sleep(0)
    for i in reversed(range(n)):
        ca.send(("data", "L0", i), np.full(100 + i, i, dtype=np.int32))
    cb.send(["ack"], {"ok": True}, phase="offline")
    results = await asyncio.wait_for(asyncio.gather(*recvs), GUARD)
    for i, arr in enumerate(results):
        np.testing.assert_array_equal(arr, np.full(100 + i, i, dtype=np.int32))
    assert await asyncio.wait_for(aux, GUARD) == {"ok": True}

    sa, sb = ma.stats[("online", "data")], mb.stats[("online", "data")]
    assert sa.msgs_sent == sb.msgs_recv == n and sa.msgs_recv == sb.msgs_sent == 0
    assert sa.bytes_sent == sb.bytes_recv
    body_sizes = sum(len(encode_message(("data", "L0", i), "online", 1, np.full(100 + i, i, np.int32))) for i in range(n))
    assert sa.bytes_sent == body_sizes + 4 * n
    assert mb.stats[("offline", "ack")].bytes_sent == ma.stats[("offline", "ack")].bytes_recv > 4
    assert ma.total("offline").msgs_recv == 1 and mb.total(kind="ack").msgs_sent == 1
    assert ma.total("setup", "handshake").msgs_sent == mb.total("setup", "handshake").msgs_recv == 1
    assert ma.total("online") == sa
    snap = ma.snapshot()
    assert snap["stats"]["online/data"]["msgs_sent"] == n and snap["clock"]["online"] == 0


async def test_messages_before_recv_wait_in_mailbox(chans):
    ca, cb, *_ = chans
    for i in range(5):
        ca.send(("x", i), i * 10)
    await ca.flush()
    assert [await asyncio.wait_for(cb.recv(("x", i)), GUARD) for i in (4, 0, 3, 1, 2)] == [40, 0, 30, 10, 20]


async def test_send_encodes_immediately(chans):
    ca, cb, *_ = chans
    a = np.arange(10)
    ca.send(("v",), a)
    a[:] = -1  # the caller may reuse its buffer at once
    np.testing.assert_array_equal(await asyncio.wait_for(cb.recv(("v",)), GUARD), np.arange(10))


async def test_tag_reuse_after_consumption(chans):
    ca, cb, *_ = chans
    for i in range(3):
        ca.send(("again",), i)
        assert await asyncio.wait_for(cb.recv(("again",)), GUARD) == i


async def test_recv_timeout_names_tag_and_message_still_arrives(chans):
    ca, cb, *_ = chans
    with pytest.raises(asyncio.TimeoutError, match=r"\('late', 1\)"):
        await cb.recv(("late", 1), timeout=0.05)
    ca.send(("late", 1), "here")
    assert await asyncio.wait_for(cb.recv(("late", 1)), GUARD) == "here"


async def test_send_rejects_bad_phase_and_tag(chans):
    ca, *_ = chans
    with pytest.raises(ValueError, match="phase"):
        ca.send(("k",), 1, phase="onlin")
    with pytest.raises(TypeError):
        ca.send((), 1)


# ---------------------------------------------------------------- oversized frames


async def test_oversized_frame_tcp():
    limit = 1 << 20
    async with tcp_pair(max_client=16 << 20, max_server=limit) as (tc, ts):
        cc, cs, *_ = await open_pair(tc, ts)
        pending = asyncio.create_task(cs.recv(("big",)))
        await asyncio.sleep(0)
        payload = np.zeros(2 << 20, np.uint8)
        size = len(encode_message(("big",), "online", 1, payload))
        cc.send(("big",), payload)
        with pytest.raises(FrameTooLarge) as info:
            await asyncio.wait_for(pending, 2.0)
        msg = str(info.value)
        assert str(size) in msg and str(limit) in msg and "'user'" in msg and "('big',)" in msg
        assert isinstance(info.value, FrameError)
        await cc.close()
        await cs.close()


async def test_oversized_frame_memory():
    ta, tb = memory_pair("user", "helper", max_frame=16 << 20)
    tb.max_frame = 1000
    ca, cb, *_ = await open_pair(ta, tb)
    pending = asyncio.create_task(cb.recv(("big",)))
    await asyncio.sleep(0)
    payload = np.zeros(5000, np.uint8)
    size = len(encode_message(("big",), "online", 1, payload))
    ca.send(("big",), payload)
    with pytest.raises(FrameTooLarge, match=f"{size} bytes.*1000 bytes"):
        await asyncio.wait_for(pending, 2.0)
    # the receiver closed its end, so the sender's channel fails too
    with pytest.raises(PeerClosed):
        await asyncio.wait_for(ca.recv(("never",)), 2.0)
    await ca.close()
    await cb.close()


async def test_send_over_own_max_frame_raises_at_once():
    ta, tb = memory_pair(max_frame=100)
    ca, cb, *_ = await open_pair(ta, tb)
    with pytest.raises(FrameTooLarge, match="100 bytes"):
        ca.send(("big",), b"x" * 200)
    ca.send(("small",), b"ok")  # the channel is still usable
    assert await asyncio.wait_for(cb.recv(("small",)), GUARD) == b"ok"
    await ca.close()
    await cb.close()


# ---------------------------------------------------------------- malformed input and duplicates


async def test_malformed_frame_on_tcp_wire():
    async with raw_tcp_peer() as (ch, reader, writer):
        pending = asyncio.create_task(ch.recv(("m", 0)))
        await asyncio.sleep(0)
        writer.write(struct.pack("!I", 10) + b"\xc1" * 10)
        with pytest.raises(FrameError, match=r"malformed frame from peer 'user'.*\('m', 0\)"):
            await asyncio.wait_for(pending, 2.0)
        with pytest.raises(FrameError):  # the channel stays failed
            await ch.recv(("m", 1))
        with pytest.raises(FrameError):
            ch.send(("m", 2), None)


async def test_bad_message_structure_on_tcp_wire():
    async with raw_tcp_peer() as (ch, reader, writer):
        body = packb({"not": "a message"})
        writer.write(struct.pack("!I", len(body)) + body)
        with pytest.raises(FrameError, match="expected \\[tag, phase, stamp, payload\\]"):
            await asyncio.wait_for(ch.recv(("m", 0)), 2.0)


async def test_duplicate_tag_fails_channel(chans):
    ca, cb, *_ = chans
    ca.send(("dup", 1), "first")
    ca.send(("dup", 1), "second")
    ca.send(("other",), "x")
    with pytest.raises(FrameError, match=r"duplicate message for tag \('dup', 1\)"):
        await asyncio.wait_for(cb.recv(("never",)), 2.0)
    # the first copy arrived before the failure and is still delivered
    assert await cb.recv(("dup", 1)) == "first"
    assert isinstance(cb.error, FrameError)


# ---------------------------------------------------------------- peer closing


async def test_peer_closes_transport_mid_op(chans):
    ca, cb, *_ = chans
    pending = asyncio.create_task(cb.recv(("softmax", "L0", 3, "m")))
    await asyncio.sleep(0.01)
    await ca._transport.close()
    with pytest.raises(PeerClosed) as info:
        await asyncio.wait_for(pending, 2.0)
    msg = str(info.value)
    assert "'user'" in msg and "('softmax', 'L0', 3, 'm')" in msg and "closed" in msg


async def test_peer_channel_close_delivers_sent_messages_first(chans):
    ca, cb, *_ = chans
    ca.send(("last",), np.arange(1000))
    await ca.close()
    np.testing.assert_array_equal(await asyncio.wait_for(cb.recv(("last",)), GUARD), np.arange(1000))
    with pytest.raises(PeerClosed, match=r"peer 'user'.*\('more',\)"):
        await asyncio.wait_for(cb.recv(("more",)), 2.0)
    with pytest.raises(PeerClosed):
        cb.send(("x",), 1)


async def test_tcp_peer_aborts_socket():
    async with raw_tcp_peer() as (ch, reader, writer):
        pending = asyncio.create_task(ch.recv(("softmax", "L0", 3, "m")))
        await asyncio.sleep(0.01)
        writer.transport.abort()
        with pytest.raises(PeerClosed, match=r"peer 'user'.*\('softmax', 'L0', 3, 'm'\)"):
            await asyncio.wait_for(pending, 2.0)


async def test_tcp_peer_dies_mid_frame():
    async with raw_tcp_peer() as (ch, reader, writer):
        pending = asyncio.create_task(ch.recv(("t",)))
        writer.write(struct.pack("!I", 100) + b"\x00" * 10)
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.close()
        with pytest.raises(PeerClosed, match=r"truncated.*10 of 100 bytes.*\('t',\)"):
            await asyncio.wait_for(pending, 2.0)


async def test_own_close_fails_pending_recv(chans):
    ca, cb, *_ = chans
    pending = asyncio.create_task(ca.recv(("k",)))
    await asyncio.sleep(0)
    await ca.close()
    with pytest.raises(PeerClosed, match=r"channel closed.*\('k',\)"):
        await asyncio.wait_for(pending, 2.0)
    with pytest.raises(PeerClosed, match="channel closed"):
        ca.send(("k",), 1)
    await ca.close()  # idempotent


async def test_memory_transport_close_semantics():
    ta, tb = memory_pair("a", "b")
    assert ta.peer == "b" and tb.peer == "a"
    pending = asyncio.create_task(tb.recv())
    await ta.send(b"one")
    assert await pending == b"one"
    pending = asyncio.create_task(tb.recv())
    await asyncio.sleep(0)
    await ta.close()
    with pytest.raises(PeerClosed, match="peer 'a' closed"):
        await asyncio.wait_for(pending, 2.0)
    with pytest.raises(PeerClosed):
        await tb.recv()
    with pytest.raises(PeerClosed):
        await tb.send(b"x")
    await ta.close()
    await tb.close()


# ---------------------------------------------------------------- handshake


async def test_handshake_success():
    ta, tb = memory_pair("user", "helper")
    ca, cb, ma, mb = await open_pair(ta, tb)
    assert isinstance(ca, Channel) and ca.error is None
    assert ma.stats[("setup", "handshake")].msgs_sent == 1
    await ca.close()
    await cb.close()


async def test_handshake_version_mismatch():
    ta, tb = memory_pair("user", "helper")
    await tb.send(packb({"permllm": PROTOCOL_VERSION + 1, "role": "helper", "session": "s1"}))
    with pytest.raises(HandshakeError, match=f"this party speaks {PROTOCOL_VERSION}, peer 'helper' speaks {PROTOCOL_VERSION + 1}"):
        await open_channel(ta, Meter(), role="user", peer_role="helper", session="s1", timeout=2)
    assert await tb.recv()  # the user's hello, sent before the check failed
    with pytest.raises(PeerClosed):  # then the user closed the transport
        await tb.recv()


async def test_handshake_wrong_role():
    ta, tb = memory_pair("user", "helper")
    ra, rb = await asyncio.wait_for(asyncio.gather(
        open_channel(ta, Meter(), role="user", peer_role="helper", session="s1", timeout=2),
        open_channel(tb, Meter(), role="server", peer_role="user", session="s1", timeout=2),
        return_exceptions=True,
    ), GUARD)
    assert isinstance(ra, HandshakeError)
    assert "'helper'" in str(ra) and "'server'" in str(ra) and "role mismatch" in str(ra)
    if isinstance(rb, Channel):
        await rb.close()


async def test_handshake_wrong_session():
    ta, tb = memory_pair("user", "helper")
    ra, rb = await asyncio.wait_for(asyncio.gather(
        open_channel(ta, Meter(), role="user", peer_role="helper", session="run-1", timeout=2),
        open_channel(tb, Meter(), role="helper", peer_role="user", session="run-2", timeout=2),
        return_exceptions=True,
    ), GUARD)
    for r in (ra, rb):
        assert isinstance(r, HandshakeError)
        assert "'run-1'" in str(r) and "'run-2'" in str(r) and "session mismatch" in str(r)


@pytest.mark.parametrize("frame", [b"\xc1garbage", packb([1, 2, 3]), packb({"role": "helper"}),
                                   packb({"permllm": PROTOCOL_VERSION, "role": 5, "session": "s1"})])
async def test_handshake_malformed(frame):
    ta, tb = memory_pair("user", "helper")
    await tb.send(frame)
    with pytest.raises(HandshakeError, match="malformed handshake from peer 'helper'"):
        await open_channel(ta, Meter(), role="user", peer_role="helper", session="s1", timeout=2)
    await tb.close()


async def test_handshake_timeout():
    ta, tb = memory_pair("user", "helper")
    with pytest.raises(asyncio.TimeoutError, match="'helper'"):
        await open_channel(ta, Meter(), role="user", peer_role="helper", session="s1", timeout=0.05)
    await tb.close()


async def test_handshake_over_tcp():
    async with tcp_pair() as (tc, ts):
        cc, cs, *_ = await open_pair(tc, ts)
        cc.send(("hi",), "there")
        assert await asyncio.wait_for(cs.recv(("hi",)), GUARD) == "there"
        await cc.close()
        await cs.close()


# ---------------------------------------------------------------- hop clock


async def test_hops_ping_pong(chans):
    ca, cb, ma, mb = chans
    k = 7

    async def party(ch, parity: int):  # message i goes from ca if i is even, from cb if odd
        for i in range(k):
            if i % 2 == parity:
                if i > 0:
                    await ch.recv(("ping", i - 1))
                ch.send(("ping", i), i)
        if (k - 1) % 2 != parity:
            await ch.recv(("ping", k - 1))

    await asyncio.wait_for(asyncio.gather(party(ca, 0), party(cb, 1)), GUARD)
    assert max(ma.hops(), mb.hops()) == k
    assert ma.hops("offline") == mb.hops("offline") == 0


async def test_hops_parallel(chans):
    ca, cb, ma, mb = chans
    for i in range(10):
        ca.send(("par", i), i)
    await asyncio.wait_for(asyncio.gather(*(cb.recv(("par", i)) for i in range(10))), GUARD)
    assert max(ma.hops(), mb.hops()) == 1
    ma.reset()
    assert ma.hops() == 0 and ma.stats == {}


async def test_hops_follow_causality_across_links():
    meters = {p: Meter() for p in "ABC"}
    ab_a, ab_b = memory_pair("A", "B")
    bc_b, bc_c = memory_pair("B", "C")
    a_b, b_a = await asyncio.gather(
        open_channel(ab_a, meters["A"], role="A", peer_role="B", session="s"),
        open_channel(ab_b, meters["B"], role="B", peer_role="A", session="s"),
    )
    b_c, c_b = await asyncio.gather(
        open_channel(bc_b, meters["B"], role="B", peer_role="C", session="s"),
        open_channel(bc_c, meters["C"], role="C", peer_role="B", session="s"),
    )
    a_b.send(("x",), 1)
    b_c.send(("y",), await asyncio.wait_for(b_a.recv(("x",)), GUARD) + 1)
    assert await asyncio.wait_for(c_b.recv(("y",)), GUARD) == 2
    assert max(m.hops() for m in meters.values()) == meters["C"].hops() == 2
    for ch in (a_b, b_a, b_c, c_b):
        await ch.close()


# ---------------------------------------------------------------- TLS and tcp_connect


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_tls_channel(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,URI:urn:permllm:role:helper"],
        check=True, capture_output=True,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    accepted: asyncio.Queue = asyncio.Queue()
    server = await tcp_serve("127.0.0.1", 0, accepted.put, ssl=server_ctx, peer="user")
    port = server.sockets[0].getsockname()[1]
    tc = await tcp_connect("127.0.0.1", port, ssl=client_ctx, peer="helper")
    ts = await asyncio.wait_for(accepted.get(), GUARD)
    cc, cs, mc, ms = await open_pair(tc, ts)
    cc.send(("tls", 0), np.arange(100_000))
    np.testing.assert_array_equal(await asyncio.wait_for(cs.recv(("tls", 0)), GUARD), np.arange(100_000))
    assert mc.total("online").bytes_sent == ms.total("online").bytes_recv > 800_000
    pending = asyncio.create_task(cs.recv(("tls", 1)))
    await asyncio.sleep(0)
    await cc.close()
    with pytest.raises(PeerClosed, match=r"\('tls', 1\)"):
        await asyncio.wait_for(pending, 2.0)
    await cs.close()
    server.close()
    await server.wait_closed()


async def test_tcp_connect_refused_after_retries():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ConnectionRefusedError):
        await tcp_connect("127.0.0.1", port, retries=2, backoff=0.02)
    assert 0.05 <= loop.time() - t0 < 1.0  # waited 0.02 + 0.04 between the 3 attempts


async def test_tcp_connect_retries_until_server_is_up():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    accepted: asyncio.Queue = asyncio.Queue()

    async def start_later():
        await asyncio.sleep(0.05)
        return await tcp_serve("127.0.0.1", port, accepted.put)

    starter = asyncio.create_task(start_later())
    tc = await asyncio.wait_for(tcp_connect("127.0.0.1", port, retries=10, backoff=0.02), GUARD)
    ts = await asyncio.wait_for(accepted.get(), GUARD)
    server = await starter
    assert tc.peer == f"127.0.0.1:{port}"
    await tc.send(b"hello")
    assert await asyncio.wait_for(ts.recv(), GUARD) == b"hello"
    await tc.close()
    await ts.close()
    server.close()
    await server.wait_closed()

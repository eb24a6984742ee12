"""What the daemons ask of a channel: handshake terms, frames bound to the session, a link timeout that
spares busy and idle (keep-alive) links, an abort that carries its reason, and external cancellation that
leaves no waiter hanging."""
from __future__ import annotations

import asyncio

import pytest

from permllm.net import HandshakeError, Meter, PeerAborted, PeerClosed, PeerTimeout, memory_pair, open_channel
from permllm.net.channel import accept_channel

SID = "ab" * 16


async def _pair(a_kw: dict | None = None, b_kw: dict | None = None):
    ta, tb = memory_pair("user", "model")
    return await asyncio.gather(
        open_channel(ta, Meter(), role="user", peer_role="model", session=SID, **(a_kw or {})),
        accept_channel(tb, Meter(), role="model", peer_roles={"user"}, **(b_kw or {})))


async def test_terms_compared_key_by_key_and_kept():
    ch, (srv, role, sid) = await _pair({"terms": {"dtype": "float64", "x": 1}, "bind": True},
                                       {"terms": {"dtype": "float64", "model": "f" * 32}, "bind": True})
    assert ch.peer_terms == {"dtype": "float64", "model": "f" * 32} and srv.peer_terms["x"] == 1
    assert (role, sid) == ("user", SID)
    srv.send(("k",), 5)
    assert await ch.recv(("k",)) == 5  # bound frames both ways
    await ch.close()
    await srv.close()
    with pytest.raises(HandshakeError, match=r"handshake mismatch: dtype: this party \(model\) has 'float64', "
                                             r"peer 'user' \(user\) has 'float32'"):
        await _pair({"terms": {"dtype": "float32"}}, {"terms": {"dtype": "float64"}})


async def test_admit_refusal_reaches_the_connecting_side():
    def admit(role, sid, terms):
        raise HandshakeError("busy: come back later")

    ta, tb = memory_pair("user", "model")
    a, b = await asyncio.gather(
        open_channel(ta, Meter(), role="user", peer_role="model", session=SID),
        accept_channel(tb, Meter(), role="model", peer_roles={"user"}, admit=admit), return_exceptions=True)
    assert isinstance(a, HandshakeError) and "peer 'model' refused the connection: busy: come back later" in str(a)
    assert isinstance(b, HandshakeError)


async def test_link_timeout_fails_a_silent_peer_but_not_a_busy_one():
    ch, (srv, _, _) = await _pair({"link_timeout": 0.3})
    pending = asyncio.ensure_future(ch.recv(("late",)))
    for i in range(6):  # 0.6 s of traffic from the peer: the wait goes on
        await asyncio.sleep(0.1)
        srv.send(("tick", i), i)
    await asyncio.sleep(0.6)  # 0.6 s of keep-alives only: the peer is alive, the wait still goes on
    assert not pending.done()
    srv.send(("late",), "ok")
    assert await pending == "ok"
    srv._tasks[2].cancel()  # the peer stops showing life (as when its event loop hangs)
    with pytest.raises(PeerTimeout, match=r"peer 'model' sent and accepted nothing for 0.3 s while this party "
                                          r"waited for \('never',\)"):
        await asyncio.wait_for(ch.recv(("never",)), 2)
    await ch.close()
    await srv.close()


async def test_abort_tells_the_peer_why():
    ch, (srv, _, _) = await _pair({"bind": True}, {"bind": True})
    with pytest.raises(ValueError, match="reserved"):
        srv.send(("!abort",), "x")
    srv.send(("first",), 1)
    await srv.abort("the model party ended session x: it is shutting down")
    assert await ch.recv(("first",)) == 1  # what was sent before the abort still arrives
    with pytest.raises(PeerAborted, match="peer 'model' ended the session: the model party ended session x: it is "
                                          r"shutting down while this party waited for \('next',\)"):
        await ch.recv(("next",))
    await ch.close()


async def test_cancelled_channel_tasks_release_waiters():
    ch, (srv, _, _) = await _pair()
    waiter = asyncio.ensure_future(ch.recv(("x",)))
    await asyncio.sleep(0)
    for t in ch._tasks:  # what asyncio.run does to leftover tasks at shutdown
        t.cancel()
    with pytest.raises(PeerClosed, match="was shut down"):
        await asyncio.wait_for(waiter, 2)
    await asyncio.wait_for(ch.flush(), 2)  # returns (nothing pending) instead of hanging
    await srv.close()

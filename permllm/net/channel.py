"""Channels: tagged mailboxes over a transport, with accounting and emulation.

Part of ``permllm.net``, the bottom layer of permllm; it knows nothing of
protocols or models. A :class:`Channel` links this party to one peer
(MPyC-style): ``send(tag, payload)`` is one non-blocking write and
``recv(tag)`` returns the payload of the message with that tag whenever it
arrives, in any order, so many operations can be in flight at once. Every
message is counted in the party's :class:`Meter` and carries a hop-clock
stamp; an optional :class:`LinkEmulator` delays delivery. :func:`open_channel`
(connecting side) and :func:`accept_channel` (daemons) perform the handshake and
start the channel.

For links to untrusted peers a channel can bind every frame to its session
(a frame of another session is refused), bound the bytes of messages nobody
has asked for yet, end a link whose peer goes silent (``timeout``), and end a
session with a reason the peer sees (:meth:`Channel.abort`).

Keep-alives: a party with a link timeout asks its peer in the hello for a sign
of life at least every quarter of it (``"alive"``); the peer then sends a
keep-alive frame whenever it has written nothing for that long, so a party that
is alive but has nothing to say is not taken for a dead one. Keep-alives never
reach a mailbox, the :class:`Meter` or the hop clock (``Channel.keepalives``
counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import ssl
from collections import deque
from typing import Any, Callable, Collection, Mapping

from .codec import KEEPALIVE, decode_message, encode_keepalive, encode_message, packb, unpackb
from .emulation import LinkEmulator
from .errors import FrameError, FrameTooLarge, HandshakeError, NetError, PeerAborted, PeerClosed, PeerTimeout, TlsError
from .meter import PHASES, Meter
from .tls import PeerCert, tls_reason
from .transport import Transport

__all__ = ["PROTOCOL_VERSION", "ABORT", "KEEPALIVE_MIN", "Tag", "Channel", "open_channel", "accept_channel",
           "keepalive_interval", "printable"]

PROTOCOL_VERSION = 2
ABORT = "!abort"  # the reserved tag kind of Channel.abort's frame

Tag = tuple  # of str | int, e.g. ("linear", "L0.q", 3, "u"); tag[0] is the 'kind' used for counters

_PREFIX_BYTES = 4          # the transport's length prefix, counted as wire bytes
_ABORT_LINGER = 1.0  # seconds an aborting party reads on, at most, while the peer keeps sending
_ABORT_QUIET = 0.05  # ... and it stops once the peer has sent nothing for this long
_CLOSE_FLUSH_TIMEOUT = 5.0  # how long close() waits for queued frames to go out
KEEPALIVE_MIN = 0.05  # seconds: the shortest keep-alive interval a party asks for, or heeds

_Item = tuple[str, int, Any, int]  # (phase, stamp, payload, frame bytes) of a received message


def printable(text: str, limit: int = 500) -> str:
    """``text`` cut to ``limit`` characters with control characters replaced: safe to log when a peer wrote it."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def keepalive_interval(link_timeout: float) -> float:
    """The keep-alive interval a party with this link timeout asks its peer for: a quarter, at least KEEPALIVE_MIN."""
    return max(link_timeout / 4, KEEPALIVE_MIN)


def _for_tag(err: NetError, tag: Tag) -> NetError:
    """A copy of ``err`` (same class) whose message names the awaited tag."""
    e = type(err)(f"{err} while this party waited for {tag!r}")
    e.__cause__ = err
    return e


class Channel:
    """Link to one peer with tagged mailboxes (MPyC-style): send(tag, payload) is one write; recv(tag) returns the payload when the message with that tag arrives, in any order, so many ops can be in flight at once."""

    __slots__ = (
        "name", "peer_terms", "_transport", "_meter", "_link", "_loop", "_mailbox", "_waiters",
        "_outq", "_wake", "_pending", "_flushers", "_error", "_closing", "_tasks",
        "_timeout", "_bind", "_max_unread", "_unread", "_active", "_down",
        "_keepalive", "_ping", "_wrote", "_pings_sent", "_pings_recv",
    )

    def __init__(
        self, transport: Transport, meter: Meter, *, link: LinkEmulator | None = None, name: str = "",
        timeout: float | None = None, bind: bytes | None = None, max_unread: int | None = None,
        keepalive: float | None = None,
    ) -> None:
        """``timeout``: fail the link when the peer neither sends (a message or a keep-alive) nor accepts
        a message for that many seconds while this party waits on it; ``bind``: the session binding every
        frame carries; ``max_unread``: the most bytes of received messages that may wait for a ``recv``;
        ``keepalive``: send a keep-alive frame whenever nothing was written for that many seconds (the
        interval the peer asked for; at least KEEPALIVE_MIN)."""
        self.name = name or transport.peer  # the peer's name in error messages
        self.peer_terms: dict[str, Any] = {}  # what the peer stated in its hello
        self._transport = transport
        self._meter = meter
        self._link = link
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mailbox: dict[tuple, _Item] = {}
        self._waiters: dict[tuple, asyncio.Future[_Item]] = {}
        self._outq: deque[tuple[bytes, float | None]] = deque()
        self._wake = asyncio.Event()
        self._pending = 0  # frames queued or being written
        self._flushers: list[asyncio.Future[None]] = []
        self._error: NetError | None = None
        self._closing = False
        self._tasks: tuple[asyncio.Task[None], ...] = ()
        self._timeout = timeout
        self._bind = bind
        self._max_unread = max_unread
        self._unread = 0  # bytes of frames in the mailbox
        self._active = 0.0  # loop time of the last frame read or message written
        self._down = asyncio.Event()
        self._keepalive = None if keepalive is None else max(keepalive, KEEPALIVE_MIN)
        self._ping = encode_keepalive(bind)
        self._wrote = 0.0  # loop time of the last frame written, keep-alives included
        self._pings_sent = 0
        self._pings_recv = 0

    @property
    def error(self) -> BaseException | None:
        """The error that failed or closed the channel, or None while it is healthy."""
        return self._error

    @property
    def unread(self) -> int:
        """Bytes of received messages that wait for a ``recv``."""
        return self._unread

    def discard(self, unwanted: Callable[[Tag], bool]) -> int:
        """Drop the received messages nobody will ask for (``unwanted(tag)``); how many were dropped."""
        drop = [tag for tag in self._mailbox if unwanted(tag)]
        for tag in drop:
            self._unread -= self._mailbox.pop(tag)[3]
        return len(drop)

    @property
    def keepalives(self) -> tuple[int, int]:
        """Keep-alive frames (sent, received) so far; the Meter does not count them (27 + 4 bytes each on a
        session-bound link, 17 + 4 otherwise)."""
        return self._pings_sent, self._pings_recv

    @property
    def peer_cert(self) -> PeerCert | None:
        """The peer's verified TLS certificate (None on an unauthenticated link)."""
        return self._transport.peer_cert

    async def wait_failed(self) -> BaseException:
        """Wait until the channel fails or is closed; return the error."""
        await self._down.wait()
        assert self._error is not None
        return self._error

    def start(self) -> None:
        """Start the reader and writer tasks (inside a running loop; open_channel calls it)."""
        if self._loop is not None:
            raise RuntimeError(f"channel to peer {self.name!r} already started")
        self._loop = asyncio.get_running_loop()
        self._active = self._wrote = self._loop.time()
        self._tasks = (
            self._loop.create_task(self._read_loop(), name=f"permllm-net-read[{self.name}]"),
            self._loop.create_task(self._write_loop(), name=f"permllm-net-write[{self.name}]"),
        )
        if self._keepalive is not None:
            self._tasks += (self._loop.create_task(self._alive_loop(self._keepalive),
                                                   name=f"permllm-net-alive[{self.name}]"),)

    def send(self, tag: Tag, payload: Any, *, phase: str = "online") -> None:
        """Queue one message; returns at once (the payload is encoded now, so the caller may reuse it).

        Raises the channel's error if it has failed or closed, FrameTooLarge if
        the frame exceeds the transport's max_frame, ValueError for an unknown
        phase, TypeError for a bad tag or an unencodable payload.
        """
        if self._error is not None:
            raise self._error
        if self._loop is None:
            raise RuntimeError(f"channel to peer {self.name!r} not started")
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        tag = tuple(tag)
        if tag and tag[0] == ABORT:
            raise ValueError(f"the tag kind {ABORT!r} is reserved for Channel.abort")
        if tag and tag[0] == KEEPALIVE:
            raise ValueError(f"the tag kind {KEEPALIVE!r} is reserved for keep-alive frames")
        self._enqueue(tag, phase, payload)

    def _enqueue(self, tag: Tag, phase: str, payload: Any) -> None:
        meter = self._meter
        frame = encode_message(tag, phase, meter.clock[phase] + 1, payload, self._bind)
        if len(frame) > self._transport.max_frame:
            raise FrameTooLarge(
                f"message {tag!r} to peer {self.name!r} is a frame of {len(frame)} bytes, "
                f"over the maximum frame size of {self._transport.max_frame} bytes"
            )
        nbytes = len(frame) + _PREFIX_BYTES
        meter.on_send(phase, str(tag[0]), nbytes)  # returns the stamp already encoded above
        at = None if self._link is None else self._link.schedule(nbytes, self._loop.time())
        self._outq.append((frame, at))
        self._pending += 1
        self._wake.set()

    def emulate(self, link: LinkEmulator | None) -> None:
        """Emulate ``link`` (delay, bandwidth) on this direction from now on (None: send at once); frames
        already queued keep their schedule. Benchmarks change a session's network between runs this way."""
        self._link = link

    async def recv(self, tag: Tag, *, timeout: float | None = None) -> Any:
        """Wait for the message with this exact tag, remove it from the mailbox and return its payload.

        A message that arrived before the channel failed is still returned.
        Otherwise raises the channel's error (PeerClosed, FrameError, ...)
        naming the tag, or asyncio.TimeoutError after ``timeout`` seconds.
        Without ``timeout``, a channel made with a link timeout fails with
        PeerTimeout once the link has been idle that long during the wait.
        """
        tag = tuple(tag)
        item = self._mailbox.pop(tag, None)
        if item is not None:
            self._unread -= item[3]
        else:
            if self._error is not None:
                raise _for_tag(self._error, tag)
            if self._loop is None:
                raise RuntimeError(f"channel to peer {self.name!r} not started")
            if tag in self._waiters:
                raise RuntimeError(f"another task is already waiting for {tag!r} from peer {self.name!r}")
            fut: asyncio.Future[_Item] = self._loop.create_future()
            self._waiters[tag] = fut
            try:
                if timeout is not None:
                    item = await asyncio.wait_for(fut, timeout)
                elif self._timeout is not None:
                    item = await self._wait_live(fut)
                else:
                    item = await fut
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(
                    f"timed out after {timeout} s waiting for {tag!r} from peer {self.name!r}"
                ) from None
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._mailbox[tag] = fut.result()  # arrived just as we were cancelled: keep it
                    self._unread += fut.result()[3]
                raise
            finally:
                if self._waiters.get(tag) is fut:
                    del self._waiters[tag]
        phase, stamp, payload, _ = item
        self._meter.on_consume(phase, stamp)
        return payload

    async def _wait_live(self, fut: asyncio.Future[_Item]) -> _Item:
        """Await ``fut`` while the link shows life: a frame read (keep-alives too) or a message written
        within the link timeout."""
        loop, limit = self._loop, self._timeout
        assert loop is not None and limit is not None
        start = loop.time()
        while True:
            left = max(start, self._active) + limit - loop.time()
            if left <= 0:
                self._fail(PeerTimeout(f"peer {self.name!r} sent and accepted nothing for {limit:g} s"))
                return fut.result()  # raises the timeout, naming the tag
            await asyncio.wait((fut,), timeout=left)
            if fut.done():
                return fut.result()

    async def flush(self) -> None:
        """Wait until every queued frame has been handed to the transport."""
        if self._error is not None:
            if self._pending:
                raise self._error
            return
        if not self._pending:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._flushers.append(fut)
        await fut

    async def abort(self, reason: str) -> None:
        """End the link on purpose: send ``reason`` (the peer's recvs fail with PeerAborted naming it), then close.

        Wire format: one message with the reserved tag ``("!abort",)`` and the reason
        (a str) as payload, after every message queued before it.
        """
        if self._error is None and self._loop is not None and not self._closing:
            try:
                self._enqueue((ABORT,), "setup", printable(reason))
                await asyncio.wait_for(self.flush(), _CLOSE_FLUSH_TIMEOUT)
                # Read what the peer still sends until it hangs up or goes quiet (bounded):
                # closing with its data unread would reset the connection, and a reset can
                # discard the reason before the peer reads it.
                deadline = self._loop.time() + _ABORT_LINGER
                while self._loop.time() < deadline:
                    seen = self._active
                    done, _ = await asyncio.wait({self._tasks[0]}, timeout=_ABORT_QUIET)
                    if done or self._active == seen:
                        break
            except (NetError, asyncio.TimeoutError):
                pass  # the link failed meanwhile: close() below is all that is left to do
        await self.close()

    async def close(self) -> None:
        """Flush (best effort, bounded), close the transport and stop the tasks; idempotent.

        Pending and later recvs fail with PeerClosed ("channel closed ...").
        """
        if self._closing:
            return
        self._closing = True
        if self._error is None and self._loop is not None:
            try:
                await asyncio.wait_for(self.flush(), _CLOSE_FLUSH_TIMEOUT)
            except (asyncio.TimeoutError, NetError):
                pass
        self._fail(PeerClosed(f"channel closed by this party (peer {self.name!r})"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._transport.close()

    def _fail(self, err: NetError) -> None:
        if self._error is not None:
            return
        self._error = err
        for tag, fut in self._waiters.items():
            if not fut.done():
                fut.set_exception(_for_tag(err, tag))
        self._waiters.clear()
        for fut in self._flushers:
            if not fut.done():
                fut.set_exception(err)
        self._flushers.clear()
        self._wake.set()  # lets the writer task see the error and stop
        self._down.set()
        if len(self._tasks) > 2:
            self._tasks[2].cancel()  # no more keep-alives

    async def _read_loop(self) -> None:
        transport, meter, mailbox, waiters = self._transport, self._meter, self._mailbox, self._waiters
        loop = self._loop
        assert loop is not None
        try:
            while True:
                body = await transport.recv()
                self._active = loop.time()
                try:
                    tag, phase, stamp, payload = decode_message(body, self._bind)
                except FrameError as e:
                    raise FrameError(f"malformed frame from peer {self.name!r}: {e}") from e
                if tag == (KEEPALIVE,):  # its arrival was the point (self._active above)
                    self._pings_recv += 1
                    continue
                if phase not in PHASES:
                    raise FrameError(f"malformed frame from peer {self.name!r}: message {tag!r} has unknown phase "
                                     f"{printable(phase, 40)!r}")
                if tag == (ABORT,):
                    why = printable(payload) if isinstance(payload, str) else "(no reason given)"
                    raise PeerAborted(f"peer {self.name!r} ended the session: {why}")
                n = len(body) + _PREFIX_BYTES
                meter.on_arrive(phase, str(tag[0]), n)
                fut = waiters.pop(tag, None)
                if fut is not None and not fut.done():
                    fut.set_result((phase, stamp, payload, n))
                elif tag in mailbox:
                    raise FrameError(
                        f"duplicate message for tag {tag!r} from peer {self.name!r} (the previous one was not consumed)"
                    )
                else:
                    mailbox[tag] = (phase, stamp, payload, n)
                    self._unread += n
                    if self._max_unread is not None and self._unread > self._max_unread:
                        raise FrameError(
                            f"peer {self.name!r} sent {self._unread} bytes of messages this party has not asked "
                            f"for yet (limit {self._max_unread}); the last one was {tag!r}"
                        )
        except FrameError as e:
            self._fail(e)
            await self._tell(str(e))
        except NetError as e:
            self._fail(e)
        except asyncio.CancelledError:  # cancelled from outside (not by close): release every waiter
            self._fail(PeerClosed(f"channel to peer {self.name!r} was shut down"))
            raise
        except Exception as e:  # a bug below us must not leave recvs hanging
            err = NetError(f"reading from peer {self.name!r} failed: {e!r}")
            err.__cause__ = e
            self._fail(err)
        await transport.close()

    async def _tell(self, reason: str) -> None:
        """After refusing the peer's frame: send it the reason as an abort frame (best effort, 1 s)."""
        writer = self._tasks[1]
        try:
            await asyncio.wait_for(asyncio.shield(writer), 1.0)  # a frame being written goes out whole first
            frame = encode_message((ABORT,), "setup", 0, printable(reason), self._bind)
            await asyncio.wait_for(self._transport.send(frame), 1.0)
        except (NetError, asyncio.TimeoutError):
            pass

    def _stalled(self) -> None:
        """The peer accepted no data for the link timeout: fail the channel and drop the connection."""
        assert self._loop is not None
        self._fail(PeerTimeout(f"peer {self.name!r} accepted no data for {self._timeout:g} s"))
        self._loop.create_task(self._transport.close())

    async def _alive_loop(self, every: float) -> None:
        """Queue a keep-alive whenever nothing has been written for ``every`` seconds and nothing is on its way."""
        loop = self._loop
        assert loop is not None
        while self._error is None:
            left = self._wrote + every - loop.time()
            if left <= 0:
                if not (self._outq or self._pending):  # else frames on their way will show life first
                    self._outq.append((self._ping, None))
                    self._wake.set()
                left = every
            await asyncio.sleep(left)

    async def _write_loop(self) -> None:
        transport, q = self._transport, self._outq
        loop = self._loop
        assert loop is not None
        try:
            while self._error is None:
                if not q:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                frame, at = q.popleft()
                if at is not None:
                    delay = at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if self._timeout is None:
                    await transport.send(frame)
                else:  # a timer, not wait_for: wait_for (3.11) can swallow this task's cancellation
                    stall = loop.call_later(self._timeout, self._stalled)
                    try:
                        await transport.send(frame)
                    finally:
                        stall.cancel()
                self._wrote = loop.time()
                if frame is self._ping:  # not a message: no sign of the peer's life, nothing to flush
                    self._pings_sent += 1
                    continue
                self._active = self._wrote
                self._pending -= 1
                if not self._pending and self._flushers:
                    for fut in self._flushers:
                        if not fut.done():
                            fut.set_result(None)
                    self._flushers.clear()
        except NetError as e:
            # A peer that ended the session may have sent its reason before closing: let the
            # reader take it from the socket's buffer first, so that is the error reported.
            await asyncio.wait({self._tasks[0]}, timeout=1.0)
            self._fail(e)
        except asyncio.CancelledError:  # cancelled from outside (not by close): release flush() waiters
            self._fail(PeerClosed(f"channel to peer {self.name!r} was shut down"))
            raise
        except Exception as e:
            err = NetError(f"writing to peer {self.name!r} failed: {e!r}")
            err.__cause__ = e
            self._fail(err)
        if not isinstance(self._error, FrameError):  # after a bad frame the reader closes, once it told the peer why
            await transport.close()


Terms = Mapping[str, Any]  # what a party states in its hello (str/int/float/bool values), compared key by key


def _binding(session: str) -> bytes:
    """The 8-byte session binding carried by every frame of a session-bound channel."""
    return hashlib.sha256(b"permllm-session:" + session.encode()).digest()[:8]


def _hello(role: str, session: str, terms: Terms | None, bind: bool, link_timeout: float | None) -> dict[str, Any]:
    hello: dict[str, Any] = {"permllm": PROTOCOL_VERSION, "role": role, "session": session}
    if terms:
        hello["terms"] = dict(terms)
    if bind:
        hello["bind"] = True
    if link_timeout is not None:
        hello["alive"] = keepalive_interval(link_timeout)
    return hello


def _asked_alive(hello: dict[str, Any], peer: str) -> float | None:
    """The keep-alive interval the peer asks for in its hello (None: it asks for none)."""
    every = hello.get("alive")
    if every is None:
        return None
    if not (type(every) in (int, float) and math.isfinite(every) and every > 0):
        raise HandshakeError(f"malformed handshake from peer {peer!r}: alive must be a positive number of "
                             f"seconds, got {printable(repr(every), 40)}")
    return every


def _check_hello(hello: Any, *, role: str, peer_role: str, session: str, peer: str, terms: Terms | None = None,
                 bind: bool = False, cert: PeerCert | None = None) -> tuple[dict[str, Any], float | None]:
    """Check the peer's hello against this party's; return the terms the peer stated and the keep-alive
    interval it asks for."""
    if not (isinstance(hello, dict) and "permllm" in hello):
        raise HandshakeError(f"malformed handshake from peer {peer!r}: not a permllm hello")
    version = hello["permllm"]
    if isinstance(hello.get("error"), str):
        raise HandshakeError(f"peer {peer!r} refused the connection: {printable(hello['error'], 2000)}")
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"protocol version mismatch: this party speaks {PROTOCOL_VERSION}, "
            f"peer {peer!r} speaks {printable(repr(version), 40)}"
        )
    their_role, their_session = hello.get("role"), hello.get("session")
    if not (isinstance(their_role, str) and isinstance(their_session, str)):
        raise HandshakeError(f"malformed handshake from peer {peer!r}: role and session must be strings")
    if their_role != peer_role:
        raise HandshakeError(
            f"role mismatch: this party ({role!r}) expects peer {peer!r} to be {peer_role!r}, "
            f"but the peer says it is {printable(their_role, 40)!r}"
        )
    if cert is not None and their_role not in cert.roles:
        named = f"names roles {list(cert.roles)}" if cert.roles else "names no permllm role"
        raise TlsError(f"role mismatch: peer {peer!r} says it is {their_role!r}, but its {cert} {named}")
    if their_session != session:
        raise HandshakeError(
            f"session mismatch: this party is in session {session!r}, "
            f"peer {peer!r} is in session {printable(their_session, 80)!r}"
        )
    if bool(hello.get("bind", False)) is not bind:
        raise HandshakeError(f"frame binding mismatch: this party {'binds' if bind else 'does not bind'} frames to "
                             f"the session, peer {peer!r} {'does not' if bind else 'does'}")
    theirs = hello.get("terms", {})
    if not (isinstance(theirs, dict) and all(isinstance(k, str) for k in theirs)):
        raise HandshakeError(f"malformed handshake from peer {peer!r}: terms must be a map with string keys")
    mine = dict(terms or {})
    diff = [f"{k}: this party ({role}) has {mine[k]!r}, peer {peer!r} ({their_role}) has "
            f"{printable(repr(theirs[k]), 80)}" for k in sorted(mine.keys() & theirs.keys()) if mine[k] != theirs[k]]
    if diff:
        raise HandshakeError("handshake mismatch: " + "; ".join(diff))
    return theirs, _asked_alive(hello, peer)


def _closed_in_handshake(e: PeerClosed, transport: Transport) -> HandshakeError:
    """A handshake cut by the peer. On TLS that means it refused this party's certificate (daemons always answer)."""
    peer, cause = transport.peer, e.__cause__
    if isinstance(cause, ssl.SSLError):
        return TlsError(f"peer {peer!r} refused this party's TLS certificate: {tls_reason(cause)}")
    if transport.peer_cert is not None:
        return TlsError(f"peer {peer!r} closed the connection before answering the handshake: it refused this "
                        "party's TLS certificate (unknown CA, expired, or not valid yet; the peer's log says which)")
    return HandshakeError(f"peer {peer!r} closed the connection during the handshake ({e})")


async def open_channel(
    transport: Transport,
    meter: Meter,
    *,
    role: str,
    peer_role: str,
    session: str,
    link: LinkEmulator | None = None,
    timeout: float = 30.0,
    terms: Terms | None = None,
    bind: bool = False,
    link_timeout: float | None = None,
    max_unread: int | None = None,
) -> Channel:
    """Handshake over ``transport``, then return a started :class:`Channel`.

    Wire format of the handshake: each side sends one frame, the msgpack map
    ``{"permllm": PROTOCOL_VERSION, "role": role, "session": session}`` plus
    ``"terms": {...}`` (what this party states: e.g. a model fingerprint, a
    dtype), ``"bind": true`` when frames carry the session binding, and
    ``"alive": seconds`` with a ``link_timeout`` (send this party a frame at
    least that often: ``keepalive_interval(link_timeout)``), and reads the
    peer's; if it asks for keep-alives (a positive number), the channel sends
    them. The peer's version must equal ``PROTOCOL_VERSION``, its role
    ``peer_role`` (and, on a TLS link, a role its certificate names), its
    session ``session``, its binding ``bind``, and every term both sides state
    must be equal; otherwise, or if its frame is malformed or holds an
    ``"error"``, the transport is closed and HandshakeError (TlsError for
    certificates) raised naming both sides' values. The peer's terms are kept
    in ``channel.peer_terms``. The two frames are counted in ``meter`` as phase
    "setup", kind "handshake". No hello within ``timeout`` s:
    asyncio.TimeoutError. ``link_timeout`` and ``max_unread`` go to the channel.
    """
    peer = transport.peer
    try:
        hello = packb(_hello(role, session, terms, bind, link_timeout))
        try:
            await asyncio.wait_for(transport.send(hello), timeout)
            meter.on_send("setup", "handshake", len(hello) + _PREFIX_BYTES)
            body = await asyncio.wait_for(transport.recv(), timeout)
            theirs = unpackb(body)
        except FrameError as e:
            raise HandshakeError(f"malformed handshake from peer {peer!r}: {e}") from e
        except PeerClosed as e:
            raise _closed_in_handshake(e, transport) from e
        meter.on_arrive("setup", "handshake", len(body) + _PREFIX_BYTES)
        peer_terms, alive = _check_hello(theirs, role=role, peer_role=peer_role, session=session, peer=peer,
                                         terms=terms, bind=bind, cert=transport.peer_cert)
    except asyncio.TimeoutError:
        await transport.close()
        raise asyncio.TimeoutError(f"no handshake from peer {peer!r} within {timeout} s") from None
    except BaseException:
        await transport.close()
        raise
    channel = Channel(transport, meter, link=link, timeout=link_timeout,
                      bind=_binding(session) if bind else None, max_unread=max_unread, keepalive=alive)
    channel.peer_terms = peer_terms
    channel.start()
    return channel


Admit = Callable[[str, str, Mapping[str, Any]], None]


async def accept_channel(
    transport: Transport,
    meter: Meter,
    *,
    role: str,
    peer_roles: Collection[str],
    link: LinkEmulator | None = None,
    timeout: float = 30.0,
    terms: Terms | None = None,
    bind: bool = False,
    admit: Admit | None = None,
    link_timeout: float | None = None,
    max_unread: int | None = None,
) -> tuple[Channel, str, str]:
    """Server side of the handshake: read the peer's hello first, then answer.

    Used by daemons, which learn the session id and the peer's role from the hello.
    The hello is checked as in :func:`open_channel` (version, a role among
    ``peer_roles`` and named by its certificate on TLS, binding, terms, the
    keep-alives it asks for; the answer asks for them with a ``link_timeout``); then
    ``admit(role, session, peer_terms)`` may refuse the peer by raising
    HandshakeError (e.g. too many sessions). A refusal's answer carries an
    ``"error"`` field (so the connecting side's :func:`open_channel` raises
    HandshakeError with the reason), the transport is closed and the error
    raised here. Returns the started channel, the peer's role and the session id.
    """
    peer = transport.peer
    try:
        body = await asyncio.wait_for(transport.recv(), timeout)
        meter.on_arrive("setup", "handshake", len(body) + _PREFIX_BYTES)
        answer = _hello(role, "", terms, bind, link_timeout)
        try:
            try:
                theirs = unpackb(body)
            except FrameError as e:
                raise HandshakeError(f"malformed handshake from peer {peer!r}: {e}") from e
            their_role = theirs.get("role") if isinstance(theirs, dict) else None
            session = theirs.get("session") if isinstance(theirs, dict) else None
            session = session if isinstance(session, str) else ""
            answer = _hello(role, session, terms, bind, link_timeout)
            if their_role not in peer_roles:
                shown = repr(printable(their_role, 40)) if isinstance(their_role, str) else type(their_role).__name__
                raise HandshakeError(f"role mismatch: this party ({role!r}) accepts {sorted(peer_roles)}, "
                                     f"but the peer says it is {shown}")
            peer_terms, alive = _check_hello(theirs, role=role, peer_role=their_role, session=session, peer=peer,
                                             terms=terms, bind=bind, cert=transport.peer_cert)
            if admit is not None:
                admit(their_role, session, peer_terms)
        except HandshakeError as e:
            answer["error"] = str(e)
            with contextlib.suppress(NetError, asyncio.TimeoutError):  # best effort: the peer may be gone
                await asyncio.wait_for(transport.send(packb(answer)), timeout)
            raise
        hello = packb(answer)
        await asyncio.wait_for(transport.send(hello), timeout)
        meter.on_send("setup", "handshake", len(hello) + _PREFIX_BYTES)
    except asyncio.TimeoutError:
        await transport.close()
        raise asyncio.TimeoutError(f"no handshake from peer {peer!r} within {timeout} s") from None
    except BaseException:
        await transport.close()
        raise
    channel = Channel(transport, meter, link=link, timeout=link_timeout,
                      bind=_binding(session) if bind else None, max_unread=max_unread, keepalive=alive)
    channel.peer_terms = peer_terms
    channel.start()
    return channel, their_role, session

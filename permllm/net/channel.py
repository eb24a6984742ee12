"""Channels: tagged mailboxes over a transport, with accounting and emulation.

Part of ``permllm.net``, the bottom layer of permllm; it knows nothing of
protocols or models. A :class:`Channel` links this party to one peer
(MPyC-style): ``send(tag, payload)`` is one non-blocking write and
``recv(tag)`` returns the payload of the message with that tag whenever it
arrives, in any order, so many operations can be in flight at once. Every
message is counted in the party's :class:`Meter` and carries a hop-clock
stamp; an optional :class:`LinkEmulator` delays delivery. :func:`open_channel`
performs the handshake and starts the channel.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Collection

from .codec import decode_message, encode_message, packb, unpackb
from .emulation import LinkEmulator
from .errors import FrameError, FrameTooLarge, HandshakeError, NetError, PeerClosed
from .meter import PHASES, Meter
from .transport import Transport

__all__ = ["PROTOCOL_VERSION", "Tag", "Channel", "open_channel"]

PROTOCOL_VERSION = 1

Tag = tuple  # of str | int, e.g. ("linear", "L0.q", 3, "u"); tag[0] is the 'kind' used for counters

_PREFIX_BYTES = 4          # the transport's length prefix, counted as wire bytes
_CLOSE_FLUSH_TIMEOUT = 5.0  # how long close() waits for queued frames to go out

_Item = tuple[str, int, Any]  # (phase, stamp, payload) of a received message


def _for_tag(err: NetError, tag: Tag) -> NetError:
    """A copy of ``err`` (same class) whose message names the awaited tag."""
    e = type(err)(f"{err} while this party waited for {tag!r}")
    e.__cause__ = err
    return e


class Channel:
    """Link to one peer with tagged mailboxes (MPyC-style): send(tag, payload) is one write; recv(tag) returns the payload when the message with that tag arrives, in any order, so many ops can be in flight at once."""

    __slots__ = (
        "name", "_transport", "_meter", "_link", "_loop", "_mailbox", "_waiters",
        "_outq", "_wake", "_pending", "_flushers", "_error", "_closing", "_tasks",
    )

    def __init__(
        self, transport: Transport, meter: Meter, *, link: LinkEmulator | None = None, name: str = ""
    ) -> None:
        self.name = name or transport.peer  # the peer's name in error messages
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

    @property
    def error(self) -> BaseException | None:
        """The error that failed or closed the channel, or None while it is healthy."""
        return self._error

    def start(self) -> None:
        """Start the reader and writer tasks (inside a running loop; open_channel calls it)."""
        if self._loop is not None:
            raise RuntimeError(f"channel to peer {self.name!r} already started")
        self._loop = asyncio.get_running_loop()
        self._tasks = (
            self._loop.create_task(self._read_loop(), name=f"permllm-net-read[{self.name}]"),
            self._loop.create_task(self._write_loop(), name=f"permllm-net-write[{self.name}]"),
        )

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
        meter = self._meter
        frame = encode_message(tag, phase, meter.clock[phase] + 1, payload)
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

    async def recv(self, tag: Tag, *, timeout: float | None = None) -> Any:
        """Wait for the message with this exact tag, remove it from the mailbox and return its payload.

        A message that arrived before the channel failed is still returned.
        Otherwise raises the channel's error (PeerClosed, FrameError, ...)
        naming the tag, or asyncio.TimeoutError after ``timeout`` seconds.
        """
        tag = tuple(tag)
        item = self._mailbox.pop(tag, None)
        if item is None:
            if self._error is not None:
                raise _for_tag(self._error, tag)
            if self._loop is None:
                raise RuntimeError(f"channel to peer {self.name!r} not started")
            if tag in self._waiters:
                raise RuntimeError(f"another task is already waiting for {tag!r} from peer {self.name!r}")
            fut: asyncio.Future[_Item] = self._loop.create_future()
            self._waiters[tag] = fut
            try:
                item = await (fut if timeout is None else asyncio.wait_for(fut, timeout))
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(
                    f"timed out after {timeout} s waiting for {tag!r} from peer {self.name!r}"
                ) from None
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._mailbox[tag] = fut.result()  # arrived just as we were cancelled: keep it
                raise
            finally:
                if self._waiters.get(tag) is fut:
                    del self._waiters[tag]
        phase, stamp, payload = item
        self._meter.on_consume(phase, stamp)
        return payload

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

    async def _read_loop(self) -> None:
        transport, meter, mailbox, waiters = self._transport, self._meter, self._mailbox, self._waiters
        try:
            while True:
                body = await transport.recv()
                try:
                    tag, phase, stamp, payload = decode_message(body)
                except FrameError as e:
                    raise FrameError(f"malformed frame from peer {self.name!r}: {e}") from e
                if phase not in PHASES:
                    raise FrameError(f"message {tag!r} from peer {self.name!r} has unknown phase {phase!r}")
                meter.on_arrive(phase, str(tag[0]), len(body) + _PREFIX_BYTES)
                fut = waiters.pop(tag, None)
                if fut is not None and not fut.done():
                    fut.set_result((phase, stamp, payload))
                elif tag in mailbox:
                    raise FrameError(
                        f"duplicate message for tag {tag!r} from peer {self.name!r} (the previous one was not consumed)"
                    )
                else:
                    mailbox[tag] = (phase, stamp, payload)
        except NetError as e:
            self._fail(e)
        except Exception as e:  # a bug below us must not leave recvs hanging
            err = NetError(f"reading from peer {self.name!r} failed: {e!r}")
            err.__cause__ = e
            self._fail(err)
        await transport.close()

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
                await transport.send(frame)
                self._pending -= 1
                if not self._pending and self._flushers:
                    for fut in self._flushers:
                        if not fut.done():
                            fut.set_result(None)
                    self._flushers.clear()
        except NetError as e:
            self._fail(e)
        except Exception as e:
            err = NetError(f"writing to peer {self.name!r} failed: {e!r}")
            err.__cause__ = e
            self._fail(err)
        await transport.close()


def _check_hello(hello: Any, *, role: str, peer_role: str, session: str, peer: str) -> None:
    if not (isinstance(hello, dict) and "permllm" in hello):
        text = repr(hello)
        raise HandshakeError(
            f"malformed handshake from peer {peer!r}: not a permllm hello: {text[:80]}{'...' if len(text) > 80 else ''}"
        )
    version = hello["permllm"]
    if isinstance(hello.get("error"), str):
        raise HandshakeError(f"peer {peer!r} refused the connection: {hello['error']}")
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"protocol version mismatch: this party speaks {PROTOCOL_VERSION}, peer {peer!r} speaks {version!r}"
        )
    their_role, their_session = hello.get("role"), hello.get("session")
    if not (isinstance(their_role, str) and isinstance(their_session, str)):
        raise HandshakeError(f"malformed handshake from peer {peer!r}: role and session must be strings, got {hello!r}")
    if their_role != peer_role:
        raise HandshakeError(
            f"role mismatch: this party ({role!r}) expects peer {peer!r} to be {peer_role!r}, "
            f"but the peer says it is {their_role!r}"
        )
    if their_session != session:
        raise HandshakeError(
            f"session mismatch: this party is in session {session!r}, peer {peer!r} is in session {their_session!r}"
        )


async def open_channel(
    transport: Transport,
    meter: Meter,
    *,
    role: str,
    peer_role: str,
    session: str,
    link: LinkEmulator | None = None,
    timeout: float = 30.0,
) -> Channel:
    """Handshake over ``transport``, then return a started :class:`Channel`.

    Wire format of the handshake: each side sends one frame, the msgpack map
    ``{"permllm": PROTOCOL_VERSION, "role": role, "session": session}``, and
    reads the peer's. The peer's version must equal ``PROTOCOL_VERSION``, its
    role ``peer_role`` and its session ``session``; otherwise, or if its frame
    is malformed, the transport is closed and HandshakeError raised naming both
    sides' values. The two frames are counted in ``meter`` as phase "setup",
    kind "handshake". No hello within ``timeout`` s: asyncio.TimeoutError.
    """
    peer = transport.peer
    try:
        hello = packb({"permllm": PROTOCOL_VERSION, "role": role, "session": session})
        await asyncio.wait_for(transport.send(hello), timeout)
        meter.on_send("setup", "handshake", len(hello) + _PREFIX_BYTES)
        try:
            body = await asyncio.wait_for(transport.recv(), timeout)
            theirs = unpackb(body)
        except FrameError as e:
            raise HandshakeError(f"malformed handshake from peer {peer!r}: {e}") from e
        meter.on_arrive("setup", "handshake", len(body) + _PREFIX_BYTES)
        _check_hello(theirs, role=role, peer_role=peer_role, session=session, peer=peer)
    except asyncio.TimeoutError:
        await transport.close()
        raise asyncio.TimeoutError(f"no handshake from peer {peer!r} within {timeout} s") from None
    except BaseException:
        await transport.close()
        raise
    channel = Channel(transport, meter, link=link)
    channel.start()
    return channel


async def accept_channel(
    transport: Transport,
    meter: Meter,
    *,
    role: str,
    peer_roles: Collection[str],
    link: LinkEmulator | None = None,
    timeout: float = 30.0,
) -> tuple[Channel, str, str]:
    """Server side of the handshake: read the peer's hello first, then answer.

    Used by daemons, which learn the session id and the peer's role from the hello.
    The peer's version must equal ``PROTOCOL_VERSION`` and its role be one of
    ``peer_roles``; otherwise the answer carries an ``"error"`` field (so the
    connecting side's :func:`open_channel` raises HandshakeError with the reason),
    the transport is closed and HandshakeError raised here. Returns the started
    channel, the peer's role and the session id.
    """
    peer = transport.peer
    try:
        try:
            body = await asyncio.wait_for(transport.recv(), timeout)
            theirs = unpackb(body)
        except FrameError as e:
            raise HandshakeError(f"malformed handshake from peer {peer!r}: {e}") from e
        meter.on_arrive("setup", "handshake", len(body) + _PREFIX_BYTES)
        their_role = theirs.get("role") if isinstance(theirs, dict) else None
        session = theirs.get("session") if isinstance(theirs, dict) else None
        answer = {"permllm": PROTOCOL_VERSION, "role": role, "session": session if isinstance(session, str) else ""}
        try:
            if their_role not in peer_roles:
                raise HandshakeError(f"role mismatch: this party ({role!r}) accepts {sorted(peer_roles)}, "
                                     f"but the peer says it is {their_role!r}")
            _check_hello(theirs, role=role, peer_role=their_role, session=session, peer=peer)
        except HandshakeError as e:
            answer["error"] = str(e)
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
    channel = Channel(transport, meter, link=link)
    channel.start()
    return channel, their_role, session

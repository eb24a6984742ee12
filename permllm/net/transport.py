"""Transports: ordered, reliable delivery of whole frames (message bodies).

Part of ``permllm.net``, the bottom layer of permllm; it knows nothing of
protocols or models. A :class:`Transport` moves opaque ``bytes`` frames
between two parties; ``Channel`` builds tagged mailboxes on top of it.
Two implementations: :class:`MemoryTransport` (an in-process pair over asyncio
queues, for tests and single-process runs) and :class:`TcpTransport`
(length-prefixed frames over an asyncio stream, optionally TLS), with
:func:`tcp_connect` and :func:`tcp_serve` to set them up.

A transport's ``send`` and ``recv`` are each meant for one task at a time
(``Channel`` has one writer task and one reader task).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as _ssl
import struct
from abc import ABC, abstractmethod
from typing import Awaitable, Callable

from .codec import DEFAULT_MAX_FRAME
from .errors import FrameTooLarge, PeerClosed, TlsError
from .tls import PeerCert, peer_cert, tls_reason

__all__ = ["Transport", "MemoryTransport", "memory_pair", "TcpTransport", "tcp_connect", "tcp_serve"]

log = logging.getLogger(__name__)

_PREFIX = struct.Struct("!I")
_COALESCE = 64 * 1024      # frames up to this size are written in one piece with their prefix
_STREAM_LIMIT = 1 << 20    # StreamReader buffer limit: fewer pause/resume cycles on big frames
_CLOSE_TIMEOUT = 1.0       # how long close() lets buffered data drain before aborting


def _too_large(n: int, limit: int, peer: str, direction: str) -> FrameTooLarge:
    return FrameTooLarge(f"frame of {n} bytes {direction} peer {peer!r} exceeds the maximum frame size of {limit} bytes")


class Transport(ABC):
    """Ordered, reliable delivery of frames (one message body each) to one peer."""

    __slots__ = ("peer", "max_frame", "peer_cert")

    peer: str       # human-readable name of the other end, used in error messages
    max_frame: int  # largest frame body, in bytes, that this end sends or accepts
    peer_cert: PeerCert | None  # the peer's verified TLS certificate; None on an unauthenticated link

    @abstractmethod
    async def send(self, frame: bytes) -> None:
        """Send one frame; FrameTooLarge if ``len(frame) > max_frame``, PeerClosed if the connection is gone."""

    @abstractmethod
    async def recv(self) -> bytes:
        """Return the next frame; PeerClosed on EOF/reset (also mid-frame), FrameTooLarge for an oversized frame."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection (idempotent)."""


class _Eof:
    __slots__ = ()


_EOF = _Eof()


class MemoryTransport(Transport):
    """One end of an in-process pair made by :func:`memory_pair`; frames are passed as ``bytes`` objects."""

    __slots__ = ("_inbox", "_other", "_closed")

    def __init__(self, peer: str, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.peer = peer
        self.max_frame = max_frame
        self.peer_cert = None
        self._inbox: asyncio.Queue[bytes | _Eof] = asyncio.Queue()
        self._other: MemoryTransport = self
        self._closed = False

    async def send(self, frame: bytes) -> None:
        """Hand ``frame`` to the other end's inbox (no length prefix: the frame object itself travels)."""
        if self._closed:
            raise PeerClosed(f"connection to peer {self.peer!r} was closed by this party")
        if self._other._closed:
            raise PeerClosed(f"peer {self.peer!r} closed the connection")
        if len(frame) > self.max_frame:
            raise _too_large(len(frame), self.max_frame, self.peer, "to")
        self._other._inbox.put_nowait(bytes(frame))

    async def recv(self) -> bytes:
        if self._closed:
            raise PeerClosed(f"connection to peer {self.peer!r} was closed by this party")
        frame = await self._inbox.get()
        if isinstance(frame, _Eof):
            self._inbox.put_nowait(frame)  # every later recv sees the end too
            if self._closed:
                raise PeerClosed(f"connection to peer {self.peer!r} was closed by this party")
            raise PeerClosed(f"peer {self.peer!r} closed the connection")
        if len(frame) > self.max_frame:
            await self.close()
            raise _too_large(len(frame), self.max_frame, self.peer, "from")
        return frame

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put_nowait(_EOF)         # wakes a pending recv on this end
        self._other._inbox.put_nowait(_EOF)  # the peer reads what was sent before, then the end


def memory_pair(
    a: str = "a", b: str = "b", *, max_frame: int = DEFAULT_MAX_FRAME
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected in-process transports: the first is party ``a``'s end (its peer is ``b``), the second ``b``'s."""
    ta = MemoryTransport(b, max_frame)
    tb = MemoryTransport(a, max_frame)
    ta._other, tb._other = tb, ta
    return ta, tb


class TcpTransport(Transport):
    """Length-prefixed frames over an asyncio stream (plain TCP or TLS)."""

    __slots__ = ("_reader", "_writer", "_closed")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str = "",
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        if not peer:
            addr = writer.get_extra_info("peername")
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.peer = peer
        self.max_frame = max_frame
        self.peer_cert = peer_cert(writer.get_extra_info("ssl_object"))
        self._reader = reader
        self._writer = writer
        self._closed = False

    async def send(self, frame: bytes) -> None:
        """Write one frame and wait for the write buffer to drain.

        Wire format: a 4-byte big-endian unsigned length ``n`` (``!I``), then the
        ``n`` bytes of the frame body.
        """
        n = len(frame)
        if n > self.max_frame:
            raise _too_large(n, self.max_frame, self.peer, "to")
        if self._closed:
            raise PeerClosed(f"connection to peer {self.peer!r} was closed by this party")
        w = self._writer
        if w.is_closing():
            raise PeerClosed(f"peer {self.peer!r} closed the connection")
        try:
            if n <= _COALESCE:
                w.write(_PREFIX.pack(n) + frame)
            else:
                w.write(_PREFIX.pack(n))
                w.write(frame)
            await w.drain()
        except OSError as e:
            raise PeerClosed(f"connection to peer {self.peer!r} was lost ({e})") from e

    async def recv(self) -> bytes:
        if self._closed:
            raise PeerClosed(f"connection to peer {self.peer!r} was closed by this party")
        r = self._reader
        try:
            head = await r.readexactly(4)
        except asyncio.IncompleteReadError as e:
            raise self._eof_error(e, 4, "frame header") from None
        except OSError as e:
            raise PeerClosed(f"connection to peer {self.peer!r} was lost ({e})") from e
        (n,) = _PREFIX.unpack(head)
        if n > self.max_frame:
            await self.close()
            raise _too_large(n, self.max_frame, self.peer, "from")
        try:
            return await r.readexactly(n)
        except asyncio.IncompleteReadError as e:
            raise self._eof_error(e, n, "frame body", mid_frame=True) from None
        except OSError as e:
            raise PeerClosed(f"connection to peer {self.peer!r} was lost in the middle of a frame ({e})") from e

    def _eof_error(self, e: asyncio.IncompleteReadError, n: int, what: str, mid_frame: bool = False) -> PeerClosed:
        if self._closed:
            return PeerClosed(f"connection to peer {self.peer!r} was closed by this party")
        if mid_frame or e.partial:
            return PeerClosed(
                f"peer {self.peer!r} closed the connection in the middle of a frame "
                f"(truncated {what}: got {len(e.partial)} of {n} bytes)"
            )
        return PeerClosed(f"peer {self.peer!r} closed the connection")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        w = self._writer
        w.close()
        try:
            await asyncio.wait_for(w.wait_closed(), _CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            w.transport.abort()  # the peer is not reading: drop what is still buffered
        except OSError:
            pass  # the connection was already broken


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def tcp_connect(
    host: str,
    port: int,
    *,
    peer: str = "",
    ssl: _ssl.SSLContext | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    retries: int = 0,
    backoff: float = 0.1,
    max_backoff: float = 2.0,
    timeout: float = 10.0,
) -> TcpTransport:
    """Connect to ``host:port`` (TLS with ``ssl``); on a network error retry up to ``retries`` times.

    Each attempt, TLS handshake included, has ``timeout`` seconds. The waits
    between attempts grow exponentially from ``backoff`` seconds, capped at
    ``max_backoff``; after the last attempt its OSError (e.g.
    ConnectionRefusedError) propagates, its message naming the peer, the address
    and the number of attempts. A failed TLS handshake is not retried:
    it raises TlsError with OpenSSL's reason (unknown CA, expired certificate).
    ``peer`` defaults to ``"host:port"``.
    """
    peer = peer or f"{host}:{port}"
    attempt = 0
    while True:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl, limit=_STREAM_LIMIT), timeout)
            break
        except _ssl.SSLError as e:
            raise TlsError(f"TLS handshake with peer {peer!r} at {host}:{port} failed: {tls_reason(e)}") from e
        except (OSError, asyncio.TimeoutError) as e:
            if attempt >= retries:
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                if isinstance(e, asyncio.TimeoutError):
                    raise TimeoutError(f"cannot connect to peer {peer!r} at {host}:{port} ({tries}): "
                                       f"timed out after {timeout} s") from None
                if e.errno:
                    raise type(e)(e.errno, f"cannot connect to peer {peer!r} at {host}:{port} ({tries}): "
                                           f"{os.strerror(e.errno)}") from e
                raise
            await asyncio.sleep(min(backoff * 2**attempt, max_backoff))
            attempt += 1
    _set_nodelay(writer)
    return TcpTransport(reader, writer, peer=peer, max_frame=max_frame)


async def tcp_serve(
    host: str,
    port: int,
    on_transport: Callable[[TcpTransport], Awaitable[None]],
    *,
    ssl: _ssl.SSLContext | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    peer: str = "",
    handshake_timeout: float = 10.0,
) -> asyncio.Server:
    """Listen on ``host:port`` (0 picks a free port) and await ``on_transport(t)`` for each connection.

    With ``ssl`` each connection first completes a TLS handshake within
    ``handshake_timeout`` seconds; one that fails (unknown CA, expired or missing
    client certificate, not TLS at all) is logged with the reason and dropped
    before ``on_transport`` sees it. ``peer`` names accepted connections
    (default: the remote address). The transport stays open when
    ``on_transport`` returns; if it raises, the error is logged and the
    transport closed.
    """

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _set_nodelay(writer)
        if ssl is not None:
            addr = writer.get_extra_info("peername")
            try:
                await writer.start_tls(ssl, ssl_handshake_timeout=handshake_timeout)
            except (OSError, asyncio.TimeoutError) as e:
                where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
                log.warning("rejected a connection from %s: TLS handshake failed: %s", where, tls_reason(e))
                writer.close()
                return
        transport = TcpTransport(reader, writer, peer=peer, max_frame=max_frame)
        try:
            await on_transport(transport)
        except asyncio.CancelledError:
            # The server is shutting down (the handler logged why). End this task quietly: Python 3.11's
            # stream callback would log the cancellation of its task as an error with a traceback.
            writer.close()
        except Exception:
            log.exception("connection handler for peer %r failed", transport.peer)
            await transport.close()

    return await asyncio.start_server(accepted, host, port, limit=_STREAM_LIMIT)

"""Exceptions of the networking layer.

Part of ``permllm.net``, the bottom layer of permllm: every error that the
codec, the transports and the channels raise derives from :class:`NetError`,
so callers above (protocols, runtime) can tell network failures from their own.
"""

from __future__ import annotations


class NetError(Exception):
    """Base of every networking error."""


class FrameError(NetError):
    """A frame that cannot be decoded: bad msgpack, bad structure, unknown ext type, bad dtype, byte count not matching shape."""


class FrameTooLarge(FrameError):
    """A frame whose length prefix exceeds the maximum frame size."""


class PeerClosed(NetError):
    """The peer closed the connection or it was lost.

    The message names the peer and, when raised from ``Channel.recv``, the awaited tag.
    """


class PeerTimeout(NetError):
    """The peer sent nothing (or accepted nothing) for longer than the link's timeout."""


class PeerAborted(NetError):
    """The peer ended the session on purpose and said why (``Channel.abort``)."""


class HandshakeError(NetError):
    """Peer's handshake does not match (version, role, session, terms): the message names both sides' values."""


class TlsError(HandshakeError):
    """A TLS handshake that failed, or a peer certificate that does not fit (CA, role, expiry, pin)."""

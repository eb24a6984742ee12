"""permllm.net: the networking layer, the bottom of permllm.

It knows nothing of protocols or models; it moves tagged messages between
parties and accounts for them:

- ``codec``: msgpack with numpy/torch arrays (never pickle), strict decoding,
  and the ``[tag, phase, stamp, payload]`` message envelope;
- ``transport``: ordered frame delivery, in memory (``memory_pair``) or over
  length-prefixed TCP/TLS (``tcp_connect``, ``tcp_serve``);
- ``tls``: mutual-TLS contexts and the role a peer's certificate names;
- ``channel``: tagged mailboxes over a transport (``send`` never blocks,
  ``recv(tag)`` completes in any order) and the handshake (``open_channel``,
  ``accept_channel``);
- ``meter``: bytes/messages per (phase, kind) and a hop clock per phase;
- ``emulation``: latency/bandwidth of a link, applied by the channel writer;
- ``loop``: uvloop when available.
"""

from .channel import PROTOCOL_VERSION, Channel, Tag, accept_channel, open_channel
from .codec import DEFAULT_MAX_FRAME, decode_message, encode_message, packb, unpackb
from .emulation import LinkEmulator
from .errors import (
    FrameError, FrameTooLarge, HandshakeError, NetError, PeerAborted, PeerClosed, PeerTimeout, TlsError,
)
from .loop import install_uvloop, run
from .meter import PHASES, Meter, Stat
from .tls import PeerCert, client_context, server_context
from .transport import MemoryTransport, TcpTransport, Transport, memory_pair, tcp_connect, tcp_serve

__all__ = [
    "NetError", "FrameError", "FrameTooLarge", "PeerClosed", "PeerTimeout", "PeerAborted", "HandshakeError",
    "TlsError", "PeerCert", "server_context", "client_context",
    "DEFAULT_MAX_FRAME", "packb", "unpackb", "encode_message", "decode_message",
    "Transport", "MemoryTransport", "memory_pair", "TcpTransport", "tcp_connect", "tcp_serve",
    "Meter", "Stat", "PHASES",
    "LinkEmulator",
    "Channel", "Tag", "open_channel", "accept_channel", "PROTOCOL_VERSION",
    "install_uvloop", "run",
]

"""The wire between a source and a destination daemon: opaque typed frames, sessions.

frames.py (the format, specified once, and its pure codec), address.py (migration
addresses), channel.py (one connection: the protocol around a decoder), handshake.py
(authenticating a channel), session.py (a session's channels as one stream),
client.py (:func:`connect`), server.py (:func:`serve`), auth.py (keys and TLS),
limits.py, bandwidth.py (the token bucket and the bandwidth estimate), errors.py.
Knows nothing of devices: the payloads are the application's.
"""

from __future__ import annotations

from transport.address import parse_address
from transport.auth import AuthConfig, client_tls_context, server_tls_context
from transport.bandwidth import TokenBucket
from transport.client import DEFAULT_CHANNELS, connect
from transport.errors import (
    AuthenticationError,
    ConnectionLost,
    LimitExceeded,
    PeerCancelled,
    ProtocolError,
    SessionClosed,
    TransportError,
    TransportTimeout,
)
from transport.frames import (
    DATA_TAGS,
    PROTOCOL_VERSION,
    Buffer,
    Chunk,
    Frame,
    FrameDecoder,
    Tag,
    encode_header,
    typed_field,
)
from transport.limits import Limits
from transport.server import Server, serve
from transport.session import Session

__all__ = [
    "DATA_TAGS",
    "DEFAULT_CHANNELS",
    "PROTOCOL_VERSION",
    "AuthConfig",
    "AuthenticationError",
    "Buffer",
    "Chunk",
    "ConnectionLost",
    "Frame",
    "FrameDecoder",
    "LimitExceeded",
    "Limits",
    "PeerCancelled",
    "ProtocolError",
    "Server",
    "Session",
    "SessionClosed",
    "Tag",
    "TokenBucket",
    "TransportError",
    "TransportTimeout",
    "client_tls_context",
    "connect",
    "encode_header",
    "parse_address",
    "serve",
    "server_tls_context",
    "typed_field",
]

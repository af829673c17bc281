"""The wire between a source and a destination daemon: frames, sessions, auth, limits.

The format is specified once, in :mod:`transport.frames`.
"""

from __future__ import annotations

from transport.auth import AuthConfig, client_tls_context, server_tls_context
from transport.bandwidth import BandwidthEstimator, TokenBucket
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
    require,
)
from transport.limits import Limits
from transport.session import DEFAULT_CHANNELS, Server, Session, connect, parse_address, serve

__all__ = [
    "DATA_TAGS",
    "DEFAULT_CHANNELS",
    "PROTOCOL_VERSION",
    "AuthConfig",
    "AuthenticationError",
    "BandwidthEstimator",
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
    "require",
    "serve",
    "server_tls_context",
]

"""Errors raised by the transport.

Every error the transport raises is a :class:`TransportError`::

    TransportError
     +-- ProtocolError          bad input from the peer; the message names the field
     |    +-- LimitExceeded     a size or count limit; names the limit and the value
     +-- AuthenticationError    the peer failed authentication, or refused ours
     +-- ConnectionLost         the peer vanished; ``__cause__`` is the OSError or EOFError
     +-- PeerCancelled          the peer sent CANCEL; ``reason`` says why
     +-- SessionClosed          misuse: the session was closed or aborted locally
     +-- TransportTimeout       an operation ran out of its time budget (also a TimeoutError)

A session that raised any of them (but SessionClosed) is aborted: no later frame of
that session reaches the caller, so nothing is ever half-applied.
"""

from __future__ import annotations


class TransportError(Exception):
    """Base of every error the transport raises."""


class ProtocolError(TransportError):
    """The peer sent something the protocol forbids; ``field`` names what was wrong.

    ``ProtocolError(field, message)`` reads "field: message"; the one-argument form
    ``ProtocolError(message)`` is for callers whose message already names the field.
    """

    #: The CANCEL code that tells the peer why its frames were refused.
    code = "protocol"

    def __init__(self, field: str, message: str | None = None) -> None:
        super().__init__(field if message is None else f"{field}: {message}")
        self.field = None if message is None else field


class LimitExceeded(ProtocolError):
    """The peer exceeded a limit; ``limit`` names it, ``value`` is what the peer sent."""

    code = "limit"

    def __init__(self, field: str, value: int, limit: int) -> None:
        super().__init__(field, f"{value} exceeds the limit of {limit}")
        self.value = value
        self.limit = limit


class AuthenticationError(TransportError):
    """Authentication failed: we refused the peer, or the peer refused us."""


class ConnectionLost(TransportError):
    """The connection to the peer ended unexpectedly; ``__cause__`` says how."""


class PeerHungUp(ConnectionLost):
    """The peer closed its end between two frames: how a peer that said all it had to
    leaves, and also how a crashed one's kernel ends it. Whether more was due is the
    caller's call, so the session does not warn about it."""


class PeerCancelled(TransportError):
    """The peer cancelled the session; ``reason`` is the text it gave, ``code`` its kind.

    A peer that was asked to stop (code "cancelled" or none) "cancelled"; one that hit
    its own bug ("internal") "failed"; one that gave up on what we sent ("protocol",
    "limit", ...) "refused".
    """

    def __init__(self, reason: str, *, code: str | None = None, peer: str = "peer") -> None:
        verbs = {None: "cancelled", "cancelled": "cancelled", "internal": "failed"}
        verb = verbs.get(code, "refused")
        super().__init__(f"{peer} {verb}: {reason}")
        self.reason = reason
        self.code = code


class SessionClosed(TransportError):
    """The session was used after it was closed, cancelled or aborted locally."""


class TransportTimeout(TransportError, TimeoutError):
    """An operation (connect, handshake, close) did not finish within its budget."""

"""The source's side: :func:`connect` opens a session's channels, with retries."""

from __future__ import annotations

import asyncio
import os
import random
import ssl

import structlog

from transport.address import parse_address, parse_destination
from transport.auth import SESSION_ID_SIZE, AuthConfig
from transport.channel import Channel
from transport.errors import (
    AuthenticationError,
    ConnectionLost,
    TransportError,
    TransportTimeout,
)
from transport.handshake import client_handshake
from transport.limits import Limits
from transport.session import DEFAULT_LINK_TIMEOUT_S, Session

log = structlog.get_logger(__name__)

#: Channels a session opens unless told otherwise: one connection fills every link
#: measured here, loopback included (orchestrator/bench/transportbench.py: framed 1
#: channel 3.8 GB/s against 3.6 for 4, and 20% less receiver CPU per GB).
DEFAULT_CHANNELS = 1
#: First delay between connection attempts; doubles up to RETRY_MAX_S (full jitter).
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0


async def _open_channel(
    kind: str, host: str, port: int, auth: AuthConfig, limits: Limits
) -> Channel:
    loop = asyncio.get_running_loop()
    factory = lambda: Channel(limits)  # noqa: E731 - a one-line protocol factory
    if kind == "unix":
        _, channel = await loop.create_unix_connection(
            factory, host, ssl=auth.ssl_context, server_hostname=auth.server_hostname
        )
    else:
        hostname = (auth.server_hostname or host) if auth.ssl_context else None
        _, channel = await loop.create_connection(
            factory, host, port, ssl=auth.ssl_context, server_hostname=hostname
        )
    return channel


async def connect(
    address: str,
    *,
    name: str,
    auth: AuthConfig,
    channels: int = DEFAULT_CHANNELS,
    limits: Limits | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - one budget for every attempt and handshake
    link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
) -> Session:
    """Open a session to the destination at ``address`` over ``channels`` connections.

    A connection refused, reset or dropped before the handshake ends (a busy
    destination evicts pending handshakes) is retried with exponential backoff and
    jitter until ``timeout``; an authentication failure never is. Raises
    AuthenticationError (refused, or the destination failed to prove the key or its
    certificate), ConnectionLost (the last attempt's loss), ProtocolError, PeerCancelled,
    or TransportTimeout after ``timeout`` seconds for the whole set.
    """
    limits = limits or Limits()
    if not 1 <= channels <= limits.max_channels:
        raise ValueError(f"channels must be in 1..{limits.max_channels}, got {channels}")
    parse_destination(address)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = RETRY_FIRST_S
    attempt = 1
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                opened, peer, peer_max, session = await _connect_once(
                    address, name=name, auth=auth, channels=channels, limits=limits
                )
            break
        except TimeoutError as exc:
            if isinstance(exc, TransportError):
                raise
            raise TransportTimeout(
                f"no session with {address} within {timeout} s ({attempt} attempts)"
            ) from exc
        except ConnectionLost as exc:
            pause = random.uniform(0, delay)
            if loop.time() + pause >= deadline:
                raise
            log.info("connect_retry", address=address, attempt=attempt, error=str(exc))
            await asyncio.sleep(pause)
            delay = min(delay * 2, RETRY_MAX_S)
            attempt += 1
    return Session(
        opened,
        role="source",
        peer_name=peer,
        peer_max_payload=peer_max,
        limits=limits,
        session_id=session,
        link_timeout_s=link_timeout_s,
    )


async def _connect_once(
    address: str, *, name: str, auth: AuthConfig, channels: int, limits: Limits
) -> tuple[list[Channel], str, int, bytes]:
    """One attempt: every channel opened and through the handshake, or none."""
    kind, host, port = parse_address(address)
    session = os.urandom(SESSION_ID_SIZE)
    opened: list[Channel] = []
    try:
        for index in range(channels):
            channel = await _open_channel(kind, host, port, auth, limits)
            opened.append(channel)
            peer, peer_max = await client_handshake(
                channel,
                name=name,
                auth=auth,
                session=session,
                index=index,
                channels=channels,
                limits=limits,
            )
    except BaseException as exc:
        for channel in opened:
            channel.hang_up()
        if isinstance(exc, ConnectionLost) and isinstance(exc.__cause__, ssl.SSLError):
            raise AuthenticationError(f"TLS with {address} failed: {exc.__cause__}") from exc
        if isinstance(exc, ConnectionLost) and auth.ssl_context and not opened[-1].decoder.frames:
            if opened[-1].decoder.buffered:  # it sent data over TLS: it took our certificate
                raise
            # With TLS 1.3 a destination that rejects our certificate just hangs up.
            raise AuthenticationError(
                f"TLS with {address} failed: the destination hung up before HELLO "
                "(is our certificate trusted there?)"
            ) from exc
        if isinstance(exc, ssl.SSLError):
            raise AuthenticationError(f"TLS with {address} failed: {exc}") from exc
        if isinstance(exc, OSError):
            raise ConnectionLost(f"cannot connect to {address}: {exc}") from exc
        raise
    return opened, peer, peer_max, session

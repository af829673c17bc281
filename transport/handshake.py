"""The handshake of one channel, both sides (specified in :mod:`transport.frames`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from transport.auth import NONCE_SIZE, SESSION_ID_SIZE, AuthConfig, check_proof, new_nonce, proof
from transport.channel import Channel
from transport.errors import (
    AuthenticationError,
    LimitExceeded,
    PeerCancelled,
    ProtocolError,
    TransportError,
)
from transport.frames import (
    PROTOCOL_VERSION,
    Frame,
    Tag,
    typed_field,
)
from transport.limits import MIN_MAX_PAYLOAD, Limits

log = structlog.get_logger(__name__)


def refuse(channel: Channel, code: str, reason: str) -> None:
    """Send the peer a refusal and nothing else, then close."""
    with contextlib.suppress(TransportError):
        channel.send_control(Tag.CANCEL, {"reason": reason, "code": code})
    channel.hang_up(graceful=True)


def peer_cancelled(frame: Frame, peer: str) -> PeerCancelled:
    """The error a received CANCEL stands for, with the peer's reason and code."""
    fields = frame.fields()
    reason, code = fields.get("reason"), fields.get("code")
    return PeerCancelled(
        reason[:500] if isinstance(reason, str) else "no reason given",
        code=code[:40] if isinstance(code, str) else None,
        peer=peer,
    )


def raise_if_cancel(frame: Frame, expected: Tag) -> None:
    if frame.tag is Tag.CANCEL:
        fields = frame.fields()
        reason = str(fields.get("reason", "no reason given"))[:200]
        if fields.get("code") == "auth":
            raise AuthenticationError(f"peer refused us: {reason}")
        raise peer_cancelled(frame, "peer")
    if frame.tag is not expected:
        raise ProtocolError("tag", f"expected {expected.name}, got {frame.tag.name}")


def _bytes_field(fields: Mapping[str, Any], key: str, size: int) -> bytes:
    value: bytes = typed_field(fields, key, bytes)
    if len(value) != size:
        raise ProtocolError(key, f"expected {size} bytes, got {len(value)}")
    return value


def _checksum_field(fields: Mapping[str, Any]) -> bool:
    """HELLO's ``checksum``: true when absent (a peer that predates it checks every frame)."""
    value = fields.get("checksum", True)
    if not isinstance(value, bool):
        raise ProtocolError("checksum", f"expected bool, got {value!r:.60}")
    return value


def _max_payload_field(fields: Mapping[str, Any]) -> int:
    """``max_payload``: the largest data payload the peer takes, at least MIN_MAX_PAYLOAD
    (our chunks are cut to it: smaller, a frame each would cost more than its bytes)."""
    value: int = typed_field(fields, "max_payload", int)
    if value < MIN_MAX_PAYLOAD:
        raise ProtocolError("max_payload", f"{value} is below {MIN_MAX_PAYLOAD}")
    return value


def _name_field(fields: Mapping[str, Any], limits: Limits) -> str:
    name: str = typed_field(fields, "name", str)
    if len(name) > limits.max_name_length:
        raise LimitExceeded("name", len(name), limits.max_name_length)
    return name


async def client_handshake(
    channel: Channel,
    *,
    name: str,
    auth: AuthConfig,
    session: bytes,
    index: int,
    channels: int,
    limits: Limits,
) -> tuple[str, int]:
    """Run the source side of the handshake; returns the peer's name and max_payload."""
    nonce = new_nonce()
    channel.send_control(
        Tag.HELLO,
        {
            "version": PROTOCOL_VERSION,
            "name": name,
            "session": session,
            "channel": index,
            "channels": channels,
            "nonce": nonce,
            "auth": auth.method,
            "max_payload": limits.max_payload,
            "checksum": auth.requires_checksums,
        },
    )
    frame = await channel.next_frame()
    raise_if_cancel(frame, Tag.HELLO)
    hello = frame.fields()
    if hello.get("version") != PROTOCOL_VERSION:
        raise ProtocolError("version", f"peer speaks {hello.get('version')!r}")
    channel.checksums = _checksum_field(hello)
    if auth.requires_checksums and not channel.checksums:
        refuse(channel, "protocol", "this source requires per-chunk checksums")
        raise ProtocolError("checksum", "the destination refused per-chunk checksums")
    dest_nonce = _bytes_field(hello, "nonce", NONCE_SIZE)
    if auth.psk is not None and hello.get("auth") != "psk":
        refuse(channel, "auth", "the source requires a pre-shared key")
        raise AuthenticationError("the destination does not authenticate with the key")
    reply = {}
    if auth.psk is not None:
        reply["proof"] = proof(auth.psk, "source", session, index, nonce, dest_nonce)
    channel.send_control(Tag.AUTH, reply)
    frame = await channel.next_frame()
    raise_if_cancel(frame, Tag.AUTH)
    accepted = frame.fields()
    if auth.psk is not None and not check_proof(
        accepted.get("proof"), auth.psk, "dest", session, index, nonce, dest_nonce
    ):
        refuse(channel, "auth", "authentication failed")
        raise AuthenticationError("the destination failed to prove the pre-shared key")
    return _name_field(accepted, limits), _max_payload_field(accepted)


@dataclass(frozen=True, slots=True)
class Hello:
    """What a source told about itself and the session a channel belongs to."""

    name: str
    session: bytes
    channel: int
    channels: int
    max_payload: int
    #: Whether the source asked for per-chunk checksums.
    checksum: bool


def _parse_hello(fields: Mapping[str, Any], limits: Limits) -> tuple[Hello, bytes]:
    """A source's HELLO, and its nonce; ProtocolError naming the first field refused."""
    version = fields.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", f"{version!r:.20} is not {PROTOCOL_VERSION}, the one spoken here"
        )
    channels = typed_field(fields, "channels", int)
    if channels < 1:
        raise ProtocolError("channels", f"{channels} is below 1")
    if channels > limits.max_channels:
        raise LimitExceeded("channels", channels, limits.max_channels)
    index = typed_field(fields, "channel", int)
    if not 0 <= index < channels:
        raise ProtocolError("channel", f"{index} is not in 0..{channels - 1}")
    hello = Hello(
        name=_name_field(fields, limits),
        session=_bytes_field(fields, "session", SESSION_ID_SIZE),
        channel=index,
        channels=channels,
        max_payload=_max_payload_field(fields),
        checksum=_checksum_field(fields),
    )
    return hello, _bytes_field(fields, "nonce", NONCE_SIZE)


async def server_handshake(
    channel: Channel, *, name: str, auth: AuthConfig, limits: Limits
) -> Hello:
    """Run the destination side of the handshake on one channel.

    A HELLO refused for one of its fields is answered with CANCEL naming the field, so
    the source reports why rather than a closed connection (which it would retry).
    """
    frame = await channel.next_frame()
    raise_if_cancel(frame, Tag.HELLO)
    try:
        hello, source_nonce = _parse_hello(frame.fields(), limits)
    except ProtocolError as exc:
        refuse(channel, "version" if exc.field == "version" else exc.code, str(exc))
        raise
    index = hello.channel
    nonce = new_nonce()
    channel.checksums = hello.checksum or auth.requires_checksums
    channel.send_control(
        Tag.HELLO,
        {
            "version": PROTOCOL_VERSION,
            "nonce": nonce,
            "auth": auth.method,
            "checksum": channel.checksums,
        },
    )
    frame = await channel.next_frame()
    raise_if_cancel(frame, Tag.AUTH)
    answer = frame.fields()
    reply: dict[str, Any] = {"name": name, "max_payload": limits.max_payload}
    if auth.psk is not None:
        if not check_proof(
            answer.get("proof"), auth.psk, "source", hello.session, index, source_nonce, nonce
        ):
            refuse(channel, "auth", "authentication failed")
            raise AuthenticationError(f"source {hello.name!r} failed to prove the key")
        reply["proof"] = proof(auth.psk, "dest", hello.session, index, source_nonce, nonce)
    channel.send_control(Tag.AUTH, reply)
    return hello

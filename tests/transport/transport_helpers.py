"""Shared pieces of the transport tests: a recording destination, DEVICES fields, the key."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.pki import make_pki
from transport import Frame, FrameDecoder, Session, Tag, TransportError, parse_address
from transport.auth import AuthConfig, client_tls_context, proof, server_tls_context
from transport.frames import encode_fields, encode_frame

PSK = b"test pre-shared key"


def tls_auth(folder: Path) -> tuple[AuthConfig, AuthConfig]:
    """(server, client) authentication over TLS with the PSK, from a fresh PKI in folder."""
    pki = make_pki(folder, ("server",))
    server = AuthConfig(
        psk=PSK, ssl_context=server_tls_context(pki / "server.crt", pki / "server.key")
    )
    client = AuthConfig(
        psk=PSK, ssl_context=client_tls_context(pki / "ca.crt"), server_hostname="localhost"
    )
    return server, client


def announce(count: int) -> dict[str, Any]:
    """DEVICES fields for ``count`` devices: opaque to the transport, which only counts."""
    return {"devices": [f"dev{i}" for i in range(count)]}


@dataclass
class Recorder:
    """A destination handler that records what it receives until END_OF_STREAM."""

    frames: list[tuple[Tag, int, bytes]] = field(default_factory=list)
    error: TransportError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    on_frame: Callable[[Session, Frame], Awaitable[None]] | None = None

    async def __call__(self, session: Session) -> None:
        try:
            while True:
                frame = await session.recv()
                self.frames.append((frame.tag, frame.device, bytes(frame.payload)))
                if frame.tag is Tag.DEVICES:
                    session.set_device_count(len(frame.fields()["devices"]))
                if self.on_frame is not None:
                    await self.on_frame(session, frame)
                if frame.tag is Tag.END_OF_STREAM:
                    await session.send_control(Tag.VERDICT, {"resumed": True, "reason": ""})
                    return
        except TransportError as exc:
            self.error = exc
        finally:
            self.done.set()


class RawPeer:
    """A hand-driven source on a plain socket: sends any frame, reads what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.seq = 0
        self.decoder = FrameDecoder(handshake=True)

    @classmethod
    async def open(cls, address: str, *, local: str | None = None) -> RawPeer:
        """Connect to a tcp: address (from the loopback address ``local`` if given)."""
        _, host, port = parse_address(address)
        local_addr = None if local is None else (local, 0)
        return cls(*await asyncio.open_connection(host, port, local_addr=local_addr))

    @classmethod
    async def in_session(cls, address: str) -> RawPeer:
        """Connect, authenticate with PSK and announce one device: a session's raw peer."""
        peer = await cls.open(address)
        assert (await peer.handshake(PSK)).tag is Tag.AUTH  # type: ignore[union-attr]
        await peer.send(Tag.DEVICES, announce(1))
        return peer

    async def half_open(self) -> None:
        """Send a HELLO and read the answer: the server now holds a pending handshake."""
        await self.send(Tag.HELLO, hello_fields(os.urandom(16), os.urandom(32)))
        hello = await self.read_frame()
        assert hello is not None
        assert hello.tag is Tag.HELLO

    def encode(
        self,
        tag: Tag,
        fields: dict[str, Any] | None = None,
        *,
        device: int = 0,
        payload: bytes | None = None,
    ) -> bytes:
        """The bytes of the next frame (payload, or the fields as msgpack)."""
        body = encode_fields(fields) if payload is None else payload
        data = b"".join(encode_frame(tag, device, self.seq, (body,)))  # type: ignore[arg-type]
        self.seq += 1
        return data

    async def send(self, tag: Tag, fields: dict[str, Any] | None = None, **kw: Any) -> None:
        """Send the next frame."""
        self.writer.write(self.encode(tag, fields, **kw))
        await self.writer.drain()

    async def read_frame(self) -> Frame | None:
        """The next frame from the peer, or None once it closed (or reset) the connection."""
        while (frame := self.decoder.next_frame()) is None:
            try:
                data = await self.reader.read(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)
        return frame

    async def handshake(self, psk: bytes, *, nonce: bytes | None = None) -> Frame | None:
        """Authenticate as a one-channel source; returns the destination's AUTH (or CANCEL)."""
        session, nonce = os.urandom(16), nonce or os.urandom(32)
        await self.send(Tag.HELLO, hello_fields(session, nonce))
        hello = await self.read_frame()
        assert hello is not None
        assert hello.tag is Tag.HELLO
        dest_nonce = hello.fields()["nonce"]
        await self.send(Tag.AUTH, {"proof": proof(psk, "source", session, 0, nonce, dest_nonce)})
        answer = await self.read_frame()
        self.decoder.end_handshake()
        return answer

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def hello_fields(session: bytes, nonce: bytes) -> dict[str, Any]:
    """A one-channel source's HELLO."""
    return {
        "version": 1,
        "name": "raw",
        "session": session,
        "channel": 0,
        "channels": 1,
        "nonce": nonce,
        "auth": "psk",
        "max_payload": 1 << 20,
    }


async def first_of_two_channels(peer: RawPeer) -> RawPeer:
    """``peer`` authenticated as channel 0 of a two-channel session whose channel 1
    never comes (the server holds it pending, then refuses the incomplete session)."""
    session, nonce = os.urandom(16), os.urandom(32)
    await peer.send(Tag.HELLO, hello_fields(session, nonce) | {"channels": 2})
    hello = await peer.read_frame()
    assert hello is not None
    dest_nonce = hello.fields()["nonce"]
    await peer.send(Tag.AUTH, {"proof": proof(PSK, "source", session, 0, nonce, dest_nonce)})
    accepted = await peer.read_frame()
    assert accepted is not None
    assert accepted.tag is Tag.AUTH
    return peer

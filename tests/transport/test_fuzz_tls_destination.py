"""A hostile destination behind valid TLS, against the source's connect() and session.

The daemon fuzz and tests/transport/test_fuzz_tls.py throw malformed input at a
listener; here the source is the one that reads it. A fake destination completes TLS
and plays the handshake up to a stage drawn at random, then sends one malformed input
(the daemon fuzz's mutations of what it should have sent): as its HELLO, as its AUTH,
or inside the session after a valid handshake, on each channel of one- and two-channel
sessions (a second channel failing must not leave the first open). Then it hangs up or
goes silent. Every case must end within the source's own bounds (connect's timeout,
the link timeout) with a TransportError that says what was wrong, nothing unhandled,
and no socket or task left. LIVEMIG_FUZZ_TLS_CASES sets the cases per event loop
(default 100; asyncio and uvloop both run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
from pathlib import Path
from typing import Any

from test_transport_hostile_tls import open_sockets, settled
from transport_helpers import PSK, RawPeer, tls_auth

from tests.conftest import Runner
from tests.orchestrator.test_hostile_fuzz import hostile_bytes
from transport import AuthConfig, Tag, TransportError, connect
from transport.auth import proof

CASES = int(os.environ.get("LIVEMIG_FUZZ_TLS_CASES", "100"))
WORKERS = 8
#: The source's bounds: connect's budget (retries included) and the link timeout.
CONNECT_S = 0.5
LINK_S = 0.5
#: Frames a destination may send in a session, each a base for mutations.
SESSION_FRAMES: list[tuple[Tag, dict[str, Any]]] = [
    (Tag.DEVICES_ACCEPTED, {"boot_id": "b"}),
    (Tag.SYNC_ACK, {}),
    (Tag.SWITCHOVER_ACK, {}),
    (Tag.VERDICT, {"stage": "failed", "reason": "x" * 100}),
    (Tag.CANCEL, {"reason": "r" * 3000, "code": "c" * 100}),
    (Tag.PING, {"id": 1, "t": 0.5}),
]


class HostileDestination:
    """Per connection: TLS, then the handshake up to a random stage, then one malformed
    input, then a hang-up or silence (held until the source hangs up)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        rng = random.Random(self.rng.random())
        peer = RawPeer(reader, writer)
        try:
            await self._play(peer, rng)
        except (OSError, ssl.SSLError, TransportError, AssertionError):
            pass  # the source hung up first, or sent what this fake cannot parse
        finally:
            writer.transport.abort()
            self.tasks.discard(task)

    async def _play(self, peer: RawPeer, rng: random.Random) -> None:
        hello = await peer.read_frame()
        assert hello is not None
        fields = hello.fields()
        nonce = os.urandom(32)
        answer = {"version": 1, "nonce": nonce, "auth": "psk", "checksum": True}
        stage = rng.randrange(3)
        if stage == 0:
            await self._send(peer, rng, peer.encode(Tag.HELLO, answer))
            return
        await peer.send(Tag.HELLO, answer)
        auth = await peer.read_frame()
        assert auth is not None
        made = proof(PSK, "dest", fields["session"], fields["channel"], fields["nonce"], nonce)
        accepted = {"name": "dest", "max_payload": 1 << 20, "proof": made}
        if stage == 1:
            await self._send(peer, rng, peer.encode(Tag.AUTH, accepted))
            return
        await peer.send(Tag.AUTH, accepted)
        peer.decoder.end_handshake()
        for _ in range(rng.randrange(3)):  # a few valid frames first
            await peer.send(*rng.choice(SESSION_FRAMES[:3]))
        await self._send(peer, rng, peer.encode(*rng.choice(SESSION_FRAMES)))

    async def _send(self, peer: RawPeer, rng: random.Random, valid: bytes) -> None:
        """A mutation of ``valid`` (whose seq is the peer's last), then an ending."""
        peer.writer.write(hostile_bytes(rng, peer.seq - 1, valid))
        await peer.writer.drain()
        if rng.random() < 0.5:
            while await peer.reader.read(65536):  # silent until the source hangs up
                pass


async def one_case(address: str, auth: AuthConfig, channels: int) -> TransportError:
    """Connect and read the session until the source gives up; the error it gave."""
    try:
        session = await connect(
            address, name="source", auth=auth, channels=channels, timeout=CONNECT_S,
            link_timeout_s=LINK_S,
        )  # fmt: skip
    except TransportError as exc:
        return exc
    try:
        while True:
            frame = await session.recv()
            frame.fields()  # the application reads every control frame it gets
    except TransportError as exc:
        return exc
    finally:
        session.abort()


def test_a_hostile_destination_ends_every_connect_or_session_with_a_named_error(
    run: Runner, tmp_path: Path
) -> None:
    """CASES hostile destinations behind valid TLS: each connect() or session ends
    within the source's bounds with a named TransportError; nothing unhandled, no
    socket or task left."""
    server_auth, client_auth = tls_auth(tmp_path)
    unhandled: list[dict[str, Any]] = []
    errors: list[TransportError] = []

    async def body() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        before = open_sockets()
        destination = HostileDestination(seed=5)
        listener = await asyncio.start_server(
            destination, "127.0.0.1", 0, ssl=server_auth.ssl_context
        )
        address = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        cases = iter(range(CASES))

        async def worker() -> None:
            for case in cases:
                # The source's bounds plus slack: a case that outlives it hangs.
                async with asyncio.timeout(CONNECT_S + 4 * LINK_S + 2):
                    errors.append(await one_case(address, client_auth, 1 + case % 2))

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        listener.close()
        await listener.wait_closed()
        await settled(lambda: not destination.tasks, "every fake destination ended")
        await settled(lambda: open_sockets() <= before, "every descriptor closed")
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(body())
    assert len(errors) == CASES
    unnamed = [repr(e) for e in errors if not str(e)]
    assert not unnamed, unnamed
    kinds = {type(e).__name__ for e in errors}
    assert {"ProtocolError", "ConnectionLost"} <= kinds, kinds
    assert not unhandled, unhandled


async def test_a_destination_hanging_up_mid_hello_is_not_blamed_on_our_certificate(
    tmp_path: Path,
) -> None:
    """A destination that completed TLS, sent part of its HELLO and hung up accepted our
    certificate (it sent data): the error says what happened, a frame cut short, rather
    than asking whether our certificate is trusted."""
    server_auth, client_auth = tls_auth(tmp_path)

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = RawPeer(reader, writer)
        await peer.read_frame()
        answer = peer.encode(Tag.HELLO, {"version": 1, "nonce": os.urandom(32), "auth": "psk"})
        writer.write(answer[:9])
        writer.close()  # the bytes, then close_notify and FIN: nothing is lost to a reset
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()

    listener = await asyncio.start_server(destination, "127.0.0.1", 0, ssl=server_auth.ssl_context)
    async with listener:
        address = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
        try:
            await connect(address, name="source", auth=client_auth, timeout=CONNECT_S)
        except TransportError as exc:
            error: TransportError = exc
    assert "certificate" not in str(error), str(error)
    assert "mid-frame (9 bytes of it arrived)" in str(error), str(error)

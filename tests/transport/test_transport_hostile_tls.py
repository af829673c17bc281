"""Hostile and broken peers against the server's own accept loop, TLS and HELLO checks.

With TLS on TCP the server accepts connections itself and runs each TLS handshake
(transport/server.py), so the accept loop, the handshake tasks and their sockets are the
transport's to get right rather than asyncio's. Daemons run on uvloop, the other tests
on asyncio's loop: the tests that reach that code run on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from transport_helpers import (
    PSK,
    RawPeer,
    Recorder,
    first_of_two_channels,
    hello_fields,
    tls_auth,
)

from tests.conftest import Runner
from transport import (
    AuthConfig,
    Frame,
    LimitExceeded,
    Limits,
    PeerCancelled,
    ProtocolError,
    Server,
    Session,
    Tag,
    connect,
    parse_address,
    serve,
)
from transport.auth import proof

#: Bound on anything that must happen "soon" (closing, a refusal): generous, as the
#: machine is shared; every wait below ends on an event well before it.
SOON_S = 10.0


def open_sockets() -> int:
    """Sockets open in this process (uvloop opens a descriptor of its own once, lazily)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the descriptor listdir used
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def server_ends(address: str) -> int:
    """Our open sockets bound to ``address``'s port: the server's listener and its ends
    of the connections (their inodes in /proc/self/net/tcp and among our descriptors)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                ours.add(link[len("socket:[") : -1])
    port = parse_address(address)[2]
    count = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        count += int(fields[1].rpartition(":")[2], 16) == port and fields[9] in ours
    return count


async def settled(condition: Callable[[], bool], what: str) -> None:
    """Until ``condition()`` holds: closing takes a few loop turns with no event to await."""
    try:
        async with asyncio.timeout(SOON_S):
            while not condition():  # noqa: ASYNC110 - /proc and counters have no event
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what} within {SOON_S} s") from None


def client_hello() -> bytes:
    """The first flight of a TLS client: a complete ClientHello record."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


async def tls_peer(address: str, context: ssl.SSLContext) -> RawPeer:
    """A hand-driven source that completed TLS and sent nothing yet."""
    _, host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname="localhost"
    )
    return RawPeer(reader, writer)


async def tcp_peer(address: str, first: bytes = b"") -> RawPeer:
    """A plain connection to a TLS listener that sends ``first`` and then nothing."""
    peer = await RawPeer.open(address)
    if first:
        peer.writer.write(first)
        await peer.writer.drain()
    return peer


async def until_closed(peer: RawPeer) -> bool:
    """Whether the server hung up on ``peer`` (EOF, reset, or a TLS error for a TLS peer)."""
    try:
        async with asyncio.timeout(SOON_S):
            while await peer.reader.read(65536):
                pass
    except (ConnectionError, ssl.SSLError):
        pass
    except TimeoutError:
        return False
    return True


def reset(peer: RawPeer) -> None:
    """Close with a reset (SO_LINGER 0) rather than a FIN."""
    sock = peer.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.writer.transport.abort()


# -- the accept loop -------------------------------------------------------------------


def test_the_tls_accept_loop_survives_running_out_of_descriptors(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE from accept() is logged by name and retried after a pause (not in a spin, not
    the end of the listener): a source gets in once descriptors are free again."""
    server_auth, client_auth = tls_auth(tmp_path)
    failures = 3
    real_accept = socket.socket.accept

    def accept(sock: socket.socket) -> tuple[socket.socket, Any]:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_accept(sock)

    monkeypatch.setattr("transport.server.ACCEPT_RETRY_S", 0.05)

    async def body() -> None:
        with capture_logs() as logs:
            async with await serve(
                "127.0.0.1:0", Recorder(), name="dest", auth=server_auth
            ) as server:
                monkeypatch.setattr(socket.socket, "accept", accept)
                started = time.monotonic()
                session = await connect(server.address, name="source", auth=client_auth, timeout=4)
                waited = time.monotonic() - started
                await session.send_control(Tag.END_OF_STREAM)
                assert (await session.recv()).tag is Tag.VERDICT
                await session.close()
        assert failures == 0
        assert waited >= 3 * 0.05, "it paused after each failure"
        failed = [e for e in logs if e["event"] == "accept_failed"]
        assert len(failed) == 3
        assert "Too many open files" in failed[0]["error"]

    run(body())


# -- closing the server ------------------------------------------------------------


@pytest.mark.parametrize("ending", ["aborts", "raises"])
def test_closing_the_server_waits_out_a_cancel_on_its_way(
    run: Runner, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """A handler that ended its session with a reason (abort, or an exception) leaves a
    connection lingering so the CANCEL is not lost to a reset; a server closing then
    returns from wait_closed() only once that connection is gone, the CANCEL delivered."""
    monkeypatch.setattr("transport.session.CANCEL_LINGER_S", 1.0)
    ended = asyncio.Event()

    async def handler(session: Session) -> None:
        await session.recv()
        ended.set()
        if ending == "raises":
            raise RuntimeError("handler bug")
        session.abort("disk full", code="device")
        await asyncio.Event().wait()  # the server's close ends this handler

    async def body() -> None:
        before = open_sockets()
        async with await serve(
            "127.0.0.1:0", handler, name="dest", auth=AuthConfig(psk=PSK)
        ) as server:
            peer = await RawPeer.in_session(server.address)  # authenticates, then reads nothing
            await ended.wait()
        left = open_sockets() - before
        cancel = await peer.read_frame()
        await peer.close()
        assert left == 1, "only the peer's own socket is left"
        assert cancel is not None
        assert cancel.tag is Tag.CANCEL
        assert cancel.fields()["reason"] in ("disk full", "handler bug")

    run(body())


# -- TLS handshakes that go wrong ------------------------------------------------------


def test_broken_tls_clients_give_back_every_slot_and_descriptor(
    run: Runner, tmp_path: Path
) -> None:
    """Silent, noisy, truncated and reset TLS clients, before and after the TLS handshake,
    are all dropped within the handshake timeout; then nothing is pending, no descriptor
    is left behind, and a real source still gets a session."""
    server_auth, client_auth = tls_auth(tmp_path)
    hello = client_hello()
    assert client_auth.ssl_context is not None
    context = client_auth.ssl_context
    limits = Limits(handshake_timeout=0.3)

    async def body() -> None:
        async with await serve(
            "127.0.0.1:0", Recorder(), name="dest", auth=server_auth, limits=limits
        ) as server:
            address = server.address
            before = open_sockets()
            waiting = [  # peers the server must hang up on
                await tcp_peer(address),  # never sends a ClientHello
                await tcp_peer(address, hello[: len(hello) // 2]),  # half of one
                await tcp_peer(address, os.urandom(300)),  # noise
                await tcp_peer(address, b"\x16\x03\x01\xff\xff" + b"\x01" * 64),  # a lying length
                await tls_peer(address, context),  # TLS, then never HELLO
                await tls_peer(address, context),  # TLS, then half a HELLO frame
                await tls_peer(address, context),  # TLS, then noise
            ]
            frame = waiting[5].encode(Tag.HELLO, hello_fields(os.urandom(16), os.urandom(32)))
            waiting[5].writer.write(frame[: len(frame) // 2])
            waiting[6].writer.write(os.urandom(300))
            vanishing = [  # peers that go away on their own
                await tcp_peer(address, hello[:40]),
                await tcp_peer(address, hello),
                await tls_peer(address, context),
            ]
            for peer in vanishing:
                reset(peer)
            hung_up = [await until_closed(peer) for peer in waiting]
            assert hung_up == [True] * len(waiting)
            for peer in waiting:
                peer.writer.transport.abort()
            await settled(lambda: server.pending == 0, "every slot freed")
            await settled(lambda: open_sockets() <= before, "every descriptor closed")
            session = await connect(address, name="source", auth=client_auth, channels=2)
            await session.send_control(Tag.END_OF_STREAM)
            assert (await session.recv()).tag is Tag.VERDICT
            await session.close()

    run(body())


def test_tls_and_hello_share_one_handshake_budget(run: Runner, tmp_path: Path) -> None:
    """A connection has handshake_timeout from accept for TLS and HELLO together: a
    client that finishes TLS just in time and then sends nothing is dropped when the
    budget ends, not a whole second budget later."""
    server_auth, client_auth = tls_auth(tmp_path)
    assert client_auth.ssl_context is not None
    budget = 2.0  # a slow client is the behaviour under test: it starts TLS at 0.8 of it

    async def body() -> None:
        limits = Limits(handshake_timeout=budget)
        async with await serve(
            "127.0.0.1:0", Recorder(), name="dest", auth=server_auth, limits=limits
        ) as server:
            peer = await RawPeer.open(server.address)
            accepted = time.monotonic()
            await asyncio.sleep(0.8 * budget)
            await peer.writer.start_tls(client_auth.ssl_context, server_hostname="localhost")
            assert await until_closed(peer)
            dropped = time.monotonic() - accepted
            peer.writer.transport.abort()
        assert dropped < budget + 0.5 * budget, f"dropped after {dropped:.2f} s"

    run(body())


def test_closing_the_server_mid_handshake_leaves_no_socket_or_task(
    run: Runner, tmp_path: Path
) -> None:
    """``async with serve()`` ending while connections sit in every stage of admission (TCP
    only, half a ClientHello, TLS done, HELLO answered, one channel of two authenticated)
    hangs up on all of them and leaves no descriptor and no task behind."""
    server_auth, client_auth = tls_auth(tmp_path)
    assert client_auth.ssl_context is not None
    context = client_auth.ssl_context
    limits = Limits(handshake_timeout=60)  # what ends them must be the close, not a timeout

    async def body() -> None:
        before = open_sockets()
        server = await serve(
            "127.0.0.1:0", Recorder(), name="dest", auth=server_auth, limits=limits
        )
        address = server.address
        peers = [
            await tcp_peer(address),
            await tcp_peer(address, client_hello()[:50]),
            await tls_peer(address, context),
        ]
        answered = await tls_peer(address, context)
        await answered.half_open()
        first = await first_of_two_channels(await tls_peer(address, context))
        peers += [answered, first]
        assert server.pending == 5
        async with server:
            pass
        left = server_ends(address)
        hung_up = [await until_closed(peer) for peer in peers]
        for peer in peers:
            peer.writer.transport.abort()
        assert server.pending == 0
        assert left == 0, "no end of the server's is open after wait_closed()"
        assert hung_up == [True] * len(peers)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        await settled(lambda: open_sockets() <= before, "every descriptor closed")

    run(body())


def test_an_incomplete_session_refused_to_a_peer_that_reads_nothing_is_let_go(
    run: Runner, tmp_path: Path
) -> None:
    """When a session's channels do not all arrive, the ones that did get a CANCEL saying
    so; over TLS a peer that reads nothing more does not hold the connection open past
    the CANCEL's linger (a graceful TLS close waits 30 s for its close_notify)."""
    server_auth, client_auth = tls_auth(tmp_path)
    assert client_auth.ssl_context is not None
    context = client_auth.ssl_context

    async def first_of_two(address: str) -> RawPeer:
        return await first_of_two_channels(await tls_peer(address, context))

    async def body() -> None:
        limits = Limits(handshake_timeout=0.5)
        async with await serve(
            "127.0.0.1:0", Recorder(), name="dest", auth=server_auth, limits=limits
        ) as server:
            before = open_sockets()
            deaf = await first_of_two(server.address)
            deaf.writer.transport.pause_reading()  # reads nothing from now on
            listening = await first_of_two(server.address)
            refusal = await listening.read_frame()
            listening.writer.transport.abort()
            try:  # within CANCEL_LINGER_S (2 s) of the refusal
                await settled(lambda: open_sockets() <= before + 1, "the server's end closed")
                let_go = True
            except AssertionError:
                let_go = False
            deaf.writer.transport.resume_reading()  # (which also ends a TLS close waiting)
            assert await until_closed(deaf)
            deaf.writer.transport.abort()
        assert refusal is not None
        assert refusal.fields()["reason"] == "not all channels of the session arrived"
        assert let_go, "the server's end stayed open"

    run(body())


# -- HELLO checks the source must hear about --------------------------------------------


def session_hello(**changes: Any) -> dict[str, Any]:
    """A one-channel HELLO with ``changes`` applied."""
    return hello_fields(os.urandom(16), os.urandom(32)) | changes


@pytest.mark.parametrize(
    ("changes", "field", "code"),
    [
        ({"version": 2}, "version", "version"),
        ({"channels": 17}, "channels", "limit"),
        ({"channels": 0}, "channels", "protocol"),
        ({"channel": 1}, "channel", "protocol"),
        ({"name": "n" * 300}, "name", "limit"),
        ({"session": b"short"}, "session", "protocol"),
        ({"nonce": b"\0" * 31}, "nonce", "protocol"),
        ({"max_payload": "big"}, "max_payload", "protocol"),
        ({"max_payload": -1}, "max_payload", "protocol"),
        ({"checksum": "yes"}, "checksum", "protocol"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
async def test_a_refused_hello_is_answered_with_a_cancel_naming_the_field(
    server: Server, changes: dict[str, Any], field: str, code: str
) -> None:
    """A HELLO the destination refuses gets a CANCEL that names the field (then the
    connection closes), so the source can say why rather than "connection closed"."""
    peer = await RawPeer.open(server.address)
    await peer.send(Tag.HELLO, session_hello(**changes))
    answer = await peer.read_frame()
    assert answer is not None, "closed without a reason"
    assert answer.tag is Tag.CANCEL
    fields = answer.fields()
    assert fields["reason"].startswith(f"{field}: ")
    assert fields["code"] == code
    assert await peer.read_frame() is None
    await peer.close()
    assert server.pending == 0


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_source_wanting_more_channels_than_allowed_hears_why_at_once(
    run: Runner, tmp_path: Path, tls: bool
) -> None:
    """A source configured for more channels than the destination takes fails at the first
    attempt with the destination's reason, not after retrying until its timeout."""
    server_auth, client_auth = tls_auth(tmp_path) if tls else (AuthConfig(psk=PSK),) * 2

    async def body() -> None:
        async with await serve("127.0.0.1:0", Recorder(), name="dest", auth=server_auth) as server:
            with capture_logs() as logs, pytest.raises(PeerCancelled) as caught:
                await connect(
                    server.address,
                    name="source",
                    auth=client_auth,
                    channels=17,
                    limits=Limits(max_channels=32),
                    timeout=SOON_S,
                )
        assert str(caught.value) == "peer refused: channels: 17 exceeds the limit of 16"
        assert not [e for e in logs if e["event"] == "connect_retry"]

    run(body())


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"checksum": False}, "checksum"),
        ({"name": "other"}, "name"),
        ({"max_payload": 8192}, "max_payload"),
        ({"channels": 3}, "channels"),
        ({"channel": 0}, "channel 0 joined already"),
    ],
    ids=["checksum", "name", "max_payload", "channels", "repeated"],
)
async def test_a_channel_that_disagrees_with_its_session_is_refused(
    changes: dict[str, Any], field: str
) -> None:
    """Channel 1 of a session whose HELLO differs from channel 0's in what the session is
    built from is refused naming the field, and no session forms from the pair."""
    recorder = Recorder()
    auth = AuthConfig(psk=PSK, checksums=False)  # the source's choice decides checksums
    async with await serve("127.0.0.1:0", recorder, name="dest", auth=auth) as server:
        session, peers = os.urandom(16), []
        for index, extra in enumerate(({}, changes)):
            peer = await RawPeer.open(server.address)
            nonce = os.urandom(32)
            fields = hello_fields(session, nonce) | {"channel": index, "channels": 2}
            fields |= {"checksum": True} | extra
            await peer.send(Tag.HELLO, fields)
            dest_hello = await peer.read_frame()
            assert dest_hello is not None
            dest_nonce = dest_hello.fields()["nonce"]
            made = proof(PSK, "source", session, fields["channel"], nonce, dest_nonce)
            await peer.send(Tag.AUTH, {"proof": made})
            accepted = await peer.read_frame()
            assert accepted is not None
            assert accepted.tag is Tag.AUTH  # authenticated; then its session is looked at
            peers.append(peer)
        refusal = await peers[1].read_frame()
        for peer in peers:
            await peer.close()
    assert refusal is not None
    assert refusal.tag is Tag.CANCEL
    misfit = field if " " in field else f"{field} differs"
    index = 0 if "channel 0" in field else 1
    assert refusal.fields()["reason"] == f"channel {index} does not fit the session: {misfit}"
    assert not recorder.done.is_set(), "no session was handed to the handler"


# -- frame length limits on the wire -------------------------------------------------


async def test_a_chunk_of_exactly_max_payload_passes_and_one_byte_more_is_refused() -> None:
    """The payload limit is inclusive: max_payload bytes are delivered, max_payload + 1
    aborts the session with LimitExceeded, which the peer hears as a "limit" CANCEL."""
    recorder = Recorder()
    delivered = asyncio.Event()

    async def note(session: object, frame: Frame) -> None:
        if frame.tag is Tag.PRECOPY_DATA:
            delivered.set()

    recorder.on_frame = note
    limits = Limits(max_payload=4096)
    async with await serve(
        "127.0.0.1:0", recorder, name="dest", auth=AuthConfig(psk=PSK), limits=limits
    ) as server:
        peer = await RawPeer.in_session(server.address)
        await peer.send(Tag.PRECOPY_DATA, device=0, payload=b"a" * 4096)
        await delivered.wait()
        await peer.send(Tag.PRECOPY_DATA, device=0, payload=b"b" * 4097)
        cancel = await peer.read_frame()
        assert cancel is not None
        assert cancel.tag is Tag.CANCEL
        assert cancel.fields() == {
            "reason": "payload_length: 4097 exceeds the limit of 4096",
            "code": "limit",
        }
        await recorder.done.wait()
        await peer.close()
    assert (Tag.PRECOPY_DATA, 0, b"a" * 4096) in recorder.frames
    assert isinstance(recorder.error, LimitExceeded)
    assert (recorder.error.value, recorder.error.limit) == (4097, 4096)
    assert isinstance(recorder.error, ProtocolError)

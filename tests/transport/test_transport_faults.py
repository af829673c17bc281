"""Hostile and failing peers: cancels, vanishing peers, limits over the wire, handlers."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from transport_helpers import PSK, RawPeer, Recorder, announce, hello_fields

from tests.pki import make_pki
from transport import (
    AuthConfig,
    ConnectionLost,
    Frame,
    LimitExceeded,
    Limits,
    PeerCancelled,
    ProtocolError,
    Server,
    Session,
    SessionClosed,
    Tag,
    connect,
    serve,
    server_tls_context,
)
from transport.errors import PeerHungUp
from transport.frames import encode_header


async def source(server: Server, channels: int = 1) -> Session:
    """An authenticated source session that has announced two devices."""
    session = await connect(
        server.address, name="source", auth=AuthConfig(psk=PSK), channels=channels
    )
    await session.send_control(Tag.DEVICES, announce(2))
    return session


async def test_destination_cancel_reaches_the_streaming_source(
    server: Server, recorder: Recorder
) -> None:
    """A CANCEL from the destination mid-stream fails the source's recv and sends."""

    async def cancel_on_third(session: Session, frame: Frame) -> None:
        if frame.seq == 3:
            await session.cancel("disk full")

    recorder.on_frame = cancel_on_third
    session = await source(server)
    for i in range(5):
        await session.send_chunk(Tag.PRECOPY_DATA, i % 2, (os.urandom(1000),))
    with pytest.raises(PeerCancelled, match="disk full") as caught:
        await session.recv()
    assert caught.value.reason == "disk full"
    with pytest.raises(PeerCancelled):
        await session.send_chunk(Tag.PRECOPY_DATA, 0, (b"more",))
    await session.close()


async def test_source_cancel_reaches_the_receiving_destination(
    server: Server, recorder: Recorder
) -> None:
    """A CANCEL from the source mid-stream ends the destination's recv with its reason."""
    session = await source(server, channels=2)
    for i in range(6):
        await session.send_chunk(Tag.STOPCOPY_DATA, i % 2, (b"x" * 5000,))
    await session.cancel("operator")
    with pytest.raises(SessionClosed):
        await session.send_chunk(Tag.STOPCOPY_DATA, 0, (b"x",))
    await recorder.done.wait()
    assert isinstance(recorder.error, PeerCancelled)
    assert recorder.error.reason == "operator"


async def test_source_vanishing_mid_frame_is_connection_lost(
    server: Server, recorder: Recorder
) -> None:
    """Half a frame then a hang-up ends the destination's session with ConnectionLost,
    and the session warns: data was cut off."""
    peer = await RawPeer.in_session(server.address)
    frame = peer.encode(Tag.PRECOPY_DATA, device=0, payload=b"p" * 10000)
    with capture_logs() as logs:
        peer.writer.write(frame[: len(frame) // 2])
        await peer.close()
        await recorder.done.wait()
    assert isinstance(recorder.error, ConnectionLost)
    assert not isinstance(recorder.error, PeerHungUp)
    assert [e["log_level"] for e in logs if e["event"] == "session_aborted"] == ["warning"]
    assert isinstance(recorder.error.__cause__, EOFError)
    assert "mid-frame" in str(recorder.error.__cause__)
    session = await source(server)
    await session.close()


async def test_destination_vanishing_is_connection_lost_at_the_source(
    recorder: Recorder,
) -> None:
    """A destination that drops the connection fails the source's recv with ConnectionLost."""

    async def drop(session: Session) -> None:
        await session.recv()
        session.abort()

    async with await serve("127.0.0.1:0", drop, name="dest", auth=AuthConfig(psk=PSK)) as server:
        session = await source(server)
        with pytest.raises(ConnectionLost):
            await session.recv()
        with pytest.raises(ConnectionLost):
            await session.send_chunk(Tag.PRECOPY_DATA, 0, (b"x",))


async def test_frames_before_a_clean_hang_up_are_delivered(recorder: Recorder) -> None:
    """The verdict sent just before the destination closes still reaches the source; the
    hang-up after it is PeerHungUp, which the session notes without a warning (the
    engine knows whether more was due)."""

    async def verdict_then_close(session: Session) -> None:
        await session.recv()
        await session.send_control(Tag.VERDICT, {"stage": "failed", "reason": "refused"})

    async with await serve(
        "127.0.0.1:0", verdict_then_close, name="dest", auth=AuthConfig(psk=PSK)
    ) as server:
        session = await source(server)
        with capture_logs() as logs:
            verdict = await session.recv()
            assert verdict.fields()["reason"] == "refused"
            with pytest.raises(PeerHungUp):
                await session.recv()
    assert [e for e in logs if e["log_level"] in ("warning", "error", "critical")] == []


async def test_failing_handler_aborts_only_its_session(recorder: Recorder) -> None:
    """A handler that raises aborts its session, telling the source why; others go on."""
    calls = 0

    async def flaky(session: Session) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await recorder(session)

    async with await serve("127.0.0.1:0", flaky, name="dest", auth=AuthConfig(psk=PSK)) as server:
        first = await connect(server.address, name="source", auth=AuthConfig(psk=PSK))
        with pytest.raises(PeerCancelled, match="destination failed: handler bug"):
            await first.recv()
        second = await source(server)
        await second.send_control(Tag.END_OF_STREAM)
        assert (await second.recv()).tag is Tag.VERDICT
        await second.close()


BAD_FRAMES = [
    ("unannounced device", lambda p: p.encode(Tag.PRECOPY_DATA, device=2, payload=b"x"), "device"),
    ("wrong channel", None, "device"),
    ("seq out of order", lambda p: encode_header(Tag.PING, 0, p.seq + 1, 0, 0), "seq"),
    ("unknown tag", lambda p: b"LM\x07\x96\x63\x00" + bytes([p.seq]) + b"\x00\x00\x00", "tag"),
    (
        "oversized payload",
        lambda p: encode_header(Tag.SETUP, 0, p.seq, 1 << 30, 0),
        "payload_length",
    ),
    ("second HELLO", lambda p: p.encode(Tag.HELLO, {}), "tag"),
    ("VERDICT to destination", lambda p: p.encode(Tag.VERDICT, {}), "tag"),
    (
        "data after END_OF_STREAM",
        lambda p: p.encode(Tag.END_OF_STREAM) + p.encode(Tag.SETUP, device=0, payload=b"x"),
        "tag",
    ),
]


@pytest.mark.parametrize(
    ("make", "field"),
    [(b[1], b[2]) for b in BAD_FRAMES if b[1] is not None],
    ids=[b[0] for b in BAD_FRAMES if b[1] is not None],
)
async def test_bad_frames_abort_the_session_naming_the_field(make, field: str) -> None:  # type: ignore[no-untyped-def]
    """Each violation ends the destination's session with a ProtocolError naming the field,
    and the peer is told so in a CANCEL before the connection goes."""
    recorder = Recorder()
    limits = Limits(max_devices=4, max_name_length=32, max_payload=1 << 20)
    async with await serve(
        "127.0.0.1:0", recorder, name="dest", auth=AuthConfig(psk=PSK), limits=limits
    ) as server:
        peer = await RawPeer.open(server.address)
        await peer.handshake(PSK)
        await peer.send(Tag.DEVICES, announce(2))
        peer.writer.write(make(peer))
        await recorder.done.wait()
        assert isinstance(recorder.error, ProtocolError)
        assert recorder.error.field == field
        cancel = await peer.read_frame()
        assert cancel is not None
        assert cancel.tag is Tag.CANCEL
        expected = "limit" if isinstance(recorder.error, LimitExceeded) else "protocol"
        assert cancel.fields() == {"reason": str(recorder.error), "code": expected}
        await peer.close()
    if field == "payload_length":
        assert isinstance(recorder.error, LimitExceeded)


async def test_handshake_that_never_finishes_is_dropped() -> None:
    """A connection that sends nothing is closed after the handshake timeout."""
    limits = Limits(handshake_timeout=0.2)
    recorder = Recorder()
    async with await serve(
        "127.0.0.1:0", recorder, name="dest", auth=AuthConfig(psk=PSK), limits=limits
    ) as server:
        peer = await RawPeer.open(server.address)
        assert await peer.read_frame() is None
        await peer.close()
    assert recorder.frames == []


async def test_oversized_hello_is_refused_before_authentication() -> None:
    """An unauthenticated peer cannot send more than max_handshake_payload in HELLO."""
    recorder = Recorder()
    async with await serve(
        "127.0.0.1:0", recorder, name="dest", auth=AuthConfig(psk=PSK)
    ) as server:
        peer = await RawPeer.open(server.address)
        peer.writer.write(encode_header(Tag.HELLO, 0, 0, 1 << 20, 0) + b"x" * 65536)
        assert await peer.read_frame() is None
        await peer.close()


async def test_cancelled_recv_leaves_the_session_usable(server: Server) -> None:
    """A recv() cancelled by a timeout does not break the next recv()."""
    session = await source(server)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(session.recv(), 0.01)
    await session.send_control(Tag.END_OF_STREAM)
    assert (await session.recv()).tag is Tag.VERDICT
    await session.close()


async def test_a_tls_handshake_that_never_starts_is_dropped(tmp_path: Path) -> None:
    """On a TLS listener too, a connection that sends nothing is closed (handshake_timeout)."""
    pki = make_pki(tmp_path, ("server",))
    context = server_tls_context(pki / "server.crt", pki / "server.key")
    limits = Limits(handshake_timeout=0.2)
    async with await serve(
        "127.0.0.1:0",
        Recorder(),
        name="dest",
        auth=AuthConfig(psk=PSK, ssl_context=context),
        limits=limits,
    ) as server:
        peer = await RawPeer.open(server.address)
        # Well under asyncio's own 60 s TLS default, which applied before.
        assert await asyncio.wait_for(peer.read_frame(), 20) is None
        await peer.close()


async def test_closing_the_server_closes_connections_still_in_the_handshake() -> None:
    """Server.close() hangs up on a peer whose handshake it cancelled, leaking no socket."""
    server = await serve("127.0.0.1:0", Recorder(), name="dest", auth=AuthConfig(psk=PSK))
    peer = await RawPeer.open(server.address)
    await peer.send(Tag.HELLO, hello_fields(os.urandom(16), os.urandom(32)))
    hello = await peer.read_frame()
    assert hello is not None
    assert hello.tag is Tag.HELLO  # the server now waits for our AUTH
    server.close()
    await server.wait_closed()
    assert await peer.read_frame() is None
    await peer.close()


async def test_a_peer_flooding_pings_without_reading_is_cut_off(
    server: Server, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PINGs from a peer that never reads its PONGs abort the session, bounding our buffer."""
    monkeypatch.setattr("transport.session.PONG_BACKLOG_LIMIT", 64 * 1024)
    peer = await RawPeer.in_session(server.address)
    with contextlib.suppress(ConnectionError):
        while not recorder.done.is_set():  # until the destination gives up on us
            batch = b"".join(peer.encode(Tag.PING, {"id": i, "t": 0.0}) for i in range(5000))
            peer.writer.write(batch)
            await peer.writer.drain()
    await recorder.done.wait()
    assert isinstance(recorder.error, ProtocolError)
    assert "PING flood" in str(recorder.error)
    await peer.close()

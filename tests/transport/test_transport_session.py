"""Sessions end to end over loopback: handshake, data, control, verdict, channels."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path

import pytest
from transport_helpers import PSK, RawPeer, Recorder, announce, tls_auth

from transport import (
    AuthConfig,
    ProtocolError,
    Server,
    Session,
    SessionClosed,
    Tag,
    connect,
    serve,
)
from transport.channel import READ_LOW_WATER
from transport.limits import MiB


async def open_source(server: Server, channels: int = 1) -> Session:
    """A source session to ``server`` with the test key."""
    return await connect(server.address, name="source", auth=AuthConfig(psk=PSK), channels=channels)


async def test_stream_reaches_destination_in_order(server: Server, recorder: Recorder) -> None:
    """Chunks, END_OF_DEVICE and END_OF_STREAM arrive intact and the verdict comes back."""
    session = await open_source(server)
    assert session.peer_name == "dest"
    await session.send_control(Tag.DEVICES, announce(2))
    sent = []
    for i in range(20):
        chunk = (f"chunk{i}:".encode(), os.urandom(i * 1000))
        assert await session.send_chunk(Tag.PRECOPY_DATA, i % 2, chunk) == sum(map(len, chunk))
        sent.append((Tag.PRECOPY_DATA, i % 2, b"".join(chunk)))
    for device in range(2):
        await session.send_end_of_device(device)
    await session.send_control(Tag.END_OF_STREAM)
    verdict = await session.recv()
    assert (verdict.tag, verdict.fields()) == (Tag.VERDICT, {"resumed": True, "reason": ""})
    await session.close()
    await recorder.done.wait()
    assert recorder.error is None
    data = [f for f in recorder.frames if f[0] is Tag.PRECOPY_DATA]
    assert data == sent
    assert recorder.frames[-1][0] is Tag.END_OF_STREAM


@pytest.mark.parametrize("channels", [2, 3])
async def test_multi_channel_keeps_per_device_order(
    server: Server, recorder: Recorder, channels: int
) -> None:
    """Over several channels every device's chunks arrive in send order, and all arrive."""
    session = await open_source(server, channels)
    assert session.channel_count == channels
    await session.send_control(Tag.DEVICES, announce(5))
    for i in range(200):
        await session.send_chunk(Tag.PRECOPY_DATA, i % 5, (i.to_bytes(4, "big") * 300,))
    for device in range(5):
        await session.send_end_of_device(device)
    await session.send_control(Tag.END_OF_STREAM)
    assert (await session.recv()).tag is Tag.VERDICT
    await session.close()
    await recorder.done.wait()
    for device in range(5):
        got = [
            int.from_bytes(p[:4], "big")
            for tag, d, p in recorder.frames
            if d == device and tag is Tag.PRECOPY_DATA
        ]
        assert got == list(range(device, 200, 5))
        ends = [i for i, (tag, d, _) in enumerate(recorder.frames) if tag is Tag.END_OF_DEVICE]
        assert len(ends) == 5
    assert recorder.frames[-1][0] is Tag.END_OF_STREAM


async def test_ping_returns_ordered_stamps(server: Server) -> None:
    """ping() returns the local send stamp, the peer's stamp and the local receive stamp."""
    session = await open_source(server)
    sent, _peer, received = await session.ping()
    assert sent <= received
    await session.close()


async def test_unix_socket_session(tmp_path: os.PathLike[str], recorder: Recorder) -> None:
    """A session works over a Unix socket without any authentication configured."""
    path = f"unix:{tmp_path}/sock"
    async with await serve(path, recorder, name="dest", auth=AuthConfig()) as server:
        assert server.address == path
        session = await connect(path, name="source", auth=AuthConfig())
        await session.send_control(Tag.DEVICES, announce(1))
        await session.send_chunk(Tag.STOPCOPY_DATA, 0, (b"x" * 10,))
        await session.send_control(Tag.END_OF_STREAM)
        assert (await session.recv()).tag is Tag.VERDICT
        await session.close()
    assert recorder.frames[1] == (Tag.STOPCOPY_DATA, 0, b"x" * 10)


async def test_max_bandwidth_and_estimate_follow_the_stream(server: Server) -> None:
    """A session with a cap still delivers, and counts every byte it wrote."""
    session = await open_source(server)
    await session.send_control(Tag.DEVICES, announce(1))
    session.set_max_bandwidth(50_000_000)
    for _ in range(10):
        await session.send_chunk(Tag.PRECOPY_DATA, 0, (bytes(100_000),))
    session.set_max_bandwidth(None)
    await session.send_control(Tag.END_OF_STREAM)
    assert (await session.recv()).tag is Tag.VERDICT
    assert session.delivery()[0] >= 1_000_000
    await session.close()


async def test_a_cancelled_ping_does_not_orphan_a_concurrent_one(server: Server) -> None:
    """Cancelling one ping() leaves another ping() in flight waiting for its own PONG."""
    session = await open_source(server)
    first = asyncio.create_task(session.ping())
    second = asyncio.create_task(session.ping())
    await asyncio.sleep(0)  # one loop step: both tasks send their PING, no PONG is read yet
    assert len(session._pings) == 2
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    sent, _peer, received = await second
    assert sent <= received
    await session.close()


async def test_an_aborted_session_ends_a_send_waiting_on_the_bandwidth_cap(
    server: Server,
) -> None:
    """A send_chunk() waiting off the max-bandwidth debt raises as soon as the session aborts."""
    session = await open_source(server)
    await session.send_control(Tag.DEVICES, announce(1))
    session.set_max_bandwidth(1.0)  # one byte per second: the chunk below owes days
    sending = asyncio.create_task(session.send_chunk(Tag.PRECOPY_DATA, 0, (b"x" * 1_000_000,)))
    await asyncio.sleep(0)  # one loop step: the chunk is written, the debt is being waited off
    assert not sending.done()
    session.abort()
    with pytest.raises(SessionClosed):
        await sending


@pytest.mark.parametrize(
    ("source", "dest", "agreed"),
    [(None, None, True), (False, None, True), (None, False, True), (False, False, False)],
)
async def test_channels_skip_checksums_only_when_both_sides_agree(
    recorder: Recorder, source: bool | None, dest: bool | None, agreed: bool
) -> None:
    """Outside TLS a side asks for checksums unless told not to; either side asking wins."""
    auth = AuthConfig(psk=PSK, checksums=dest)
    async with await serve("127.0.0.1:0", recorder, name="dest", auth=auth) as server:
        session = await connect(
            server.address, name="source", auth=AuthConfig(psk=PSK, checksums=source), channels=2
        )
        assert [channel.checksums for channel in session._chans] == [agreed, agreed]
        await session.send_control(Tag.DEVICES, announce(2))
        await session.send_chunk(Tag.PRECOPY_DATA, 1, (b"payload",))
        await session.send_control(Tag.END_OF_STREAM)
        assert (await session.recv()).tag is Tag.VERDICT
        await session.close()
        await recorder.done.wait()
    assert recorder.error is None
    assert (Tag.PRECOPY_DATA, 1, b"payload") in recorder.frames


def test_checksums_are_required_outside_tls_by_default() -> None:
    """The default asks for per-chunk checksums on plain TCP and leaves them to TLS inside it."""
    assert AuthConfig().requires_checksums
    assert not AuthConfig(ssl_context=ssl.create_default_context()).requires_checksums
    assert AuthConfig(ssl_context=ssl.create_default_context(), checksums=True).requires_checksums


async def test_the_reader_wakes_for_the_rest_of_a_frame_not_for_each_segment(
    recorder: Recorder,
) -> None:
    """Mid-frame the socket's SO_RCVLOWAT is what the frame misses (capped), then back to 1."""
    sessions: asyncio.Queue[Session] = asyncio.Queue()

    async def handler(session: Session) -> None:
        sessions.put_nowait(session)
        await recorder(session)

    auth = AuthConfig(psk=PSK)
    async with await serve("127.0.0.1:0", handler, name="dest", auth=auth) as server:
        peer = await RawPeer.open(server.address)
        await peer.handshake(PSK)
        channel = (await sessions.get())._chans[0]
        assert channel._socket is not None
        await peer.send(Tag.DEVICES, announce(1))
        payload = os.urandom(3 * MiB)
        ping = peer.encode(Tag.PING, {"id": 1, "t": 0.0})
        frame = peer.encode(Tag.PRECOPY_DATA, device=0, payload=payload)
        # One small write: the PING and the data frame's header; the PONG says both were read.
        peer.writer.write(ping + frame[:40])
        pong = await peer.read_frame()
        assert pong is not None
        assert pong.tag is Tag.PONG
        assert channel.decoder.missing == len(frame) - 40
        assert channel._socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == READ_LOW_WATER
        peer.writer.write(frame[40:])
        await peer.send(Tag.END_OF_STREAM)
        await recorder.done.wait()
        assert (Tag.PRECOPY_DATA, 0, payload) in recorder.frames
        assert channel._socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        await peer.close()


@pytest.mark.parametrize(
    ("count", "desc"),
    [(None, "device 1 before the device count was set"), (1, "device 1 was not announced")],
)
async def test_device_frames_are_checked_against_the_count_the_application_sets(
    count: int | None, desc: str
) -> None:
    """The transport reads no DEVICES payload: device frames are checked against the
    count the application set, and refused when it set none."""
    errors: asyncio.Queue[Exception] = asyncio.Queue()

    async def handler(session: Session) -> None:
        try:
            devices = await session.recv()
            assert devices.tag is Tag.DEVICES
            if count is not None:
                session.set_device_count(count)
            await session.recv()
        except ProtocolError as exc:
            errors.put_nowait(exc)

    async with await serve("127.0.0.1:0", handler, name="dest", auth=AuthConfig(psk=PSK)) as server:
        peer = await RawPeer.open(server.address)
        await peer.handshake(PSK)
        await peer.send(Tag.DEVICES, announce(2))
        await peer.send(Tag.PRECOPY_DATA, device=1, payload=b"x")
        error = await errors.get()
        assert desc in str(error)
        await peer.close()


def _unsent_bounds(session: Session) -> list[int]:
    sockets = [channel.transport.get_extra_info("socket") for channel in session._chans]
    return [sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) for sock in sockets]


async def test_limit_unsent_bounds_every_channel_in_the_kernel(server: Server) -> None:
    """Pacing's kernel bound reaches each channel's socket as TCP_NOTSENT_LOWAT."""
    session = await open_source(server)
    session.limit_unsent(64 * 1024)
    assert _unsent_bounds(session) == [64 * 1024] * session.channel_count
    await session.close()


async def test_limit_unsent_reaches_the_socket_under_tls(tmp_path: Path) -> None:
    """Under TLS the bound lands on the TCP socket below the records too."""
    server_auth, client_auth = tls_auth(tmp_path)
    async with await serve("127.0.0.1:0", Recorder(), name="dest", auth=server_auth) as server:
        session = await connect(server.address, name="source", auth=client_auth, channels=2)
        session.limit_unsent(96 * 1024)
        assert _unsent_bounds(session) == [96 * 1024, 96 * 1024]
        await session.close()

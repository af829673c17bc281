"""Admission: a keyless peer cannot keep the port from a source that has the key."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs
from transport_helpers import PSK, RawPeer, Recorder, first_of_two_channels, tls_auth

from transport import (
    AuthConfig,
    Limits,
    Server,
    Tag,
    connect,
    serve,
)


async def half_open(server: Server, local: str, count: int) -> list[RawPeer]:
    """``count`` peers from ``local`` that sent HELLO and stopped there."""
    peers = []
    for _ in range(count):
        peer = await RawPeer.open(server.address, local=local)
        await peer.half_open()
        peers.append(peer)
    return peers


async def test_a_full_server_evicts_the_oldest_handshake_of_the_busiest_address() -> None:
    """Full, the server drops the oldest pending handshake of the address holding the most."""
    limits = Limits(max_pending_handshakes=4, max_pending_per_peer=3)
    recorder = Recorder()
    with capture_logs() as logs:
        async with await serve(
            "127.0.0.1:0", recorder, name="dest", auth=AuthConfig(psk=PSK), limits=limits
        ) as server:
            busy = await half_open(server, "127.0.0.2", 3)
            other = await half_open(server, "127.0.0.3", 1)
            assert server.pending == 4
            session = await connect(
                server.address, name="source", auth=AuthConfig(psk=PSK), channels=1
            )
            assert await busy[0].read_frame() is None, "the oldest of 127.0.0.2 was dropped"
            assert server.pending == 3
            await session.close()
            for peer in (*busy, *other):
                await peer.close()
    summaries = [e for e in logs if e["event"] == "connections_refused"]
    assert summaries
    # One summary for the eviction and the hang-ups of the test's own peers at the end.
    assert summaries[0]["reasons"]["evicted: handshake pending while full"] == 1
    assert "127.0.0.2" in summaries[0]["peers"]


async def test_the_sources_own_address_full_of_half_open_handshakes_lets_it_in() -> None:
    """Past the per-address limit, the newest connection from that address gets the room."""
    limits = Limits(max_pending_per_peer=3)
    async with await serve(
        "127.0.0.1:0", Recorder(), name="dest", auth=AuthConfig(psk=PSK), limits=limits
    ) as server:
        squatters = await half_open(server, "127.0.0.1", 5)
        closed = [await peer.read_frame() is None for peer in squatters[:2]]
        assert closed == [True, True]
        assert server.pending == 3
        session = await connect(server.address, name="source", auth=AuthConfig(psk=PSK), channels=1)
        assert await squatters[2].read_frame() is None
        await session.close()
        for peer in squatters:
            await peer.close()


async def test_authenticated_channels_waiting_for_their_session_are_never_evicted() -> None:
    """Channels past the handshake count against the limit; a newcomer is then refused."""
    limits = Limits(max_pending_handshakes=2)
    with capture_logs() as logs:
        async with await serve(
            "127.0.0.1:0", Recorder(), name="dest", auth=AuthConfig(psk=PSK), limits=limits
        ) as server:
            waiting = [
                await first_of_two_channels(await RawPeer.open(server.address)) for _ in range(2)
            ]
            assert server.pending == 2
            newcomer = await RawPeer.open(server.address)
            assert await newcomer.read_frame() is None
            assert server.pending == 2
            for peer in (*waiting, newcomer):
                await peer.close()
    reasons = [e["reasons"] for e in logs if e["event"] == "connections_refused"]
    assert reasons[0] == {"full of authenticated channels": 1}


async def test_stalled_tls_handshakes_hold_slots_and_do_not_keep_a_source_out(
    tmp_path: Path,
) -> None:
    """Connections that never start TLS count from accept, so past the limit the oldest
    are evicted (the server closes them); a source that completes TLS still gets in."""
    server_auth, client_auth = tls_auth(tmp_path)
    limits = Limits(max_pending_per_peer=2, max_pending_handshakes=2)
    async with await serve(
        "127.0.0.1:0", Recorder(), name="dest", auth=server_auth, limits=limits
    ) as server:
        stalled = [await RawPeer.open(server.address) for _ in range(20)]
        async with asyncio.timeout(10):
            for peer in stalled[:18]:
                assert await peer.read_frame() is None  # evicted: closed by the server
        assert server.pending == 2
        session = await connect(server.address, name="source", auth=client_auth, channels=2)
        await session.send_control(Tag.END_OF_STREAM)
        assert (await session.recv()).tag is Tag.VERDICT
        await session.close()
        for peer in stalled:
            await peer.close()

"""Liveness: keep-alives, silence as a lost link, reasons that reach the peer, retries."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs
from transport_helpers import PSK, Recorder, announce

from tests.faultproxy import FaultProxy
from transport import (
    AuthConfig,
    AuthenticationError,
    ConnectionLost,
    Limits,
    PeerCancelled,
    Server,
    Session,
    Tag,
    connect,
    serve,
)

LINK = 0.4
#: Detection may take the timeout plus one keep-alive interval; the rest is slack for a
#: loaded machine (an upper bound, not a measurement).
BOUND = LINK * 1.25 + 2.0


@pytest.fixture
async def slow_server(recorder: Recorder) -> AsyncIterator[Server]:
    """A destination with a short link timeout."""
    async with await serve(
        "127.0.0.1:0", recorder, name="dest", auth=AuthConfig(psk=PSK), link_timeout_s=LINK
    ) as server:
        yield server


@pytest.fixture
async def proxy(slow_server: Server) -> AsyncIterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of ``slow_server``."""
    proxy = FaultProxy(slow_server.address)
    address = await proxy.start()
    yield proxy, address
    await proxy.close()


async def open_source(address: str, **kw: object) -> Session:
    """A one-channel source with two devices announced and a short link timeout."""
    session = await connect(
        address, name="source", auth=AuthConfig(psk=PSK), channels=1, link_timeout_s=LINK, **kw
    )  # type: ignore[arg-type]
    await session.send_control(Tag.DEVICES, announce(2))
    return session


async def test_keepalives_keep_an_idle_session_open(slow_server: Server) -> None:
    """A session with no traffic for many link timeouts stays open: keep-alives flow."""
    session = await open_source(slow_server.address)
    await asyncio.sleep(LINK * 5)  # the idleness under test, not a synchronisation
    await session.send_control(Tag.END_OF_STREAM)
    assert (await session.recv()).tag is Tag.VERDICT
    await session.close()


async def test_a_stalled_link_fails_both_ends_naming_the_link(
    proxy: tuple[FaultProxy, str], recorder: Recorder
) -> None:
    """When the link stops forwarding, recv and a blocked send fail with the link timeout."""
    fault, address = proxy
    session = await open_source(address)
    fault.stall()
    started = time.monotonic()

    async def flood() -> None:
        while True:  # blocks in drain once the stalled proxy stops taking bytes
            await session.send_chunk(Tag.PRECOPY_DATA, 0, (os.urandom(1 << 20),))

    sender = asyncio.create_task(flood())
    with pytest.raises(ConnectionLost, match=r"no frame from dest for 0\.4 s \(link_timeout_s\)"):
        await asyncio.wait_for(session.recv(), BOUND)
    assert time.monotonic() - started < BOUND
    with pytest.raises(ConnectionLost, match="link_timeout_s"):
        await asyncio.wait_for(sender, BOUND)
    await asyncio.wait_for(recorder.done.wait(), BOUND)
    assert isinstance(recorder.error, ConnectionLost)
    assert "no frame from source" in str(recorder.error)


async def test_a_slow_big_frame_is_a_live_link(
    proxy: tuple[FaultProxy, str], recorder: Recorder
) -> None:
    """A frame that takes several link timeouts to arrive does not look like silence."""
    fault, address = proxy
    fault.rate = 1 << 20  # bytes per second: a 1 MiB chunk takes about 2.5 link timeouts
    session = await open_source(address)
    await session.send_chunk(Tag.PRECOPY_DATA, 0, (b"x" * (1 << 20),))
    await session.send_control(Tag.END_OF_STREAM)
    assert (await asyncio.wait_for(session.recv(), 30)).tag is Tag.VERDICT
    await session.close()
    assert recorder.error is None
    assert (Tag.PRECOPY_DATA, 0, b"x" * (1 << 20)) in recorder.frames


async def test_a_corrupt_frame_reaches_the_source_as_the_destinations_reason(
    proxy: tuple[FaultProxy, str], recorder: Recorder
) -> None:
    """A checksum failure on the destination reaches the source as a CANCEL naming it."""
    fault, address = proxy
    session = await open_source(address)
    fault.corrupt_at = fault.upstream_bytes + 5000  # inside the next chunk's payload
    await session.send_chunk(Tag.PRECOPY_DATA, 1, (os.urandom(20000),))
    with pytest.raises(PeerCancelled) as caught:
        await asyncio.wait_for(session.recv(), BOUND)
    assert str(caught.value) == (
        "destination refused: checksum: mismatch on PRECOPY_DATA frame 3 of device 1"
    )
    assert caught.value.code == "protocol"
    await recorder.done.wait()


async def test_an_abort_with_a_reason_reaches_the_peer(
    slow_server: Server, recorder: Recorder
) -> None:
    """Session.abort(reason) tells the peer why before the connections go."""

    async def refuse(session: Session, frame: object) -> None:
        session.abort("device 0 rejected its state", code="device")

    recorder.on_frame = refuse
    session = await connect(slow_server.address, name="source", auth=AuthConfig(psk=PSK))
    await session.send_control(Tag.DEVICES, announce(2))
    with pytest.raises(PeerCancelled, match="destination refused: device 0 rejected its state"):
        await asyncio.wait_for(session.recv(), BOUND)


async def test_connect_retries_a_refused_connection(slow_server: Server) -> None:
    """Connections reset at accept are retried with backoff until one gets through."""
    fault = FaultProxy(slow_server.address)
    fault.refuse_first = 3
    address = await fault.start()
    try:
        with capture_logs() as logs:
            session = await connect(address, name="source", auth=AuthConfig(psk=PSK), timeout=10)
        await session.close()
    finally:
        await fault.close()
    assert fault.refused == 3
    assert [e["attempt"] for e in logs if e["event"] == "connect_retry"] == [1, 2, 3]


async def test_connect_never_retries_an_authentication_failure(slow_server: Server) -> None:
    """A wrong key fails at the first attempt, however long the budget."""
    with capture_logs() as logs, pytest.raises(AuthenticationError):
        await connect(
            slow_server.address, name="source", auth=AuthConfig(psk=b"wrong key 123456"), timeout=30
        )
    assert not [e for e in logs if e["event"] == "connect_retry"]


def test_limits_refuse_nonsense_admission_settings() -> None:
    """Admission limits below one, or a zero handshake timeout, are refused by name."""
    with pytest.raises(ValueError, match="max_pending_per_peer"):
        Limits(max_pending_per_peer=0)
    with pytest.raises(ValueError, match="handshake_timeout"):
        Limits(handshake_timeout=0)

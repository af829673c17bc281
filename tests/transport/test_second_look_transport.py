"""A second look at reading paused by backpressure: a destination whose application takes
frames more slowly than the link brings them is paused most of the time, yet alive; its
keep-alives must still go out, or the source cuts a healthy migration at link_timeout_s.
A stalled application (nothing taken) stays silent, as before."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from test_transport_hostile_tls import settled
from transport_helpers import PSK, announce

from transport import AuthConfig, ConnectionLost, Session, Tag, connect, serve

#: Short, so three of them make a short test; each end uses it.
LINK_TIMEOUT_S = 0.5
CHUNK = (bytes(256 * 1024),)


@contextlib.asynccontextmanager
async def announced(handler: Callable[[Session], Awaitable[None]]) -> AsyncIterator[Session]:
    """A source session to a destination running ``handler``, one device announced, on
    links that time out at LINK_TIMEOUT_S; aborted at the end."""
    async with await serve(
        "127.0.0.1:0", handler, name="dest", auth=AuthConfig(psk=PSK),
        link_timeout_s=LINK_TIMEOUT_S,
    ) as server:  # fmt: skip
        source = await connect(
            server.address, name="src", auth=AuthConfig(psk=PSK), link_timeout_s=LINK_TIMEOUT_S
        )
        try:
            await source.send_control(Tag.DEVICES, announce(1))
            source.set_device_count(1)
            yield source
        finally:
            source.abort()


async def send_until_it_fails(source: Session) -> None:
    """Data frames until the session fails (its error raised)."""
    while True:
        await source.send_chunk(Tag.PRECOPY_DATA, 0, CHUNK)


async def slow_reader(sessions: list[Session], taken: list[int]) -> None:
    """A destination application slower than the link: it takes one frame each time its
    channel has paused reading (the load of each chunk outlasts the chunk's arrival)."""
    session = sessions[-1]
    await session.recv()  # DEVICES
    session.set_device_count(1)
    channel = session._chans[0]
    with contextlib.suppress(ConnectionLost):
        while True:
            await settled(lambda: channel.reading_paused or session.error is not None, "paused")
            await session.recv()
            taken[0] += 1


async def test_a_destination_slower_than_the_link_keeps_the_link_alive() -> None:
    """For three link timeouts the destination's reading is paused at nearly every
    keep-alive tick while its application keeps taking frames: the source's session stays
    up and the frames keep flowing."""
    sessions: list[Session] = []
    taken = [0]

    async def handler(session: Session) -> None:
        sessions.append(session)
        await slow_reader(sessions, taken)

    async with announced(handler) as source:
        loop = asyncio.get_running_loop()
        end = loop.time() + 3 * LINK_TIMEOUT_S
        while loop.time() < end:
            await source.send_chunk(Tag.PRECOPY_DATA, 0, CHUNK)
        assert source.error is None
        assert taken[0] > 10


async def test_a_stalled_destination_application_still_times_the_link_out() -> None:
    """A destination application that takes nothing more: its paused channel stays silent,
    so the source's session ends at link_timeout_s, naming it (a stall is not progress)."""
    stalled = asyncio.Event()
    release = asyncio.Event()

    async def handler(session: Session) -> None:
        await session.recv()  # DEVICES
        session.set_device_count(1)
        stalled.set()
        await release.wait()

    try:
        async with announced(handler) as source:
            await stalled.wait()
            with pytest.raises(ConnectionLost, match="link_timeout_s"):
                await asyncio.wait_for(send_until_it_fails(source), 10 * LINK_TIMEOUT_S)
    finally:
        release.set()


async def test_barriers_on_every_channel_arrive_once_and_in_order_through_paused_reads() -> None:
    """Two channels, a reader slower than the link (it takes a frame only while a channel
    is paused, until everything was sent): every
    data frame sent before a SYNC comes out before it, each SYNC and END_OF_STREAM comes
    out once, END_OF_STREAM last, and nothing is lost or waits forever."""
    got: list[tuple[Tag, int]] = []
    done, sent = asyncio.Event(), asyncio.Event()

    async def handler(session: Session) -> None:
        await session.recv()  # DEVICES
        session.set_device_count(2)
        channels = session._chans
        while True:
            await settled(
                lambda: sent.is_set() or any(c.reading_paused for c in channels), "a pause"
            )
            frame = await session.recv()
            got.append((frame.tag, frame.device))
            if frame.tag is Tag.END_OF_STREAM:
                done.set()
                await release.wait()
                return

    release = asyncio.Event()
    async with await serve(
        "127.0.0.1:0", handler, name="dest", auth=AuthConfig(psk=PSK),
        link_timeout_s=LINK_TIMEOUT_S,
    ) as server:  # fmt: skip
        source = await connect(
            server.address, name="src", auth=AuthConfig(psk=PSK), channels=2,
            link_timeout_s=LINK_TIMEOUT_S,
        )  # fmt: skip
        try:
            await source.send_control(Tag.DEVICES, announce(2))
            source.set_device_count(2)
            for _ in range(2):  # two rounds: data on both channels, then a barrier
                for _ in range(12):
                    for device in (0, 1):
                        await source.send_chunk(Tag.PRECOPY_DATA, device, CHUNK)
                await source.send_control(Tag.SYNC)
            await source.send_control(Tag.END_OF_STREAM)
            sent.set()  # the rest may be taken at any pace
            async with asyncio.timeout(20 * LINK_TIMEOUT_S):
                await done.wait()
            assert source.error is None
        finally:
            release.set()
            source.abort()
    tags = [tag for tag, _ in got]
    assert tags.count(Tag.SYNC) == 2
    assert tags.count(Tag.END_OF_STREAM) == 1
    assert tags[-1] is Tag.END_OF_STREAM
    first_sync, second_sync = (i for i, t in enumerate(tags) if t is Tag.SYNC)
    # What was sent before a barrier comes out before it (a later frame of a channel
    # read ahead may too: the barrier waits for its slowest channel).
    assert first_sync >= 24
    assert (second_sync, len(got)) == (49, 51)
    assert sorted(got[:first_sync] + got[first_sync + 1 : second_sync]) == sorted(
        [(Tag.PRECOPY_DATA, 0), (Tag.PRECOPY_DATA, 1)] * 24
    )

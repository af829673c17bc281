"""VfioUserDevice against real libvfio-user servers: the test device and the library's sample."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from devices.errors import ChannelIOError, DeviceError, TransitionError, Unsupported
from devices.fsm import Feature, State
from devices.testing import ArcTrace, copy_device, read_until_pause
from devices.vfio_user import VfioUserDevice, VfioUserFaults
from tests.vfio_user import harness, servers
from tests.vfio_user.servers import BAR0, BAR1, REG_BAD_PAGES, REG_SIZE, REG_WRITES, Server

S = State
SIZE = 4 << 20


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[list[Server]]:
    """Servers started by a test, stopped after it."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
async def devices() -> AsyncIterator[list[VfioUserDevice]]:
    """Devices made by a test, closed after it."""
    made: list[VfioUserDevice] = []
    yield made
    for device in made:
        await device.close()


def start(sockets: list[Server], path: Path, **options: int) -> Server:
    server = servers.start_testdev(path, **options)
    sockets.append(server)
    return server


def connect(
    devices: list[VfioUserDevice], name: str, server: Server, **options: Any
) -> VfioUserDevice:
    device = VfioUserDevice(name, socket=str(server.socket), **options)
    devices.append(device)
    return device


async def test_opens_with_the_servers_features_and_state(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """Opening negotiates the version and reads STOP_COPY|PRE_COPY and RUNNING."""
    device = connect(devices, "dev", start(sockets, tmp_path / "d.sock", size=SIZE))
    await device.open()
    assert device.server_features == Feature.STOP_COPY | Feature.PRE_COPY
    assert device.state == S.RUNNING
    assert device.descriptor().kind == "vfio-user:1de5:011e"  # its PCI vendor:device
    assert await servers.control_read(device, REG_SIZE) == SIZE


async def test_precopy_figures_are_unsupported(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """precopy_info and stop_copy_size raise Unsupported: vfio-user has neither."""
    device = connect(devices, "dev", start(sockets, tmp_path / "d.sock"))
    await device.set_state(S.PRE_COPY)
    with pytest.raises(Unsupported, match="dev: vfio-user has no precopy info"):
        device.precopy_info()
    with pytest.raises(Unsupported, match="MIG_DATA_SIZE"):
        device.stop_copy_size()


async def test_copy_of_a_running_device_with_precopy_passes(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """A device dirtied while it runs crosses in several pre-copy passes, byte-identical."""
    source = connect(devices, "src", start(sockets, tmp_path / "s.sock", size=SIZE, rate=2000))
    dest = connect(devices, "dst", start(sockets, tmp_path / "d.sock", size=SIZE, seed=9))
    assert await source.digest() != await dest.digest()
    trace = ArcTrace()
    trace.watch(source, dest)
    report = await copy_device(source, dest, min_passes=3)
    assert report.passes >= 3
    assert report.precopy_bytes > SIZE  # the initial data and then dirty pages again
    await source.set_state(S.STOP)
    await dest.set_state(S.RUNNING)
    assert await source.digest() == await dest.digest()
    assert await servers.control_read(dest, REG_BAD_PAGES) == 0
    assert trace.arcs("src") == [
        (S.RUNNING, S.PRE_COPY),
        (S.PRE_COPY, S.STOP_COPY),
        (S.STOP_COPY, S.STOP),
    ]
    assert trace.arcs("dst") == [
        (S.RUNNING, S.STOP),
        (S.STOP, S.RESUMING),
        (S.RESUMING, S.STOP),
        (S.STOP, S.RUNNING),
    ]


async def test_abort_from_precopy_keeps_the_device_running(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """PRE_COPY -> RUNNING mid-stream leaves the device running, its state self-consistent."""
    device = connect(devices, "dev", start(sockets, tmp_path / "d.sock", size=SIZE, rate=2000))
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    assert await channel.read()
    await device.set_state(S.RUNNING)
    writes = await servers.control_read(device, REG_WRITES)
    for _ in range(1000):  # the writer runs again: its counter moves (within 5 s)
        if await servers.control_read(device, REG_WRITES) > writes:
            break
        await asyncio.sleep(0.005)
    assert await servers.control_read(device, REG_WRITES) > writes
    assert await servers.control_read(device, REG_BAD_PAGES) == 0


async def test_end_of_stream_in_stop_copy_is_permanent(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """In STOP_COPY a 0-byte read ends the stream, and every later read says so too."""
    device = connect(devices, "dev", start(sockets, tmp_path / "d.sock"))
    await device.set_state(S.STOP_COPY)
    channel = device.save_channel()
    assert await read_until_pause(channel)
    for _ in range(3):
        assert await channel.read() == ()
        await channel.wait_readable()


async def test_corrupt_stream_is_refused_at_load(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """A stream corrupted by its source is refused at RESUMING -> STOP; reset recovers."""
    source = connect(
        devices,
        "src",
        start(sockets, tmp_path / "s.sock", size=SIZE),
        faults=VfioUserFaults(corrupt_stream=True),
    )
    dest = connect(devices, "dst", start(sockets, tmp_path / "d.sock", size=SIZE, seed=3))
    with pytest.raises(TransitionError, match=r"dst: RESUMING -> STOP failed: .*EINVAL") as info:
        await copy_device(source, dest)
    assert info.value.state == dest.state == S.RESUMING
    await dest.reset()
    assert dest.state == S.RUNNING
    assert await servers.control_read(dest, REG_BAD_PAGES) == 0
    await source.set_state(S.RUNNING)


async def test_not_allowed_targets_are_refused_before_asking(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """A state outside the configured features is refused by devices.fsm, not the server."""
    device = connect(
        devices, "dev", start(sockets, tmp_path / "d.sock"), features=Feature.STOP_COPY
    )
    with pytest.raises(TransitionError, match="RUNNING -> PRE_COPY is not allowed"):
        await device.set_state(S.PRE_COPY)
    with pytest.raises(TransitionError, match="not allowed"):
        await device.set_state(S.RUNNING_P2P)
    assert device.state == S.RUNNING


async def test_lost_server_names_command_device_and_state(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """A server that dies mid-migration gives an error naming the command; the device is ERROR."""
    server = start(sockets, tmp_path / "d.sock")
    device = connect(devices, "dev", server)
    await device.set_state(S.PRE_COPY)
    server.stop()
    with pytest.raises(ChannelIOError, match=r"dev: MIG_DATA_READ failed in state PRE_COPY"):
        await read_until_pause(device.save_channel())
    assert device.state == S.ERROR


async def test_a_new_client_finds_an_abandoned_session_ended(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """A client that left in PRE_COPY leaves a server the next client finds RUNNING."""
    server = start(sockets, tmp_path / "d.sock")
    first = connect(devices, "dev", server)
    await first.set_state(S.PRE_COPY)
    await first.close()
    second = connect(devices, "dev", server)
    await second.open()
    assert second.state == S.RUNNING


@pytest.mark.parametrize("walk", [(S.STOP,), (S.STOP, S.STOP_COPY)], ids=["stop", "stop-copy"])
async def test_a_client_that_leaves_a_device_stopped_leaves_its_state(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice], walk: tuple[State, ...]
) -> None:
    """Closing resets nothing: a device left in STOP (kept stopped, migrated away, or the
    only copy of a workload whose outcome is unknown), or in STOP_COPY, is found by the
    next client and left in STOP with the very same state."""
    server = start(sockets, tmp_path / "d.sock")
    first = connect(devices, "dev", server)
    await first.set_state(S.STOP)
    before = await first.digest()
    for state in walk[1:]:
        await first.set_state(state)
    await first.close()
    second = connect(devices, "dev", server)
    await second.open()
    assert (second.found_at_open, second.state) == (walk[-1], S.STOP)
    assert await second.digest() == before


async def test_region_read_returns_the_state(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """REGION_READ in pieces returns the state: page 5 starts with its index."""
    device = connect(devices, "dev", start(sockets, tmp_path / "d.sock", size=SIZE))
    state = await device.region_read(BAR1, 0, SIZE)
    assert len(state) == SIZE
    assert struct.unpack_from("<Q", state, 5 * 4096)[0] == 5
    with pytest.raises(DeviceError, match=r"dev: REGION_READ\(region 1, .*EINVAL"):
        await device.region_read(BAR1, SIZE - 8, 16)


async def test_sample_server_migrates_stop_copy_only_byte_exact(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """The library's sample migrates stop-copy only; its BAR1 reads back identical."""
    source_server = servers.start_sample(tmp_path / "s.sock")
    dest_server = servers.start_sample(tmp_path / "d.sock")
    sockets.extend([source_server, dest_server])
    source = connect(devices, "src", source_server, features=Feature.STOP_COPY)
    dest = connect(devices, "dst", dest_server, features=Feature.STOP_COPY)
    await source.open()
    assert source.descriptor().kind == "vfio-user:dead:beef"
    pattern = os.urandom(0x4000)
    await source.region_write(BAR1, 0, pattern)
    # BAR0 is the time the sample's timer fires; RUNNING re-arms it and needs a future one.
    alarm = struct.pack("=q", int(time.time()) + 3600)
    await source.region_write(BAR0, 0, alarm)
    report = await copy_device(source, dest)
    assert report.precopy_bytes == 0
    assert report.stop_copy_bytes == 0x4000 + 8
    await dest.set_state(S.RUNNING)
    # The sample's BAR1 read ignores the offset: read it whole, from 0.
    assert await dest.region_read(BAR1, 0, 0x4000) == pattern


async def test_precopy_says_nothing_now_again_and_again(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """With every page read and none dirtied, each PRE_COPY read says "nothing now" (None)."""
    device = connect(devices, "dev", start(sockets, tmp_path / "d.sock"))
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    assert await read_until_pause(channel)
    assert await channel.read() is None
    assert await channel.read() is None
    assert device.state == S.PRE_COPY


async def test_a_new_session_sends_every_page_again(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """Re-entering PRE_COPY opens a new channel whose stream carries the whole state again."""
    device = connect(devices, "dev", start(sockets, tmp_path / "d.sock"))
    await device.set_state(S.PRE_COPY)
    first = device.save_channel()
    await read_until_pause(first)
    await device.set_state(S.RUNNING)
    await device.set_state(S.PRE_COPY)
    assert device.save_channel() is not first
    chunks = await read_until_pause(device.save_channel())
    pages = [page for chunk in chunks for page in harness.blocks_of(chunk)]
    assert sorted(pages) == list(range((1 << 20) // servers.PAGE))


async def test_only_reset_leaves_error_after_the_server_came_back(
    tmp_path: Path, sockets: list[Server], devices: list[VfioUserDevice]
) -> None:
    """A device that lost its server stays in ERROR until reset() reconnects it."""
    server = start(sockets, tmp_path / "d.sock")
    device = connect(devices, "dev", server)
    await device.set_state(S.STOP)
    server.stop()
    with pytest.raises(DeviceError, match=r"dev: STOP -> RUNNING failed: .* connection lost"):
        await device.set_state(S.RUNNING)
    assert device.state == S.ERROR
    start(sockets, tmp_path / "d.sock")
    with pytest.raises(TransitionError, match="ERROR -> RUNNING is not allowed"):
        await device.set_state(S.RUNNING)
    await device.reset()
    assert device.state == S.RUNNING

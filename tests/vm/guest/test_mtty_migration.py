"""VfioDevice against the kernel's mtty driver: migration, cancel, corruption (guest only)."""

from __future__ import annotations

import errno
import os

import pytest
import uvloop

from devices.errors import (
    ChannelClosedError,
    ChannelIOError,
    InvalidStateError,
    StateValidationError,
    TransitionError,
    TransitionNotAllowed,
)
from devices.fsm import Feature, State
from devices.testing import ArcTrace, read_until_pause
from devices.vfio import VfioDevice
from tests.devices import vfio_harness
from tests.devices.vfio_harness import HEADER_SIZE, MTTY_MAGIC, uart_drain

S = State
#: mtty-2's whole stream: the header plus two 36-byte port structs.
STREAM_SIZE = HEADER_SIZE + 2 * 36


def joined(chunks: list[tuple[bytes | bytearray | memoryview, ...]]) -> bytes:
    """The bytes of a list of chunks, in order."""
    return b"".join(bytes(b) for chunk in chunks for b in chunk)


async def test_device_reports_what_mtty_implements(src: VfioDevice) -> None:
    """Opened through group and container, mtty-2 reports flags 0x7, RUNNING and 96 bytes."""
    assert src.features == Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY
    assert src.state == S.RUNNING
    assert src.stop_copy_size() == STREAM_SIZE
    assert src.descriptor().kind == "vfio:mtty-2"
    bar0 = src.region_info(0)
    assert (bar0.size, bar0.offset) == (8, 0)
    assert src.region_info(1).offset == 1 << 40


async def test_migration_carries_the_uart_state(src: VfioDevice, dst: VfioDevice) -> None:
    """Pre-copy, P2P quiesce and stop-copy move both ports' FIFOs to the destination."""
    trace = ArcTrace()
    trace.watch(src, dst)
    assert await src.digest() != await dst.digest()
    await dst.set_state(S.RESUMING)
    sink = dst.resume_channel()

    await src.set_state(S.PRE_COPY)
    channel = src.save_channel()
    assert src.precopy_info() == (HEADER_SIZE, 0)
    precopy = joined(await read_until_pause(channel))
    assert precopy[:8] == MTTY_MAGIC
    assert len(precopy) == HEADER_SIZE
    assert src.precopy_info() == (0, 0)
    assert await channel.read() is None  # mtty's read() == 0 here means "nothing now"
    await sink.write(precopy)

    await src.set_state(S.PRE_COPY_P2P)
    assert src.save_channel() is channel
    await src.set_state(S.STOP_COPY)
    assert src.save_channel() is channel
    with pytest.raises(InvalidStateError):
        src.precopy_info()
    rest = joined(await read_until_pause(channel))
    assert len(rest) == STREAM_SIZE - HEADER_SIZE
    assert await channel.read() == ()
    assert src.stop_copy_size() == 0
    for start in range(0, len(rest), 5):  # many small writes, as a transport may deliver
        await sink.write(memoryview(rest)[start : start + 5])
    assert sink.written == STREAM_SIZE

    await dst.set_state(S.STOP)
    with pytest.raises(ChannelClosedError, match=r"dst: .*STOP"):
        await sink.write(b"x")
    await dst.set_state(S.RUNNING)
    assert await src.digest() == await dst.digest()
    assert src.state == S.STOP_COPY  # the digest's snapshot was taken aside
    assert await channel.read() == ()
    assert (uart_drain(dst, 0), uart_drain(dst, 1)) == (b"HELLO!", b"WORLD!")

    await src.set_state(S.RUNNING)
    assert (uart_drain(src, 0), uart_drain(src, 1)) == (b"HELLO!", b"WORLD!")
    assert trace.arcs("src") == [
        (S.RUNNING, S.PRE_COPY),
        (S.PRE_COPY, S.PRE_COPY_P2P),
        (S.PRE_COPY_P2P, S.STOP_COPY),
        (S.STOP_COPY, S.STOP),
        (S.STOP, S.RUNNING_P2P),
        (S.RUNNING_P2P, S.RUNNING),
    ]
    assert trace.arcs("dst") == [
        (S.RUNNING, S.RUNNING_P2P),
        (S.RUNNING_P2P, S.STOP),
        (S.STOP, S.RESUMING),
        (S.RESUMING, S.STOP),
        (S.STOP, S.RUNNING_P2P),
        (S.RUNNING_P2P, S.RUNNING),
    ]


async def test_cancel_mid_precopy_returns_the_source_to_running(src: VfioDevice) -> None:
    """PRE_COPY -> RUNNING ends the session: the kernel's fd says ENODEV and ours is closed."""
    await src.set_state(S.PRE_COPY)
    channel = src.save_channel()
    assert await channel.read()
    kernel_view = os.dup(channel.fd)
    try:
        await src.set_state(S.RUNNING)
        with pytest.raises(OSError, match="No such device") as info:
            os.read(kernel_view, 64)
        assert info.value.errno == errno.ENODEV
    finally:
        os.close(kernel_view)
    assert channel.closed
    assert channel.fd == -1
    with pytest.raises(ChannelClosedError, match=r"src: .*RUNNING"):
        await channel.read()
    assert src.state == S.RUNNING
    await src.set_state(S.PRE_COPY)
    assert src.save_channel() is not channel
    assert src.precopy_info() == (HEADER_SIZE, 0)
    await src.set_state(S.RUNNING)
    assert (uart_drain(src, 0), uart_drain(src, 1)) == (b"HELLO!", b"WORLD!")


async def test_stop_copy_to_precopy_is_refused_before_the_kernel(src: VfioDevice) -> None:
    """STOP_COPY -> PRE_COPY(_P2P) raises TransitionNotAllowed and leaves the session alone."""
    await src.set_state(S.STOP_COPY)
    channel = src.save_channel()
    for target in (S.PRE_COPY, S.PRE_COPY_P2P):
        with pytest.raises(TransitionNotAllowed, match="STOP_COPY -> PRE_COPY") as info:
            await src.set_state(target)
        assert info.value.state == S.STOP_COPY
    assert src.save_channel() is channel
    assert len(joined(await read_until_pause(channel))) == STREAM_SIZE
    await src.set_state(S.RUNNING)


async def test_corrupted_stream_fails_the_destination_not_the_source(
    src: VfioDevice, dst: VfioDevice
) -> None:
    """A foreign header: write() fails with EFAULT and RESUMING -> STOP is refused here."""
    await src.set_state(S.STOP_COPY)
    stream = bytearray(joined(await read_until_pause(src.save_channel())))
    stream[0] ^= 0xFF  # break the magic
    await dst.set_state(S.RESUMING)
    sink = dst.resume_channel()
    with pytest.raises(ChannelIOError, match=r"dst: write\(data_fd\) at stream offset 0 .*EFAULT"):
        await sink.write(stream)
    with pytest.raises(TransitionError, match="RESUMING -> STOP refused") as info:
        await dst.set_state(S.RUNNING)
    cause = info.value.__cause__
    assert isinstance(cause, StateValidationError)
    assert "EFAULT" in str(cause)
    assert (info.value.state, dst.state) == (S.RESUMING, S.RESUMING)
    await dst.reset()
    assert dst.state == S.RUNNING
    assert (uart_drain(dst, 0), uart_drain(dst, 1)) == (b"s7p0", b"s7p1")
    await src.set_state(S.RUNNING)
    assert (uart_drain(src, 0), uart_drain(src, 1)) == (b"HELLO!", b"WORLD!")


async def test_short_stream_fails_in_the_kernel_and_stays_resuming(
    src: VfioDevice, dst: VfioDevice
) -> None:
    """A truncated stream: the kernel's load fails (EINVAL) and the device stays RESUMING."""
    await src.set_state(S.STOP_COPY)
    stream = joined(await read_until_pause(src.save_channel()))
    await dst.set_state(S.RESUMING)
    await dst.resume_channel().write(stream[:50])
    with pytest.raises(TransitionError, match=r"dst: RESUMING -> STOP failed: .*EINVAL") as info:
        await dst.set_state(S.STOP)
    assert (info.value.state, dst.state) == (S.RESUMING, S.RESUMING)
    with pytest.raises(InvalidStateError):
        dst.save_channel()
    await dst.reset()
    assert dst.state == S.RUNNING
    await src.set_state(S.RUNNING)


async def test_digest_outside_its_states_is_refused(src: VfioDevice) -> None:
    """digest() in PRE_COPY (a live session not read to its end) raises InvalidStateError."""
    await src.set_state(S.PRE_COPY)
    with pytest.raises(InvalidStateError, match="digest"):
        await src.digest()
    await src.set_state(S.STOP_COPY)
    with pytest.raises(InvalidStateError, match="digest"):
        await src.digest()
    await src.set_state(S.RUNNING)


def test_data_fd_waits_work_under_uvloop() -> None:
    """Under uvloop too, waiting on mtty's unpollable data fd neither fails nor spins."""

    async def migrate() -> bytes:
        source = vfio_harness.make("src")
        assert isinstance(source, VfioDevice)
        try:
            await source.set_state(S.PRE_COPY)
            channel = source.save_channel()
            assert await read_until_pause(channel)
            await channel.wait_readable()
            assert await channel.read() is None
            await source.set_state(S.STOP_COPY)
            await channel.wait_readable()
            return joined(await read_until_pause(channel))
        finally:
            await source.close()

    assert len(uvloop.run(migrate())) == STREAM_SIZE - HEADER_SIZE

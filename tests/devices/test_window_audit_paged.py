"""The paged devices' last stop-copy read carries the stream's END record: an audit.

Whatever was pending at the stop (nothing, a part of a chunk, exactly a chunk, many
chunks), the stream read ends with exactly one END record, then only empty reads, and
loads on a fresh device to the same state; a device entering ERROR has no session left.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from devices import stream
from devices.errors import DeviceError, TransitionError
from devices.fsm import State
from devices.paged import Faults, PagedDevice
from devices.ram import RamDevice
from devices.simulated import SimulatedDevice

BLOCK = 4 << 10
CHUNK = 4 * BLOCK
SIZE = 16 * BLOCK


def simulated(name: str) -> PagedDevice:
    return SimulatedDevice(name, state_size=SIZE, chunk_size=CHUNK, block_size=BLOCK, seed=3)


def ram(name: str) -> PagedDevice:
    return RamDevice(name, size=SIZE, page_size=BLOCK, chunk_size=CHUNK, seed=3)


KINDS: dict[str, Callable[[str], PagedDevice]] = {"simulated": simulated, "ram": ram}


async def precopy_leaving(device: PagedDevice, pending_blocks: int) -> list[bytes]:
    """PRE_COPY read out whole (its pieces), then ``pending_blocks`` blocks written again."""
    await device.set_state(State.PRE_COPY)
    channel, pieces = device.save_channel(), []
    while chunk := await channel.read():
        pieces.extend(bytes(p) for p in chunk)
    for block in range(pending_blocks):
        device._write(block)  # one workload write to each of the first blocks
    return pieces


def kinds(pieces: list[bytes]) -> list[int]:
    """The stream's record kinds, in order (from each record's header)."""
    data, found, at = b"".join(pieces), [], 0
    while at < len(data):
        kind, length, _, _ = stream.HEADER.unpack_from(data, at)
        found.append(kind)
        at += stream.HEADER.size + length
    assert at == len(data)
    return found


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("pending_blocks", [0, 1, CHUNK // BLOCK, 2 * CHUNK // BLOCK + 1])
async def test_the_stop_copy_stream_ends_once_and_loads(kind: str, pending_blocks: int) -> None:
    """Nothing, part of a chunk, exactly a chunk or several pending at the stop: the
    stop-copy reads end with one END record, then only empty reads, and a fresh device
    loads the whole stream to the source's state."""
    source, target = KINDS[kind]("src"), KINDS[kind]("dst")
    await source.open()
    await target.open()
    try:
        await target.set_state(State.RESUMING)
        precopy = await precopy_leaving(source, pending_blocks)
        pieces: list[bytes] = []
        await source.set_state(State.STOP_COPY)
        channel = source.save_channel()
        while chunk := await channel.read():
            pieces.extend(bytes(p) for p in chunk)
        assert stream.END not in kinds(precopy)
        assert await channel.read() == ()
        await source.set_state(State.STOP)
        assert kinds(pieces)[-1] == stream.END
        assert kinds(pieces).count(stream.END) == 1
        writer = target.resume_channel()
        for piece in precopy + pieces:
            await writer.write(piece)
        await target.set_state(State.STOP)
        assert await target.digest() == await source.digest()
    finally:
        await source.close()
        await target.close()


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_device_broken_mid_walk_has_no_session_and_resets(kind: str) -> None:
    """An arc fails and so does the walk back: the device is in ERROR with no data
    session (the state setter drops it for every backend) and a reset brings it back
    to RUNNING, ready for a new session."""
    device = KINDS[kind]("dev")
    await device.open()
    try:
        await device.set_state(State.PRE_COPY)
        session = device.save_channel()
        # PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keeps the session; its last arc fails, and
        # so does the walk back: ERROR, reached with the session still open.
        arcs = {(State.PRE_COPY_P2P, State.STOP_COPY), (State.PRE_COPY_P2P, State.PRE_COPY)}
        device.faults = Faults(fail_arcs=frozenset(arcs))
        with pytest.raises(TransitionError):
            await device.set_state(State.STOP_COPY)
        assert device.state == State.ERROR
        with pytest.raises(DeviceError):
            await session.read()  # the state setter ended the session
        device.faults = Faults()
        await device.reset()
        assert device.state == State.RUNNING
        await device.set_state(State.PRE_COPY)
        assert await device.save_channel().read()
    finally:
        await device.close()

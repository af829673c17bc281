"""SimulatedDevice: seeded content, the clock-driven workload, and stable chunks."""

from __future__ import annotations

import hashlib

import pytest

from devices import fsm, stream
from devices.errors import InvalidStateError, TransitionError
from devices.fsm import ARCS, LEGAL_FEATURE_SETS, Arc, Feature, State
from devices.paged import Faults
from devices.simulated import SimulatedDevice
from devices.testing import ManualClock, opened, read_until_pause

KIB = 1 << 10


def small(**options: object) -> SimulatedDevice:
    """A 64-block device with 4-block chunks."""
    return SimulatedDevice("sim", state_size=256 * KIB, chunk_size=16 * KIB, **options)  # type: ignore[arg-type]


async def test_content_follows_the_seed() -> None:
    """Same seed, same state; another seed, another state; the digest is SHA-256 of it."""
    one, same, other = small(seed=7), small(seed=7), small(seed=8)
    assert await one.digest() == await same.digest() != await other.digest()
    assert await one.digest() == hashlib.sha256(one.memory).digest()


def test_workload_writes_only_the_hot_set() -> None:
    """With hot_set 1/4 the workload never changes a block outside the first quarter."""
    device = small(dirty_rate=1e6, hot_set=0.25)
    before = bytes(device.memory)
    device.run_workload(1.0)
    assert device.writes == int(1e6 // (4 * KIB))
    quarter = len(before) // 4
    assert device.memory[quarter:] == before[quarter:]
    assert device.memory[:quarter] != before[:quarter]


async def test_workload_runs_on_the_clock_only_while_the_device_runs() -> None:
    """Time spent stopped writes nothing, across stopped-to-stopped arcs too; time spent
    running writes at the dirty rate, across running-to-running arcs too."""
    clock = ManualClock()
    device = small(dirty_rate=40 * KIB, clock=clock)
    async with opened(device):
        await device.set_state(State.STOP)
        clock.advance(10.0)
        await device.set_state(State.STOP_COPY)
        clock.advance(5.0)
        await device.set_state(State.STOP)
        clock.advance(5.0)
        await device.set_state(State.RUNNING)
        assert device.writes == 0
        clock.advance(1.0)
        await device.set_state(State.PRE_COPY)  # running to running: the clock runs on
        clock.advance(0.5)
        assert device.precopy_info().initial_bytes == 64 * 4 * KIB  # catches up
        assert device.writes == 15  # 1.5 s at 10 blocks a second, none lost or doubled


async def test_precopy_chunks_are_copies_that_never_change() -> None:
    """A PRE_COPY chunk keeps its bytes when the workload rewrites the blocks it carried."""
    device = small()
    await device.set_state(State.PRE_COPY)
    channel = device.save_channel()
    await channel.read()
    chunk = await channel.read()
    assert chunk is not None
    snapshot = b"".join(chunk)
    for block in range(device.n_blocks):
        device.touch(block)
    assert b"".join(chunk) == snapshot
    assert len(snapshot) <= device.chunk_size + 64


async def test_stop_copy_chunks_are_views_of_the_state() -> None:
    """In STOP_COPY, where nothing writes, the data travels as views of the state itself."""
    device = small()
    await device.set_state(State.STOP_COPY)
    chunks = await read_until_pause(device.save_channel())
    views = [b for chunk in chunks for b in chunk if isinstance(b, memoryview)]
    assert views
    assert all(view.obj is device.memory for view in views)


async def test_the_last_stop_copy_blocks_carry_the_end_record() -> None:
    """The stop-copy read that takes the last pending blocks carries the END record too
    (one piece less per device in the window); the next read is the permanent end, and
    a destination loads the stream whole."""
    source, target = small(seed=3), small(seed=4)
    await source.set_state(State.PRE_COPY)
    channel = source.save_channel()
    chunks = await read_until_pause(channel)
    source.touch(5)
    await source.set_state(State.STOP_COPY)
    last = await channel.read()
    assert last is not None
    kinds = [stream.HEADER.unpack_from(part)[0] for part in (last[0], last[-1])]
    assert kinds == [stream.BLOCKS, stream.END]  # the dirty block's record, then END
    assert await channel.read() == ()
    await target.set_state(State.RESUMING)
    sink = target.resume_channel()
    for chunk in (*chunks, last):
        await sink.write(b"".join(chunk))
    await target.set_state(State.STOP)
    assert await target.digest() == await source.digest()


def test_cannot_throttle() -> None:
    """A simulated device has no auto-converge: set_throttle is InvalidStateError."""
    device = small()
    assert not device.can_throttle()
    with pytest.raises(InvalidStateError, match=r"sim: .*throttling"):
        device.set_throttle(0.5)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"state_size": 1000}, "not a positive multiple of 4096"),
        ({"state_size": 4096, "block_size": 12}, "block size 12"),
        ({"state_size": 4096, "chunk_size": 100}, "below the block size"),
        ({"state_size": 4096, "hot_set": 0.0}, "hot set"),
        ({"state_size": 4096, "dirty_rate": -1.0}, "negative dirty rate"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], reason: str) -> None:
    """Inconsistent sizes and rates fail at construction, naming the device and the option."""
    with pytest.raises(ValueError, match=f"sim: .*{reason}"):
        SimulatedDevice("sim", **options)  # type: ignore[arg-type]


def _single_arcs() -> list[tuple[Feature, Arc]]:
    return [(f, arc) for f in LEGAL_FEATURE_SETS for arc in sorted(ARCS[f])]


@pytest.mark.parametrize(("features", "arc"), _single_arcs())
@pytest.mark.parametrize("fails", [False, True])
async def test_a_single_arc_ends_as_the_fsm_walk_does(
    features: Feature, arc: Arc, fails: bool
) -> None:
    """A model's one-arc state change (its fast path) leaves the device, its listeners and
    the error exactly as the FSM's walk of the same change does, for every arc."""
    ends = []
    for change in (lambda d: d.set_state_now(arc[1]), lambda d: fsm.walk(d, arc[1])):
        device = small(features=features)
        await device.set_state(arc[0])
        if fails:
            device.faults = Faults(fail_arcs=frozenset({arc}))
        seen: list[tuple[State, State]] = []
        device.add_state_listener(lambda _, old, new, seen=seen: seen.append((old, new)))
        error = None
        try:
            change(device)
        except TransitionError as exc:
            error = (exc.state, exc.failed_arc, type(exc.__cause__))
        ends.append((device.state, seen, error, device._channel is not None))
    assert ends[0] == ends[1]
    if arc == (State.RESUMING, State.STOP) and not fails:
        assert ends[0][0] == State.ERROR  # nothing was loaded: the empty stream is rejected
    else:
        assert ends[0][0] == (arc[0] if fails else arc[1])

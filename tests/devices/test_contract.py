"""The device contract, proven for every backend in tests/devices/contract.py."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.base import MigratableDevice
from devices.errors import (
    ArcFailed,
    ChannelClosedError,
    ChannelIOError,
    InvalidStateError,
    StateValidationError,
    TransitionError,
)
from devices.fsm import Feature, State
from devices.paged import Faults, PagedDevice
from devices.testing import ArcTrace, copy_device, opened, read_until_pause, run_pending
from tests.devices.contract import HARNESSES, Harness

S = State
PRECOPY_STATES = (S.PRE_COPY, S.PRE_COPY_P2P)


@pytest.fixture(params=HARNESSES, ids=str)
def harness(request: pytest.FixtureRequest) -> Harness:
    """Each backend in turn."""
    return request.param  # type: ignore[no-any-return]


def faulty(harness: Harness, name: str, faults: Faults) -> MigratableDevice:
    """A device of ``harness`` with ``faults`` injected (skips backends that cannot)."""
    if not harness.faults:
        pytest.skip(f"{harness} cannot inject faults")
    return harness.make(name, faults=faults)


# -- pre-copy readiness and the end of stream ---------------------------------------------


async def test_temporary_end_of_stream_in_precopy(harness: Harness) -> None:
    """Once everything is read in PRE_COPY a read says 'nothing now', again and again."""
    device = harness.make("dev")
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    assert await read_until_pause(channel)
    assert device.precopy_info() == (0, 0)
    assert await channel.read() is None
    assert await channel.read() is None


async def test_wait_readable_returns_when_the_device_dirties(harness: Harness) -> None:
    """At the temporary end, wait_readable blocks until the running device changes state."""
    device = harness.make("dev")
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    await read_until_pause(channel)
    waiter = asyncio.create_task(channel.wait_readable())
    await run_pending()
    assert not waiter.done()
    harness.touch(device, 3)
    await waiter
    assert harness.blocks_of(await channel.read() or ()) == [3]


async def test_wait_readable_returns_on_stop_copy(harness: Harness) -> None:
    """A reader waiting at the temporary end wakes when the device enters STOP_COPY."""
    device = harness.make("dev")
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    await read_until_pause(channel)
    waiter = asyncio.create_task(channel.wait_readable())
    await run_pending()
    await device.set_state(S.STOP_COPY)
    await waiter
    assert await read_until_pause(channel)  # the end record
    assert await channel.read() == ()


async def test_wait_readable_fails_when_the_session_ends(harness: Harness) -> None:
    """A reader waiting at the temporary end gets ChannelClosedError when pre-copy is abandoned."""
    device = harness.make("dev")
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    await read_until_pause(channel)
    waiter = asyncio.create_task(channel.wait_readable())
    await run_pending()
    await device.set_state(S.RUNNING)
    with pytest.raises(ChannelClosedError, match=r"dev: .*RUNNING"):
        await waiter


async def test_permanent_end_of_stream_in_stop_copy(harness: Harness) -> None:
    """In STOP_COPY the stream ends with an empty read, forever, and is always readable."""
    device = harness.make("dev")
    await device.set_state(S.STOP_COPY)
    channel = device.save_channel()
    assert device.stop_copy_size() > 0
    assert await read_until_pause(channel)
    assert device.stop_copy_size() == 0
    for _ in range(3):
        assert await channel.read() == ()
        await channel.wait_readable()


# -- precopy_info ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state", [S.RUNNING, S.STOP, S.RUNNING_P2P, S.STOP_COPY, S.RESUMING, *PRECOPY_STATES]
)
async def test_precopy_info_only_in_precopy_states(harness: Harness, state: State) -> None:
    """precopy_info answers in PRE_COPY and PRE_COPY_P2P and is InvalidStateError elsewhere."""
    device = harness.make("dev")
    await device.set_state(state)
    if state in PRECOPY_STATES:
        assert device.precopy_info() == (harness.n_blocks * harness.block_size, 0)
    else:
        with pytest.raises(InvalidStateError, match=f"dev: precopy_info .* is {state.name}"):
            device.precopy_info()


operations = st.lists(
    st.one_of(
        st.tuples(st.just("touch"), st.integers(0, 1 << 16)),
        st.just(("read", 0)),
        st.just(("p2p", 0)),
    ),
    max_size=80,
)


@pytest.mark.parametrize("harness", HARNESSES, ids=str)
@settings(max_examples=60, deadline=None)
@given(ops=operations)
def test_precopy_accounting_follows_a_model(harness: Harness, ops: list[tuple[str, int]]) -> None:
    """initial_bytes counts blocks never sent, dirty_bytes blocks written since they were sent."""

    async def run() -> None:
        device = harness.make("dev")
        await device.set_state(S.PRE_COPY)
        channel = device.save_channel()
        assert harness.blocks_of(await channel.read() or ()) == []  # the stream's header
        unsent, dirty = set(range(harness.n_blocks)), set[int]()
        for op, arg in ops:
            if op == "touch":
                block = arg % harness.n_blocks
                harness.touch(device, block)
                if block not in unsent:
                    dirty.add(block)
            elif op == "read":
                chunk = await channel.read()
                assert (chunk is None) == (not unsent and not dirty)
                for block in harness.blocks_of(chunk or ()):
                    assert block in unsent or block in dirty
                    unsent.discard(block)
                    dirty.discard(block)
            else:
                other = S.PRE_COPY if device.state == S.PRE_COPY_P2P else S.PRE_COPY_P2P
                await device.set_state(other)
                assert device.save_channel() is channel
            assert device.precopy_info() == (
                len(unsent) * harness.block_size,
                len(dirty) * harness.block_size,
            )

    asyncio.run(run())


# -- channel lifetime -----------------------------------------------------------------------


async def test_channel_survives_moves_inside_the_saving_group(harness: Harness) -> None:
    """PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keeps one session, which goes on where it was."""
    device = harness.make("dev")
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    first = await channel.read()
    await device.set_state(S.PRE_COPY_P2P)
    assert device.save_channel() is channel
    await device.set_state(S.STOP_COPY)
    assert device.save_channel() is channel
    rest = await read_until_pause(channel)
    sent = [b for chunk in [first or (), *rest] for b in harness.blocks_of(chunk)]
    assert sorted(sent) == list(range(harness.n_blocks))


async def test_leaving_the_saving_group_closes_the_channel(harness: Harness) -> None:
    """PRE_COPY -> RUNNING ends the session: the old channel names the device and its state."""
    device = harness.make("dev")
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    await channel.read()
    await device.set_state(S.RUNNING)
    with pytest.raises(ChannelClosedError, match=r"dev: data channel .* closed .*RUNNING"):
        await channel.read()
    with pytest.raises(ChannelClosedError):
        await channel.wait_readable()
    with pytest.raises(InvalidStateError, match="dev: the saving data channel"):
        device.save_channel()


async def test_a_new_session_starts_from_scratch(harness: Harness) -> None:
    """Re-entering PRE_COPY opens a new channel and all the state counts as initial again."""
    device = harness.make("dev")
    await device.set_state(S.PRE_COPY)
    first = device.save_channel()
    await read_until_pause(first)
    await device.set_state(S.RUNNING)
    await device.set_state(S.PRE_COPY)
    assert device.save_channel() is not first
    assert device.precopy_info() == (harness.n_blocks * harness.block_size, 0)


async def test_resume_channel_closes_after_resuming(harness: Harness) -> None:
    """RESUMING -> STOP ends the resuming session; its channel refuses further writes."""
    source, dest = harness.make("src", seed=1), harness.make("dst", seed=2)
    await source.set_state(S.STOP_COPY)
    await dest.set_state(S.RESUMING)
    sink = dest.resume_channel()
    for chunk in await read_until_pause(source.save_channel()):
        for buffer in chunk:
            await sink.write(buffer)
    await dest.set_state(S.STOP)
    with pytest.raises(ChannelClosedError, match=r"dst: .*STOP"):
        await sink.write(b"x")
    with pytest.raises(InvalidStateError):
        dest.resume_channel()


# -- in-process migration ---------------------------------------------------------------------


async def test_copy_of_a_running_device_ends_byte_identical(harness: Harness) -> None:
    """A source that keeps dirtying through several pre-copy passes arrives byte-identical."""
    source = harness.make("src", dirty_rate=2e6, seed=1)
    dest = harness.make("dst", seed=2)
    assert await source.digest() != await dest.digest()
    trace = ArcTrace()
    trace.watch(source, dest)
    async with opened(source, dest):
        report = await copy_device(source, dest, min_passes=3)
        assert report.passes >= 3
        assert report.converged
        assert await source.digest() == await dest.digest()
        await source.set_state(S.RUNNING)
        await dest.set_state(S.RUNNING)
    assert trace.arcs("src") == [
        (S.RUNNING, S.PRE_COPY),
        (S.PRE_COPY, S.PRE_COPY_P2P),
        (S.PRE_COPY_P2P, S.STOP_COPY),
        (S.STOP_COPY, S.STOP),
        (S.STOP, S.RUNNING_P2P),
        (S.RUNNING_P2P, S.RUNNING),
    ]


@pytest.mark.parametrize("features", [Feature.STOP_COPY, Feature.STOP_COPY | Feature.P2P])
async def test_copy_without_precopy(harness: Harness, features: Feature) -> None:
    """A device without PRE_COPY migrates through STOP_COPY alone and arrives byte-identical."""
    source = harness.make("src", seed=1, features=features)
    dest = harness.make("dst", seed=2, features=features)
    report = await copy_device(source, dest)
    assert report.precopy_bytes == 0
    assert report.stop_copy_bytes > 0
    assert await source.digest() == await dest.digest()


# -- injected faults and the FSM unwind -------------------------------------------------------


async def test_failed_switchover_walks_back_to_precopy(harness: Harness) -> None:
    """A failing PRE_COPY_P2P -> STOP_COPY leaves the device in PRE_COPY with its session."""
    device = faulty(harness, "dev", Faults(fail_arcs=frozenset({(S.PRE_COPY_P2P, S.STOP_COPY)})))
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    await channel.read()
    trace = ArcTrace()
    trace.watch(device)
    with pytest.raises(TransitionError, match="dev: PRE_COPY_P2P -> STOP_COPY failed") as info:
        await device.set_state(S.STOP_COPY)
    assert isinstance(info.value.__cause__, ArcFailed)
    assert info.value.state == device.state == S.PRE_COPY
    assert trace.arcs() == [(S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.PRE_COPY)]
    assert device.save_channel() is channel
    assert await channel.read()


async def test_failed_walk_back_ends_in_error_until_reset(harness: Harness) -> None:
    """If the step back fails too, the device is in ERROR without a session; reset recovers it."""
    arcs = frozenset({(S.PRE_COPY_P2P, S.STOP_COPY), (S.PRE_COPY_P2P, S.PRE_COPY)})
    device = faulty(harness, "dev", Faults(fail_arcs=arcs))
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    with pytest.raises(TransitionError) as info:
        await device.set_state(S.STOP_COPY)
    assert (info.value.state, device.state) == (S.ERROR, S.ERROR)
    with pytest.raises(ChannelClosedError, match=r"dev: .*ERROR"):
        await channel.read()
    with pytest.raises(InvalidStateError):
        device.precopy_info()
    await device.reset()
    assert device.state == S.RUNNING


async def test_failed_entry_to_precopy_opens_no_session(harness: Harness) -> None:
    """A failing RUNNING -> PRE_COPY leaves the device RUNNING with no data channel."""
    device = faulty(harness, "dev", Faults(fail_arcs=frozenset({(S.RUNNING, S.PRE_COPY)})))
    with pytest.raises(TransitionError, match=r"RUNNING -> PRE_COPY failed .*injected"):
        await device.set_state(S.PRE_COPY)
    assert device.state == S.RUNNING
    with pytest.raises(InvalidStateError):
        device.save_channel()


async def test_read_failure_names_the_device_and_leaves_it_in_precopy(harness: Harness) -> None:
    """A read failing after N bytes raises ChannelIOError; the device can still go to RUNNING."""
    device = faulty(harness, "dev", Faults(fail_read_after=2 * harness.block_size))
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    with pytest.raises(ChannelIOError, match=r"dev: read failed after \d+ bytes \(injected"):
        await read_until_pause(channel)
    assert device.state == S.PRE_COPY
    await device.set_state(S.RUNNING)


async def test_stalled_read_waits_until_released(harness: Harness) -> None:
    """A stalled read blocks without spinning and returns data once the stall is released."""
    device = faulty(harness, "dev", Faults(stall_read_after=1))
    assert isinstance(device, PagedDevice)
    await device.set_state(S.PRE_COPY)
    channel = device.save_channel()
    await channel.read()  # the header, before the stall point
    reader = asyncio.create_task(channel.read())
    await device.read_stalled.wait()
    assert not reader.done()
    device.release_stall()
    assert harness.blocks_of(await reader or ())


async def test_stalled_read_of_an_abandoned_session_fails(harness: Harness) -> None:
    """A read stalled while the session ends raises ChannelClosedError once released."""
    device = faulty(harness, "dev", Faults(stall_read_after=0))
    assert isinstance(device, PagedDevice)
    await device.set_state(S.PRE_COPY)
    reader = asyncio.create_task(device.save_channel().read())
    await device.read_stalled.wait()
    await device.set_state(S.RUNNING)
    device.release_stall()
    with pytest.raises(ChannelClosedError):
        await reader


async def test_stalled_read_can_be_cancelled(harness: Harness) -> None:
    """Cancelling a stalled read cancels it cleanly and clears the stalled flag."""
    device = faulty(harness, "dev", Faults(stall_read_after=0))
    assert isinstance(device, PagedDevice)
    await device.set_state(S.PRE_COPY)
    reader = asyncio.create_task(device.save_channel().read())
    await device.read_stalled.wait()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert not device.read_stalled.is_set()


async def test_rejected_state_leaves_the_destination_in_error(harness: Harness) -> None:
    """Failed validation on RESUMING -> STOP puts the destination in ERROR; reset recovers it."""
    source = harness.make("src", seed=1)
    dest = faulty(harness, "dst", Faults(corrupt_validation=True))
    await source.set_state(S.STOP_COPY)
    await dest.set_state(S.RESUMING)
    sink = dest.resume_channel()
    for chunk in await read_until_pause(source.save_channel()):
        await sink.write(b"".join(chunk))
    with pytest.raises(TransitionError, match="RESUMING -> STOP failed") as info:
        await dest.set_state(S.RUNNING)
    cause = info.value.__cause__
    assert isinstance(cause, StateValidationError)
    assert str(cause).startswith("dst: ")
    assert "corrupt" in str(cause)
    assert (info.value.state, dest.state) == (S.ERROR, S.ERROR)
    with pytest.raises(ChannelClosedError, match=r"dst: .*ERROR"):
        await sink.write(b"x")
    await dest.reset()
    assert dest.state == S.RUNNING
    await source.set_state(S.RUNNING)

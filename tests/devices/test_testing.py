"""The test helpers: the trace recorder and the in-process copy."""

from __future__ import annotations

import pytest

from devices.fsm import State
from devices.simulated import SimulatedDevice
from devices.testing import ArcTrace, ManualClock, copy_device, opened

S = State


def device(name: str) -> SimulatedDevice:
    """A small simulated device."""
    return SimulatedDevice(name, state_size=64 << 10, chunk_size=16 << 10)


async def test_trace_records_every_device_in_one_order() -> None:
    """ArcTrace keeps the state changes of several devices in the order they happened."""
    clock = ManualClock()
    trace = ArcTrace(clock)
    a, b = device("a"), device("b")
    trace.watch(a, b)
    await a.set_state(S.RUNNING_P2P)
    clock.advance(1.0)
    await b.set_state(S.STOP)
    await a.set_state(S.RUNNING)
    assert trace.steps() == [
        ("a", S.RUNNING_P2P), ("b", S.RUNNING_P2P), ("b", S.STOP), ("a", S.RUNNING),
    ]  # fmt: skip
    assert trace.arcs("a") == [(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING)]
    assert [e.time for e in trace.entries] == [0.0, 1.0, 1.0, 1.0]


async def test_copy_of_an_idle_device_switches_once_the_initial_data_is_read() -> None:
    """An idle source converges as soon as its initial data is read; STOP_COPY adds the end."""
    source, dest = device("src"), device("dst")
    report = await copy_device(source, dest)
    assert report.converged
    assert report.passes == 0
    assert report.precopy_bytes > 64 << 10
    assert 0 < report.stop_copy_bytes < 64
    assert (source.state, dest.state) == (S.STOP_COPY, S.STOP)


async def test_opened_closes_devices_on_error() -> None:
    """opened() closes what it opened even when the block raises."""
    source = SimulatedDevice("src", state_size=4096, dirty_rate=1.0)

    async def fail_while_open() -> None:
        async with opened(source):
            assert source._timer is not None
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_while_open()
    assert source._timer is None

"""Moving many devices at once: models inline in the caller's task, blocking devices
overlapped; and a switchover whose tasks and log events do not grow with its devices."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import structlog

from devices.errors import ArcFailed, TransitionError
from devices.fsm import State
from devices.paged import Faults
from devices.simulated import SimulatedDevice
from orchestrator.engine import fanout
from orchestrator.engine.stats import Status
from tests.orchestrator.conftest import Spec


@contextmanager
def counting_tasks() -> Iterator[list[str]]:
    """Record the name of every task the running loop creates inside the block."""
    loop = asyncio.get_running_loop()
    created: list[str] = []
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        yield created
    finally:
        loop.set_task_factory(previous)


class Blocking:
    """A device whose state change waits (as a VFIO arc in its thread pool does)."""

    def __init__(self, name: str, release: asyncio.Event, fail: bool = False) -> None:
        self.name = name
        self.release = release
        self.fail = fail
        self.started = asyncio.Event()

    async def set_state(self, target: State) -> None:
        self.started.set()
        await self.release.wait()
        if self.fail:
            raise ArcFailed(self.name, "injected")


def models(count: int) -> list[SimulatedDevice]:
    return [SimulatedDevice(f"sim{i}", state_size=64 << 10) for i in range(count)]


async def test_models_move_without_a_task_each() -> None:
    """Sixteen models reach the target state and the loop starts no task for them."""
    devices = models(16)
    with counting_tasks() as created:
        answers = await fanout.each(devices, lambda d: d.set_state(State.STOP))
    assert answers == [None] * 16
    assert created == []
    assert all(d.state == State.STOP for d in devices)


async def test_only_a_set_of_models_never_waits() -> None:
    """A set of models moves without yielding to the loop; one blocking device spoils it."""
    devices = models(2)
    assert fanout.never_waits(devices)
    assert not fanout.never_waits([*devices, Blocking("vfio0", asyncio.Event())])


async def test_a_failing_model_leaves_the_others_moving() -> None:
    """A model whose arc fails answers with its error; the ones after it still move."""
    devices = models(3)
    devices[1].faults = Faults(fail_arcs=frozenset({(State.RUNNING, State.RUNNING_P2P)}))
    answers = await fanout.each(devices, lambda d: d.set_state(State.STOP))
    assert answers[0] is None
    assert answers[2] is None
    assert isinstance(answers[1], TransitionError)
    assert [d.state for d in devices] == [State.STOP, State.RUNNING, State.STOP]


async def test_blocking_devices_overlap_and_answer_in_order() -> None:
    """Devices whose change waits each get a task: all start before any ends, and the
    answers (one a failure) come in the devices' order, with the models' in between."""
    release = asyncio.Event()
    slow = [Blocking("vfio0", release), Blocking("vfio1", release, fail=True)]
    mixed: list[Any] = [slow[0], *models(2), slow[1]]

    async def step(device: Any) -> str:
        await device.set_state(State.STOP)
        return str(device.name)

    with counting_tasks() as created:
        moving = asyncio.ensure_future(fanout.each(mixed, step))
        await asyncio.wait_for(asyncio.gather(*(d.started.wait() for d in slow)), 5)
        assert not moving.done()
        release.set()
        answers = await moving
    assert answers[:3] == ["vfio0", "sim0", "sim1"]
    assert isinstance(answers[3], ArcFailed)
    steps = [name for name in created if name.endswith(".step")]
    assert len(steps) == 2  # one per blocking device, none per model


async def test_a_cancel_reaches_the_blocking_devices() -> None:
    """Cancelling the caller cancels the blocking devices' tasks too."""
    release = asyncio.Event()
    slow = [Blocking("vfio0", release)]
    moving = asyncio.ensure_future(fanout.each(slow, lambda d: d.set_state(State.STOP)))
    await asyncio.wait_for(slow[0].started.wait(), 5)
    moving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await moving


async def test_move_walks_models_with_plain_calls_and_times_each() -> None:
    """``move`` takes each model to its own target without a task or a coroutine per
    device, and answers with when each one's change started and ended, in order."""
    devices = models(3)
    await devices[0].set_state(State.PRE_COPY)
    walked: list[str] = []
    for device in devices:
        device.add_state_listener(lambda d, old, new: walked.append(d.name))
    with counting_tasks() as created:
        spans = await fanout.move(
            devices, lambda d: State.PRE_COPY_P2P if d.state == State.PRE_COPY else State.STOP
        )
    assert created == []
    assert [d.state for d in devices] == [State.PRE_COPY_P2P, State.STOP, State.STOP]
    assert walked == ["sim0", "sim1", "sim1", "sim2", "sim2"]  # one device after the other
    times = [t for span in spans for t in span]  # type: ignore[union-attr]
    assert times == sorted(times)  # each device's start and end, one after the other


async def test_move_answers_a_failing_model_with_its_error() -> None:
    """A model whose walk fails answers with its TransitionError; the others still move."""
    devices = models(3)
    devices[1].faults = Faults(fail_arcs=frozenset({(State.RUNNING, State.RUNNING_P2P)}))
    answers = await fanout.move(devices, State.STOP)
    assert isinstance(answers[1], TransitionError)
    assert [d.state for d in devices] == [State.STOP, State.RUNNING, State.STOP]


async def test_a_model_whose_change_waits_gets_a_task() -> None:
    """A model class that overrides ``set_state`` to wait is not walked by plain calls:
    ``move`` honours its override, and a set holding it may yield to the loop."""
    release = asyncio.Event()

    class Waiting(SimulatedDevice):
        async def set_state(self, target: State) -> None:
            await release.wait()
            await super().set_state(target)

    slow = Waiting("slow", state_size=64 << 10)
    devices = [*models(2), slow]
    assert not fanout.never_waits(devices)
    moving = asyncio.ensure_future(fanout.move(devices, State.STOP))
    await asyncio.sleep(0)
    assert not moving.done()
    assert slow.state == State.RUNNING
    release.set()
    answers = await moving
    assert not [a for a in answers if isinstance(a, BaseException)]
    assert [d.state for d in devices] == [State.STOP] * 3


class Tally:
    """Tasks created and log events emitted so far, read at every state change of the
    devices it watches: what a stretch of the switchover cost, by counting."""

    def __init__(self, created: list[str], logs: list[Any]) -> None:
        self.created = created
        self.logs = logs
        self.marks: list[tuple[State, State, int, int]] = []

    def watch(self, *devices: SimulatedDevice) -> None:
        for device in devices:
            device.add_state_listener(self._mark)

    def _mark(self, device: Any, old: State, new: State) -> None:
        self.marks.append((old, new, len(self.created), len(self.logs)))

    def between(self, first: tuple[State, State], last: tuple[State, State]) -> tuple[int, int]:
        """(tasks, log events) from the first ``first`` arc to the last ``last`` arc."""
        start = next(m for m in self.marks if m[:2] == first)
        end = [m for m in self.marks if m[:2] == last][-1]
        return end[2] - start[2], end[3] - start[3]


async def switchover_costs(make_ends: Any, count: int) -> list[tuple[int, int]]:
    """Tasks and log events of the source's quiesce and stop, and of the destination's
    load and resume, in a migration of ``count`` simulated devices."""
    ends = await make_ends([Spec(f"sim{i}", seed=i + 1, size=256 << 10) for i in range(count)])
    with counting_tasks() as created, structlog.testing.capture_logs() as logs:
        source, target = Tally(created, logs), Tally(created, logs)
        source.watch(*ends.sources)
        target.watch(*ends.targets)
        stats = await ends.migration(downtime_limit_ms=300).run()
    assert stats.status == Status.COMPLETED
    return [
        source.between((State.PRE_COPY, State.PRE_COPY_P2P), (State.PRE_COPY_P2P, State.STOP_COPY)),
        target.between((State.RESUMING, State.STOP), (State.RUNNING_P2P, State.RUNNING)),
    ]


async def test_switchover_costs_no_task_or_log_event_per_device(make_ends: Any) -> None:
    """Eight devices' quiesce, stop, load and resume start no more tasks and log no more
    events than one device's."""
    one = await switchover_costs(make_ends, 1)
    eight = await switchover_costs(make_ends, 8)
    assert eight == one, (one, eight)

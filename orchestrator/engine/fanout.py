"""One step on many devices at once, at a cost that does not grow by a task per device.

A switchover moves every device through the same arcs (quiesce and stop on the source,
load and resume on the destination) and waits for all of them, inside the downtime
window. Devices come in two kinds here:

* Models (:class:`devices.base.ArcDevice`): their arc handlers are plain calls, so a
  state change never waits. They move one after another in the caller's task: a task
  and a gather slot per model cost about as much as its arc (64 models, measured: 7.7
  us a device and arc through gather, 5.2 inline, 2.5 inline now that an arc logs
  nothing). ``move`` goes further and walks them with plain calls, no coroutine per
  device, and leaves the bookkeeping (marks) to the caller, after the arcs.
* Every other device (VFIO, whose arcs block in the kernel and run in a thread pool;
  vfio-user, whose arcs are messages to a server) gets a task of its own, so the N
  devices' arcs overlap as before.

Mixed sets start the tasks first and run the models while they go (the tasks take
their first step once the models are done). A model that did wait would only be
serialised, never broken.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar, cast

from devices.base import ArcDevice, MigratableDevice
from devices.fsm import State

D = TypeVar("D", bound=MigratableDevice)
T = TypeVar("T")


#: When one device's state change started and ended (``time.monotonic``): a plain
#: tuple, since a NamedTuple's construction costs 0.35 us a device.
Span = tuple[float, float]


async def each(devices: Sequence[D], step: Callable[[D], Awaitable[T]]) -> list[T | BaseException]:
    """Run ``step(device)`` for every device together; each one's result or exception.

    Like ``gather(..., return_exceptions=True)``: every device takes its step whatever
    the others do, and the answers come in the order of ``devices``.
    """
    inline = [_inline(type(d)) for d in devices]
    overlapped = [i for i, model in enumerate(inline) if not model]
    tasks = asyncio.gather(*(step(devices[i]) for i in overlapped), return_exceptions=True)
    answers: list[T | BaseException] = []
    try:
        for device, model in zip(devices, inline, strict=True):
            if model:
                try:
                    answers.append(await step(device))
                except Exception as exc:
                    answers.append(exc)
        if overlapped:
            waited = await tasks
            for index, answer in zip(overlapped, waited, strict=True):
                answers.insert(index, answer)
    except BaseException:
        tasks.cancel()  # only a cancel or an interpreter exit gets here
        raise
    return answers


async def move(
    devices: Sequence[D], target: State | Callable[[D], State], *, models: bool | None = None
) -> list[Span | BaseException]:
    """Every device to ``target`` (a state, or each device's own) together, as ``each``
    does; each one's span or exception, in the order of ``devices``. ``models``: whether
    ``never_waits(devices)``, when the caller knows it (a check of every device)."""
    if never_waits(devices) if models is None else models:
        return list(walk(devices, target))
    goal = (lambda _: target) if isinstance(target, State) else target

    async def overlapped(device: D) -> Span:
        started = time.monotonic()
        await device.set_state(goal(device))
        return started, time.monotonic()

    return await each(devices, overlapped)


def walk(models: Sequence[D], target: State | Callable[[D], State]) -> list[Span | Exception]:
    """``move`` for a set of models (``never_waits``), by plain calls one after another:
    nothing else runs in between, and a caller that knows its set saves the check."""
    goals = [target] * len(models) if isinstance(target, State) else list(map(target, models))
    now = time.monotonic
    answers: list[Span | Exception] = []
    for device, goal in zip(models, goals, strict=True):
        started = now()
        try:
            cast(ArcDevice, device).set_state_now(goal)
        except Exception as exc:
            answers.append(exc)
        else:
            answers.append((started, now()))
    return answers


def never_waits(devices: Sequence[MigratableDevice]) -> bool:
    """Whether ``each`` over ``devices`` completes without yielding to the loop (all
    models): then no cancel can come between two of their arcs."""
    return all(_inline(type(d)) for d in devices)


@functools.lru_cache(maxsize=64)
def _inline(kind: type) -> bool:
    """Whether devices of class ``kind`` are models (see the module's docstring): an
    ArcDevice that keeps its plain-call walk. Cached, since an ABC's isinstance costs
    0.2 us a device."""
    return issubclass(kind, ArcDevice) and kind.set_state is ArcDevice.set_state

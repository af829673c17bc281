"""One step on many devices at once, at a cost that does not grow by a task per device.

A switchover moves every device through the same arcs (quiesce and stop on the source,
load and resume on the destination) and waits for all of them, inside the downtime
window. Devices come in two kinds here:

* Models (:class:`devices.base.ArcDevice`): their arc handlers are plain calls, so a
  state change never waits. They move one after another in the caller's task: a task
  and a gather slot per model cost more than its arc (64 models: a task each added
  about 3 us per device and arc, twice that in a loaded loop's scheduling).
* Every other device (VFIO, whose arcs block in the kernel and run in a thread pool;
  vfio-user, whose arcs are messages to a server) gets a task of its own, so the N
  devices' arcs overlap as before.

Mixed sets start the tasks first and run the models while they go. A model that did
wait would only be serialised, never broken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from devices.base import ArcDevice, MigratableDevice

D = TypeVar("D", bound=MigratableDevice)
T = TypeVar("T")


async def each(devices: Sequence[D], step: Callable[[D], Awaitable[T]]) -> list[T | BaseException]:
    """Run ``step(device)`` for every device together; each one's result or exception.

    Like ``gather(..., return_exceptions=True)``: every device takes its step whatever
    the others do, and the answers come in the order of ``devices``.
    """
    answers: dict[int, T | BaseException] = {}
    inline = [isinstance(d, ArcDevice) for d in devices]
    overlapped = [i for i, model in enumerate(inline) if not model]
    tasks = asyncio.gather(*(step(devices[i]) for i in overlapped), return_exceptions=True)
    try:
        for index, device in enumerate(devices):
            if inline[index]:
                try:
                    answers[index] = await step(device)
                except Exception as exc:
                    answers[index] = exc
        answers.update(zip(overlapped, await tasks, strict=True))
    except BaseException:
        tasks.cancel()  # only a cancel or an interpreter exit gets here
        raise
    return [answers[i] for i in range(len(devices))]

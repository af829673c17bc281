"""Helpers for tests of devices and of what drives them (the orchestrator's tests too).

- :class:`ArcTrace` records every state change of many devices in one global order.
- :class:`ManualClock` is a workload clock that moves only when told to.
- :func:`opened` opens devices for the length of a ``with`` block.
- :func:`copy_device` moves a device's state into another in-process, pre-copy and
  stop-copy, the way the orchestrator does over a socket.
- :func:`read_until_pause` reads a saving channel to its temporary end of stream.
- :func:`run_pending` lets every ready task and callback run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NamedTuple

from devices.base import Chunk, MigratableDevice, ResumeChannel, SaveChannel
from devices.errors import Unsupported
from devices.fsm import Feature, State


class TraceEntry(NamedTuple):
    """One state change: when, of which device, from where to where."""

    time: float
    device: str
    old: State
    new: State


class ArcTrace:
    """Records the state changes of the devices it watches, in the order they happened."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.entries: list[TraceEntry] = []
        self._clock = clock

    def watch(self, *devices: MigratableDevice) -> None:
        """Record every later state change of ``devices``."""
        for device in devices:
            device.add_state_listener(self._record)

    def _record(self, device: MigratableDevice, old: State, new: State) -> None:
        self.entries.append(TraceEntry(self._clock(), device.name, old, new))

    def arcs(self, device: str | None = None) -> list[tuple[State, State]]:
        """The arcs taken, of one device or of all of them, in order."""
        return [(e.old, e.new) for e in self.entries if device in (None, e.device)]

    def steps(self) -> list[tuple[str, State]]:
        """``(device, new state)`` for every change, in the global order."""
        return [(e.device, e.new) for e in self.entries]


class ManualClock:
    """A clock for a device's workload that advances only by ``advance``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


@asynccontextmanager
async def opened(*devices: MigratableDevice) -> AsyncIterator[None]:
    """Open ``devices`` for the block and close them after it, whatever happens."""
    done: list[MigratableDevice] = []
    try:
        for device in devices:
            await device.open()
            done.append(device)
        yield
    finally:
        for device in reversed(done):
            await device.close()


async def run_pending() -> None:
    """Let every task and callback that is ready run before going on (a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def read_until_pause(channel: SaveChannel) -> list[Chunk]:
    """Read until the temporary end of stream (PRE_COPY) or the permanent end (STOP_COPY)."""
    chunks = []
    while chunk := await channel.read():
        chunks.append(chunk)
    return chunks


@dataclass
class CopyReport:
    """What an in-process copy moved."""

    #: Bytes read in the PRE_COPY states.
    precopy_bytes: int = 0
    #: Bytes read in STOP_COPY (what the downtime would have to carry).
    stop_copy_bytes: int = 0
    #: Times the pre-copy stream reached its temporary end.
    passes: int = 0
    #: Whether pre-copy ended because the remaining dirty bytes fit, not by force.
    converged: bool = False


async def _forward(chunk: Chunk, sink: ResumeChannel) -> int:
    # One write per chunk, joined, as a transport delivers one payload per chunk.
    payload = b"".join(chunk)
    await sink.write(payload)
    await asyncio.sleep(0)  # let the loop run (the workload among others), as I/O would
    return len(payload)


async def copy_device(
    source: MigratableDevice,
    dest: MigratableDevice,
    *,
    switchover_bytes: int = 0,
    min_passes: int = 0,
    max_passes: int = 1000,
) -> CopyReport:
    """Copy ``source``'s state into ``dest`` in-process; leave them in STOP_COPY and STOP.

    Pre-copy (when the source has the feature) runs until the initial data is read, at
    least ``min_passes`` temporary ends of stream were reached, and the dirty bytes fit
    ``switchover_bytes``; after ``max_passes`` it switches over anyway. A pass that ends
    short of ``min_passes`` waits for the source to dirty something, so ``min_passes``
    needs a source whose workload runs. A source without precopy info counts as caught
    up when its stream last said "nothing now". ``dest`` validates the stream on RESUMING -> STOP;
    its errors propagate as the device raised them.
    """
    report = CopyReport()
    await dest.set_state(State.RESUMING)
    sink = dest.resume_channel()
    if Feature.PRE_COPY in source.features:
        await source.set_state(State.PRE_COPY)
        channel = source.save_channel()
        paused = False
        while report.passes < max_passes:
            try:
                info = source.precopy_info()
                caught_up = info.initial_bytes == 0 and info.dirty_bytes <= switchover_bytes
            except Unsupported:
                caught_up = paused  # no figures: the stream said "nothing now"
            if caught_up and report.passes >= min_passes:
                report.converged = True
                break
            chunk = await channel.read()
            paused = chunk is None
            if chunk is None:
                report.passes += 1
                if report.passes < min_passes:
                    await channel.wait_readable()
                continue
            report.precopy_bytes += await _forward(chunk, sink)
    await source.set_state(State.STOP_COPY)
    channel = source.save_channel()
    while (chunk := await channel.read()) != ():
        if chunk is None:  # not in STOP_COPY by the contract; wait rather than spin
            await channel.wait_readable()
            continue
        report.stop_copy_bytes += await _forward(chunk, sink)
    await dest.set_state(State.STOP)
    return report

"""What the kernel saw: mtty's states read back through the uAPI while livemig runs.

:class:`KernelView` stands in for ``devices.vfio.uapi.ioctl`` (the ioctl boundary): it
passes every call to the kernel and, after every SET|MIG_DEVICE_STATE on a watched
device (failed or not), reads every watched device's state with GET|MIG_DEVICE_STATE
and records the snapshot. Only SETs change a device's state, so the snapshots show
every state each device was in, as the driver reports it; SETs of different devices
run in different threads, and a lock orders the snapshots. It also records each SET's
interval (for the arcs-overlap figures) and can make chosen SETs fail (fault
injection at the boundary, the driver untouched).

:func:`migrate` runs one in-process migration over loopback (source and destination
in this process) and returns what happened.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import transport
from devices import vfio
from devices.fsm import State
from devices.vfio import VfioDevice
from orchestrator.engine.destination import DestinationMigration
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.source import SourceMigration
from orchestrator.engine.stats import MigrationStats
from tests.orchestrator.conftest import VerdictGate

_SET = vfio.VFIO_DEVICE_FEATURE_SET | vfio.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
_GET = vfio.VFIO_DEVICE_FEATURE_GET | vfio.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
#: Running with P2P DMA initiated (the running group minus its P2P states).
FULLY_RUNNING = frozenset({State.RUNNING, State.PRE_COPY})
#: Stopped: P2P DMA to such a device may fail (the uAPI's STOP semantics).
STOPPED = frozenset({State.STOP, State.STOP_COPY, State.RESUMING})
QUIESCED = frozenset({State.RUNNING_P2P, State.PRE_COPY_P2P})


@dataclass(frozen=True)
class SetCall:
    """One SET|MIG_DEVICE_STATE as the worker thread saw it."""

    device: str
    target: State
    started: float
    ended: float
    errno: int | None


@dataclass
class KernelView:
    """Snapshots of the watched devices' kernel states, one after every SET."""

    devices: dict[int, str] = field(default_factory=dict)
    snapshots: list[dict[str, State]] = field(default_factory=list)
    sets: list[SetCall] = field(default_factory=list)
    #: (device, target) -> errno: that SET fails once, before reaching the kernel.
    fail_once: dict[tuple[str, State], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _real: Callable[..., int] = field(default_factory=lambda: vfio.uapi.ioctl)

    def watch(self, label: str, device: VfioDevice) -> None:
        """Snapshot ``device`` from now on, under ``label`` (both ends share names)."""
        self.devices[device.fds.device] = label

    @contextmanager
    def installed(self) -> Iterator[KernelView]:
        """Stand between devices.vfio and the kernel for the block."""
        vfio.uapi.ioctl = self.ioctl
        try:
            yield self
        finally:
            vfio.uapi.ioctl = self._real

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        """The ioctl boundary: pass through, snapshot after every watched SET."""
        name = self.devices.get(fd)
        if name is None or request != vfio.VFIO_DEVICE_FEATURE or not isinstance(arg, bytearray):
            return self._real(fd, request, arg)
        if vfio.FEATURE_HEADER.unpack_from(arg)[1] != _SET:
            return self._real(fd, request, arg)
        target = State(vfio.MIG_STATE_PAYLOAD.unpack_from(arg, vfio.FEATURE_HEADER.size)[0])
        started = time.monotonic()
        code: int | None = None
        try:
            injected = self.fail_once.pop((name, target), None)
            if injected is not None:
                raise OSError(injected, f"injected: {os.strerror(injected)}")
            return self._real(fd, request, arg)
        except OSError as exc:
            code = exc.errno
            raise
        finally:
            ended = time.monotonic()
            with self._lock:
                self.sets.append(SetCall(name, target, started, ended, code))
                self.snapshots.append({n: self._get(f) for f, n in self.devices.items()})

    def _get(self, fd: int) -> State:
        request = vfio.feature_request(_GET, payload_size=vfio.MIG_STATE_PAYLOAD.size)
        try:
            self._real(fd, vfio.VFIO_DEVICE_FEATURE, request)
        except OSError:
            return State.ERROR
        return State(vfio.MIG_STATE_PAYLOAD.unpack_from(request, vfio.FEATURE_HEADER.size)[0])

    def history(self, device: str) -> list[State]:
        """The states one device was seen in, repeats folded."""
        seen: list[State] = []
        for snapshot in self.snapshots:
            state = snapshot[device]
            if not seen or seen[-1] != state:
                seen.append(state)
        return seen


def p2p_violations(view: KernelView, group: Sequence[str], start: int = 0) -> list[dict[str, str]]:
    """Snapshots (from index ``start``) where one of ``group`` ran fully, another stopped.

    Forward (every device quiesced before any stops) and backward (every device back
    in RUNNING_P2P before any runs fully) are the same rule seen in one snapshot: a
    device that can initiate P2P DMA never runs next to a stopped peer.
    """
    bad = []
    for snapshot in view.snapshots[start:]:
        states = [snapshot[name] for name in group]
        if any(s in FULLY_RUNNING for s in states) and any(s in STOPPED for s in states):
            bad.append({name: snapshot[name].name for name in group})
    return bad


def first(view: KernelView, group: Sequence[str], states: frozenset[State]) -> int:
    """Index of the first snapshot where every device of ``group`` is in ``states``."""
    for index, snapshot in enumerate(view.snapshots):
        if all(snapshot[name] in states for name in group):
            return index
    return len(view.snapshots)


def concurrency(calls: Sequence[SetCall]) -> int:
    """The most SETs in the kernel at the same moment."""
    events = sorted([(c.started, 1) for c in calls] + [(c.ended, -1) for c in calls])
    most = inside = 0
    for _, step in events:
        inside += step
        most = max(most, inside)
    return most


def passes_through_p2p(history: Sequence[State]) -> bool:
    """Whether every move between fully running and stopped stopped at a P2P state."""
    moves = [s for s in history if s in FULLY_RUNNING | STOPPED | QUIESCED]
    for before, after in itertools.pairwise(moves):
        crossing = {before, after}
        if crossing & FULLY_RUNNING and crossing & STOPPED:
            return False
    return True


@dataclass
class Outcome:
    """What one in-process migration did."""

    stats: MigrationStats
    error: BaseException | None
    destination_ok: list[bool]


async def migrate(
    sources: Sequence[VfioDevice],
    targets: Mapping[str, VfioDevice],
    params: MigrationParams,
    *,
    hold_loaded: bool = False,
    cancel_at_hold: bool = False,
) -> Outcome:
    """Migrate ``sources`` into ``targets`` over loopback TCP in this process.

    ``hold_loaded`` holds the destination's "loaded" verdict; ``cancel_at_hold`` then
    cancels the migration while it is held (every source device is in STOP_COPY).
    """
    results: list[bool] = []
    gates: list[VerdictGate] = []
    gate_made, destination_done = asyncio.Event(), asyncio.Event()

    async def accept(session: transport.Session) -> None:
        try:
            if hold_loaded:
                gate = VerdictGate(session, "loaded")
                gates.append(gate)
                gate_made.set()
                session = gate  # type: ignore[assignment]
            results.append(await DestinationMigration(session, targets).run())
        finally:
            destination_done.set()

    auth = transport.AuthConfig()
    server = await transport.serve("127.0.0.1:0", accept, name="guest-dst", auth=auth)
    migration = SourceMigration(sources, server.address, params, auth=auth)
    error: BaseException | None = None
    try:
        run = asyncio.create_task(migration.run())
        if cancel_at_hold:
            await gate_made.wait()
            await gates[0].blocked.wait()
            migration.cancel("cancel during the switchover")
            gates[0].open.set()
        try:
            await run
        except Exception as exc:  # the outcome is what the test looks at
            error = exc
        await asyncio.wait_for(destination_done.wait(), 60)
    finally:
        server.close()
        await server.wait_closed()
    return Outcome(migration.stats, error, results)

"""Where a migration is: one phase machine for both ends.

Each end (SourceMigration, DestinationMigration) owns a :class:`PhaseMachine`. Its
phase has one writer, :meth:`PhaseMachine.set`, which logs the change and wakes whoever
waits for it; an operation that needs certain phases calls :meth:`PhaseMachine.require`,
which raises :class:`PhaseError` naming the current and the required phases. The
source's QEMU-style status (``query-migrate``) is derived from its phase
(:data:`STATUS_OF`), never written separately.
"""

from __future__ import annotations

import asyncio
import enum
import gc
from collections.abc import Callable
from typing import Any

from orchestrator.engine.stats import Status


class Phase(enum.Enum):
    """A migration's phase, in the order a completed one goes through them."""

    #: Created; ``run()`` not called yet.
    NEW = "new"
    #: Connecting and agreeing on the devices (source: devices entering PRE_COPY too).
    SETUP = "setup"
    #: Pre-copy: the devices run on the source while their state streams across.
    PRECOPY = "precopy"
    #: Source only: pre-copy done, waiting for ``continue_switchover()``.
    PAUSED = "paused"
    #: Devices stopped, the rest of their state drained and loaded; still reversible.
    SWITCHOVER = "switchover"
    #: COMMIT sent (source) or received (destination): the destination may run the
    #: devices, the source must not, and nothing rolls back any more.
    COMMITTED = "committed"
    #: Every device runs on the destination.
    COMPLETED = "completed"
    #: Ended with an error; before COMMIT the source devices run again.
    FAILED = "failed"
    #: Cancelled by the user, a signal or the peer before COMMIT; rolled back.
    CANCELLED = "cancelled"


#: The phases a migration ends in.
FINAL_PHASES = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED})
#: The phases in which a failure or a cancel still rolls the source back.
REVERSIBLE_PHASES = frozenset(
    {Phase.NEW, Phase.SETUP, Phase.PRECOPY, Phase.PAUSED, Phase.SWITCHOVER}
)
#: The source's status (QEMU's names) in each phase.
STATUS_OF = {
    Phase.NEW: Status.SETUP,
    Phase.SETUP: Status.SETUP,
    Phase.PRECOPY: Status.ACTIVE,
    Phase.PAUSED: Status.PRE_SWITCHOVER,
    Phase.SWITCHOVER: Status.DEVICE,
    Phase.COMMITTED: Status.DEVICE,
    Phase.COMPLETED: Status.COMPLETED,
    Phase.FAILED: Status.FAILED,
    Phase.CANCELLED: Status.CANCELLED,
}


class PhaseError(Exception):
    """An operation asked for in a phase that does not allow it."""

    def __init__(self, action: str, current: Phase, required: frozenset[Phase]) -> None:
        self.action = action
        self.current = current
        self.required = required
        names = ", ".join(p.value for p in Phase if p in required)
        super().__init__(f"cannot {action}: the migration is {current.value}, not one of {names}")


class PhaseMachine:
    """One migration's phase: one writer that logs and wakes waiters, and a guard."""

    def __init__(self, log: Any, on_change: Callable[[Phase, Phase], None] | None = None) -> None:
        self.phase = Phase.NEW
        #: Every phase entered, in order (NEW first).
        self.history = [Phase.NEW]
        self._log = log
        self._on_change = on_change
        self._changed = asyncio.Event()
        #: While the downtime window is open: what waits for ``announce``, in order.
        self._held: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = None

    def set(self, phase: Phase, *, in_window: bool = False) -> None:
        """Enter ``phase``: log it, tell the owner, wake the waiters.

        ``in_window``: the change takes effect now (phase, history, waiters) but its log
        line and the owner's listeners (events, metrics) wait for ``announce``, after the
        downtime window: they cost a tenth of a millisecond each, all of it downtime.
        Without it, whatever the window held is announced first.
        """
        old, self.phase = self.phase, phase
        self.history.append(phase)
        if in_window:
            self.hold()
            self.later(self._tell, (old, phase))
        else:
            self.announce()
            self._tell(old, phase)
        self._changed.set()
        self._changed = asyncio.Event()

    def hold(self) -> None:
        """The downtime window is open: from now on ``later`` defers until ``announce``,
        and the cyclic garbage collector waits (see :class:`_CollectorPause`)."""
        if self._held is None:
            self._held = []
            _COLLECTOR.pause()

    def later(self, report: Callable[..., None], args: tuple[Any, ...] = ()) -> None:
        """Call ``report(*args)`` now, or at ``announce`` while the downtime window is open.

        For what only reports (logs, events to control clients): inside the window it
        would be downtime, per device and state change. The arguments are kept as they
        are, not bound into a partial: that alone was a third of a report's cost.
        """
        if self._held is None:
            report(*args)
        else:
            self._held.append((report, args))

    def announce(self) -> None:
        """Close the window: make the reports it held, in order.

        A report that fails is logged and the others are still made: announce runs
        right after COMMIT, where an observer's bug must not reach the migration.
        """
        held, self._held = self._held, None
        if held is None:
            return
        _COLLECTOR.resume()
        for report, args in held:
            try:
                report(*args)
            except Exception:
                self._log.exception("held_report_failed", report=repr(report))

    def _tell(self, old: Phase, phase: Phase) -> None:
        self._log.info("phase_changed", phase=phase.value, previous=old.value)
        if self._on_change is not None:
            self._on_change(old, phase)

    def require(self, action: str, phases: frozenset[Phase]) -> None:
        """PhaseError naming the current and the required phases, unless in one of them."""
        if self.phase not in phases:
            raise PhaseError(action, self.phase, phases)

    async def wait(self, *phases: Phase) -> Phase:
        """Return once the migration is in one of ``phases`` (now or later)."""
        while self.phase not in phases:
            await self._changed.wait()
        return self.phase


class _CollectorPause:
    """The cyclic garbage collector off while a downtime window of this process is open.

    A collection is due whenever enough objects were allocated, wherever that is: a
    daemon's older generations hold ~35k objects, and one collection of them took
    1.5 ms of a 1-device switchover's 0.2 ms quiesce, landing there or not by the
    allocation count alone. A window lasts milliseconds (bounded by max_stop_ms) and
    every migration ends with a phase change that closes it; the daemon also collects
    in full after each migration, so memory stays bounded even if one never closed.
    """

    def __init__(self) -> None:
        self.open = 0
        self.paused = False

    def pause(self) -> None:
        """One more window is open; the first turns the collector off if it was on."""
        self.open += 1
        if self.open == 1 and gc.isenabled():
            gc.disable()
            self.paused = True

    def resume(self) -> None:
        """One window closed; the last turns the collector back on if it turned it off."""
        self.open -= 1
        if self.open == 0 and self.paused:
            gc.enable()
            self.paused = False


_COLLECTOR = _CollectorPause()


async def wait_out(task: asyncio.Future[Any]) -> bool:
    """Wait until ``task`` is done, through cancels of our own; whether one came.

    For the ends of a migration (a rollback, a give-up): cut short they would leave
    devices stopped and the downtime window open; the caller re-raises the cancel after.
    """
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


class Phased:
    """A migration end with a phase machine (``_phases``): what it shows of it."""

    _phases: PhaseMachine

    @property
    def phase(self) -> Phase:
        """Where the migration is."""
        return self._phases.phase

    @property
    def phases(self) -> list[Phase]:
        """Every phase entered so far, in order."""
        return list(self._phases.history)

    async def wait_phase(self, *phases: Phase) -> Phase:
        """Return once the migration is in one of ``phases``."""
        return await self._phases.wait(*phases)

    def _set_phase(self, phase: Phase) -> None:
        """The one writer of the phase."""
        self._phases.set(phase)

    def after_window(self, report: Callable[..., None], args: tuple[Any, ...] = ()) -> None:
        """Call ``report(*args)`` now, or once the downtime window closed if it is open.

        For observers of the devices (the daemon's DEVICE_STATE events): the switchover
        changes every device's state inside the window, and a report made there would
        add to the downtime once per device and change.
        """
        self._phases.later(report, args)

"""The phase machine: the exact phases a migration goes through at both ends.

Completed, cancelled, rolled back in the switchover, and lost after COMMIT (the link
cut by the fault proxy): each end's phase history, in order, and the state guard.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import structlog

from devices.fsm import State
from orchestrator.engine.errors import MigrationCancelled, MigrationError, OutcomeUnknown
from orchestrator.engine.phases import Phase, PhaseError, PhaseMachine
from orchestrator.engine.stats import Status
from tests.orchestrator.conftest import Spec

N, S, P, PA, SW, C = (
    Phase.NEW,
    Phase.SETUP,
    Phase.PRECOPY,
    Phase.PAUSED,
    Phase.SWITCHOVER,
    Phase.COMMITTED,
)


def sims(count: int) -> list[Spec]:
    """``count`` small simulated devices with distinct seeds."""
    return [Spec(f"sim{i}", seed=i + 1) for i in range(count)]


async def test_a_completed_migration_goes_through_every_phase_once(make_ends) -> None:
    """Source and destination: setup, pre-copy, switchover, committed, completed."""
    ends = await make_ends(sims(2))
    migration = ends.migration()
    stats = await migration.run()
    assert stats.status == Status.COMPLETED
    assert migration.phases == [N, S, P, SW, C, Phase.COMPLETED]
    assert ends.incoming[0].phases == [N, S, P, SW, C, Phase.COMPLETED]
    await ends.assert_migrated()


async def test_a_cancelled_migration_ends_cancelled_at_both_ends(make_ends) -> None:
    """A cancel in the pause before the switchover: both ends end CANCELLED, rolled back."""
    ends = await make_ends(sims(2))
    migration = ends.migration(pause_before_switchover=True)
    run = asyncio.create_task(migration.run())
    await migration.wait_phase(PA)
    migration.cancel("the test cancels")
    with pytest.raises(MigrationCancelled):
        await run
    assert migration.phases == [N, S, P, PA, Phase.CANCELLED]
    assert migration.stats.status == Status.CANCELLED
    await ends.assert_source_intact()
    async with asyncio.timeout(10):
        await ends.incoming[0].wait_phase(Phase.CANCELLED, Phase.FAILED)
    assert ends.incoming[0].phases == [N, S, P, Phase.CANCELLED]


async def test_a_switchover_rolled_back_never_commits(make_ends) -> None:
    """No verdict in time: the source fails from SWITCHOVER, its devices run again."""
    ends = await make_ends(sims(1), hold_verdicts=True)
    migration = ends.migration(verdict_timeout_s=0.5)
    with pytest.raises(MigrationError, match="no verdict"):
        await migration.run()
    assert migration.phases == [N, S, P, SW, Phase.FAILED]
    assert migration.stats.outcome == "source"
    (await ends.held_verdict()).open.set()
    await ends.assert_source_intact()


async def test_a_link_lost_after_commit_fails_from_committed(make_ends, proxy_to) -> None:
    """The proxy cuts the link after COMMIT: the source fails from COMMITTED (outcome
    unknown, devices stopped) while the destination completes."""
    ends = await make_ends(sims(2), hold_verdicts="resumed")
    proxy, address = await proxy_to(ends.address)
    migration = ends.migration(address)
    run = asyncio.create_task(migration.run())
    gate = await ends.held_verdict()
    proxy.drop()
    gate.open.set()
    with pytest.raises(OutcomeUnknown):
        await run
    assert migration.phases == [N, S, P, SW, C, Phase.FAILED]
    assert migration.stats.outcome == "unknown"
    assert ends.incoming[0].phases == [N, S, P, SW, C, Phase.COMPLETED]
    assert [d.state for d in ends.sources] == [State.STOP, State.STOP]
    assert [d.state for d in ends.targets] == [State.RUNNING, State.RUNNING]


async def test_the_guard_names_the_current_and_the_required_phases(make_ends) -> None:
    """cancel after the end and continue outside the pause raise PhaseError saying why."""
    ends = await make_ends(sims(1))
    migration = ends.migration()
    with pytest.raises(
        PhaseError, match="cannot continue: the migration is new, not one of paused"
    ):
        migration.continue_switchover()
    await migration.run()
    with pytest.raises(PhaseError) as caught:
        migration.cancel()
    assert caught.value.current is Phase.COMPLETED
    assert Phase.SWITCHOVER in caught.value.required
    assert "cannot cancel: the migration is completed" in str(caught.value)


async def test_a_crash_the_daemon_caught_ends_failed_through_the_one_writer(make_ends) -> None:
    """record_crash (the daemon's last resort for a bug) sets FAILED by the phase writer,
    so the status follows; a migration already ended keeps its end."""
    ends = await make_ends(sims(1))
    migration = ends.migration()
    migration.record_crash(RuntimeError("a bug"))
    assert migration.phases == [N, Phase.FAILED]
    assert migration.stats.status == Status.FAILED
    assert migration.stats.error == "internal error: RuntimeError('a bug')"
    done = ends.migration()
    await done.run()
    done.record_crash(RuntimeError("late"))
    assert (done.phase, done.stats.error) == (Phase.COMPLETED, None)


async def test_reports_made_in_the_window_wait_for_its_end_in_order() -> None:
    """Inside the downtime window a report waits; announce, or the next phase change out
    of the window, makes the held ones in order; outside it a report is made at once."""
    told: list[str] = []
    machine = PhaseMachine(structlog.get_logger(), lambda old, new: told.append(new.value))
    machine.set(SW)
    machine.later(lambda: told.append("before"))
    machine.hold()
    machine.later(lambda: told.append("device"))
    machine.set(C, in_window=True)
    assert machine.phase is C
    assert told == ["switchover", "before"]
    machine.announce()
    assert told == ["switchover", "before", "device", "committed"]
    machine.hold()
    machine.later(lambda: told.append("rollback"))
    machine.set(Phase.FAILED)
    assert told[-2:] == ["rollback", "failed"]


async def test_a_held_report_that_fails_is_logged_and_the_others_still_made() -> None:
    """announce runs right after COMMIT: one report raising must neither reach the
    migration nor drop the reports after it."""
    told: list[str] = []
    machine = PhaseMachine(structlog.get_logger(), lambda old, new: told.append(new.value))
    machine.set(SW)
    machine.hold()

    def broken() -> None:
        raise RuntimeError("observer bug")

    machine.later(broken)
    machine.later(lambda: told.append("device"))
    machine.set(C, in_window=True)
    with structlog.testing.capture_logs() as logs:
        machine.announce()
    assert told == ["switchover", "device", "committed"]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["held_report_failed"]


async def test_the_collector_waits_while_any_window_is_open() -> None:
    """The cyclic GC is off from the first window's open to the last one's close, and a
    collector someone else turned off stays off."""
    first, second = (PhaseMachine(structlog.get_logger()) for _ in range(2))
    assert gc.isenabled()
    first.hold()
    second.hold()
    assert not gc.isenabled()
    first.announce()
    assert not gc.isenabled()
    second.set(Phase.FAILED)  # a phase change out of the window closes it too
    assert gc.isenabled()
    gc.disable()
    try:
        first.hold()
        first.announce()
        assert not gc.isenabled()
    finally:
        gc.enable()

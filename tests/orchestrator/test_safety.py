"""Safety of one migration in-process: no rollback after COMMIT, P2P order both ways."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import structlog

from devices.fsm import Feature, State
from devices.paged import Faults
from devices.simulated import SimulatedDevice
from devices.testing import ArcTrace, TraceEntry
from orchestrator.engine.errors import DestinationFailed, MigrationCancelled, SplitOutcome
from orchestrator.engine.p2p import resume_in_order
from tests.orchestrator.conftest import MIB, Spec

#: States in which a device issues P2P DMA: it runs and was not quiesced.
P2P_ACTIVE = (State.RUNNING, State.PRE_COPY)


def assert_p2p_resume_order(entries: Sequence[TraceEntry], devices: set[str]) -> None:
    """Every device of ``devices`` that left a stopped state reached RUNNING_P2P before any
    device reached RUNNING from a quiesced or stopped state."""
    resumed = [
        i
        for i, e in enumerate(entries)
        if e.new == State.RUNNING and e.old not in P2P_ACTIVE and e.device in devices
    ]
    quiesced = {
        e.device: i
        for i, e in enumerate(entries)
        if e.new == State.RUNNING_P2P and e.device in devices
    }
    assert resumed, "nothing resumed"
    assert set(quiesced) == devices, (
        f"devices without a RUNNING_P2P step: {devices - set(quiesced)}"
    )
    assert max(quiesced.values()) < min(resumed), [(e.device, e.new.name) for e in entries]


async def test_a_device_failing_to_resume_after_commit_splits_and_nothing_rolls_back(
    make_ends,
) -> None:
    """One destination device failing RUNNING_P2P -> RUNNING: split outcome, no rollback,
    the failed device stopped on the destination with its state, the source stopped."""
    broken = Faults(fail_arcs=frozenset({(State.RUNNING_P2P, State.RUNNING)}))
    ends = await make_ends(
        [Spec("a", seed=1, target_faults=broken), Spec("b", seed=2), Spec("c", seed=3)]
    )
    migration = ends.migration(downtime_limit_ms=200)
    with pytest.raises(SplitOutcome, match=r"could not resume a \(") as failed:
        await migration.run()
    assert set(failed.value.failed) == {"a"}
    assert migration.stats.outcome == "split"
    assert migration.stats.placement["b"] == "destination"
    assert migration.stats.placement["a"].startswith("stopped on the destination")
    # Nothing runs twice: the source stays stopped, the destination runs b and c.
    assert [d.state for d in ends.sources] == [State.STOP] * 3
    assert [d.state for d in ends.targets] == [State.STOP, State.RUNNING, State.RUNNING]
    assert ends.outcomes == [False]
    # The stopped device kept the state it loaded: no reset after COMMIT.
    assert await ends.targets[0].digest() == await ends.sources[0].digest()
    assert not [e for e in ends.target_trace.entries if e.device == "a" and e.old == State.ERROR]


async def test_a_single_device_without_p2p_migrates_with_p2p_on(make_ends) -> None:
    """p2p on (the default) and one device lacking P2P: per-device targets, it completes."""
    ends = await make_ends([Spec("plain", features=Feature.STOP_COPY | Feature.PRE_COPY)])
    migration = ends.migration(downtime_limit_ms=200)
    assert migration.params.p2p
    await migration.run()
    await ends.assert_migrated()
    assert State.RUNNING_P2P not in {e.new for e in ends.target_trace.entries}


async def test_the_destination_resumes_in_p2p_order(make_ends) -> None:
    """On the destination every P2P device reaches RUNNING_P2P before any reaches RUNNING;
    a device without P2P in a p2p-off migration goes straight to RUNNING."""
    ends = await make_ends(
        [
            Spec("a", seed=1),
            Spec("b", seed=2),
            Spec("plain", seed=3, features=Feature.STOP_COPY | Feature.PRE_COPY),
        ]
    )
    await ends.migration(downtime_limit_ms=200, p2p=False).run()
    await ends.assert_migrated()
    ends2 = await make_ends([Spec("a", seed=1), Spec("b", seed=2)])
    await ends2.migration(downtime_limit_ms=200).run()
    assert_p2p_resume_order(ends2.target_trace.entries, {"a", "b"})


async def test_a_rollback_after_the_stop_restores_in_p2p_order(make_ends) -> None:
    """The destination rejects the state at load: the source devices, stopped, reach
    RUNNING_P2P all before any reaches RUNNING, and keep their own state."""
    ends = await make_ends(
        [Spec("a", seed=1, target_faults=Faults(corrupt_validation=True)), Spec("b", seed=2)]
    )
    with pytest.raises(DestinationFailed, match="corrupt"):
        await ends.migration(downtime_limit_ms=200).run()
    stop = next(i for i, e in enumerate(ends.trace.entries) if e.new == State.STOP_COPY)
    assert_p2p_resume_order(ends.trace.entries[stop:], {"a", "b"})
    await ends.assert_source_intact()


async def test_a_failed_rollback_arc_is_retried_before_any_reset() -> None:
    """A rollback arc that fails once, leaving a valid state, is retried: no reset, state kept."""
    flaky = SimulatedDevice("flaky", state_size=1 * MIB, dirty_rate=0.0, seed=4)
    steady = SimulatedDevice("steady", state_size=1 * MIB, dirty_rate=0.0, seed=5)
    trace = ArcTrace()
    trace.watch(flaky, steady)
    for device in (flaky, steady):
        await device.open()
        await device.set_state(State.STOP_COPY)
    before = await flaky.digest()
    failures = 0
    original = flaky.fail_arc

    def fail_once(arc_from: State, arc_to: State) -> None:
        nonlocal failures
        if failures == 0 and (arc_from, arc_to) == (State.STOP, State.RUNNING_P2P):
            failures += 1
            original(arc_from, arc_to)

    flaky.fail_arc = fail_once  # type: ignore[method-assign]
    start = len(trace.entries)
    notes = await resume_in_order([flaky, steady], structlog.get_logger("test"))
    assert notes == {}
    assert failures == 1
    assert flaky.state == steady.state == State.RUNNING
    assert await flaky.digest() == before
    assert State.ERROR not in {e.new for e in trace.entries}
    assert_p2p_resume_order(trace.entries[start:], {"flaky", "steady"})
    for device in (flaky, steady):
        await device.close()


async def test_a_cancel_racing_an_iteration_wakeup_is_not_lost(make_ends) -> None:
    """A cancel that lands as the pre-copy loop wakes up still cancels (Python 3.11's
    wait_for can swallow it): the migration ends cancelled, the source intact."""
    ends = await make_ends([Spec("a", seed=1, dirty_rate=4_000_000)])
    migration = ends.migration(downtime_limit_ms=0.001, timeout_s=30, iteration_s=0.05)
    run = asyncio.create_task(migration.run())
    for _ in range(3):
        await wait_iteration(migration)
    migration._wakeup.set()  # the loop's wait completes in this same step...
    migration.cancel("raced")  # ...as the cancel arrives
    async with asyncio.timeout(5):
        with pytest.raises(MigrationCancelled, match="raced"):
            await run
    await ends.assert_source_intact()


async def wait_iteration(migration) -> None:  # type: ignore[no-untyped-def]
    """Return after the migration's next pre-copy iteration."""
    done = asyncio.Event()
    seen = migration.stats.iterations
    migration.add_listener(lambda stats: done.set() if stats.iterations > seen else None)
    await done.wait()

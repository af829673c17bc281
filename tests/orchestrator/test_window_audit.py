"""An audit of the switchover's performance changes against the safety invariants.

The destination loads a model as its END_OF_DEVICE arrives and holds its reports (and
the garbage collector) from then on; the source drains models in its own task; a
per-daemon window history scales the expected downtime from past windows. Each test
puts a hostile peer or a failing device against one of those, and checks what every
outcome must leave: one place for the workload, the stop bounded, nothing held.
"""

# ruff: noqa: F811 - the tests take test_switchover_faults' make_pair fixture, imported here

from __future__ import annotations

import asyncio
import gc
import math
import time
from pathlib import Path
from typing import Any

import pytest

import transport
from devices.fsm import State
from devices.paged import Faults
from orchestrator.engine import window
from orchestrator.engine.destination import DestinationMigration
from orchestrator.engine.errors import DestinationFailed, MigrationError
from orchestrator.engine.messages import Devices, Verdict
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.phases import Phase
from orchestrator.engine.source import SourceMigration
from orchestrator.engine.stats import Downtime
from orchestrator.service.config import parse
from orchestrator.service.service import Service
from tests.orchestrator.conftest import MIB, SessionView, Spec
from tests.orchestrator.test_safety import assert_p2p_resume_order
from tests.orchestrator.test_switchover_faults import (  # noqa: F401 - the make_pair fixture
    PARAMS,
    Awaiting,
    Pair,
    make_pair,
    run_to_end,
)
from transport import Tag


def three() -> list[Spec]:
    return [Spec("a", seed=1), Spec("b", seed=2), Spec("c", seed=3)]


async def hostile_source(pair: Pair) -> transport.Session:
    """A source session that offers every device and has them accepted, then follows
    no script: the test sends what it likes."""
    session = await transport.connect(
        pair.ends.address, name="hostile", auth=transport.AuthConfig(), channels=1, timeout=5.0
    )
    offer = Devices(
        devices=tuple(d.descriptor() for d in pair.ends.sources),
        p2p=False,
        switchover_ack=False,
        precopy_devices=0,
        boot_id="hostile",
        migration_id="hostile-1",
    )
    session.set_device_count(len(offer.devices))
    await session.send_control(Tag.DEVICES, offer.to_fields())
    async with asyncio.timeout(5):
        accepted = await session.recv()
    assert accepted.tag == Tag.DEVICES_ACCEPTED, accepted.tag
    return session


async def send_whole_stream(pair: Pair, session: transport.Session, index: int) -> None:
    """Device ``index``'s complete stream (its END record included), then END_OF_DEVICE:
    a stream the destination's load validates."""
    device = pair.ends.sources[index]
    await device.set_state(State.STOP_COPY)
    channel = device.save_channel()
    while chunk := await channel.read():
        await session.send_chunk(Tag.STOPCOPY_DATA, index, chunk)
    await session.send_end_of_device(index)


# -- the destination's early load --------------------------------------------------------


async def test_end_of_device_before_any_sync_is_refused(make_pair: Any) -> None:
    """A source sending a device's whole stream and END_OF_DEVICE in pre-copy, before
    any SYNC (a real source opens its window only after two): the destination refuses
    it naming the frame, instead of loading that device and pausing its reports and
    the process's garbage collector for as long as the source keeps pre-copying."""
    pair = await make_pair(three())
    session = await hostile_source(pair)
    try:
        await send_whole_stream(pair, session, 0)
        # The pre-copy may go on for ever for the other devices: each frame resets the
        # destination's idle deadline. The refusal must come without waiting for one.
        async with asyncio.timeout(2):
            answer = await session.recv()
        assert answer.tag == Tag.VERDICT, answer.tag
        verdict = Verdict.parse(answer.fields())
        assert verdict.stage == "failed"
        assert "END_OF_DEVICE" in verdict.reason, verdict.reason
        assert "SYNC" in verdict.reason, verdict.reason
    finally:
        await hang_up(pair, session)
    assert pair.ends.outcomes == [False]
    assert all(t.state == State.RUNNING for t in pair.ends.targets)


async def test_a_model_failing_its_early_load_resets_every_device(make_pair: Any) -> None:
    """The second of three models rejects its state as it loads, while the others are
    loaded or still RESUMING: the source names it and rolls back, and every
    destination device is reset (none keeps a half-migrated state)."""
    specs = three()
    specs[1].target_faults = Faults(corrupt_validation=True)
    pair = await make_pair(specs)
    migration = pair.migration()
    error = await run_to_end(migration)
    assert isinstance(error, DestinationFailed), repr(error)
    assert "(device b)" in str(error), str(error)
    await pair.assert_rolled_back(migration)


async def test_a_model_drain_that_stalls_keeps_the_stop_bounded(make_pair: Any) -> None:
    """The first model's stop-copy read never returns while the others wait to drain in
    the same task: the stop still ends at max_stop_ms, the source runs again and no
    task is left behind."""
    pair = await make_pair(three())
    migration = pair.migration(max_stop_ms=400, downtime_limit_ms=5000)
    stuck = pair.ends.sources[0]
    original = migration._stop_and_drain

    async def stall_then_drain(clock: Any) -> None:
        stuck.faults = Faults(stall_read_after=0)  # pre-copy is over: the drain stalls
        await original(clock)

    migration._stop_and_drain = stall_then_drain  # type: ignore[method-assign]
    started = time.monotonic()
    error = await run_to_end(migration)
    assert isinstance(error, MigrationError), repr(error)
    assert "max_stop_ms" in str(error), str(error)
    stuck.faults = Faults()
    stuck.release_stall()
    assert migration.stats.downtime_ms is None
    assert time.monotonic() - started < 15
    await pair.assert_rolled_back(migration)


async def test_a_model_drain_that_fails_rolls_back_naming_the_device(make_pair: Any) -> None:
    """The second model's stop-copy read fails while the first drained and was loaded
    early on the destination: the source rolls back naming the read, every device there
    is reset."""
    pair = await make_pair(three())
    migration = pair.migration()
    broken = pair.ends.sources[1]
    original = migration._stop_and_drain

    async def fail_then_drain(clock: Any) -> None:
        broken.faults = Faults(fail_read_after=0)
        await original(clock)

    migration._stop_and_drain = fail_then_drain  # type: ignore[method-assign]
    error = await run_to_end(migration)
    assert isinstance(error, MigrationError), repr(error)
    assert "b: read failed" in str(error), str(error)
    broken.faults = Faults()
    await pair.assert_rolled_back(migration)


async def test_the_idle_deadline_still_fires_within_a_second_of_its_bound(
    make_pair: Any,
) -> None:
    """A source that goes silent after its offer: the destination gives up between
    idle_timeout_s and a second more, naming the parameter, and resets its devices."""
    pair = await make_pair(three(), idle_timeout_s=0.3)
    session = await hostile_source(pair)
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            answer = await session.recv()
        waited = time.monotonic() - started
        assert answer.tag == Tag.VERDICT, answer.tag
        reason = Verdict.parse(answer.fields()).reason
        assert "idle_timeout_s" in reason, reason
        assert 0.3 <= waited < 1.3 + 1.0  # the bound, its second of slack, a loaded host
    finally:
        session.abort()
    await pair.settle()
    assert pair.ends.outcomes == [False]
    assert all(t.state == State.RUNNING for t in pair.ends.targets)


# -- the window history --------------------------------------------------------------------


class LateResume(SessionView):
    """A destination session whose "resumed" verdict says it resumed far in the future."""

    def __init__(self, session: transport.Session, late_s: float) -> None:
        super().__init__(session)
        self._late_s = late_s

    async def send_control(self, tag: Tag, fields: Any = None, **kw: Any) -> None:
        if tag == Tag.VERDICT and fields is not None and fields["stage"] == "resumed":
            marks = dict(fields["marks"])
            marks[Downtime.RESUME] += self._late_s
            fields = {**fields, "marks": marks}
        await self._session.send_control(tag, fields, **kw)


@pytest.mark.parametrize("late_s", [1000.0, math.inf, math.nan])
async def test_a_destination_reporting_a_late_resume_does_not_poison_the_history(
    make_ends: Any, late_s: float
) -> None:
    """A destination whose "resumed" verdict puts its resume 1000 s (or an infinity, or
    no number) after the window opened: the source learns no window longer than it
    saw itself (from the stop to that verdict), so the daemon's next migrations are not
    all held back for WINDOW_MEMORY_S, and the downtime it reports is one it saw."""
    ends = await make_ends([Spec("a", seed=1)], wrap=lambda s: LateResume(s, late_s))
    history = window.WindowHistory()
    migration = SourceMigration(
        ends.sources, ends.address, MigrationParams(**PARAMS), auth=ends.auth,
        window_history=history,
    )  # fmt: skip
    started = time.monotonic()
    async with asyncio.timeout(20):
        await migration.run()
    seen_s = time.monotonic() - started
    cost = migration._window_cost
    assert cost is not None
    work = cost.base_s + cost.devices * cost.device_s + cost.arcs_s
    assert history.scale() * work <= seen_s, history.scale()
    downtime = migration.stats.downtime_ms
    assert downtime is not None
    assert math.isfinite(downtime)
    assert downtime <= seen_s * 1e3


@pytest.mark.parametrize(
    ("downtime_s", "bandwidth"),
    [(math.nan, 1e9), (math.inf, 1e9), (-5.0, 1e9), (1.0, math.nan), (1.0, math.inf)],
)
def test_a_window_history_fed_no_number_keeps_a_finite_scale(
    downtime_s: float, bandwidth: float
) -> None:
    """Windows of no number, an infinity or a negative length, or at a bandwidth of no
    number: the scale stays a finite number of at least 1 (never lowers the estimate,
    never makes it no number)."""
    history = window.WindowHistory()
    cost = window.window_cost(4, 0.001, 3, 0.002, history)
    history.observe(cost, downtime_s, MIB, bandwidth, now=0.0)
    scale = history.scale(now=1.0)
    assert math.isfinite(scale), scale
    assert scale >= 1.0, scale


async def hang_up(pair: Any, session: transport.Session) -> None:
    """End the hostile source: drop its session, run its device again, let both ends
    settle."""
    session.abort()
    await pair.ends.sources[0].set_state(State.RUNNING)
    await pair.settle()


async def load_one_early(pair: Any, session: transport.Session) -> None:
    """A barrier, the first device's whole stream with its END_OF_DEVICE, and a second
    barrier (answered once that frame was taken): the device is loaded early there."""
    await session.send_control(Tag.SYNC)
    async with asyncio.timeout(5):
        assert (await session.recv()).tag == Tag.SYNC_ACK
    await send_whole_stream(pair, session, 0)
    await session.send_control(Tag.SYNC)
    async with asyncio.timeout(5):
        assert (await session.recv()).tag == Tag.SYNC_ACK
    assert pair.ends.targets[0].state == State.STOP


async def test_a_destination_loading_early_then_lost_resets_and_rolls_back(
    make_pair: Any,
) -> None:
    """The link dies after one model's END_OF_DEVICE loaded it on the destination:
    that device is reset with the others there, the phase ends failed and nothing is
    held (reports, the collector)."""
    pair = await make_pair(three())
    session = await hostile_source(pair)
    try:
        await load_one_early(pair, session)
    finally:
        await hang_up(pair, session)
    assert pair.ends.incoming[0].phase is Phase.FAILED
    assert all(t.state == State.RUNNING for t in pair.ends.targets)
    assert gc.isenabled()


async def test_a_window_never_ended_by_the_source_is_bounded(make_pair: Any) -> None:
    """After one model's END_OF_DEVICE (the destination's window: reports held, the
    collector off) the source sends frames for another device for ever and never
    END_OF_STREAM: the destination gives up within about idle_timeout_s naming it,
    resets its devices and turns the collector back on."""
    pair = await make_pair(three(), idle_timeout_s=0.3)
    session = await hostile_source(pair)

    async def trickle() -> None:
        while True:  # a hostile cadence, each frame well inside the idle timeout
            await session.send_chunk(Tag.STOPCOPY_DATA, 1, ())
            await asyncio.sleep(0.05)

    trickling: asyncio.Task[None] | None = None
    try:
        await session.send_control(Tag.SYNC)
        async with asyncio.timeout(5):
            assert (await session.recv()).tag == Tag.SYNC_ACK
        await send_whole_stream(pair, session, 0)
        trickling = asyncio.create_task(trickle())
        async with asyncio.timeout(3):
            answer = await session.recv()
        assert answer.tag == Tag.VERDICT, answer.tag
        reason = Verdict.parse(answer.fields()).reason
        assert "idle_timeout_s" in reason, reason
        assert "END_OF_STREAM" in reason, reason
    finally:
        if trickling is not None:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
        session.abort()
        await pair.ends.sources[0].set_state(State.RUNNING)
    await pair.settle()
    assert pair.ends.outcomes == [False]
    assert all(t.state == State.RUNNING for t in pair.ends.targets)


DRAIN_FAULTS = {
    "model stalls": (0, Faults(stall_read_after=0), "max_stop_ms"),
    "waiting device fails": (1, Faults(fail_read_after=0), "b: read failed"),
    "last model fails": (2, Faults(fail_read_after=0), "c: read failed"),
}


@pytest.mark.parametrize("case", list(DRAIN_FAULTS))
async def test_a_drain_fault_in_a_mixed_set_rolls_back_every_device(
    make_pair: Any, case: str
) -> None:
    """Models drained in the switchover's task beside a device whose arcs wait (drained
    in a task of its own): a model's read stalling keeps the stop bounded, a read
    failing anywhere is named; every device runs again at the source, none is
    resumed at the destination, and no drain task is left."""
    index, fault, named = DRAIN_FAULTS[case]
    pair = await make_pair(three())
    pair.ends.sources[1] = Awaiting(pair.ends.sources[1])  # type: ignore[call-overload]
    migration = pair.migration(max_stop_ms=400, downtime_limit_ms=5000)
    broken = getattr(pair.ends.sources[index], "inner", pair.ends.sources[index])
    original = migration._stop_and_drain

    async def fault_then_drain(clock: Any) -> None:
        broken.faults = fault
        await original(clock)

    migration._stop_and_drain = fault_then_drain  # type: ignore[method-assign]
    error = await run_to_end(migration)
    assert isinstance(error, MigrationError), repr(error)
    assert named in str(error), str(error)
    broken.faults = Faults()
    broken.release_stall()
    await pair.assert_rolled_back(migration)


async def test_end_of_device_twice_changes_nothing(make_pair: Any) -> None:
    """A source repeating a model's END_OF_DEVICE (loaded already): the destination
    neither loads it again nor fails; the migration completes byte-exact."""
    pair = await make_pair(three())
    session = await hostile_source(pair)
    try:
        for _ in range(2):  # the two barriers of a real switchover
            await session.send_control(Tag.SYNC)
            async with asyncio.timeout(5):
                assert (await session.recv()).tag == Tag.SYNC_ACK
        await send_whole_stream(pair, session, 0)
        await session.send_end_of_device(0)
        await send_whole_stream(pair, session, 1)
        await send_whole_stream(pair, session, 2)
        await session.send_control(Tag.END_OF_STREAM)
        async with asyncio.timeout(5):
            loaded = Verdict.parse((await session.recv()).fields())
        assert loaded.stage == "loaded", loaded.reason
        for device in pair.ends.sources:
            await device.set_state(State.STOP)
        await session.send_control(Tag.COMMIT)
        async with asyncio.timeout(5):
            resumed = Verdict.parse((await session.recv()).fields())
        assert resumed.stage == "resumed", resumed.reason
    finally:
        session.abort()
    await pair.settle()
    assert pair.ends.outcomes == [True]
    await pair.ends.assert_migrated()


async def test_a_stop_arc_failing_mid_set_names_it_and_rolls_back_in_p2p_order(
    make_pair: Any,
) -> None:
    """The middle model's stop arc fails in the plain-call walk: the models after it
    still stop (one walk each, whatever the others did), the error names the device,
    and the rollback brings every device to RUNNING_P2P before any to RUNNING."""
    specs = three()
    specs[1].source_faults = Faults(fail_arcs=frozenset({(State.PRE_COPY_P2P, State.STOP_COPY)}))
    pair = await make_pair(specs)
    migration = pair.migration()
    error = await run_to_end(migration)
    assert isinstance(error, MigrationError), repr(error)
    assert "b: " in str(error), str(error)
    assert (State.PRE_COPY_P2P, State.STOP_COPY) in pair.ends.trace.arcs("c")
    pair.ends.sources[1].faults = Faults()
    entries = pair.ends.trace.entries
    stop = next(i for i, e in enumerate(entries) if e.new == State.STOP_COPY)
    assert_p2p_resume_order(entries[stop:], {"a", "b", "c"})
    await pair.assert_rolled_back(migration)


async def test_end_of_device_for_a_device_not_offered_is_refused(make_pair: Any) -> None:
    """END_OF_DEVICE for a device index past the offer, in the window: the destination
    transport refuses it naming the index (no IndexError, no device touched), and the
    migration ends there with every device reset."""
    pair = await make_pair(three())
    session = await hostile_source(pair)
    try:
        await session.send_control(Tag.SYNC)
        async with asyncio.timeout(5):
            assert (await session.recv()).tag == Tag.SYNC_ACK
        await send_whole_stream(pair, session, 0)
        session.set_device_count(4)  # our side only: the offer said three
        await session.send_end_of_device(3)
        with pytest.raises(transport.PeerCancelled, match="device 3 was not announced"):
            async with asyncio.timeout(5):
                await session.recv()
    finally:
        await hang_up(pair, session)
    assert pair.ends.outcomes == [False]
    assert all(t.state == State.RUNNING for t in pair.ends.targets)


async def test_a_shutdown_after_an_early_load_resets_and_reopens_the_collector(
    make_pair: Any,
) -> None:
    """The destination daemon shuts down (its migration task cancelled) after one model
    was loaded early, before END_OF_STREAM: the source hears why, every device there
    is reset, and the held reports and the collector are let go."""
    pair = await make_pair(three())
    session = await hostile_source(pair)
    try:
        await load_one_early(pair, session)
        assert not gc.isenabled()  # the window is open there
        pair.tasks[0].cancel()
        async with asyncio.timeout(5):
            answer = await session.recv()
        reason = Verdict.parse(answer.fields()).reason
        assert "shutting down" in reason, reason
    finally:
        await hang_up(pair, session)
    assert pair.ends.incoming[0].phase is Phase.CANCELLED
    assert all(t.state == State.RUNNING for t in pair.ends.targets)


@pytest.mark.parametrize("rejecting", ["a", "b"], ids=["model loaded early", "waiting device"])
async def test_a_load_failing_in_a_mixed_destination_resets_every_device(rejecting: str) -> None:
    """The destination holds models (loaded as their END_OF_DEVICE arrives) and a
    device whose arcs wait (loaded after END_OF_STREAM); one of them rejects its state:
    the source rolls back naming it, and every destination device is reset, the models
    already loaded included."""
    specs = three()
    for spec in specs:
        if spec.name == rejecting:
            spec.target_faults = Faults(corrupt_validation=True)
    sources = [s.build(source=True) for s in specs]
    inner = [s.build(source=False) for s in specs]
    targets: list[Any] = [inner[0], Awaiting(inner[1]), inner[2]]
    for device in (*sources, *inner):
        await device.open()
    outcomes: list[bool] = []
    ended = asyncio.Event()

    async def accept(session: transport.Session) -> None:
        by_name = {d.name: d for d in targets}
        outcomes.append(await DestinationMigration(session, by_name, idle_timeout_s=5.0).run())
        ended.set()

    auth = transport.AuthConfig()
    server = await transport.serve("127.0.0.1:0", accept, name="mixed", auth=auth)
    try:
        migration = SourceMigration(sources, server.address, MigrationParams(**PARAMS), auth=auth)
        error = await run_to_end(migration)
        assert isinstance(error, DestinationFailed), repr(error)
        assert f"(device {rejecting})" in str(error), str(error)
        async with asyncio.timeout(5):
            await ended.wait()  # the destination's give-up may end after the source's
        assert outcomes == [False]
        assert [t.state for t in targets] == [State.RUNNING] * 3
        for spec, device in zip(specs, sources, strict=True):
            assert device.state == State.RUNNING
            await device.close()
            replica = spec.build(source=True)
            replica.replay(device.writes)
            assert await replica.digest() == await device.digest(), device.name
    finally:
        server.close()
        await server.wait_closed()
        for device in (*sources, *inner):
            await device.close()


async def test_a_long_window_to_one_destination_does_not_hold_back_another(
    make_ends: Any, tmp_path: Path
) -> None:
    """A daemon learns its windows per destination: one that taught a window a thousand
    times its prediction (a peer holding back its verdicts) scales the estimates to it,
    and a migration to another host is estimated and completed as if it never was."""
    first = await make_ends([Spec("a", seed=1)])
    other = await make_ends([Spec("a", seed=1)])
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), first.sources)
    try:
        poisoned = service.window_histories.setdefault(first.address, window.WindowHistory())
        cost = window.window_cost(1, 0.001, 4, 0.0)
        poisoned.observe(cost, 1000.0, 0, 1e9)
        assert poisoned.scale() > 100
        record = service.start_migration(other.address, None, {"downtime_limit_ms": 300})
        assert record.task is not None
        await asyncio.wait_for(record.task, 20)
        stats = record.migration.stats
        assert stats.outcome == "destination"
        assert stats.expected_downtime_parts_ms["scale"] == 1.0
        assert service.window_histories[first.address] is poisoned
    finally:
        service.book.close()

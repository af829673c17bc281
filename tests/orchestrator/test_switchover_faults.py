"""Faults at each step of the switchover, between the source's fence and the end.

The switchover is: fence, SYNC #1 (the pre-copy readers still stream), the readers
stop, SYNC #2, the devices' last figures, then the window (quiesce, STOP_COPY, drain,
END_OF_STREAM, "loaded"), COMMIT, "resumed". Each test puts one fault at one of those
steps: a destination that answers a barrier or a verdict wrongly (a scripted wrapper of
the real destination's session), an operator or a daemon shutdown acting while a
barrier's answer is held, a device or a reader failing, the stop bound running out.
Every test ends with one of the three outcomes the design allows (rolled back;
migrated; stopped with "outcome unknown" and what to do) and then checks what any
outcome must leave: the garbage collector on, no window open, no task it started left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import structlog

import transport
from devices.base import MigratableDevice
from devices.errors import DeviceError
from devices.fsm import Feature, State
from devices.paged import Faults, PagedDevice
from devices.simulated import SimulatedDevice
from devices.testing import ArcTrace
from orchestrator.engine import phases
from orchestrator.engine.destination import Gate
from orchestrator.engine.errors import (
    DestinationFailed,
    DowntimeExceeded,
    MigrationCancelled,
    MigrationError,
    OutcomeUnknown,
)
from orchestrator.engine.messages import Verdict
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.phases import Phase, PhaseError
from orchestrator.engine.source import SourceMigration
from tests.orchestrator.conftest import MIB, Ends, SessionView, Spec
from transport import Tag

#: Short timeouts: a cell that waits for one ends in about a second.
PARAMS: dict[str, Any] = {
    "downtime_limit_ms": 200,
    "max_stop_ms": 1500,
    "verdict_timeout_s": 1.0,
    "timeout_s": 10,
    "connect_timeout_s": 2.0,
}
SOURCE_RUNS = frozenset({State.RUNNING, State.RUNNING_P2P, State.PRE_COPY, State.PRE_COPY_P2P})


@dataclasses.dataclass
class Script:
    """How the destination's answers to the barriers and verdicts go wrong (0: never)."""

    #: Hold the n-th SYNC_ACK until the test releases it.
    hold_ack: int = 0
    #: Never send the n-th SYNC_ACK.
    drop_ack: int = 0
    #: Send the n-th SYNC_ACK twice.
    double_ack: int = 0
    #: Send a "failed" verdict instead of the n-th SYNC_ACK.
    fail_at_ack: int = 0
    #: Send a "loaded" verdict before the first SYNC_ACK, long before anything loaded.
    early_loaded: bool = False
    #: The stage written in place of "loaded" and of "resumed".
    loaded_as: str = "loaded"
    resumed_as: str = "resumed"
    #: Hold the verdict of this stage until the test releases it.
    hold_verdict: str = ""
    #: Send this frame before the n-th SYNC_ACK (a frame the source does not expect now).
    extra_at_ack: tuple[int, Tag] | None = None


class Scripted(SessionView):
    """The real destination's session, with its barrier and verdict answers scripted."""

    def __init__(self, session: transport.Session, script: Script) -> None:
        super().__init__(session)
        self.script = script
        self.acks = 0
        #: Set while an answer is held; the test sets ``release`` to let it go.
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def _hold(self) -> None:
        self.held.set()
        await self.release.wait()

    async def send_control(self, tag: Tag, fields: Any = None, **kw: Any) -> None:
        script, send = self.script, self._session.send_control
        if tag == Tag.SYNC_ACK:
            self.acks += 1
            n = self.acks
            if script.early_loaded and n == 1:
                await send(Tag.VERDICT, Verdict("loaded", "", None, {}, {}).to_fields())
            if n == script.hold_ack:
                await self._hold()
            if script.extra_at_ack is not None and n == script.extra_at_ack[0]:
                await send(script.extra_at_ack[1], {})
            if n == script.drop_ack:
                return
            if n == script.fail_at_ack:
                failed = Verdict("failed", "refused by the test", None, {}, {})
                await send(Tag.VERDICT, failed.to_fields())
                return
            await send(tag, fields, **kw)
            if n == script.double_ack:
                await send(tag, fields, **kw)
            return
        if tag == Tag.VERDICT and fields is not None:
            stage = fields["stage"]
            if stage == script.hold_verdict:
                await self._hold()
            renamed = {"loaded": script.loaded_as, "resumed": script.resumed_as}.get(stage, stage)
            fields = {**fields, "stage": renamed}
        await send(tag, fields, **kw)


@dataclasses.dataclass
class Pair:
    """Both ends (conftest's Ends), the scripted destination sessions and their tasks."""

    ends: Ends
    script: Script
    scripted: list[Scripted]
    tasks: list[asyncio.Task[Any]]
    #: Set once the first destination session arrived.
    accepted: asyncio.Event
    #: The tasks there were before the migration (none of its own may outlive it).
    before: set[asyncio.Task[Any]]

    def migration(self, address: str | None = None, **params: Any) -> SourceMigration:
        return self.ends.migration(address, **(PARAMS | params))

    async def held(self) -> Scripted:
        """The first destination session, once it holds an answer."""
        await self.accepted.wait()
        await self.scripted[0].held.wait()
        return self.scripted[0]

    def release(self) -> None:
        for session in self.scripted:
            session.release.set()

    async def settle(self) -> None:
        """Let the destination end, then check what every outcome must leave behind."""
        self.release()
        async with asyncio.timeout(10):
            await asyncio.gather(*self.tasks, return_exceptions=True)
        assert gc.isenabled(), "a downtime window left the garbage collector off"
        assert phases._COLLECTOR.open == 0, "a downtime window was never closed"
        leftover = [
            f"{t.get_name()}: {t.get_coro()!r}"
            for t in asyncio.all_tasks() - self.before
            if t is not asyncio.current_task()
        ]
        assert not leftover, leftover

    async def assert_rolled_back(self, migration: SourceMigration) -> None:
        """Source devices RUNNING with their own state, nothing resumed on the destination."""
        assert migration.stats.outcome == "source"
        assert migration.phase in (Phase.FAILED, Phase.CANCELLED)
        assert not self.ends.resumed_on_destination()
        await self.settle()
        assert all(t.state == State.RUNNING for t in self.ends.targets)  # reset, idle
        await self.ends.assert_source_intact()

    async def assert_kept_stopped(self) -> None:
        """Nothing resumed on the destination and the source devices stopped, their state
        intact: what the operator's ``resume --force`` runs again."""
        assert not self.ends.resumed_on_destination()
        assert [d.state for d in self.ends.sources] == [State.STOP] * len(self.ends.sources)
        await self.settle()
        for device in self.ends.sources:
            await device.set_state(State.RUNNING)  # the operator's resume --force
        await self.ends.assert_source_intact()

    async def assert_unknown(self, migration: SourceMigration, error: BaseException) -> None:
        """After COMMIT with no clear answer: source stopped, told what to do; the
        destination runs the workload it loaded."""
        await self.settle()
        assert migration.stats.outcome == "unknown"
        assert migration.phase is Phase.FAILED
        assert "livemig resume --force" in str(error), str(error)
        assert "may be running" in migration.stats.error, migration.stats.error
        await self.ends.assert_migrated()


class Awaiting(MigratableDevice):
    """A model whose state changes wait (as a VFIO device's arcs in their thread do):
    the switchover gives it a task, and a cancel can land between its arcs.

    ``gates[target]``, when set, holds a change to ``target`` until the test sets it;
    ``reached[target]`` is set as such a change starts waiting.
    """

    kind = "simulated"
    format_version = SimulatedDevice.format_version

    def __init__(self, inner: PagedDevice) -> None:
        super().__init__(inner.name, inner.features)
        self.inner = inner
        self.gates: dict[State, asyncio.Event] = {}
        self.reached: dict[State, asyncio.Event] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property  # type: ignore[override]
    def state(self) -> State:
        return self.inner.state

    def add_state_listener(self, listener: Any) -> None:
        self.inner.add_state_listener(listener)

    async def set_state(self, target: State) -> None:
        await asyncio.sleep(0)  # a step of the loop, as a thread's answer takes
        if target in self.gates:
            self.reached.setdefault(target, asyncio.Event()).set()
            await self.gates[target].wait()
        await self.inner.set_state(target)

    async def reset(self) -> None:
        await self.inner.reset()

    def save_channel(self) -> Any:
        return self.inner.save_channel()

    def resume_channel(self) -> Any:
        return self.inner.resume_channel()

    def precopy_info(self) -> Any:
        return self.inner.precopy_info()

    def stop_copy_size(self) -> int:
        return self.inner.stop_copy_size()

    async def digest(self) -> bytes:
        return await self.inner.digest()

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    def can_throttle(self) -> bool:
        return self.inner.can_throttle()

    def set_throttle(self, fraction: float) -> None:
        self.inner.set_throttle(fraction)


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    """A test that leaves a window open must not turn the collector off for the next."""
    yield
    if phases._COLLECTOR.open:
        phases._COLLECTOR.open = 1
        phases._COLLECTOR.resume()


@pytest.fixture
def make_pair(make_ends: Callable[..., Any]) -> Callable[..., Any]:
    """Factory of migration ends whose destination follows a Script."""

    async def make(
        specs: Sequence[Spec],
        script: Script | None = None,
        gate: Gate | None = None,
        waiting: bool = False,
        idle_timeout_s: float = 5.0,
    ) -> Pair:
        """``waiting``: every device is an :class:`Awaiting` (not a model)."""
        script = script or Script()
        scripted: list[Scripted] = []

        def follow(session: transport.Session) -> Scripted:
            scripted.append(Scripted(session, script))
            return scripted[-1]

        ends = await make_ends(
            specs, gate=gate, wrap=follow, idle_timeout_s=idle_timeout_s,
            device_as=Awaiting if waiting else None,
        )  # fmt: skip
        return Pair(ends, script, scripted, ends.tasks, ends.accepted, asyncio.all_tasks())

    return make


def two() -> list[Spec]:
    return [Spec("a", seed=1), Spec("b", seed=2)]


async def run_to_end(migration: SourceMigration) -> BaseException | None:
    """Run the migration; the error it ended with, if any (bounded: no hang)."""
    try:
        async with asyncio.timeout(20):
            await migration.run()
    except MigrationError as exc:
        return exc
    return None


# -- the destination answers a barrier or a verdict wrongly ----------------------------------

WRONG_ANSWERS = {
    "no ack to barrier 1": (Script(drop_ack=1), "rolled back", r"did not catch up"),
    "no ack to barrier 2": (Script(drop_ack=2), "rolled back", r"did not catch up"),
    "ack twice to barrier 1": (Script(double_ack=1), "migrated", None),
    "ack twice to barrier 2": (Script(double_ack=2), "migrated", None),
    "failed instead of ack 1": (Script(fail_at_ack=1), "rolled back", "refused by the test"),
    "failed instead of ack 2": (Script(fail_at_ack=2), "rolled back", "refused by the test"),
    "DEVICES_ACCEPTED again at barrier 2": (
        Script(extra_at_ack=(2, Tag.DEVICES_ACCEPTED)),
        "rolled back",
        "unexpected DEVICES_ACCEPTED",
    ),
    "SWITCHOVER_ACK again at barrier 2": (
        Script(extra_at_ack=(2, Tag.SWITCHOVER_ACK)),
        "migrated",
        None,
    ),
    "resumed instead of loaded": (Script(loaded_as="resumed"), "rolled back", "resumed"),
    "failed instead of loaded": (Script(loaded_as="failed"), "rolled back", "destination failed"),
    "loaded instead of resumed": (Script(resumed_as="loaded"), "unknown", "loaded"),
}


@pytest.mark.parametrize("case", list(WRONG_ANSWERS))
async def test_a_wrong_answer_from_the_destination(make_pair: Any, case: str) -> None:
    """A missing, doubled or misplaced answer to a barrier or a verdict ends in one of
    the allowed outcomes: rolled back before COMMIT, migrated, or (after COMMIT)
    stopped with "outcome unknown" and what to do."""
    script, outcome, reason = WRONG_ANSWERS[case]
    pair = await make_pair(two(), script)
    migration = pair.migration()
    error = await run_to_end(migration)
    if outcome == "migrated":
        assert error is None, error
        await pair.settle()
        await pair.ends.assert_migrated()
        return
    assert error is not None
    assert reason is not None
    assert re.search(reason, str(error)), str(error)
    if outcome == "rolled back":
        assert not isinstance(error, OutcomeUnknown)
        await pair.assert_rolled_back(migration)
    else:
        assert isinstance(error, OutcomeUnknown), repr(error)
        await pair.assert_unknown(migration, error)


async def test_a_loaded_verdict_sent_before_the_stream_ended_is_not_taken(make_pair: Any) -> None:
    """A "loaded" verdict sent before the source ended the stream (here in pre-copy) is
    no answer to it: no COMMIT, and when the destination then rejects the state at load
    the source rolls back."""
    bad = Spec("a", seed=1, target_faults=Faults(corrupt_validation=True))
    pair = await make_pair([bad, Spec("b", seed=2)], Script(early_loaded=True))
    migration = pair.migration()
    error = await run_to_end(migration)
    assert error is not None
    assert Phase.COMMITTED not in migration.phases, repr(error)
    await pair.assert_rolled_back(migration)


# -- operator and daemon actions while a step waits ------------------------------------------

STEPS = ("barrier 1", "barrier 2", "last figures")
ACTIONS = ("cancel", "force", "continue", "shutdown")


def _at_last_figures(migration: SourceMigration, action: Callable[[], None]) -> None:
    """Run ``action`` inside the devices' last figures, the step before the window."""
    device = migration.devices[0]
    original = device.stop_copy_size

    def figures() -> int:
        if migration._stop_readers.is_set():
            device.stop_copy_size = original  # type: ignore[method-assign]
            action()
        return original()

    device.stop_copy_size = figures  # type: ignore[method-assign]


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("step", STEPS)
async def test_an_operator_acting_at_each_step_before_the_window(
    make_pair: Any, step: str, action: str
) -> None:
    """cancel() or a daemon shutdown while a barrier waits or the last figures are
    taken rolls back; force_switchover changes nothing; continue_switchover is refused
    (the migration is not paused) and the migration completes."""
    hold = {"barrier 1": 1, "barrier 2": 2}.get(step, 0)
    pair = await make_pair(two(), Script(hold_ack=hold))
    migration = pair.migration()
    run = asyncio.create_task(migration.run())
    refused: list[BaseException] = []

    def act() -> None:
        assert migration.phase is Phase.SWITCHOVER
        if action == "cancel":
            migration.cancel("cancelled by the test")
        elif action == "force":
            migration.force_switchover()
        elif action == "continue":
            try:
                migration.continue_switchover()
            except PhaseError as exc:
                refused.append(exc)
        else:
            run.cancel()

    if hold:
        await pair.held()
        if step == "barrier 2":  # the readers stopped before the second barrier
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("precopy-")]
        act()
        pair.release()
    else:
        _at_last_figures(migration, act)
    try:
        async with asyncio.timeout(20):
            await run
    except asyncio.CancelledError:
        assert action == "shutdown"
        await pair.assert_rolled_back(migration)
        return
    except MigrationCancelled:
        assert action == "cancel"
        assert migration.phase is Phase.CANCELLED
        await pair.assert_rolled_back(migration)
        return
    assert action in ("force", "continue")
    assert len(refused) == (action == "continue")
    await pair.settle()
    await pair.ends.assert_migrated()


async def reader_fault_at_barrier_1(
    pair: Pair, faults: Faults, verdict_timeout_s: float
) -> tuple[SourceMigration, asyncio.Task[BaseException | None], PagedDevice]:
    """A migration whose first barrier's answer is held, and then the first source
    device's pre-copy reader given ``faults`` and something to read, so it reads now:
    the migration, its running task, and that device."""
    migration = pair.migration(verdict_timeout_s=verdict_timeout_s)
    run = asyncio.create_task(run_to_end(migration))
    await pair.held()
    source = pair.ends.sources[0]
    source.faults = faults
    source.run_workload(0.01)
    return migration, run, source


async def test_a_reader_failing_while_barrier_1_waits_rolls_back(make_pair: Any) -> None:
    """A pre-copy read failing while the first barrier's answer is held ends the wait
    with the reader's error (not the barrier's timeout) and rolls back."""
    pair = await make_pair(two(), Script(hold_ack=1))
    migration, run, source = await reader_fault_at_barrier_1(pair, Faults(fail_read_after=0), 10.0)
    error = await run
    assert isinstance(error, MigrationError)
    assert "pre-copy" in str(error) or "read" in str(error), str(error)
    assert "did not catch up" not in str(error)
    source.faults = Faults()
    await pair.assert_rolled_back(migration)


async def test_a_reader_stuck_in_a_read_at_the_switchover_is_bounded(make_pair: Any) -> None:
    """A pre-copy read that blocks (a device that never answers) as the readers are
    told to stop: the switchover gives up within verdict_timeout_s naming the
    device, instead of waiting forever with the devices running, and rolls back."""
    pair = await make_pair(two(), Script(hold_ack=1))
    migration, run, stuck = await reader_fault_at_barrier_1(pair, Faults(stall_read_after=0), 1.0)
    await stuck.read_stalled.wait()
    pair.release()
    error = await run
    assert isinstance(error, MigrationError), repr(error)
    assert "a" in str(error)
    assert "verdict_timeout_s" in str(error), str(error)
    stuck.faults = Faults()
    stuck.release_stall()
    await pair.assert_rolled_back(migration)


async def test_a_device_query_failing_at_the_last_figures_rolls_back(make_pair: Any) -> None:
    """The devices' last figures, taken after the readers stopped, fail on one device:
    the window never opens and the source runs again."""
    pair = await make_pair(two())
    migration = pair.migration()

    def broken() -> None:
        raise DeviceError("a", "stop_copy_size failed (test)")

    _at_last_figures(migration, broken)
    error = await run_to_end(migration)
    assert error is not None
    assert "stop_copy_size failed" in str(error)
    assert State.STOP_COPY not in {e.new for e in pair.ends.trace.entries}
    await pair.assert_rolled_back(migration)


async def test_a_fence_that_cannot_be_written_rolls_back(make_pair: Any) -> None:
    """The source's fence (an fsync of its records) failing: no barrier, no window, the
    source runs again and the error names the fence's cause."""
    pair = await make_pair(two())

    def fence(names: list[str]) -> None:
        raise OSError(28, "No space left on device")

    migration = SourceMigration(
        pair.ends.sources, pair.ends.address, MigrationParams(**PARAMS),
        auth=transport.AuthConfig(), on_fence=fence,
    )  # fmt: skip
    error = await run_to_end(migration)
    assert error is not None
    assert "No space left" in str(error)
    assert pair.scripted[0].acks == 0
    await pair.assert_rolled_back(migration)


async def test_a_pause_with_idle_devices_outlasts_the_destination_idle_timeout(
    make_pair: Any,
) -> None:
    """Paused before the switchover with devices that dirty nothing, no data crosses for
    longer than the destination's idle timeout; the source keeps it from giving up (a
    pause costs nothing however long it lasts), and ``continue`` then migrates."""
    idle_s = 0.5
    idle = [Spec("a", seed=1, dirty_rate=0), Spec("b", seed=2, dirty_rate=0)]
    pair = await make_pair(idle, idle_timeout_s=idle_s)
    migration = pair.migration(pause_before_switchover=True, iteration_s=0.1)
    paused_at: list[int] = []
    waited = asyncio.Event()

    def watch(stats: Any) -> None:
        # Paused, the source samples every iteration_s: four idle timeouts' worth.
        if migration.phase is Phase.PAUSED:
            paused_at[:] = paused_at or [stats.iterations]
            if (stats.iterations - paused_at[0]) * 0.1 >= 4 * idle_s:
                waited.set()

    migration.add_listener(watch)
    run = asyncio.create_task(run_to_end(migration))
    waiting = asyncio.create_task(waited.wait())
    await asyncio.wait({run, waiting}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    assert not run.done(), f"ended while paused: {run.result()!r}"
    assert waited.is_set()
    migration.continue_switchover()
    assert await run is None
    await pair.settle()
    await pair.ends.assert_migrated()


# -- a device arc failing in the window --------------------------------------------------------

ARCS = {
    "quiesce": (State.PRE_COPY, State.PRE_COPY_P2P),
    "stop": (State.PRE_COPY_P2P, State.STOP_COPY),
}


@pytest.mark.parametrize("arc", list(ARCS))
async def test_a_source_arc_failing_in_the_window_rolls_back(make_pair: Any, arc: str) -> None:
    """The second device's quiesce or stop arc fails after the first took it: the
    source rolls back with its state, in P2P order."""
    broken = Spec("b", seed=2, source_faults=Faults(fail_arcs=frozenset({ARCS[arc]})))
    pair = await make_pair([Spec("a", seed=1), broken])
    migration = pair.migration()
    error = await run_to_end(migration)
    assert error is not None
    assert "injected" in str(error) or "b" in str(error)
    pair.ends.sources[1].faults = Faults()
    await pair.assert_rolled_back(migration)


# -- the stop bound ------------------------------------------------------------------------------


@pytest.mark.parametrize("hard", [False, True], ids=["max_stop_ms", "hard limit"])
@pytest.mark.parametrize("where", ["drain", "loaded verdict"])
async def test_the_stop_bound_expiring_in_the_window_rolls_back(
    make_pair: Any, where: str, hard: bool
) -> None:
    """A stop-copy read that stalls, or a "loaded" verdict held, past the stop bound:
    rolled back, the error names the bound, the stop lasted about the bound."""
    specs = two()
    script = Script()
    if where == "drain":
        stall = Faults(stall_read_after=MIB // 2)
        specs[1] = Spec("b", seed=2, features=Feature.STOP_COPY | Feature.P2P, source_faults=stall)
    else:
        script.hold_verdict = "loaded"
    pair = await make_pair(specs, script)
    params: dict[str, Any] = {"max_stop_ms": 300, "verdict_timeout_s": 10.0}
    if hard:
        params |= {"downtime_limit_ms": 300, "hard_downtime_limit": True}
    migration = pair.migration(**params)
    error = await run_to_end(migration)
    assert error is not None
    if hard:
        assert isinstance(error, DowntimeExceeded), repr(error)
    else:
        assert "max_stop_ms" in str(error), str(error)
    assert longest_stop(pair.ends.trace) < migration.params.stop_bound_s + 2.0
    pair.ends.sources[1].faults = Faults()
    pair.ends.sources[1].release_stall()
    await pair.assert_rolled_back(migration)


def longest_stop(trace: ArcTrace) -> float:
    """The longest time any source device spent out of its running states."""
    longest, stopped = 0.0, dict[str, float]()
    for entry in trace.entries:
        if entry.new not in SOURCE_RUNS:
            stopped.setdefault(entry.device, entry.time)
        elif entry.device in stopped:
            longest = max(longest, entry.time - stopped.pop(entry.device))
    return longest


async def test_a_rollback_restores_the_devices_before_saying_goodbye(make_pair: Any) -> None:
    """The rollback brings the source devices back before it waits on the link to tell
    the destination (over a stalled link that wait lasts seconds, all of it added to the
    stop): before COMMIT the destination never runs them, so nothing is risked."""
    pair = await make_pair(two(), Script(hold_ack=1, hold_verdict="loaded"))
    migration = pair.migration(max_stop_ms=300, verdict_timeout_s=10.0)
    run = asyncio.create_task(run_to_end(migration))
    held = await pair.held()
    session = migration._session
    assert session is not None
    at_goodbye: list[list[State]] = []
    farewell = session.cancel

    async def goodbye(reason: str) -> None:
        at_goodbye.append([d.state for d in pair.ends.sources])
        await farewell(reason)

    session.cancel = goodbye  # type: ignore[method-assign]
    first, held.release = held.release, asyncio.Event()
    first.set()  # the first barrier's answer goes; "loaded" waits for a new release
    error = await run
    assert error is not None
    assert "max_stop_ms" in str(error)
    assert at_goodbye == [[State.RUNNING, State.RUNNING]]
    await pair.assert_rolled_back(migration)


async def test_a_stalled_link_in_the_window_keeps_the_stop_bounded(
    make_pair: Any, proxy_to: Any
) -> None:
    """The link stalls as the devices stop, with more stop-copy data than the socket
    buffers hold: the devices run again about max_stop_ms after they stopped, not after
    a goodbye that cannot be delivered."""
    big = Spec("big", size=32 * MIB, features=Feature.STOP_COPY | Feature.P2P)
    pair = await make_pair([big])
    proxy, address = await proxy_to(pair.ends.address)
    source = pair.ends.sources[0]
    source.add_state_listener(
        lambda device, old, new: proxy.stall() if new == State.STOP_COPY else None
    )
    migration = pair.migration(address, max_stop_ms=300, verdict_timeout_s=10.0)
    error = await run_to_end(migration)
    assert error is not None
    assert "max_stop_ms" in str(error), str(error)
    # The bound plus a wide margin, below the one-second goodbye over the stalled link.
    assert longest_stop(pair.ends.trace) < 0.3 + 0.6
    proxy.resume()
    await pair.settle()
    await pair.ends.assert_source_intact()


# -- the caller cancelled at the worst moments ----------------------------------------------------


async def shut_down_inside(pair: Pair, migration: SourceMigration, method: str) -> Any:
    """Run ``migration`` until the destination holds an answer; then release it, and
    cancel the run's task (a daemon shutdown) from inside the source session's
    ``method`` when the migration calls it. The CancelledError must propagate; the
    session is returned."""
    run = asyncio.create_task(migration.run())
    await pair.held()
    session = migration._session
    assert session is not None
    wrapped = getattr(session, method)

    async def cancelling(*args: Any, **kwargs: Any) -> Any:
        run.cancel()
        return await wrapped(*args, **kwargs)

    setattr(session, method, cancelling)
    pair.release()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(20):
            await run
    return session


async def test_a_shutdown_during_the_rollback_still_finishes_it(make_pair: Any) -> None:
    """The daemon cancels the migration's task while it rolls back (here as it says
    goodbye to the destination): the rollback still ends, with the phase FAILED, the
    window closed and the session gone; then the cancel propagates."""
    bad = Spec("a", seed=1, target_faults=Faults(corrupt_validation=True))
    pair = await make_pair([bad, Spec("b", seed=2)], Script(hold_ack=1))
    migration = pair.migration()
    session = await shut_down_inside(pair, migration, "cancel")
    assert isinstance(session.error, transport.TransportError)
    await pair.assert_rolled_back(migration)


async def test_a_shutdown_after_commit_is_an_unknown_outcome(make_pair: Any) -> None:
    """The daemon cancels the migration's task while it waits for "resumed" after
    COMMIT: nothing rolls back, and the end is reported as failed with an unknown
    outcome and what to do, not as a cancel (which promises a rollback)."""
    pair = await make_pair(two(), Script(hold_verdict="resumed"))
    migration = pair.migration()
    run = asyncio.create_task(migration.run())
    await pair.held()
    assert migration.phase is Phase.COMMITTED
    with pytest.raises(PhaseError):
        migration.cancel("too late")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(20):
            await run
    assert [d.state for d in pair.ends.sources] == [State.STOP, State.STOP]
    pair.release()
    await pair.assert_unknown(migration, OutcomeUnknown(migration.stats.error or ""))


async def test_destination_failure_reported_after_commit_is_an_unknown_outcome(
    make_pair: Any,
) -> None:
    """A "failed" verdict in answer to COMMIT: the source keeps its devices stopped and
    says what to do (the destination may have resumed some)."""
    pair = await make_pair(two(), Script(resumed_as="failed"))
    migration = pair.migration()
    error = await run_to_end(migration)
    assert isinstance(error, OutcomeUnknown), repr(error)
    assert isinstance(error.__cause__, DestinationFailed)
    await pair.assert_unknown(migration, error)


# -- inside the window ------------------------------------------------------------------------

WINDOW_ARCS = {"quiesce": State.PRE_COPY_P2P, "stop": State.STOP_COPY}


@pytest.mark.parametrize("action", ["cancel", "shutdown", "force"])
@pytest.mark.parametrize("step", list(WINDOW_ARCS))
async def test_an_operator_acting_inside_the_window(make_pair: Any, step: str, action: str) -> None:
    """cancel() or a shutdown as the first device quiesces or stops (the window's first
    arcs) rolls back in P2P order; force_switchover there changes nothing."""
    pair = await make_pair(two())
    migration = pair.migration()
    run = asyncio.create_task(migration.run())
    acted: list[State] = []

    def act(device: Any, old: State, new: State) -> None:
        if acted or new != WINDOW_ARCS[step]:
            return
        acted.append(new)
        if action == "cancel":
            migration.cancel("cancelled in the window")
        elif action == "shutdown":
            run.cancel()
        else:
            migration.force_switchover()

    pair.ends.sources[0].add_state_listener(act)
    try:
        async with asyncio.timeout(20):
            await run
    except asyncio.CancelledError:
        assert action == "shutdown"
    except MigrationCancelled:
        assert action == "cancel"
    else:
        assert action == "force"
        await pair.settle()
        await pair.ends.assert_migrated()
        return
    assert acted
    await pair.assert_rolled_back(migration)


# -- the ends' own failures while they close the window -----------------------------------------


async def test_a_rollback_that_crashes_still_ends_the_migration(make_pair: Any) -> None:
    """A bug in a device's arc during the rollback (not a DeviceError) escapes run(),
    but the migration ends FAILED, its window closed, the other device restored and
    the crashed one stopped with its state."""
    bad = Spec("b", seed=2, target_faults=Faults(corrupt_validation=True))
    pair = await make_pair([Spec("a", seed=1), bad])
    migration = pair.migration()
    broken = pair.ends.sources[0]
    original = broken.set_state

    async def crash_on_restore(target: State) -> None:
        if target in (State.RUNNING, State.RUNNING_P2P) and broken.state == State.STOP_COPY:
            raise RuntimeError("driver bug (test)")
        await original(target)

    broken.set_state = crash_on_restore  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="driver bug"):
        async with asyncio.timeout(20):
            await migration.run()
    assert migration.phase is Phase.FAILED
    assert pair.ends.sources[1].state == State.RUNNING
    # The crashed device stays stopped with its state: no reset mends a bug.
    assert broken.state == State.STOP_COPY
    broken.set_state = original  # type: ignore[method-assign]
    await pair.settle()
    await broken.set_state(State.RUNNING)
    await pair.ends.assert_source_intact()


class _Gate:
    """A destination gate that consents, notes each record it is asked to write, and
    cannot write the one named ``fails`` ("prepare", "committed" or "finished")."""

    def __init__(self, fails: str = "", error: OSError | None = None) -> None:
        self.fails = fails
        self.error = error or OSError(28, "No space left on device")
        self.notes: list[str] = []

    def _write(self, record: str) -> None:
        if record == self.fails:
            raise self.error
        self.notes.append(record)

    def admit(self, offer: Any) -> None:
        pass

    def prepare(self, offer: Any) -> None:
        self._write("prepare")

    def committed(self, offer: Any) -> None:
        self._write("committed")

    def finished(self, offer: Any, results: Any) -> None:
        self._write("finished")


async def test_a_destination_whose_records_fail_in_the_window_closes_it(make_pair: Any) -> None:
    """The destination rejects the state at load (in its window) and then cannot write
    its records: it logs that as critical (no error escapes run(), which says False),
    ends FAILED with the window closed, the devices reset, and the source rolled back."""
    bad = Spec("a", seed=1, target_faults=Faults(corrupt_validation=True))
    pair = await make_pair([bad, Spec("b", seed=2)], gate=_Gate("finished"))
    migration = pair.migration()
    with structlog.testing.capture_logs() as logs:
        error = await run_to_end(migration)
        async with asyncio.timeout(10):
            await asyncio.gather(*pair.tasks, return_exceptions=True)
    assert isinstance(error, DestinationFailed), repr(error)
    assert pair.ends.outcomes == [False]
    assert [e["log_level"] for e in logs if e["event"] == "ownership_not_recorded"] == ["critical"]
    assert pair.ends.incoming[0].phase is Phase.FAILED
    await pair.assert_rolled_back(migration)


async def test_a_destination_that_cannot_record_its_commit_still_says_resumed(
    make_pair: Any,
) -> None:
    """The devices run on the destination once COMMIT came, whatever its records say:
    a failing write after it still sends "resumed" (the source completes, its devices
    stopped, not "outcome unknown"), and the destination logs it as critical."""
    pair = await make_pair(two(), gate=_Gate("committed"))
    migration = pair.migration()
    with structlog.testing.capture_logs() as logs:
        assert await run_to_end(migration) is None
        await pair.settle()
    assert migration.stats.outcome == "destination"
    await pair.ends.assert_migrated()
    assert pair.ends.incoming[0].phase is Phase.COMPLETED
    [record] = [e for e in logs if e["event"] == "ownership_not_recorded"]
    assert record["log_level"] == "critical"
    assert "No space left on device" in record["error"]


async def test_a_destination_cancelled_twice_in_its_window_still_ends(make_pair: Any) -> None:
    """The destination daemon cancels the incoming migration in its window (before
    COMMIT), then again while it gives up: the give-up finishes (devices reset), the
    phase is CANCELLED and the window closed; the source rolls back."""
    pair = await make_pair(two(), Script(hold_verdict="loaded"))
    migration = pair.migration(max_stop_ms=5000, verdict_timeout_s=10.0)
    run = asyncio.create_task(run_to_end(migration))
    held = await pair.held()
    destination = pair.ends.incoming[0]
    assert destination.phase is Phase.SWITCHOVER
    held.script.hold_verdict = "failed"  # the give-up's verdict waits too
    held.held.clear()
    task = pair.tasks[0]
    task.cancel()
    await held.held.wait()
    task.cancel()
    first, held.release = held.release, asyncio.Event()
    first.set()
    held.release.set()
    error = await run
    assert isinstance(error, MigrationError)
    async with asyncio.timeout(10):
        await asyncio.gather(task, return_exceptions=True)
    assert destination.phase is Phase.CANCELLED
    await pair.assert_rolled_back(migration)


async def test_a_destination_fence_that_cannot_be_written_rolls_back(make_pair: Any) -> None:
    """The destination's note at the first barrier (its fsync) fails: it answers
    "failed" instead of the barrier's ack, and the source rolls back."""
    pair = await make_pair(two(), gate=_Gate("prepare", OSError(5, "Input/output error")))
    migration = pair.migration()
    error = await run_to_end(migration)
    assert isinstance(error, DestinationFailed), repr(error)
    assert "Input/output error" in str(error)
    await pair.assert_rolled_back(migration)


# -- reports held in the window --------------------------------------------------------------

REPORT_CASES = {
    "migrated": (Script(), {}),
    "rolled back in the window": (Script(), {"a": Faults(corrupt_validation=True)}),
    "bound expired": (Script(hold_verdict="loaded"), {}),
    "failed after COMMIT": (Script(resumed_as="failed"), {}),
    "split after COMMIT": (
        Script(),
        {"a": Faults(fail_arcs=frozenset({(State.RUNNING_P2P, State.RUNNING)}))},
    ),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
async def test_reports_held_in_the_window_are_made_once_in_order(make_pair: Any, case: str) -> None:
    """Every device change reported through after_window (the daemon's DEVICE_STATE
    events), on both ends, is made exactly once and in order, whatever the outcome."""
    script, target_faults = REPORT_CASES[case]
    specs = [Spec(s.name, seed=s.seed, target_faults=target_faults.get(s.name)) for s in two()]
    pair = await make_pair(specs, script)
    migration = pair.migration(max_stop_ms=300, verdict_timeout_s=10.0)
    made: list[tuple[str, State, State]] = []
    made_there: list[tuple[str, State, State]] = []

    def report_here(device: Any, old: State, new: State) -> None:
        migration.after_window(lambda: made.append((device.name, old, new)))

    def report_there(device: Any, old: State, new: State) -> None:
        incoming = pair.ends.incoming
        change = (device.name, old, new)
        if incoming:
            incoming[-1].after_window(lambda: made_there.append(change))
        else:
            made_there.append(change)

    for device in pair.ends.sources:
        device.add_state_listener(report_here)
    for device in pair.ends.targets:
        device.add_state_listener(report_there)
    await run_to_end(migration)
    await pair.settle()
    assert made == [(e.device, e.old, e.new) for e in pair.ends.trace.entries]
    assert made_there == [(e.device, e.old, e.new) for e in pair.ends.target_trace.entries]


# -- devices whose arcs wait (each gets a task in the window) ------------------------------------


async def test_a_waiting_device_migrates(make_pair: Any) -> None:
    """Devices whose arcs wait migrate byte-exact (the harness for the cells below)."""
    pair = await make_pair(two(), waiting=True)
    migration = pair.migration()
    assert await run_to_end(migration) is None
    await pair.settle()
    await pair.ends.assert_migrated()


@pytest.mark.parametrize("target", [State.PRE_COPY_P2P, State.STOP_COPY], ids=["quiesce", "stop"])
async def test_the_stop_bound_expiring_during_a_waiting_arc_rolls_back(
    make_pair: Any, target: State
) -> None:
    """An arc of the window (quiesce or stop) that waits past max_stop_ms: the switchover
    gives up at the bound, the rollback waits for the arc to end (never racing it), then
    restores every device with its state."""
    pair = await make_pair(two(), waiting=True)
    slow = pair.ends.sources[1]
    slow.gates[target] = gate = asyncio.Event()
    slow.reached[target] = reached = asyncio.Event()
    migration = pair.migration(max_stop_ms=200, verdict_timeout_s=10.0)
    run = asyncio.create_task(run_to_end(migration))
    await reached.wait()
    before = slow.state
    assert migration._body is not None
    await asyncio.wait({migration._body})  # the bound expired: the switchover gave up
    assert slow.state == before  # and the arc still waits: the rollback waits with it
    assert not run.done()
    gate.set()
    error = await run
    assert error is not None
    assert "max_stop_ms" in str(error), str(error)
    await pair.assert_rolled_back(migration)


async def test_a_destination_shut_down_while_it_resumes_still_resumes(make_pair: Any) -> None:
    """After COMMIT the destination daemon cancels the migration while its devices
    resume: the resume still ends (every device RUNNING there, the workload in one
    place), the records and the source are told, and then the cancel propagates."""
    pair = await make_pair(two(), waiting=True)
    late = pair.ends.targets[1]
    late.gates[State.RUNNING] = gate = asyncio.Event()
    late.reached[State.RUNNING] = reached = asyncio.Event()
    migration = pair.migration()
    run = asyncio.create_task(run_to_end(migration))
    await reached.wait()
    destination = pair.ends.incoming[0]
    assert destination.committed
    pair.tasks[0].cancel()
    gate.set()
    assert await run is None
    await pair.settle()
    assert destination.phase is Phase.COMPLETED
    assert pair.ends.outcomes == []  # run() re-raised the cancel after the resume
    await pair.ends.assert_migrated()


async def test_a_shutdown_after_the_destination_resumed_is_a_completed_migration(
    make_pair: Any,
) -> None:
    """The daemon cancels the migration's task after "resumed" arrived, while the
    source closes its session: the migration is reported completed (outcome
    destination, devices released), not unknown, and the cancel propagates."""
    pair = await make_pair(two(), Script(hold_ack=1))
    migration = pair.migration()
    await shut_down_inside(pair, migration, "close")
    assert migration.phase is Phase.COMPLETED
    assert migration.stats.outcome == "destination"
    assert migration.stats.error is None
    await pair.settle()
    await pair.ends.assert_migrated()


async def test_the_destination_idle_timeout_names_itself(make_pair: Any) -> None:
    """The destination hears nothing for idle_timeout_s (the source's pre-copy reads
    stall, so nothing crosses): the reason the source reports names the timeout."""
    stalled = [Spec(s.name, seed=s.seed, source_faults=Faults(stall_read_after=0)) for s in two()]
    pair = await make_pair(stalled, idle_timeout_s=0.3)
    migration = pair.migration()
    error = await run_to_end(migration)
    assert isinstance(error, DestinationFailed), repr(error)
    assert "idle_timeout_s" in str(error), str(error)
    await pair.assert_rolled_back(migration)


async def test_a_destination_waiting_for_commit_past_its_idle_timeout_says_so(
    make_pair: Any,
) -> None:
    """The source's COMMIT does not come within idle_timeout_s of "loaded": the
    destination gives up naming the wait, resumes nothing; the source, which had
    committed, keeps its devices stopped with their state (outcome unknown)."""
    pair = await make_pair(two(), Script(hold_ack=1), idle_timeout_s=0.3)
    migration = pair.migration(verdict_timeout_s=10.0)
    run = asyncio.create_task(run_to_end(migration))
    await pair.held()
    session = migration._session
    assert session is not None
    sending = session.send_control
    late = asyncio.Event()

    async def send_control(tag: Tag, fields: Any = None, **kw: Any) -> None:
        if tag == Tag.COMMIT:
            await late.wait()
        await sending(tag, fields, **kw)

    session.send_control = send_control  # type: ignore[method-assign]
    pair.release()
    async with asyncio.timeout(10):  # the destination gives up on its own
        await asyncio.gather(*pair.tasks, return_exceptions=True)
    late.set()
    error = await run
    assert isinstance(error, OutcomeUnknown), repr(error)
    destination = pair.ends.incoming[0]
    assert destination.error is not None
    assert "no COMMIT from the source 0.3 s after 'loaded' (idle_timeout_s)" in destination.error
    await pair.assert_kept_stopped()


@pytest.mark.parametrize("tag", [Tag.SYNC, Tag.COMMIT], ids=["SYNC", "COMMIT"])
async def test_a_send_that_never_returns_is_bounded(make_pair: Any, tag: Tag) -> None:
    """The source's SYNC or COMMIT send never returns (its write buffer full, the peer
    alive but not reading): the wait ends within verdict_timeout_s, rolled back before
    COMMIT, stopped with an unknown outcome after it."""
    pair = await make_pair(two(), Script(hold_ack=1) if tag == Tag.COMMIT else Script())
    migration = pair.migration(verdict_timeout_s=1.0)
    never = asyncio.Event()
    if tag == Tag.SYNC:
        # Wrap the session as soon as it exists: the first SYNC is the one that sticks.
        connect = transport.connect

        async def connect_and_wrap(*args: Any, **kwargs: Any) -> Any:
            session = await connect(*args, **kwargs)
            _stick(session, tag, never)
            return session

        transport.connect = connect_and_wrap  # type: ignore[assignment]
        try:
            error = await run_to_end(migration)
        finally:
            transport.connect = connect  # type: ignore[assignment]
    else:
        run = asyncio.create_task(run_to_end(migration))
        await pair.held()
        assert migration._session is not None
        _stick(migration._session, tag, never)
        pair.release()
        error = await run
    assert error is not None
    assert "verdict_timeout_s" in str(error), str(error)
    never.set()
    if tag == Tag.SYNC:
        await pair.assert_rolled_back(migration)
    else:
        assert isinstance(error, OutcomeUnknown), repr(error)
        assert [d.state for d in pair.ends.sources] == [State.STOP, State.STOP]
        await pair.settle()


def _stick(session: Any, tag: Tag, release: asyncio.Event) -> None:
    """Make ``session``'s sends of ``tag`` wait for ``release`` (a write that never drains)."""
    sending = session.send_control

    async def send_control(sent: Tag, fields: Any = None, **kw: Any) -> None:
        if sent == tag:
            await release.wait()
        await sending(sent, fields, **kw)

    session.send_control = send_control


async def test_a_link_lost_as_loaded_arrives_rolls_back(make_pair: Any) -> None:
    """The link fails in the turn the "loaded" verdict reaches the switchover, before
    the receiver has seen the failure: COMMIT cannot leave, so the source rolls back
    instead of stopping with an unknown outcome."""
    pair = await make_pair(two())
    migration = pair.migration()
    waiting = migration._verdict

    async def verdict(stage: str) -> Verdict:
        answer = await waiting(stage)
        if stage == "loaded":
            assert migration._session is not None
            migration._session._fail(transport.ConnectionLost("link lost (test)"))
        return answer

    migration._verdict = verdict  # type: ignore[method-assign]
    error = await run_to_end(migration)
    assert error is not None
    assert not isinstance(error, OutcomeUnknown), repr(error)
    assert "link lost (test)" in str(error)
    assert Phase.COMMITTED not in migration.phases
    await pair.assert_rolled_back(migration)


async def test_a_source_that_skips_the_barriers_is_refused(make_pair: Any) -> None:
    """A source that ends its stream without any SYNC (so the destination never made
    its durable note that COMMIT may follow) is refused before the destination loads,
    and rolls back."""
    gate = _Gate()
    pair = await make_pair(two(), gate=gate)
    migration = pair.migration()

    async def no_barrier() -> None:
        pass

    migration._sync = no_barrier  # type: ignore[method-assign]
    error = await run_to_end(migration)
    assert isinstance(error, DestinationFailed), repr(error)
    assert "SYNC" in str(error)
    assert gate.notes == ["finished"]
    await pair.assert_rolled_back(migration)


SOURCE_EXTRAS = {
    "COMMIT after barrier 1": (Tag.SYNC, Tag.COMMIT, "rolled back"),
    "SYNC after END_OF_STREAM": (Tag.END_OF_STREAM, Tag.SYNC, "stopped"),
    "COMMIT twice": (Tag.COMMIT, Tag.COMMIT, "migrated"),
}


@pytest.mark.parametrize("case", list(SOURCE_EXTRAS))
async def test_a_source_frame_out_of_place(make_pair: Any, case: str) -> None:
    """A source's COMMIT before its stream ended, or SYNC after it, is refused by the
    destination before anything runs there (the source rolls back, or, having sent
    COMMIT by then, stays stopped with its state); a second COMMIT changes nothing."""
    after, extra, outcome = SOURCE_EXTRAS[case]
    pair = await make_pair(two(), Script(hold_ack=1))
    migration = pair.migration()
    run = asyncio.create_task(run_to_end(migration))
    await pair.held()
    session = migration._session
    assert session is not None
    sending = session.send_control
    sent: list[Tag] = []

    async def send_control(tag: Tag, fields: Any = None, **kw: Any) -> None:
        await sending(tag, fields, **kw)
        if tag == after and not sent:
            sent.append(extra)
            await sending(extra)

    session.send_control = send_control  # type: ignore[method-assign]
    pair.release()
    error = await run
    assert sent == [extra]
    if outcome == "migrated":
        assert error is None, error
        await pair.settle()
        await pair.ends.assert_migrated()
        return
    assert extra.name in str(error)
    if outcome == "rolled back" or not isinstance(error, OutcomeUnknown):
        # (After END_OF_STREAM, the refusal may also beat "loaded" to the source's
        # check before COMMIT: then it is a plain rollback too.)
        assert isinstance(error, DestinationFailed), repr(error)
        await pair.assert_rolled_back(migration)
        return
    # The destination gave up before COMMIT reached it; the source, past COMMIT, trusts
    # no word of it and keeps its devices stopped, their state intact.
    assert outcome == "stopped"
    await pair.assert_kept_stopped()

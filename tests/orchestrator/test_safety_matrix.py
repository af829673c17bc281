"""The safety matrix: every fault at every phase keeps the workload in exactly one place.

Each cell runs one migration in-process over a fault proxy, injects one fault at one
phase, and checks two things. During the run, a monitor watching every state change of
both hosts' devices asserts that no device runs (RUNNING, RUNNING_P2P or a PRE_COPY
state) on the source while its copy with the migrated workload runs on the destination.
At the end, each device runs on exactly one host, or is stopped with its state intact
and a reason in the stats. The table of outcomes is printed at the end of the session
(tests/orchestrator/conftest.py); one cell per phase runs with real daemon processes in
test_safety_daemons.py and at the bottom of this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import transport
from devices.fsm import Feature, State
from devices.paged import Faults, PagedDevice
from devices.testing import ArcTrace
from orchestrator.engine.destination import DestinationMigration, Offer, Refused
from orchestrator.engine.errors import MigrationError
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.phases import PhaseError
from orchestrator.engine.source import SourceMigration
from orchestrator.engine.stats import Status
from tests.faultproxy import FaultProxy
from tests.orchestrator.conftest import SessionView, Spec, VerdictGate
from tests.orchestrator.test_daemon import running_pair, start_pair, write_pair

FAULTS = (
    "link cut",
    "stall",
    "destination killed",
    "destination refuses",
    "arc failure",
    "device without P2P",
    "cancel",
)
PHASES = ("setup", "pre-copy", "switchover", "after COMMIT")
#: Cell -> outcome, printed as a table at the end of the session.
MATRIX: dict[tuple[str, str], str] = {}

SOURCE_RUNS = frozenset({State.RUNNING, State.RUNNING_P2P, State.PRE_COPY, State.PRE_COPY_P2P})
NO_P2P = Feature.STOP_COPY | Feature.PRE_COPY
#: Short timeouts keep a cell to a few seconds.
PARAMS = {
    "downtime_limit_ms": 100,
    "max_stop_ms": 800,
    "timeout_s": 3,
    "verdict_timeout_s": 1.5,
    "connect_timeout_s": 1.0,
}


class Monitor:
    """Watches both hosts' devices and records any moment a workload runs in two places."""

    def __init__(
        self,
        sources: list[PagedDevice],
        targets: list[PagedDevice],
        committed: Callable[[], bool],
    ) -> None:
        self.sources = {d.name: d for d in sources}
        #: Whether the destination received COMMIT: only then is what it runs the workload
        #: (before it, a destination device reset after loading runs no one's workload).
        self.committed = committed
        self.targets = {d.name: d for d in targets}
        self.loaded: dict[str, bool] = dict.fromkeys(self.targets, False)
        self.holds_workload: dict[str, bool] = dict.fromkeys(self.targets, False)
        self.violations: list[str] = []
        for device in (*sources, *targets):
            device.add_state_listener(self._changed)

    def _changed(self, device: Any, old: State, new: State) -> None:
        name = device.name
        if device is self.targets.get(name):
            if new == State.RESUMING or new == State.ERROR:
                self.loaded[name] = self.holds_workload[name] = False
            elif old == State.RESUMING and new == State.STOP:
                self.loaded[name] = True
            elif old == State.STOP and self.loaded[name] and self.committed():
                self.holds_workload[name] = True
        if self.runs_on_source(name) and self.runs_on_destination(name):
            self.violations.append(f"{name} runs on both hosts ({old.name} -> {new.name})")

    def runs_on_source(self, name: str) -> bool:
        return self.sources[name].state in SOURCE_RUNS

    def runs_on_destination(self, name: str) -> bool:
        running = self.targets[name].state in (State.RUNNING, State.RUNNING_P2P)
        return running and self.holds_workload[name]


@dataclasses.dataclass
class Cell:
    """One fault at one phase: the devices, the hooks, and what happened."""

    fault: str
    phase: str
    specs: list[Spec]
    params: dict[str, Any]
    #: Hold the destination's verdict of this stage until the fault is in place.
    hold: str | None = None
    #: The destination refuses the offer at the handshake.
    refuse_offer: bool = False
    #: The destination fails once this event is set (mid-stream refusal).
    fail_stream: asyncio.Event | None = None


class Harness:
    """A destination server behind a fault proxy, source devices, and the monitor."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.sources = [s.build(source=True) for s in cell.specs]
        self.targets = [s.build(source=False) for s in cell.specs]
        self.incoming: list[DestinationMigration] = []
        self.monitor = Monitor(
            self.sources, self.targets, lambda: any(m.committed for m in self.incoming)
        )
        self.trace = ArcTrace()
        self.trace.watch(*self.sources, *self.targets)
        self.gates: list[VerdictGate] = []
        self.gate_made = asyncio.Event()
        self.destinations: list[asyncio.Task[bool]] = []
        self.server: transport.Server | None = None
        self.proxy: FaultProxy | None = None
        self.address = ""
        self.killed = False

    async def start(self) -> None:
        for device in (*self.sources, *self.targets):
            await device.open()
        self.server = await transport.serve(
            "127.0.0.1:0", self._accept, name="matrix-dst", auth=transport.AuthConfig()
        )
        self.proxy = FaultProxy(self.server.address)
        self.address = await self.proxy.start()

    async def _accept(self, session: transport.Session) -> None:
        if self.killed:  # a dead process answers nothing
            session.abort()
            return
        cell = self.cell
        wrapped: Any = session
        if cell.hold is not None:
            gate = VerdictGate(session, cell.hold)
            self.gates.append(gate)
            self.gate_made.set()
            wrapped = gate
        if cell.fail_stream is not None:
            wrapped = _FailingSession(wrapped, cell.fail_stream)
        migration = DestinationMigration(
            wrapped,
            {d.name: d for d in self.targets},
            gate=_Refuser() if cell.refuse_offer else None,
            handshake_timeout_s=2.0,
            idle_timeout_s=2.0,
        )
        self.incoming.append(migration)
        task = asyncio.current_task()
        assert task is not None
        self.destinations.append(task)  # type: ignore[arg-type]
        await migration.run()

    def migration(self) -> SourceMigration:
        return SourceMigration(
            self.sources, self.address, MigrationParams(**self.cell.params),
            auth=transport.AuthConfig(),
        )  # fmt: skip

    async def held_gate(self) -> VerdictGate:
        await self.gate_made.wait()
        await self.gates[0].blocked.wait()
        return self.gates[0]

    def kill_destination(self) -> None:
        """The destination process dies: its links drop and it does nothing more."""
        assert self.proxy is not None
        self.killed = True
        self.proxy.drop()
        for task in self.destinations:
            task.cancel()

    async def close(self) -> None:
        for gate in self.gates:
            gate.open.set()
        if self.proxy is not None:
            await self.proxy.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        await asyncio.gather(*self.destinations, return_exceptions=True)
        for device in (*self.sources, *self.targets):
            await device.close()


class _Refuser:
    """A destination gate that refuses every offer (an unarmed destination)."""

    def admit(self, offer: Offer) -> None:
        raise Refused(f"{', '.join(offer.devices)}: not armed to receive")

    def prepare(self, offer: Offer) -> None:
        raise AssertionError("a refused offer cannot switch over")

    def committed(self, offer: Offer) -> None:
        raise AssertionError("a refused offer cannot commit")

    def finished(self, offer: Offer, results: Any) -> None:
        pass


class _FailingSession(SessionView):
    """A destination session that fails its next receive once ``trigger`` is set."""

    def __init__(self, session: Any, trigger: asyncio.Event) -> None:
        super().__init__(session)
        self._trigger = trigger

    async def recv(self) -> transport.Frame:
        frame = await self._session.recv()
        if self._trigger.is_set():
            raise transport.ProtocolError("the destination refuses the stream (test)")
        return frame


async def wait_for_status(migration: SourceMigration, status: Status) -> None:
    reached = asyncio.Event()
    migration.add_listener(lambda stats: reached.set() if stats.status == status else None)
    await reached.wait()


Trigger = Callable[[Harness, SourceMigration], Any]


def build(fault: str, phase: str) -> tuple[Cell, Trigger | None]:
    """The cell for ``fault`` at ``phase`` and the coroutine that injects it."""
    two = [Spec("a", seed=1), Spec("b", seed=2)]
    params = dict(PARAMS)
    hold = {"switchover": "loaded", "after COMMIT": "resumed"}.get(phase)
    cell = Cell(fault, phase, two, params, hold=hold)

    async def at_phase(h: Harness, m: SourceMigration) -> None:
        """Wait for the phase the fault goes into."""
        if phase == "pre-copy":
            await wait_for_status(m, Status.ACTIVE)
        elif hold is not None:
            await h.held_gate()

    async def release(h: Harness) -> None:
        for gate in h.gates:
            gate.open.set()

    if fault == "link cut":
        if phase == "setup":
            cell.params["connect_timeout_s"] = 1.0

            async def cut_setup(h: Harness, m: SourceMigration) -> None:
                assert h.proxy is not None
                h.proxy.cut_after = 64  # inside the handshake

            return cell, cut_setup

        async def cut(h: Harness, m: SourceMigration) -> None:
            await at_phase(h, m)
            assert h.proxy is not None
            h.proxy.drop()
            await release(h)

        return cell, cut

    if fault == "stall":

        async def stall(h: Harness, m: SourceMigration) -> None:
            if phase != "setup":
                await at_phase(h, m)
            assert h.proxy is not None
            h.proxy.stall()
            await release(h)

        return cell, stall

    if fault == "destination killed":

        async def kill(h: Harness, m: SourceMigration) -> None:
            if phase == "setup":
                await wait_for_status(m, Status.SETUP)
            else:
                await at_phase(h, m)
            h.kill_destination()

        return cell, kill

    if fault == "destination refuses":
        if phase == "setup":
            cell.refuse_offer = True
            return cell, None
        if phase == "pre-copy":
            trigger = cell.fail_stream = asyncio.Event()

            async def refuse(h: Harness, m: SourceMigration) -> None:
                await at_phase(h, m)
                trigger.set()

            return cell, refuse
        cell.hold = None
        if phase == "switchover":
            cell.specs = [Spec("a", seed=1, target_faults=Faults(corrupt_validation=True)), two[1]]
        else:
            broken = Faults(fail_arcs=frozenset({(State.STOP, State.RUNNING_P2P)}))
            cell.specs = [Spec("a", seed=1, target_faults=broken), two[1]]
        return cell, None

    if fault == "arc failure":
        cell.hold = None
        arc, on_source = {
            "setup": ((State.RUNNING, State.PRE_COPY), True),
            "pre-copy": (None, True),
            "switchover": ((State.PRE_COPY_P2P, State.STOP_COPY), True),
            "after COMMIT": ((State.RUNNING_P2P, State.RUNNING), False),
        }[phase]
        if arc is None:  # no arc runs in pre-copy: the data channel fails instead
            faults = Faults(fail_read_after=256 * 1024)
        else:
            faults = Faults(fail_arcs=frozenset({arc}))
        spec = (
            Spec("a", seed=1, source_faults=faults)
            if on_source
            else Spec("a", seed=1, target_faults=faults)
        )
        cell.specs = [spec, two[1]]
        return cell, None

    if fault == "device without P2P":
        cell.hold = None
        if phase == "setup":  # several devices, one without P2P: blocked before anything
            cell.specs = [Spec("a", seed=1, features=NO_P2P), two[1]]
        else:  # alone it migrates with p2p on, whatever phase one looks at
            cell.specs = [Spec("a", seed=1, features=NO_P2P)]
        return cell, None

    assert fault == "cancel"

    async def cancel(h: Harness, m: SourceMigration) -> None:
        if phase == "setup":
            await wait_for_status(m, Status.SETUP)
        else:
            await at_phase(h, m)
        if phase == "after COMMIT":
            with pytest.raises(PhaseError, match="cannot cancel: the migration is committed"):
                m.cancel("cancelled by the matrix")
        else:
            m.cancel("cancelled by the matrix")
        await release(h)

    return cell, cancel


async def run_cell(fault: str, phase: str) -> str:
    """Run one cell; return its outcome, having asserted the invariant."""
    cell, trigger = build(fault, phase)
    if phase == "pre-copy" and (trigger is not None or fault == "arc failure"):
        # Keep pre-copy going until the fault: a limit no iteration fits.
        cell.params |= {"downtime_limit_ms": 0.001, "max_stop_ms": 800}
        for spec in cell.specs:
            spec.dirty_rate = 4_000_000
    harness = Harness(cell)
    await harness.start()
    try:
        migration = harness.migration()
        injector = asyncio.create_task(trigger(harness, migration)) if trigger else None
        run = asyncio.create_task(migration.run())
        error: BaseException | None = None
        try:
            async with asyncio.timeout(15):
                await run
        except MigrationError as exc:
            error = exc
        if injector is not None:
            async with asyncio.timeout(5):
                await injector
        await harness.close()
        return await check_end(harness, migration, error)
    finally:
        with contextlib.suppress(Exception):
            await harness.close()


async def check_end(harness: Harness, migration: SourceMigration, error: Any) -> str:
    """Each device runs on exactly one host, or is stopped, intact, with a reason."""
    monitor, stats = harness.monitor, migration.stats
    assert not monitor.violations, monitor.violations
    outcome = stats.outcome or "source"
    for spec, source, target in zip(
        harness.cell.specs, harness.sources, harness.targets, strict=True
    ):
        on_source = monitor.runs_on_source(source.name)
        on_destination = monitor.runs_on_destination(source.name)
        assert not (on_source and on_destination), source.name
        # The source's state is its own workload's, always (nothing lost, nothing reset).
        replica = spec.build(source=True)
        replica.replay(source.writes)
        assert await replica.digest() == await source.digest(), f"{source.name} state lost"
        if on_destination:
            assert source.state == State.STOP
            assert await target.digest() == await source.digest(), f"{target.name} differs"
        elif not on_source:
            where = stats.placement.get(source.name, "")
            assert error is not None, f"{source.name} runs nowhere after success"
            assert where not in ("", "source", "destination"), (source.name, where)
            if target.state == State.STOP and monitor.loaded[target.name]:
                assert await target.digest() == await source.digest()
    if error is None:
        assert outcome == "destination"
    if outcome == "source":
        # Bounded stop: however the link failed, no source device stayed stopped past
        # max_stop_ms (plus a wide margin for a loaded machine).
        bound = MigrationParams(**harness.cell.params).stop_bound_s + 2.0
        assert longest_stop(harness.trace, harness.sources) <= bound
    return outcome if error is None else f"{outcome}: {type(error).__name__}"


def longest_stop(trace: ArcTrace, sources: list[PagedDevice]) -> float:
    """The longest time any source device spent out of its running states."""
    longest = 0.0
    for device in sources:
        stopped_at: float | None = None
        for entry in trace.entries:
            if entry.device != device.name:
                continue
            if entry.new not in SOURCE_RUNS and stopped_at is None:
                stopped_at = entry.time
            elif entry.new in SOURCE_RUNS and stopped_at is not None:
                longest = max(longest, entry.time - stopped_at)
                stopped_at = None
    return longest


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fault", FAULTS)
async def test_safety_matrix(fault: str, phase: str) -> None:
    """One fault at one phase: never two hosts at once, and one host (or stopped) at the end."""
    MATRIX[(fault, phase)] = await run_cell(fault, phase)


def matrix_table() -> str:
    """The matrix as a text table (printed by conftest at the end of the session)."""
    width = max(len(v) for v in MATRIX.values()) if MATRIX else 10
    lines = ["fault \\ phase".ljust(20) + "".join(p.ljust(width + 2) for p in PHASES)]
    for fault in FAULTS:
        row = [MATRIX.get((fault, p), "-") for p in PHASES]
        lines.append(fault.ljust(20) + "".join(v.ljust(width + 2) for v in row))
    return "\n".join(lines)


# -- one cell per phase with real daemon processes ------------------------------------------


async def test_real_daemons_kill_the_destination_in_precopy(tmp_path: Path) -> None:
    """Pre-copy, destination SIGKILLed: the source daemon rolls back, devices RUNNING."""

    async for pair in start_pair(tmp_path):
        started: dict[str, str] = await pair.src.execute(
            "migrate",
            destination=pair.address,
            parameters={"downtime_limit_ms": 0.001, "timeout_s": 60},
        )
        migration_id = started["id"]
        await pair.src.next_event(
            lambda m, mid=migration_id: m["event"] == "MIGRATION_PASS" and m["data"]["id"] == mid,
            30,
        )
        await pair.destination.kill()
        final = await pair.migration_event("failed")
        assert final["data"]["stats"]["outcome"] == "source"
        assert set((await pair.states(pair.src)).values()) == {"RUNNING"}
        owners = {d["owner"] for d in await pair.src.execute("query-devices")}
        assert owners == {"running here"}
        pair.destination.process = None  # killed on purpose: nothing to stop


async def test_real_daemons_refusal_at_load_rolls_back(tmp_path: Path) -> None:
    """Switchover before COMMIT: a destination device rejects its state; source RUNNING."""
    source, destination = write_pair(
        tmp_path, destination_sim0="faults = { corrupt_validation = true }"
    )
    async with running_pair(tmp_path, source, destination) as pair:
        code, _, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 1, err
        assert "sim0" in err
        assert set((await pair.states(pair.src)).values()) == {"RUNNING"}
        assert {d["owner"] for d in await pair.src.execute("query-devices")} == {"running here"}
        assert "RUNNING_P2P" not in {d["state"] for d in await pair.dst.execute("query-devices")}


async def test_real_daemons_split_after_commit(tmp_path: Path) -> None:
    """After COMMIT a destination device cannot run: exit 8, nothing rolls back, named."""
    source, destination = write_pair(
        tmp_path, destination_sim0='faults = { fail_arcs = ["RUNNING_P2P->RUNNING"] }'
    )
    async with running_pair(tmp_path, source, destination) as pair:
        code, _, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 8, err
        assert "split outcome" in err
        assert "sim0: stopped on the destination" in err
        assert set((await pair.states(pair.src)).values()) == {"STOP"}
        there = {d["name"]: d for d in await pair.dst.execute("query-devices")}
        assert there["sim0"]["state"] == "STOP"
        assert there["sim0"]["owner"] == "stopped"
        assert there["idle0"]["state"] == "RUNNING"
        assert there["idle0"]["owner"] == "received"
        here = {d["owner"] for d in await pair.src.execute("query-devices")}
        assert here == {"migrated away"}
        digests = await pair.dst.execute("query-digests")
        assert digests["sim0"] == (await pair.src.execute("query-digests"))["sim0"]

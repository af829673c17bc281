"""Two ends of a migration in one process, with the tools to break the link between them."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

import transport
from devices.fsm import Feature, State
from devices.paged import Faults, PagedDevice
from devices.ram import RamDevice
from devices.simulated import SimulatedDevice
from devices.testing import ArcTrace
from orchestrator.engine.destination import DestinationMigration, Gate
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.source import SourceMigration
from orchestrator.engine.stats import Status
from tests.faultproxy import FaultProxy

MIB = 1 << 20
MB = 1_000_000
ALL = Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY
Factory = Callable[[], PagedDevice]


@dataclasses.dataclass
class Spec:
    """One device of a test migration: how to build its source and its destination."""

    name: str
    kind: str = "simulated"
    size: int = 2 * MIB
    dirty_rate: float = 2 * MB
    features: Feature = ALL
    seed: int = 7
    source_faults: Faults | None = None
    target_faults: Faults | None = None

    def build(self, *, source: bool) -> PagedDevice:
        """The source device (with its workload) or the idle destination device."""
        faults = self.source_faults if source else self.target_faults
        rate = self.dirty_rate if source else 0.0
        if self.kind == "ram":
            return RamDevice(
                self.name, size=self.size, working_set=self.size // 2, dirty_rate=rate,
                features=self.features, seed=self.seed, faults=faults,
            )  # fmt: skip
        return SimulatedDevice(
            self.name, state_size=self.size, dirty_rate=rate, features=self.features,
            seed=self.seed, faults=faults,
        )  # fmt: skip


class SessionView:
    """A destination session seen through a test's wrapper: what the wrapper does not
    define is the session's own."""

    def __init__(self, session: transport.Session) -> None:
        self._session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class VerdictGate(SessionView):
    """Wraps a destination session so its verdicts (of one stage, or all) wait for the test."""

    def __init__(self, session: transport.Session, stage: str | None) -> None:
        super().__init__(session)
        self._stage = stage
        self.blocked = asyncio.Event()
        self.open = asyncio.Event()

    async def send_control(self, tag: transport.Tag, fields: Any = None, **kw: Any) -> None:
        held = self._stage is None or (fields or {}).get("stage") == self._stage
        if tag == transport.Tag.VERDICT and held and not self.open.is_set():
            self.blocked.set()
            await self.open.wait()
        await self._session.send_control(tag, fields, **kw)


@dataclasses.dataclass
class Ends:
    """A destination server with its devices, the source devices, and one arc trace."""

    specs: list[Spec]
    sources: list[PagedDevice]
    targets: list[PagedDevice]
    #: State changes of the source devices, and of the destination devices.
    trace: ArcTrace
    target_trace: ArcTrace
    address: str
    outcomes: list[bool]
    gates: list[VerdictGate]
    #: The destination migrations, in the order their sessions arrived.
    incoming: list[DestinationMigration]
    gate_made: asyncio.Event
    auth: transport.AuthConfig = dataclasses.field(default_factory=transport.AuthConfig)
    #: The destination sessions' handler tasks, in the order the sessions arrived.
    tasks: list[asyncio.Task[Any]] = dataclasses.field(default_factory=list)
    #: Set once the first destination session arrived.
    accepted: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def resumed_on_destination(self) -> bool:
        """Whether any destination device took the resume arc out of STOP."""
        return (State.STOP, State.RUNNING_P2P) in self.target_trace.arcs()

    async def held_verdict(self) -> VerdictGate:
        """The first destination session, once its first verdict is being held."""
        await self.gate_made.wait()
        await self.gates[0].blocked.wait()
        return self.gates[0]

    def migration(self, address: str | None = None, **params: Any) -> SourceMigration:
        """A source migration of every source device to this destination."""
        return SourceMigration(
            self.sources, address or self.address, MigrationParams(**params), auth=self.auth
        )

    async def assert_source_intact(self) -> None:
        """Every source device RUNNING and holding exactly what its workload wrote."""
        for spec, device in zip(self.specs, self.sources, strict=True):
            assert device.state == State.RUNNING, device.name
            await device.close()  # freeze the workload so its write count is final
            replica = spec.build(source=True)
            replica.replay(device.writes)
            assert await replica.digest() == await device.digest(), device.name

    async def assert_migrated(self) -> None:
        """Each destination device RUNNING with the state its source had when it stopped."""
        for source, target in zip(self.sources, self.targets, strict=True):
            assert source.state == State.STOP
            assert target.state == State.RUNNING
            assert await source.digest() == await target.digest(), source.name


@pytest.fixture
async def make_ends() -> AsyncIterator[Callable[..., Any]]:
    """Factory of migration ends; everything it made is closed after the test."""
    servers: list[transport.Server] = []
    devices: list[PagedDevice] = []

    async def make(
        specs: Sequence[Spec],
        *,
        hold_verdicts: bool | str = False,
        link_timeout_s: float = 5.0,
        gate: Gate | None = None,
        wrap: Callable[[transport.Session], Any] | None = None,
        idle_timeout_s: float = 60.0,
        device_as: Callable[[PagedDevice], Any] | None = None,
        auth: tuple[transport.AuthConfig, transport.AuthConfig] | None = None,
        limits: transport.Limits | None = None,
    ) -> Ends:
        """``hold_verdicts``: hold every verdict (True) or those of one stage; ``gate``:
        the destination's say (a daemon's arming and records), none by default; ``wrap``:
        what the destination reads its session through (to watch or script what it
        receives); ``device_as``: what each device is seen through at both ends (e.g. a
        device whose arcs wait); ``auth``: the server's and the source's (TLS);
        ``limits``: the destination's transport limits."""
        sources: list[Any] = [s.build(source=True) for s in specs]
        targets: list[Any] = [s.build(source=False) for s in specs]
        if device_as is not None:
            sources = [device_as(d) for d in sources]
            targets = [device_as(d) for d in targets]
        trace, target_trace = ArcTrace(), ArcTrace()
        trace.watch(*sources)
        target_trace.watch(*targets)
        for device in (*sources, *targets):
            await device.open()
        devices.extend((*sources, *targets))
        outcomes: list[bool] = []
        gates: list[VerdictGate] = []
        incoming: list[DestinationMigration] = []
        gate_made, accepted = asyncio.Event(), asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []
        by_name = {d.name: d for d in targets}

        async def accept(session: transport.Session) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.append(task)
            if wrap is not None:
                session = wrap(session)
            accepted.set()
            if hold_verdicts:
                stage = hold_verdicts if isinstance(hold_verdicts, str) else None
                held = VerdictGate(session, stage)
                gates.append(held)
                gate_made.set()
                session = held
            incoming.append(
                DestinationMigration(session, by_name, gate=gate, idle_timeout_s=idle_timeout_s)
            )
            outcomes.append(await incoming[-1].run())

        server_auth, client_auth = auth or (transport.AuthConfig(),) * 2
        server = await transport.serve(
            "127.0.0.1:0", accept, name="test-dst", auth=server_auth,
            limits=limits, link_timeout_s=link_timeout_s,
        )  # fmt: skip
        servers.append(server)
        return Ends(list(specs), sources, targets, trace, target_trace, server.address,
                    outcomes, gates, incoming, gate_made, client_auth, tasks, accepted)  # fmt: skip

    yield make
    for server in servers:
        server.close()
        await server.wait_closed()
    for device in devices:
        await device.close()


@pytest.fixture
async def proxy_to() -> AsyncIterator[Callable[[str], Any]]:
    """Factory of fault proxies in front of a destination address."""
    proxies: list[FaultProxy] = []

    async def make(target: str) -> tuple[FaultProxy, str]:
        proxy = FaultProxy(target)
        proxies.append(proxy)
        return proxy, await proxy.start()

    yield make
    for proxy in proxies:
        await proxy.close()


async def wait_status(migration: SourceMigration, *statuses: Status) -> None:
    """Return once the migration enters one of ``statuses`` (call before it starts)."""
    reached = asyncio.Event()

    def check(stats: Any) -> None:
        if stats.status in statuses:
            reached.set()

    migration.add_listener(check)
    await reached.wait()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the safety matrix when its cells ran (tests/orchestrator/test_safety_matrix.py)."""
    # The test module is imported under its rootdir-relative name: find it, do not re-import.
    module = sys.modules.get("test_safety_matrix")
    if module is not None and module.MATRIX:
        terminalreporter.section("safety matrix: where the workload ended (outcome: error)")
        terminalreporter.write_line(module.matrix_table())

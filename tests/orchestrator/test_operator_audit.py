"""What an operator can do to the daemons: each mistake or race is refused by name, or safe.

Two real daemons on loopback (tests/orchestrator/test_daemon.py's harness) where the
answer depends on a running migration or a restart; in process where that is enough.
Every wait is on an event or a reply, bounded by DEADLINE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import transport
from devices.fsm import State
from devices.simulated import SimulatedDevice
from orchestrator.bench.daemons import DaemonFailed, DaemonProcess
from orchestrator.cli.commands import main
from orchestrator.cli.parser import build_parser
from orchestrator.engine.destination import Refused
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.source import SourceMigration
from orchestrator.engine.stats import Status
from orchestrator.service.commands import Commands
from orchestrator.service.config import ConfigError, parse
from orchestrator.service.ownership import Owner, OwnershipBook
from orchestrator.service.protocol import ControlError
from orchestrator.service.service import Service, _ClaimOnLookup
from tests.orchestrator.conftest import Spec, wait_status
from tests.orchestrator.test_daemon import DEADLINE, Pair, running_pair, write_pair
from tests.pki import make_pki
from transport import AuthConfig

NAMES = ("sim0", "idle0", "ram0")
#: Pre-copy that never converges, and a link that outlives a frozen peer for the test.
NEVER_CONVERGES = {"downtime_limit_ms": 0.001, "timeout_s": 120, "link_timeout_s": 30}


async def refusal(client: Any, command: str, **arguments: Any) -> ControlError:
    """The daemon's refusal of ``command`` (the test fails if it is accepted)."""
    with pytest.raises(ControlError) as refused:
        await client.execute(command, **arguments)
    return refused.value


async def owners(client: Any) -> dict[str, tuple[str, str]]:
    """Each device's (FSM state, owner)."""
    return {d["name"]: (d["state"], d["owner"]) for d in await client.execute("query-devices")}


async def incoming_ended(pair: Pair) -> dict[str, Any]:
    """The destination's INCOMING_MIGRATION event that ends a migration (subscribed before)."""
    message = await pair.dst.next_event(
        lambda m: m["event"] == "INCOMING_MIGRATION" and m["data"]["status"] != "active",
        DEADLINE,
    )
    return dict(message["data"])


@contextlib.asynccontextmanager
async def killable_pair(folder: Path) -> AsyncIterator[Pair]:
    """The standard pair (destination armed for "source"), for tests that SIGKILL one."""
    source_config, destination_config = write_pair(folder)
    pair = Pair(
        folder,
        DaemonProcess(source_config, name="source"),
        DaemonProcess(destination_config, name="destination"),
    )
    try:
        await asyncio.gather(
            pair.source.start(folder / "source.sock"),
            pair.destination.start(folder / "destination.sock"),
        )
        pair.src = await pair.source.client()
        pair.dst = await pair.destination.client()
        await pair.src.subscribe()
        await pair.dst.subscribe(["INCOMING_MIGRATION"])
        pair.address = (await pair.dst.execute("query-daemon"))["listen"][0]
        await pair.dst.execute("migrate-incoming", devices=list(NAMES), **{"from": "source"})
        yield pair
    finally:
        for client in ("src", "dst"):
            with contextlib.suppress(Exception):
                await getattr(pair, client).close()
        pair.destination.signal(signal.SIGCONT)
        await pair.source.kill()
        await pair.destination.kill()


async def hold_at_the_barrier(pair: Pair) -> dict[str, Any]:
    """Start a migration paused, freeze the destination and continue: the source is in
    its switchover with the fence written, waiting at the barrier. The migrate reply."""
    parameters = {"pause_before_switchover": True, "link_timeout_s": 30}
    started = await pair.src.execute("migrate", destination=pair.address, parameters=parameters)
    await pair.migration_event("pre-switchover")
    pair.destination.signal(signal.SIGSTOP)  # the barrier waits for it
    await pair.src.execute("migrate-continue")
    await pair.migration_event("device")
    return dict(started)


async def restart_source(pair: Pair, log_name: str) -> None:
    """Start the source daemon again on the same config and state file (after SIGKILL)."""
    assert pair.source.process is not None
    assert pair.source.process.returncode == -9
    with contextlib.suppress(Exception):  # the connection to the killed daemon
        await pair.src.close()
    pair.source = DaemonProcess(
        pair.source.config, name="source-again", log_file=pair.folder / log_name
    )
    await pair.source.start(pair.folder / "source.sock")
    pair.src = await pair.source.client()
    await pair.src.subscribe()


async def restart_destination(pair: Pair) -> None:
    """Start the destination daemon again on the same config and state file (after
    SIGKILL): its own log, a fresh control client."""
    with contextlib.suppress(Exception):  # the connection to the killed daemon
        await pair.dst.close()
    pair.destination = DaemonProcess(
        pair.destination.config,
        name="destination-again",
        log_file=pair.folder / "destination-again.log",
    )
    await pair.destination.start(pair.folder / "destination.sock")
    pair.dst = await pair.destination.client()


# -- races with a running migration -----------------------------------------------------------


async def test_commands_racing_a_migration_are_refused_naming_it(tmp_path: Path) -> None:
    """While a migration runs, a second migrate, resume, arming, a fixed parameter or a
    continue is refused on either host naming the migration, and nothing moves; cancel
    then returns every source device to RUNNING, and a second cancel is refused."""
    source, destination = write_pair(tmp_path)
    async with running_pair(tmp_path, source, destination) as pair:
        await pair.dst.subscribe(["INCOMING_MIGRATION"])
        refused = await refusal(pair.src, "migrate", destination=pair.address, devices=["sim0"] * 2)
        assert "device names must be unique" in refused.desc
        # Two operators at once, on two connections, for the same devices: one wins.
        other = await pair.source.client()
        both = await asyncio.gather(
            *(
                client.execute("migrate", destination=pair.address, parameters=NEVER_CONVERGES)
                for client in (pair.src, other)
            ),
            return_exceptions=True,
        )
        await other.close()
        started = next(r for r in both if isinstance(r, dict))
        lost = next(r for r in both if not isinstance(r, dict))
        assert isinstance(lost, ControlError), lost
        assert lost.error_class == "DeviceBusy"
        mid = started["id"]
        assert f"(migration {mid})" in lost.desc
        await pair.src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
        busy = f"(migration {mid})"
        on_source = [
            ("migrate", {"destination": pair.address, "devices": ["ram0"]}, "DeviceBusy", busy),
            ("migrate", {"destination": "127.0.0.1:9", "devices": ["idle0"]}, "DeviceBusy", busy),
            ("device-resume", {"devices": ["sim0"], "force": True}, "DeviceBusy", busy),
            ("migrate-incoming", {"devices": ["sim0"]}, "DeviceBusy", busy),
            ("query-digests", {"devices": ["sim0"]}, "DeviceBusy", busy),
            (
                "migrate-set-parameters",
                {"parameters": {"channels": 4}},
                "InvalidParameter",
                "channels cannot change during a migration",
            ),
            (
                "migrate-set-parameters",
                {"parameters": {"downtime_limit_ms": -1}},
                "InvalidParameter",
                "downtime_limit_ms",
            ),
            ("migrate-continue", {}, "WrongState", "continue"),
            ("migrate-cancel", {"id": "nope"}, "MigrationNotFound", "no migration 'nope'"),
        ]
        for command, arguments, error_class, text in on_source:
            refused = await refusal(pair.src, command, **arguments)
            assert (refused.error_class, text in refused.desc) == (error_class, True), (
                command,
                refused.desc,
            )
        on_destination = [
            ("device-resume", {"devices": ["sim0"], "force": True}, "DeviceBusy", busy),
            ("migrate-incoming", {"devices": ["sim0"]}, "DeviceBusy", busy),
            ("migrate", {"destination": "127.0.0.1:9", "devices": ["sim0"]}, "DeviceBusy", busy),
            ("query-digests", {"devices": ["sim0"]}, "DeviceBusy", busy),
            # The incoming migration is the source's to cancel: say so, not "no migration".
            ("migrate-cancel", {"id": mid}, "WrongState", "it on its source"),
            ("migrate-cancel", {}, "WrongState", f"migration {mid} is incoming from source"),
            ("migrate-continue", {}, "WrongState", "cancel, continue or set it on its source"),
            (
                "migrate-set-parameters",
                {"id": mid, "parameters": {"downtime_limit_ms": 5}},
                "WrongState",
                "cancel, continue or set it on its source",
            ),
        ]
        for command, arguments, error_class, text in on_destination:
            refused = await refusal(pair.dst, command, **arguments)
            assert (refused.error_class, text in refused.desc) == (error_class, True), (
                command,
                refused.desc,
            )
        assert (await pair.src.execute("query-migrate"))["status"] == "active"
        code, out, err = await pair.cli("cancel", "--json")
        assert code == 0, err
        assert json.loads(out)["status"] == "cancelled"
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))
        assert (await incoming_ended(pair))["status"] == "failed"
        code, _, err = await pair.cli("cancel", "--id", mid)
        assert code == 5
        assert f"migration {mid} is already cancelled" in err
        # A failed attempt before COMMIT leaves the arms: the source may retry.
        armed = {d["name"]: d["armed"] for d in await pair.dst.execute("query-devices")}
        assert all(a is not None and a["peer"] == "source" for a in armed.values()), armed


async def test_an_offer_for_a_device_a_migration_holds_there_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """A source offering a device that an outgoing migration on the destination holds
    (still connecting, the device RUNNING) is refused as busy with that migration, not
    told the device does not exist; nothing moves on either side."""
    held: list[asyncio.StreamWriter] = []

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    source, destination = write_pair(tmp_path)
    try:
        async with running_pair(tmp_path, source, destination) as pair:
            outgoing = await pair.dst.execute(
                "migrate",
                destination=f"127.0.0.1:{port}",
                devices=["sim0"],
                parameters={"connect_timeout_s": 60},
            )
            code, _, err = await pair.cli("migrate", "--to", pair.address)
            assert code == 1
            assert f"sim0: busy (migration {outgoing['id']} holds it here)" in err
            assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))
            await pair.dst.execute("migrate-cancel")
            assert await owners(pair.dst) == dict.fromkeys(NAMES, ("RUNNING", "running here"))
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_cancel_in_the_switchover_before_commit_rolls_the_fence_back(
    tmp_path: Path,
) -> None:
    """A cancel while the switchover waits at its barrier (the fence already written)
    puts the source's records back and its devices RUNNING; the destination runs none.
    Meanwhile ``continue`` and a forced switchover are refused: it is already under way."""
    async with killable_pair(tmp_path) as pair:
        await hold_at_the_barrier(pair)
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("PRE_COPY", "outcome unknown"))
        refused = await refusal(pair.src, "migrate-continue")
        assert refused.error_class == "WrongState"
        refused = await refusal(pair.src, "migrate-switchover")
        assert (refused.error_class, "is already switching over" in refused.desc) == (
            "WrongState",
            True,
        ), refused.desc
        # Mid-switchover a live parameter is taken (the stop bound in force stays the
        # one set when the switchover began); a fixed one is refused by name.
        changed = await pair.src.execute(
            "migrate-set-parameters", parameters={"downtime_limit_ms": 5000, "max_stop_ms": 9000}
        )
        assert (changed["downtime_limit_ms"], changed["max_stop_ms"]) == (5000, 9000)
        refused = await refusal(pair.src, "migrate-set-parameters", parameters={"channels": 2})
        assert "channels cannot change during a migration" in refused.desc
        await pair.src.execute("migrate-cancel")
        await pair.migration_event("cancelled")
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))
        pair.destination.signal(signal.SIGCONT)
        assert (await incoming_ended(pair))["status"] == "failed"
        assert {owner for _, owner in (await owners(pair.dst)).values()} <= {"idle", "running here"}


async def test_a_destination_on_port_zero_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    """``migrate --to HOST:0`` names the problem at once instead of connecting in vain
    until connect_timeout_s."""
    source, destination = write_pair(tmp_path)
    async with running_pair(tmp_path, source, destination) as pair:
        refused = await refusal(pair.src, "migrate", destination="127.0.0.1:0")
        assert refused.error_class == "InvalidParameter"
        assert "destination: port 0" in refused.desc
        assert await pair.src.execute("query-migrations") == []


async def test_cancel_and_resume_just_after_commit_are_refused(
    make_ends: Callable[..., Any], tmp_path: Path
) -> None:
    """Once COMMIT is sent (the destination holds its "resumed" verdict), ``cancel`` is
    refused as past the point of no return, without claiming where the workload ends (a
    COMMIT still whole in our buffer is withdrawn, and the source runs again), and
    ``resume --force`` as busy; the migration then completes and the source's records say
    migrated away."""
    ends = await make_ends([Spec("sim0", seed=1), Spec("sim1", seed=2)], hold_verdicts="resumed")
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), ends.sources)
    commands = Commands(service)
    try:
        record = service.start_migration(ends.address, None, {})
        gate = await ends.held_verdict()
        with pytest.raises(ControlError) as refused:
            await commands.migrate_cancel()
        assert refused.value.error_class == "WrongState"
        assert "past the point of no return" in refused.value.desc
        assert "the destination may run the workload" in refused.value.desc
        assert "belongs to the destination" not in refused.value.desc
        assert f"livemig status --id {record.migration.stats.migration_id}" in refused.value.desc
        with pytest.raises(ControlError) as busy:
            await commands.device_resume(["sim0"], force=True)
        assert busy.value.error_class == "DeviceBusy"
        gate.open.set()
        assert record.task is not None
        await record.task
        assert record.migration.stats.status == "completed"
        assert {service.book.get(n).owner for n in ("sim0", "sim1")} == {Owner.MIGRATED_AWAY}
        with pytest.raises(ControlError) as late:
            await commands.migrate_cancel()
        assert f"migration {record.migration.stats.migration_id} is already completed" in (
            late.value.desc
        )
    finally:
        service.book.close()


async def test_force_switchover_on_a_paused_migration_is_refused_naming_continue(
    make_ends: Callable[..., Any], tmp_path: Path
) -> None:
    """``migrate-switchover`` while paused before the switchover is refused with
    WrongState naming ``continue`` (the pause is the operator's gate, which only
    ``continue`` opens), and the pause holds; ``continue`` then completes the migration,
    after which a switchover is refused as already ended."""
    ends = await make_ends([Spec("sim0", seed=1)])
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), ends.sources)
    commands = Commands(service)
    try:
        record = service.start_migration(ends.address, None, {"pause_before_switchover": True})
        await wait_status(record.migration, Status.PRE_SWITCHOVER)
        with pytest.raises(ControlError) as refused:
            await commands.migrate_switchover()
        assert refused.value.error_class == "WrongState"
        assert "paused before the switchover" in refused.value.desc
        assert "livemig continue" in refused.value.desc
        assert record.migration.stats.status == Status.PRE_SWITCHOVER
        assert ends.sources[0].state == State.PRE_COPY
        await commands.migrate_continue()
        assert record.task is not None
        await record.task
        assert record.migration.stats.status == Status.COMPLETED
        assert not record.migration.stats.forced
        with pytest.raises(ControlError) as late:
            await commands.migrate_switchover()
        assert "is already completed" in late.value.desc
    finally:
        service.book.close()


async def test_stopping_a_destination_just_after_commit_lets_it_resume(tmp_path: Path) -> None:
    """SIGTERM on the destination while it resumes devices after COMMIT does not cancel
    that migration (the source has given the workload away): the devices reach RUNNING,
    the record says received, and the source completes."""
    resuming, release = asyncio.Event(), asyncio.Event()

    class HeldResume(SimulatedDevice):
        """A destination device whose resume waits for the test (a slow real backend)."""

        async def set_state(self, state: State) -> None:
            if self.state == State.STOP and state in (State.RUNNING_P2P, State.RUNNING):
                resuming.set()  # only after COMMIT does the destination resume
                await release.wait()
            await super().set_state(state)

    spec = Spec("sim0", seed=1)
    source = spec.build(source=True)
    target = HeldResume("sim0", state_size=spec.size, features=spec.features, seed=spec.seed)
    for device in (source, target):
        await device.open()
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [target])
    service.book.arm(["sim0"], None, None)
    server = await transport.serve("127.0.0.1:0", service.accept, name="dst", auth=AuthConfig())
    migration = SourceMigration([source], server.address, MigrationParams(), auth=AuthConfig())
    try:
        run = asyncio.create_task(migration.run())
        await resuming.wait()
        stopping = asyncio.create_task(service.shutdown("SIGTERM"))
        await asyncio.sleep(0)  # one turn: shutdown runs to its first await (its decision)
        release.set()
        await stopping
        stats = await run
        assert stats.outcome == "destination"
        assert target.state == State.RUNNING
        assert service.book.get("sim0").owner == Owner.RECEIVED
    finally:
        release.set()
        server.close()
        await server.wait_closed()
        service.book.close()
        for device in (source, target):
            await device.close()


async def test_a_device_the_operator_is_resuming_is_busy_for_migrations(tmp_path: Path) -> None:
    """While ``resume`` walks a device back to RUNNING (a real backend's arcs take time),
    an arm, an outgoing migration or an incoming offer for it is refused as busy, so
    two walks never drive one device at once."""
    device = Spec("sim0", seed=1).build(source=True)
    await device.open()
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [device])
    commands = Commands(service)
    await device.set_state(State.STOP)
    service.book.set(["sim0"], Owner.OUTCOME_UNKNOWN, peer="dst:7070", migration_id="m1")
    walking, release = asyncio.Event(), asyncio.Event()
    set_state = device.set_state

    async def slow_arc(state: State) -> None:
        walking.set()
        await release.wait()
        await set_state(state)

    device.set_state = slow_arc  # type: ignore[method-assign]
    try:
        resume = asyncio.create_task(commands.device_resume(["sim0"], force=True))
        await walking.wait()
        with pytest.raises(ControlError) as armed:
            await commands.migrate_incoming(devices=["sim0"])
        assert armed.value.error_class == "DeviceBusy"
        with pytest.raises(ControlError) as outgoing:
            service.start_migration("127.0.0.1:9", ["sim0"], {})
        assert outgoing.value.error_class == "DeviceBusy"
        with pytest.raises(Refused, match="sim0: busy"):
            _ClaimOnLookup(service, "incoming")["sim0"]
        release.set()
        assert await resume == {"sim0": "RUNNING"}
        assert service.owners == {}
        assert service.book.get("sim0").owner == Owner.RUNNING_HERE
    finally:
        release.set()
        service.book.close()
        await device.close()


async def test_a_device_being_digested_is_busy_for_migrations(tmp_path: Path) -> None:
    """``digests`` walks a real device aside (to STOP_COPY and back): meanwhile an arm,
    an outgoing migration, a resume or a second digest of it is refused as busy."""
    device = Spec("sim0", seed=1).build(source=True)
    await device.open()
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [device])
    commands = Commands(service)
    walking, release = asyncio.Event(), asyncio.Event()
    digest = device.digest

    async def slow_digest() -> bytes:
        walking.set()
        await release.wait()
        return await digest()

    device.digest = slow_digest  # type: ignore[method-assign]
    try:
        first = asyncio.create_task(commands.query_digests(["sim0"]))
        await walking.wait()
        for attempt in (
            commands.migrate_incoming(devices=["sim0"]),
            commands.device_resume(["sim0"]),
            commands.query_digests(["sim0"]),
        ):
            with pytest.raises(ControlError) as busy:
                await attempt
            assert busy.value.error_class == "DeviceBusy"
        with pytest.raises(ControlError) as outgoing:
            service.start_migration("127.0.0.1:9", ["sim0"], {})
        assert outgoing.value.error_class == "DeviceBusy"
        release.set()
        assert set(await first) == {"sim0"}
        assert service.owners == {}
    finally:
        release.set()
        service.book.close()
        await device.close()


async def test_arming_a_device_that_runs_a_workload_here_says_what_it_risks(
    tmp_path: Path,
) -> None:
    """``livemig incoming --devices`` naming a device that runs a workload here (a typo
    for another device, say) arms it, as documented, and warns that a migration into
    it replaces that workload's state."""
    source, destination = write_pair(tmp_path)
    async with running_pair(tmp_path, source, destination, arm=False) as pair:
        code, out, err = await pair.cli("incoming", "--devices", "sim0,idle0", "--from", "x")
        assert code == 0, err
        assert out.strip() == "armed sim0, idle0 to receive one migration from x"
        assert (
            "warning: sim0, idle0 run a workload here (owner: running here); a migration "
            "into them replaces its state" in err
        )
        armed = {d["name"]: d["armed"] for d in await pair.src.execute("query-devices")}
        assert armed["sim0"] is not None
        assert armed["ram0"] is None


async def test_set_says_when_it_changed_the_defaults_rather_than_a_migration(
    tmp_path: Path,
) -> None:
    """``livemig set`` on a daemon that sends no migration (its destination, say, while
    one arrives) changes the defaults for the next one and says so, not only the
    values, which read like a live change."""
    source, destination = write_pair(tmp_path)
    async with running_pair(tmp_path, source, destination) as pair:
        code, out, err = await pair.cli("set", "--downtime-limit-ms", "70")
        assert code == 0, err
        assert out.splitlines()[0] == (
            "no migration runs from this daemon: these are the defaults of the next one"
        )
        assert "downtime_limit_ms" in out.splitlines()[1]


# -- a daemon killed and restarted ---------------------------------------------------------------


async def test_a_source_killed_in_precopy_runs_again_after_restart_and_can_retry(
    tmp_path: Path,
) -> None:
    """SIGKILL before the fence: the restarted source runs its devices as before, the
    destination took none, and a retry is admitted by the arms that are left."""
    async with killable_pair(tmp_path) as pair:
        await pair.src.execute("migrate", destination=pair.address, parameters=NEVER_CONVERGES)
        await pair.src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
        await pair.source.kill()
        ended = await incoming_ended(pair)
        assert ended["status"] == "failed"
        assert {o for _, o in (await owners(pair.dst)).values()} <= {"idle", "running here"}
        await restart_source(pair, "source-again.log")
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))
        assert "device_fenced" not in pair.source.output()
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 0, err
        assert json.loads(out)["migration_id"] != ended["id"]
        assert await owners(pair.dst) == dict.fromkeys(NAMES, ("RUNNING", "received"))
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("STOP", "migrated away"))


async def test_a_source_killed_in_the_switchover_stays_fenced_until_the_operator_decides(
    tmp_path: Path,
) -> None:
    """SIGKILL after the fence: the restarted source keeps its devices stopped as
    'outcome unknown' (naming the migration and peer), ``resume`` refuses saying why,
    and once the destination shows it runs nothing, ``resume --force`` runs them."""
    async with killable_pair(tmp_path) as pair:
        started = await hold_at_the_barrier(pair)
        assert {o for _, o in (await owners(pair.src)).values()} == {"outcome unknown"}
        await pair.source.kill()
        pair.destination.signal(signal.SIGCONT)
        assert (await incoming_ended(pair))["status"] == "failed"
        assert not any(o == "received" for _, o in (await owners(pair.dst)).values())
        await restart_source(pair, "source-again.log")
        devices = await pair.src.execute("query-devices")
        assert {(d["state"], d["owner"]) for d in devices} == {("STOP", "outcome unknown")}
        assert {(d["migration_id"], d["peer"]) for d in devices} == {(started["id"], pair.address)}
        assert "device_fenced" in pair.source.output()
        code, out, err = await pair.cli("devices")
        assert code == 0, err
        assert out.count(f"outcome unknown ({pair.address}, {started['id']}") == 3, out
        code, _, err = await pair.cli("resume", "sim0")
        assert code == 5
        assert "sim0 (outcome unknown" in err
        assert "may be running on the other host" in err
        code, out, err = await pair.cli("resume", *NAMES, "--force", "--json")
        assert code == 0, err
        assert json.loads(out) == dict.fromkeys(NAMES, "RUNNING")
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))


async def test_sigterm_at_the_switchover_barrier_rolls_back_before_exiting(tmp_path: Path) -> None:
    """SIGTERM while the switchover waits at its barrier (fence written, no COMMIT): the
    source daemon rolls back, puts its records back, exits 0, and restarts running."""
    async with killable_pair(tmp_path) as pair:
        await hold_at_the_barrier(pair)
        pair.source.signal(signal.SIGTERM)
        cancelled = await pair.migration_event("cancelled")
        assert "SIGTERM" in cancelled["data"]["error"]
        assert cancelled["data"]["stats"]["outcome"] == "source"
        assert await pair.source.wait() == 0
        stored = json.loads((tmp_path / "source.owners.json").read_text())
        assert {r["owner"] for r in stored["devices"].values()} == {"running here"}
        pair.destination.signal(signal.SIGCONT)
        assert (await incoming_ended(pair))["status"] == "failed"
        with contextlib.suppress(Exception):
            await pair.src.close()
        pair.source = DaemonProcess(
            pair.source.config, name="source-again", log_file=tmp_path / "source-again.log"
        )
        await pair.source.start(tmp_path / "source.sock")
        pair.src = await pair.source.client()
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))


async def test_a_destination_killed_in_the_switchover_leaves_the_source_running(
    tmp_path: Path,
) -> None:
    """SIGKILL of the destination before COMMIT: the source rolls back with its records
    restored; the restarted destination holds nothing (idle: its devices' state was being
    replaced), and its arms did not survive the restart, so a retry needs the operator's
    consent again."""
    async with killable_pair(tmp_path) as pair:
        await hold_at_the_barrier(pair)
        await pair.destination.kill()
        failed = await pair.migration_event("failed")
        assert failed["data"]["stats"]["outcome"] == "source"
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))
        await restart_destination(pair)
        assert await owners(pair.dst) == dict.fromkeys(NAMES, ("RUNNING", "idle"))
        pair.address = (await pair.dst.execute("query-daemon"))["listen"][0]
        code, _, err = await pair.cli("migrate", "--to", pair.address)
        assert code == 1
        assert "sim0 is not armed to receive (owner here: idle)" in err
        await pair.dst.execute("migrate-incoming", devices=list(NAMES), **{"from": "source"})
        code, _, err = await pair.cli("migrate", "--to", pair.address)
        assert code == 0, err
        assert await owners(pair.dst) == dict.fromkeys(NAMES, ("RUNNING", "received"))


async def test_a_fence_that_cannot_be_written_keeps_the_workload_at_the_source(
    tmp_path: Path,
) -> None:
    """A state file that cannot be written at the fence (a broken or full disk) stops the
    switchover: the source runs again, the error names the state file, the records
    still say 'running here', and the devices are free for the next migration."""
    async with killable_pair(tmp_path) as pair:
        pid = (await pair.src.execute("query-daemon"))["pid"]
        blocker = tmp_path / f".source.owners.json.{pid}.tmp"
        blocker.mkdir()  # the atomic write's temporary file cannot be created
        await pair.src.execute("migrate", destination=pair.address)
        failed = await pair.migration_event("failed")
        state_file = tmp_path / "source.owners.json"
        assert f"cannot write the state file {state_file}" in failed["data"]["error"]
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))
        blocker.rmdir()
        stored = json.loads(state_file.read_text())
        assert {r["owner"] for r in stored["devices"].values()} == {"running here"}
        code, _, err = await pair.cli("migrate", "--to", pair.address)
        assert code == 0, err


# -- config and state-file mistakes ------------------------------------------------------------


async def test_a_second_daemon_on_the_same_state_file_is_refused(tmp_path: Path) -> None:
    """Two daemons sharing a state file would overwrite each other's fences: the second
    refuses to start naming the file, and the first one's records stay."""
    source, _ = write_pair(tmp_path)
    first = DaemonProcess(source, name="source")
    other = tmp_path / "other.toml"
    other.write_text(
        'name = "other"\ncontrol_socket = "other.sock"\nstate_file = "source.owners.json"\n'
        '[[device]]\nkind = "simulated"\nname = "gpu0"\nstate_mib = 1\n'
    )
    second = DaemonProcess(other, name="other")
    try:
        await first.start(tmp_path / "source.sock")
        with pytest.raises(DaemonFailed) as failed:
            await second.start(tmp_path / "other.sock")
        assert f"state file {tmp_path / 'source.owners.json'} is in use" in str(failed.value)
        stored = json.loads((tmp_path / "source.owners.json").read_text())
        assert sorted(stored["devices"]) == sorted(NAMES)
        assert await first.stop() == 0, first.output()
    finally:
        await first.kill()
        await second.kill()


def test_one_state_file_admits_one_book_at_a_time(tmp_path: Path) -> None:
    """An ownership book holds its state file until closed; another is refused meanwhile."""
    path = tmp_path / "owners.json"
    first = OwnershipBook(path, ["a"])
    with pytest.raises(ValueError, match="is in use by another daemon"):
        OwnershipBook(path, ["a"])
    first.close()
    OwnershipBook(path, ["a"]).close()


def test_a_fence_outlives_a_config_that_left_its_device_out(tmp_path: Path) -> None:
    """A device left out of the config for one restart keeps its record for the next:
    dropping it would let a migrated-away device start running here again."""
    path = tmp_path / "owners.json"
    book = OwnershipBook(path, ["a", "b"])
    book.set(["a"], Owner.MIGRATED_AWAY, peer="dst:7070", migration_id="m1")
    book.close()
    OwnershipBook(path, ["b"]).close()  # the operator commented device a out
    again = OwnershipBook(path, ["a", "b"])
    assert again.get("a").owner == Owner.MIGRATED_AWAY
    assert again.get("a").migration_id == "m1"
    again.close()


async def test_a_restart_stops_a_fenced_device_it_finds_running_in_precopy(
    tmp_path: Path,
) -> None:
    """A device whose record says its workload is elsewhere is stopped at start in any
    running state, PRE_COPY too (a backend whose device outlived a killed daemon)."""
    config = parse(
        f'control_socket = "{tmp_path}/c.sock"\n'
        '[[device]]\nkind = "simulated"\nname = "sim0"\nstate_mib = 1\n'
    )
    assert config.state_file is not None
    book = OwnershipBook(config.state_file, ["sim0"])
    book.set(["sim0"], Owner.MIGRATED_AWAY, peer="dst:7070", migration_id="m1")
    book.close()
    device = config.devices[0].build()
    await device.open()
    try:
        await device.set_state(State.PRE_COPY)  # as the daemon killed mid-migration left it
        service = Service(config, [device])
        await service.fence()
        assert device.state == State.STOP
        service.book.close()
    finally:
        await device.close()


def test_a_lapsed_arm_is_not_shown_as_armed() -> None:
    """Once an arm's timeout passed, ``query-devices`` (``livemig devices``) no longer
    shows the device armed, while a source that tries is still told the arm expired."""
    now = [100.0]
    book = OwnershipBook(None, ["a"], clock=lambda: now[0])
    book.arm(["a"], "src", 30)
    assert book.armed()["a"]["expires_in_s"] == 30
    now[0] += 31
    assert "a" not in book.armed()
    assert "a: its arming expired" in str(book.admission_problem("a", "src"))


def test_a_tls_certificate_that_does_not_match_its_key_is_named(tmp_path: Path) -> None:
    """A certificate with another host's key is refused at load, naming auth.tls_cert."""
    pki = make_pki(tmp_path / "pki", ("host", "other"))
    text = (
        f'control_socket = "{tmp_path}/c.sock"\n[auth]\n'
        f'tls_cert = "{pki / "host.crt"}"\ntls_key = "{pki / "other.key"}"\n'
        f'tls_ca = "{pki / "ca.crt"}"\n'
    )
    with pytest.raises(ConfigError) as refused:
        parse(text, file=str(tmp_path / "d.toml"))
    assert "auth.tls_cert: cannot load the TLS files" in str(refused.value)


def test_a_psk_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    """A psk_file that is a folder (unreadable as a key) is refused naming it and why."""
    (tmp_path / "keys").mkdir()
    text = f'control_socket = "{tmp_path}/c.sock"\n[auth]\npsk_file = "keys"\n'
    with pytest.raises(ConfigError) as refused:
        parse(text, file=str(tmp_path / "d.toml"))
    assert f"auth.psk_file: cannot read {tmp_path / 'keys'}: Is a directory" in str(refused.value)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            'listen = ["127.0.0.1:7391", "127.0.0.1:7391"]',
            "listen: 127.0.0.1:7391 is also listen: each listener needs its own address",
        ),
        (
            'listen = ["0.0.0.0:7391"]\nmetrics = 7391\n[auth]\ninsecure = true',
            "metrics: 127.0.0.1:7391 is also listen (0.0.0.0:7391)",
        ),
        ('listen = ["unix:c.sock"]', "control_socket: unix:{folder}/c.sock is also listen"),
    ],
    ids=["listen-twice", "metrics-on-listen", "control-socket-on-listen"],
)
def test_a_daemon_listening_twice_on_one_address_is_named(
    tmp_path: Path, lines: str, message: str
) -> None:
    """Two of a daemon's own listeners on one address are a config mistake named at its
    key, not a bind error at start that blames another process."""
    text = f'control_socket = "c.sock"\n{lines}\n'
    with pytest.raises(ConfigError) as refused:
        parse(text, file=str(tmp_path / "d.toml"))
    assert message.format(folder=tmp_path) in str(refused.value)


@pytest.mark.parametrize("name", ["a/b", "../x", "two words", "tab\\there"])
def test_a_daemon_name_that_is_no_plain_name_is_refused(tmp_path: Path, name: str) -> None:
    """The name picks the default state file (NAME.owners.json) and travels in
    handshakes: one with a slash, a space or a control character is refused by key."""
    text = f'name = "{name}"\ncontrol_socket = "c.sock"\n'
    with pytest.raises(ConfigError) as refused:
        parse(text, file=str(tmp_path / "d.toml"))
    assert "name: must be letters, digits, '.', '-' or '_'" in str(refused.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["events", "--count", "0"], "--count: must be a whole number > 0, got '0'"),
        (["events", "--count", "-3"], "--count: must be a whole number > 0, got '-3'"),
        (["incoming", "--timeout-s", "-1"], "--timeout-s: must be a number > 0, got '-1'"),
        (["incoming", "--timeout-s", "nan"], "--timeout-s: must be a number > 0, got 'nan'"),
        (["incoming", "--devices", "a,,b"], "empty device name in 'a,,b'"),
        (["resume"], "the following arguments are required: DEVICE"),
        (["bench", "--state-mib", "0"], "--state-mib: must be a number > 0, got '0'"),
    ],
)
def test_command_line_values_out_of_range_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A count or timeout that cannot mean anything exits 2 naming the option."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bench_of_no_devices_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``bench --devices 0`` without a RAM device exits 2 saying so (it raised a traceback)."""
    assert main(["bench", "--devices", "0"]) == 2
    assert "--devices must be at least 1 (or 0 with --ram-mib)" in capsys.readouterr().err

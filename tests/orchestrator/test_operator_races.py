"""Two operators at once on one migration, and daemons killed under them: the replies
each gets must agree with how the migration ends, and the workload ends in exactly one
place, as the state files say (real daemons; in process where that is enough).

Every wait is on a daemon's event or reply, bounded by DEADLINE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from devices.fsm import State
from orchestrator.bench.daemons import DaemonFailed, DaemonProcess
from orchestrator.cli import commands as cli
from orchestrator.engine.stats import Status
from orchestrator.service import ownership
from orchestrator.service.commands import Commands
from orchestrator.service.config import parse
from orchestrator.service.ownership import Owner, OwnershipBook
from orchestrator.service.protocol import ControlError
from orchestrator.service.service import Service
from tests.orchestrator.conftest import Spec, wait_status
from tests.orchestrator.test_daemon import DEADLINE, Pair, write_pair
from tests.orchestrator.test_operator_audit import (
    NAMES,
    incoming_ended,
    killable_pair,
    owners,
    refusal,
    restart_destination,
    restart_source,
)
from tests.orchestrator.test_switchover_faults import Awaiting

#: Paused before the switchover, on a link that outlives the test's pauses.
PAUSED = {"pause_before_switchover": True, "link_timeout_s": 30}


async def final_event(pair: Pair, migration_id: str) -> dict[str, Any]:
    """The source's MIGRATION event that ends ``migration_id`` (subscribed at start)."""
    message = await pair.src.next_event(
        lambda m: (
            m["event"] == "MIGRATION" and m["data"]["id"] == migration_id and "stats" in m["data"]
        ),
        DEADLINE,
    )
    return dict(message["data"])


async def in_one_place(pair: Pair, outcome: str) -> None:
    """Every device runs on exactly the host ``outcome`` names, and both records agree."""
    if outcome == "source":
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("RUNNING", "running here"))
        assert {o for _, o in (await owners(pair.dst)).values()} <= {"idle", "running here"}
    else:
        assert await owners(pair.src) == dict.fromkeys(NAMES, ("STOP", "migrated away"))
        assert await owners(pair.dst) == dict.fromkeys(NAMES, ("RUNNING", "received"))


async def test_continue_after_a_cancel_is_refused_naming_the_cancel(
    make_ends: Callable[..., Any], tmp_path: Path
) -> None:
    """A second operator's ``continue`` (or forced switchover) that arrives after the
    first one's cancel was taken, while the rollback has yet to run, is refused saying
    the migration is being cancelled, instead of answering that it continues (in
    process, so the rollback cannot finish between the two commands)."""
    ends = await make_ends([Spec("sim0", seed=1)])
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), ends.sources)
    commands = Commands(service)
    try:
        record = service.start_migration(ends.address, None, PAUSED)
        await wait_status(record.migration, Status.PRE_SWITCHOVER)
        await commands.migrate_cancel()
        for attempt in (commands.migrate_continue(), commands.migrate_switchover()):
            with pytest.raises(ControlError) as refused:
                await attempt
            assert refused.value.error_class == "WrongState"
            assert (
                f"migration {record.migration.stats.migration_id} is being cancelled "
                "(cancelled by the user)" in refused.value.desc
            )
        assert record.task is not None
        await record.task
        assert record.migration.stats.status == Status.CANCELLED
        assert ends.sources[0].state == State.RUNNING
    finally:
        service.book.close()


async def test_continue_while_a_failed_migration_rolls_back_is_refused_naming_why(
    make_ends: Callable[..., Any], tmp_path: Path
) -> None:
    """A paused migration that failed on its own (its destination went away) still
    rolls back when ``continue`` arrives: it is refused saying the migration is failing
    and why, not answered as continuing (the rollback is held at its arc)."""
    ends = await make_ends([Spec("sim0", seed=1)], device_as=Awaiting)
    source = ends.sources[0]
    source.gates[State.RUNNING] = asyncio.Event()
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), ends.sources)
    commands = Commands(service)
    try:
        record = service.start_migration(ends.address, None, PAUSED)
        await wait_status(record.migration, Status.PRE_SWITCHOVER)
        ends.incoming[0].session.abort("the destination went away (test)")
        await source.reached.setdefault(State.RUNNING, asyncio.Event()).wait()
        with pytest.raises(ControlError) as refused:
            await commands.migrate_continue()
        assert refused.value.error_class == "WrongState"
        assert "is failing" in refused.value.desc
        assert "went away" in refused.value.desc
        source.gates[State.RUNNING].set()
        assert record.task is not None
        await record.task
        assert record.migration.stats.status == Status.FAILED
        assert source.state == State.RUNNING
    finally:
        source.gates[State.RUNNING].set()
        service.book.close()


async def test_cancel_and_continue_racing_at_the_pause_end_in_one_place(tmp_path: Path) -> None:
    """``continue`` and ``cancel`` sent at once from two connections: whichever the daemon
    takes first, an accepted cancel means a rollback, a refused one a completion, and
    the devices run on exactly one host as both state files say."""
    async with killable_pair(tmp_path) as pair:
        started = await pair.src.execute("migrate", destination=pair.address, parameters=PAUSED)
        await pair.migration_event("pre-switchover")
        other = await pair.source.client()
        try:
            replies = await asyncio.gather(
                pair.src.execute("migrate-continue"),
                other.execute("migrate-cancel"),
                return_exceptions=True,
            )
        finally:
            await other.close()
        ended = await final_event(pair, started["id"])
        cancel_taken = isinstance(replies[1], dict)
        assert ended["status"] == ("cancelled" if cancel_taken else "completed"), replies
        assert ended["stats"]["outcome"] == ("source" if cancel_taken else "destination")
        await incoming_ended(pair)
        await in_one_place(pair, ended["stats"]["outcome"])


async def test_migrate_whose_daemon_is_killed_says_where_to_look(tmp_path: Path) -> None:
    """``livemig migrate`` watching a source daemon that is SIGKILLed exits 4 naming the
    migration and saying its ending is unknown here and how to find where the devices
    are, rather than only that the connection closed."""
    async with killable_pair(tmp_path) as pair:
        watching = asyncio.create_task(
            pair.cli("migrate", "--to", pair.address, "--downtime-limit-ms", "0.001")
        )
        passed = await pair.src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
        await pair.source.kill()
        code, _, err = await watching
        assert code == 4
        assert f"during migration {passed['data']['id']}" in err
        assert "how it ended is not known here" in err
        assert "livemig devices" in err


@pytest.mark.parametrize("phase", ["paused", "completed"])
async def test_a_source_killed_paused_or_after_completing_restarts_in_one_place(
    tmp_path: Path, phase: str
) -> None:
    """SIGKILL of the source while paused before the switchover (no fence yet) or once
    the migration completed: restarted, its devices and its state file put the workload
    in one place, the one the destination's agrees with."""
    async with killable_pair(tmp_path) as pair:
        if phase == "paused":
            await pair.src.execute("migrate", destination=pair.address, parameters=PAUSED)
            await pair.migration_event("pre-switchover")
        else:
            await pair.src.execute("migrate", destination=pair.address)
            await pair.migration_event("completed")
        await pair.source.kill()
        outcome = "source" if phase == "paused" else "destination"
        assert (await incoming_ended(pair))["status"] == (
            "failed" if phase == "paused" else "completed"
        )
        await restart_source(pair, "source-again.log")
        await in_one_place(pair, outcome)
        stored = json.loads((tmp_path / "source.owners.json").read_text())
        expected = "running here" if phase == "paused" else "migrated away"
        assert {r["owner"] for r in stored["devices"].values()} == {expected}


async def test_status_on_a_destination_shows_the_incoming_migration_it_receives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``livemig status`` on a daemon that once sent a migration and now receives one
    shows the incoming one in flight, not only its old outgoing one."""
    async with killable_pair(tmp_path) as pair:
        await pair.dst.subscribe(["INCOMING_MIGRATION", "MIGRATION"])
        old = await pair.dst.execute(
            "migrate",
            destination="127.0.0.1:9",
            devices=["idle0"],
            parameters={"connect_timeout_s": 0.1},
        )
        await pair.dst.next_event(
            lambda m: m["event"] == "MIGRATION" and m["data"]["status"] == "failed", DEADLINE
        )
        started = await pair.src.execute("migrate", destination=pair.address, parameters=PAUSED)
        await pair.migration_event("pre-switchover")
        args = argparse.Namespace(command="status", id=None, json=False)
        assert await cli._cmd_status(args, pair.dst) == 0
        shown = capsys.readouterr().out
        assert f"incoming migration {started['id']} from source: active" in shown, shown
        assert f"migration {old['id']} to 127.0.0.1:9:" in shown


@pytest.mark.parametrize("owner", [Owner.RECEIVED, Owner.RUNNING_HERE])
async def test_a_workload_found_stopped_at_start_is_recorded_stopped(
    tmp_path: Path, owner: Owner
) -> None:
    """A device whose record says its workload runs here but that a restart finds in STOP
    (a backend that keeps devices across daemons, such as a vfio-user server, had it
    stopped) is recorded ``stopped``: the state file says it runs nowhere and the
    operator resumes it here (not ``--force`` on the source); the device is left as
    found."""
    config = parse(
        f'control_socket = "{tmp_path}/c.sock"\n'
        '[[device]]\nkind = "simulated"\nname = "sim0"\nstate_mib = 1\n'
    )
    assert config.state_file is not None
    book = OwnershipBook(config.state_file, ["sim0"])
    book.set(["sim0"], owner, peer="source", migration_id="m1")
    book.close()
    device = config.devices[0].build()
    await device.open()
    try:
        await device.set_state(State.STOP)  # as the killed daemon left it
        service = Service(config, [device])
        await service.fence()
        record = service.book.get("sim0")
        assert record.owner == Owner.STOPPED
        assert record.migration_id == "m1"
        assert "found stopped when the daemon started" in str(record.reason)
        assert device.state == State.STOP
        service.book.close()
        stored = json.loads(config.state_file.read_text())
        assert stored["devices"]["sim0"]["owner"] == "stopped"
    finally:
        await device.close()


async def test_migrate_and_resume_racing_on_the_same_devices_end_in_one_place(
    tmp_path: Path,
) -> None:
    """``migrate`` and ``resume --force`` of the same devices sent at once from two
    connections: a refusal is DeviceBusy naming what holds them, and the devices end on
    exactly one host, as both state files say."""
    async with killable_pair(tmp_path) as pair:
        other = await pair.source.client()
        try:
            migrate, resume = await asyncio.gather(
                pair.src.execute("migrate", destination=pair.address),
                other.execute("device-resume", devices=list(NAMES), force=True),
                return_exceptions=True,
            )
        finally:
            await other.close()
        for reply in (migrate, resume):
            if not isinstance(reply, dict):
                assert getattr(reply, "error_class", None) == "DeviceBusy", reply
        outcome = "source"
        if isinstance(migrate, dict):
            ended = await final_event(pair, migrate["id"])
            assert ended["status"] == "completed", ended
            await incoming_ended(pair)
            outcome = "destination"
        await in_one_place(pair, outcome)


async def test_a_destination_killed_while_loading_restarts_holding_no_workload(
    tmp_path: Path,
) -> None:
    """Once a destination admits a migration its devices' own state is being replaced
    (the arm consented), and its state file says so before loading starts: SIGKILLed
    mid-load and restarted, it records the devices idle, not 'running here', so no
    one migrates or trusts an emptied device as a workload; the source runs on."""
    async with killable_pair(tmp_path) as pair:
        never = {"downtime_limit_ms": 0.001, "timeout_s": 120, "link_timeout_s": 30}
        started = await pair.src.execute("migrate", destination=pair.address, parameters=never)
        await pair.src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
        stored = json.loads((tmp_path / "destination.owners.json").read_text())
        assert {r["owner"] for r in stored["devices"].values()} == {"idle"}
        assert {r["migration_id"] for r in stored["devices"].values()} == {started["id"]}
        await pair.destination.kill()
        failed = await final_event(pair, started["id"])
        assert failed["stats"]["outcome"] == "source"
        await restart_destination(pair)
        assert {o for _, o in (await owners(pair.dst)).values()} == {"idle"}
        refused = await refusal(pair.dst, "migrate", destination="127.0.0.1:9")
        assert "no workload runs here" in refused.desc
        await in_one_place(pair, "source")


async def test_a_second_daemon_on_a_held_state_file_touches_no_device(tmp_path: Path) -> None:
    """A second daemon started on a state file another daemon holds (the same config run
    twice) stops before opening any device: opening one (a vfio-user server's session,
    say) could disturb the migration the first daemon runs on it."""
    source, _ = write_pair(tmp_path)
    first = DaemonProcess(source, name="source")
    connections: list[asyncio.StreamWriter] = []

    async def count(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        writer.close()

    server = await asyncio.start_unix_server(count, tmp_path / "vfu.sock")
    twice = tmp_path / "twice.toml"
    twice.write_text(
        'name = "twice"\ncontrol_socket = "twice.sock"\nstate_file = "source.owners.json"\n'
        f'[[device]]\nkind = "vfio-user"\nname = "nvme0"\nsocket = "{tmp_path / "vfu.sock"}"\n'
    )
    second = DaemonProcess(twice, name="twice")
    try:
        await first.start(tmp_path / "source.sock")
        with pytest.raises(DaemonFailed) as failed:
            await second.start(tmp_path / "twice.sock")
        assert "is in use" in str(failed.value)
        assert connections == []
        assert await first.stop() == 0, first.output()
    finally:
        server.close()
        await server.wait_closed()
        await first.kill()
        await second.kill()


def test_a_book_whose_lock_file_was_removed_stops_writing(tmp_path: Path) -> None:
    """An operator who removes a running daemon's ``.NAME.lock`` lets a second daemon
    lock a new one on the same state file; the first then refuses every write naming
    the lock (a fence write failing rolls its switchover back), so one daemon writes."""
    path = tmp_path / "owners.json"
    book = OwnershipBook(path, ["a"])
    (tmp_path / ".owners.json.lock").unlink()
    other = OwnershipBook(path, ["a"])  # the second daemon gets in
    try:
        with pytest.raises(OSError, match=r"\.owners\.json\.lock was removed or replaced"):
            book.set(["a"], Owner.MIGRATED_AWAY, peer="dst:7070", migration_id="m1")
        assert book.get("a").owner == Owner.RUNNING_HERE
        other.set(["a"], Owner.MIGRATED_AWAY, peer="dst:7070", migration_id="m2")
        assert json.loads(path.read_text())["devices"]["a"]["migration_id"] == "m2"
    finally:
        other.close()
        book.close()


MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
24 22 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw,mode=755
25 24 0:22 / /run/live\\040mig rw shared:6 - ext4 /dev/vdb rw
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/run/livemig/x.owners.json", "tmpfs"),
        ("/run/live mig/x.owners.json", "ext4"),
        ("/var/lib/livemig/x.owners.json", "ext4"),
        ("/runner/x.owners.json", "ext4"),
    ],
)
def test_the_file_system_of_a_state_file_is_read_from_mountinfo(path: str, kind: str) -> None:
    """The state file's file system is the longest mount point above it (escapes
    decoded), so a tmpfs one (the default under /run) can be warned about."""
    assert ownership.file_system(Path(path), MOUNTINFO) == kind


def test_a_state_file_on_tmpfs_is_warned_about(tmp_path: Path) -> None:
    """A state file on tmpfs (the default beside /run/livemig/control.sock) loses every
    fence at a reboot: the daemon says so at start, naming the file and the fix."""
    shm = Path("/dev/shm")
    if ownership.file_system(shm, Path("/proc/self/mountinfo").read_text()) != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    path = Path(tempfile.mkdtemp(dir=shm)) / "owners.json"
    try:
        with capture_logs() as logs:
            OwnershipBook(path, ["a"]).close()
            OwnershipBook(tmp_path / "owners.json", ["a"]).close()
        warned = [e for e in logs if e["event"] == "state_file_on_volatile_storage"]
        assert [(e["state_file"], e["file_system"]) for e in warned] == [(str(path), "tmpfs")]
        assert "set state_file under /var/lib/livemig" in warned[0]["hint"]
    finally:
        shutil.rmtree(path.parent)

"""A second look at the state file's lock and the records around an incoming migration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import transport
from devices.errors import ArcFailed
from devices.fsm import State
from devices.paged import Faults
from devices.simulated import SimulatedDevice
from orchestrator.engine.errors import DestinationFailed
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.source import SourceMigration
from orchestrator.service.config import parse
from orchestrator.service.ownership import Owner, OwnershipBook, file_system
from orchestrator.service.service import Service
from tests.orchestrator.conftest import Spec

#: Bound of every wait on a migration (they end in well under a second).
DEADLINE_S = 10.0


def _fenced_file(path: Path) -> str:
    """A state file whose one record keeps ``dev`` stopped (its workload moved away)."""
    book = OwnershipBook(path, ["dev"])
    book.set(["dev"], Owner.MIGRATED_AWAY, peer="b", migration_id="m1")
    book.close()
    return path.read_text()


def test_a_lock_path_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    """A symlink at the lock's path (to the state file itself) is refused by name, and the
    file it points at keeps every byte: the lock must never erase the fences it guards."""
    state = tmp_path / "a.owners.json"
    before = _fenced_file(state)
    lock = tmp_path / ".a.owners.json.lock"
    lock.unlink()
    lock.symlink_to(state.name)
    with pytest.raises(ValueError, match=r"\.a\.owners\.json\.lock is not a regular file"):
        OwnershipBook(state, ["dev"])
    assert state.read_text() == before
    assert json.loads(before)["devices"]["dev"]["owner"] == Owner.MIGRATED_AWAY.value


def test_a_lock_path_that_is_a_fifo_is_refused_by_name(tmp_path: Path) -> None:
    """Something other than a regular file at the lock's path is refused, naming it, rather
    than truncated and written with our pid."""
    state = tmp_path / "a.owners.json"
    _fenced_file(state)
    lock = tmp_path / ".a.owners.json.lock"
    lock.unlink()
    os.mkfifo(lock)
    with pytest.raises(ValueError, match=r"\.a\.owners\.json\.lock is not a regular file"):
        OwnershipBook(state, ["dev"])


@contextlib.asynccontextmanager
async def daemon_owning(tmp_path: Path, target: Any) -> AsyncIterator[tuple[Service, str]]:
    """A destination daemon's service owning ``target``, listening: it and its address."""
    await target.open()
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [target])
    server = await transport.serve(
        "127.0.0.1:0", service.accept, name="dst", auth=transport.AuthConfig()
    )
    try:
        yield service, server.address
    finally:
        server.close()
        await server.wait_closed()
        service.book.close()
        await target.close()


async def fails_into(address: str, match: str) -> None:
    """Migrate a source "sim0" to ``address``: it fails with ``match``, and the source
    device runs again."""
    source = Spec("sim0", seed=1).build(source=True)
    await source.open()
    try:
        migration = SourceMigration(
            [source], address, MigrationParams(), auth=transport.AuthConfig()
        )
        with pytest.raises(DestinationFailed, match=match):
            await asyncio.wait_for(migration.run(), DEADLINE_S)
        assert source.state == State.RUNNING
    finally:
        await source.close()


async def test_an_offer_whose_devices_never_left_their_workload_keeps_their_record(
    tmp_path: Path,
) -> None:
    """A destination device armed by name while it runs a workload here, whose first arc
    towards RESUMING fails (so it never stops and keeps its workload), still says
    ``running here`` after the failed migration: the ``idle`` written at admission would
    let a bare ``migrate-incoming`` arm it and a later migration replace that workload."""
    first_arcs = {(State.RUNNING, State.RUNNING_P2P), (State.RUNNING, State.STOP)}
    faults = Faults(fail_arcs=frozenset(first_arcs))
    target = Spec("sim0", seed=2, source_faults=faults).build(source=True)
    async with daemon_owning(tmp_path, target) as (service, address):
        service.book.arm(["sim0"], None, None)
        await fails_into(address, "RUNNING_P2P failed")
        assert target.state == State.RUNNING  # its own workload, never stopped
        assert service.book.get("sim0").owner == Owner.RUNNING_HERE
        assert "sim0" not in service.book.default_armable()
        assert service.config.state_file is not None
        stored = json.loads(service.config.state_file.read_text())
        assert stored["devices"]["sim0"]["owner"] == Owner.RUNNING_HERE.value


@pytest.mark.parametrize("owner", [Owner.STOPPED, Owner.IDLE], ids=lambda o: o.name)
async def test_an_armed_stopped_device_the_load_never_reached_keeps_its_state(
    tmp_path: Path, owner: Owner
) -> None:
    """A destination device waiting in STOP armed by name, whose arc into RESUMING fails
    so that it never leaves STOP: the failed migration leaves it untouched, still STOP
    with its record. ``stopped`` (a workload kept here): a reset would drop the state it
    keeps (a VFIO device's), and ``idle`` would say it holds nothing. ``idle`` (no
    workload): never loaded nor reset, it holds no copy and is fenced from nothing."""
    faults = Faults(fail_arcs=frozenset({(State.STOP, State.RESUMING)}))
    target = Spec("sim0", seed=2, source_faults=faults).build(source=True)
    async with daemon_owning(tmp_path, target) as (service, address):
        await target.set_state(State.STOP)
        service.book.set(["sim0"], owner, reason="set by the test")
        service.book.arm(["sim0"], None, None)
        await fails_into(address, "RESUMING failed")
        assert target.state == State.STOP  # not reset: the state it keeps stays
        assert service.book.get("sim0").owner == owner


async def test_a_running_device_a_failed_load_left_stopped_is_recorded_stopped(
    tmp_path: Path,
) -> None:
    """A destination device running a workload here, armed by name, whose driver stopped
    it on the way to RESUMING and could not go on nor back (it stays in STOP, as a VFIO
    device may): it keeps the workload's state, not reset, and its record says
    ``stopped`` (resume it), not ``idle`` (nothing here)."""

    class StopsHalfway(SimulatedDevice):
        async def set_state(self, target: State) -> None:
            if target == State.RESUMING and self.state == State.RUNNING:
                await super().set_state(State.STOP)
                raise ArcFailed(self.name, "STOP -> RESUMING failed, and so did the way back")
            await super().set_state(target)

    target = StopsHalfway("sim0", state_size=Spec("sim0").size, seed=2)
    async with daemon_owning(tmp_path, target) as (service, address):
        service.book.arm(["sim0"], None, None)
        await fails_into(address, "way back")
        assert target.state == State.STOP
        assert service.book.get("sim0").owner == Owner.STOPPED


def test_a_state_file_reached_through_a_symlink_is_judged_where_it_lies(tmp_path: Path) -> None:
    """A state folder reached through a symlink (``/var/run`` is one to ``/run`` on most
    distributions) is judged by the file system it resolves to, so a tmpfs behind the
    link is still warned about."""
    real = (tmp_path / "real").resolve()
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    mountinfo = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"25 22 0:22 / {real} rw,nosuid shared:5 - tmpfs tmpfs rw,mode=755\n"
    )
    assert file_system(real / "x.owners.json", mountinfo) == "tmpfs"
    assert file_system(tmp_path / "link" / "x.owners.json", mountinfo) == "tmpfs"


def test_a_symlink_at_the_temporary_path_is_not_written_through(tmp_path: Path) -> None:
    """A symlink left where a write puts its temporary file is replaced, not followed:
    the file it points at keeps its bytes and the state file stays a regular file."""
    state = tmp_path / "a.owners.json"
    book = OwnershipBook(state, ["dev"])
    try:
        victim = tmp_path / "victim"
        victim.write_text("not the daemon's\n")
        (tmp_path / f".a.owners.json.{os.getpid()}.tmp").symlink_to(victim)
        book.set(["dev"], Owner.MIGRATED_AWAY, peer="b", migration_id="m1")
        assert victim.read_text() == "not the daemon's\n"
        assert not state.is_symlink()
        assert json.loads(state.read_text())["devices"]["dev"]["owner"] == "migrated away"
    finally:
        book.close()

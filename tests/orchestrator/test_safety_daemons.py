"""Safety with real daemon processes: consent, fences that survive restarts, one migration id."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.bench.daemons import DaemonProcess
from tests.orchestrator.test_daemon import (
    Pair,
    running_pair,
    start_pair,
    write_pair,
)

NAMES = ("sim0", "idle0", "ram0")


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Pair]:
    """A source and an armed destination daemon sharing a pre-shared key."""
    async for running in start_pair(tmp_path):
        yield running


def with_workload(path: Path) -> None:
    """Give the destination's devices a workload of their own (they run here)."""
    path.write_text(path.read_text().replace("dirty_mbps = 0", "dirty_mbps = 4"))


def unarmed_pair(folder: Path) -> tuple[Path, Path]:
    """The standard pair's configs, the destination's devices running a workload."""
    source, destination = write_pair(folder)
    with_workload(destination)
    return source, destination


async def test_an_unarmed_destination_refuses_before_touching_its_devices(tmp_path: Path) -> None:
    """Without arming the destination refuses at the handshake; its running devices keep
    their own state, the source keeps running, and the source prints the reason."""
    source, destination = unarmed_pair(tmp_path)
    async with running_pair(tmp_path, source, destination, arm=False) as pair:
        await pair.dst.execute("query-digests")
        code, _, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 1, err
        assert "sim0 is not armed to receive (owner here: running here)" in err
        assert "livemig incoming --devices sim0" in err
        assert set((await pair.states(pair.src)).values()) == {"RUNNING"}
        assert set((await pair.states(pair.dst)).values()) == {"RUNNING"}
        devices = await pair.dst.execute("query-devices")
        assert {d["owner"] for d in devices} == {"running here"}
        # No state change at all on the destination: no RESUMING, no reset.
        assert "RESUMING" not in pair.destination.output()
        assert "device_reset" not in pair.destination.output()


async def test_an_arm_admits_one_named_sender_once(tmp_path: Path) -> None:
    """An arm for another sender refuses; the right one admits one migration, then the
    devices are ``received`` and a second migration without a new arm is refused."""
    source, destination = unarmed_pair(tmp_path)
    async with running_pair(tmp_path, source, destination, arm=False) as pair:
        await pair.dst.execute("migrate-incoming", devices=list(NAMES), **{"from": "elsewhere"})
        code, _, err = await pair.cli("migrate", "--to", pair.address)
        assert code == 1
        assert "armed for 'elsewhere', not 'source'" in err
        await pair.dst.execute("migrate-incoming", devices=list(NAMES), **{"from": "source"})
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 0, err
        migration_id = json.loads(out)["migration_id"]
        received = {d["name"]: d for d in await pair.dst.execute("query-devices")}
        assert {d["owner"] for d in received.values()} == {"received"}
        assert {d["migration_id"] for d in received.values()} == {migration_id}
        assert {d["armed"] for d in received.values()} == {None}
        # The operator takes the source devices back (after checking), then tries again.
        code, _, err = await pair.cli("resume", *NAMES, "--force")
        assert code == 0, err
        code, _, err = await pair.cli("migrate", "--to", pair.address)
        assert code == 1
        assert "not armed to receive (owner here: received)" in err
        assert set((await pair.states(pair.dst)).values()) == {"RUNNING"}


async def test_both_hosts_name_the_migration_alike_and_show_owners(daemons: Pair) -> None:
    """The source's migration id names the incoming record, owners and ``status`` there."""
    pair = daemons
    code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
    assert code == 0, err
    migration_id = json.loads(out)["migration_id"]
    incoming = await pair.dst.execute("query-migrations")
    assert [(m["id"], m["direction"], m["status"]) for m in incoming] == [
        (migration_id, "incoming", "completed")
    ]
    newest = await pair.dst.execute("query-migrate")
    assert newest["id"] == migration_id
    assert newest["results"] == dict.fromkeys(NAMES, "")
    owners = {d["name"]: (d["owner"], d["peer"]) for d in await pair.src.execute("query-devices")}
    assert owners == dict.fromkeys(NAMES, ("migrated away", pair.address))
    owners = {d["name"]: (d["owner"], d["peer"]) for d in await pair.dst.execute("query-devices")}
    assert owners == dict.fromkeys(NAMES, ("received", "source"))
    assert migration_id in pair.destination.output()


async def test_a_restart_keeps_the_fence(tmp_path: Path) -> None:
    """After a completed migration a restarted source daemon still knows the devices
    migrated away: they stay stopped and ``resume`` still refuses them."""
    async for first in start_pair(tmp_path):
        code, _, err = await first.cli("migrate", "--to", first.address)
        assert code == 0, err
    config = tmp_path / "source.toml"
    source = DaemonProcess(config, name="source-again")
    await source.start(tmp_path / "source.sock")
    try:
        client = await source.client()
        devices = await client.execute("query-devices")
        assert {(d["state"], d["owner"]) for d in devices} == {("STOP", "migrated away")}
        assert "device_fenced" in source.output()
        code, _, err = await Pair(tmp_path, source, source).cli("resume", "sim0")
        assert code == 5
        assert "migrated away" in err
        await client.close()
    finally:
        assert await source.stop() == 0, source.output()


async def test_a_device_whose_outcome_is_unknown_is_never_overwritten_unarmed(
    tmp_path: Path,
) -> None:
    """A device fenced as 'outcome unknown' (its stopped state may be the only copy) is
    refused to an incoming migration that was not armed for it, and stays stopped."""
    source, destination = write_pair(tmp_path)
    unknown = {
        "owner": "outcome unknown",
        "peer": "127.0.0.1:9",
        "migration_id": "m1",
        "at": "2026-12-05T00:00:00+00:00",
        "reason": "COMMIT sent",
    }
    (tmp_path / "destination.owners.json").write_text(
        json.dumps({"version": 1, "devices": dict.fromkeys(NAMES, unknown)})
    )
    async with running_pair(tmp_path, source, destination, arm=False) as pair:
        assert set((await pair.states(pair.dst)).values()) == {"STOP"}
        before = await pair.dst.execute("query-digests")
        code, _, err = await pair.cli("migrate", "--to", pair.address)
        assert code == 1
        assert "owner here: outcome unknown" in err
        assert set((await pair.states(pair.dst)).values()) == {"STOP"}
        assert await pair.dst.execute("query-digests") == before
        # Armed without names, only idle or migrated-away devices would be armed: none here.
        code, _, _ = await pair.cli("devices")
        assert code == 0


async def test_livemig_incoming_arms_from_the_command_line(tmp_path: Path) -> None:
    """``livemig incoming`` arms the named devices (or the idle ones) and says so."""
    source, destination = unarmed_pair(tmp_path)
    async with running_pair(tmp_path, source, destination, arm=False) as pair:
        target = Pair(tmp_path, pair.destination, pair.destination)
        target.folder = tmp_path / "as-destination"
        target.folder.mkdir()
        (target.folder / "source.sock").symlink_to(tmp_path / "destination.sock")
        code, out, err = await target.cli(
            "incoming", "--devices", "sim0,idle0,ram0", "--from", "source"
        )
        assert code == 0, err
        assert out.strip() == "armed sim0, idle0, ram0 to receive one migration from source"
        code, _, err = await target.cli("incoming")
        assert code == 5
        assert "no device is idle or migrated away" in err
        code, out, err = await target.cli("devices")
        assert code == 0, err
        assert out.count("running here  armed") == 3, out
        code, _, err = await pair.cli("migrate", "--to", pair.address)
        assert code == 0, err


async def test_a_size_mismatch_is_refused_at_the_handshake(tmp_path: Path) -> None:
    """Devices of different state sizes are refused before anything moves, naming both."""
    source, destination = write_pair(tmp_path)
    destination.write_text(destination.read_text().replace("state_mib = 1\n", "state_mib = 2\n", 1))
    async with running_pair(tmp_path, source, destination) as pair:
        code, _, err = await pair.cli("migrate", "--to", pair.address)
        assert code == 1
        assert "sim0: 1048576 bytes of state offered, the device here holds 2097152" in err
        assert set((await pair.states(pair.src)).values()) == {"RUNNING"}
        assert "RESUMING" not in pair.destination.output()

"""Two livemig daemons migrating vfio-user devices between real libvfio-user servers.

Each daemon holds its server's only client connection, so the tests observe devices
through the daemons (query-devices, query-digests) and the migration stats. Every
wait is on a reply or an event from the daemons, bounded by the pair's deadline.

Arming: once destinations take in only devices they were armed for, add
``accept_incoming = true`` to the destination's device entries (DEST_DEVICE_KEYS).
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.bench.daemons import DaemonProcess
from tests.orchestrator.test_daemon import DEADLINE, NEVER_CONVERGES, Pair, running_pair, write_psk
from tests.vfio_user import servers
from tests.vfio_user.servers import Server

MIB = 1 << 20
#: Extra keys of every destination device entry (arming goes here, see the docstring).
DEST_DEVICE_KEYS = "accept_incoming = true\n"


def write_configs(folder: Path, source_devices: str, destination_devices: str) -> tuple[Path, Path]:
    """Source and destination daemon configs sharing a pre-shared key."""
    write_psk(folder / "psk", "a" * 32)
    paths = []
    for role, listen, devices in (
        ("source", "", source_devices),
        ("destination", '"127.0.0.1:0"', destination_devices),
    ):
        path = folder / f"{role}.toml"
        path.write_text(
            f'name = "{role}"\ncontrol_socket = "{role}.sock"\nlisten = [{listen}]\n\n'
            f'[auth]\npsk_file = "psk"\n{devices}'
        )
        paths.append(path)
    return paths[0], paths[1]


def start_pair(
    folder: Path, started: list[Server], *, size: int = 4 * MIB, rate: int = 500
) -> tuple[Server, Server]:
    """A source test device dirtying at ``rate`` and an idle target of the same size."""
    source = servers.start_testdev(folder / "src-dev.sock", size=size, rate=rate, seed=1)
    target = servers.start_testdev(folder / "dst-dev.sock", size=size, seed=2)
    started.extend([source, target])
    return source, target


def vfio_user_entry(name: str, socket: Path, extra: str = "") -> str:
    return f'\n[[device]]\nkind = "vfio-user"\nname = "{name}"\nsocket = "{socket}"\n{extra}'


@pytest.fixture
async def pair64(tmp_path: Path, started: list[Server]) -> AsyncIterator[Pair]:
    """Daemons over two test devices of 64 MiB; the source's writer dirties 4000 pages/s."""
    source, target = start_pair(tmp_path, started, size=64 * MIB, rate=4000)
    configs = write_configs(
        tmp_path,
        vfio_user_entry("vu0", source.socket),
        vfio_user_entry("vu0", target.socket, DEST_DEVICE_KEYS),
    )
    async with running_pair(tmp_path, *configs) as pair:
        yield pair


async def test_a_dirtied_64_mib_device_migrates_byte_exact_with_precopy(pair64: Pair) -> None:
    """The state crosses in pre-copy passes while dirtied, and arrives byte-exact."""
    before = await pair64.dst.execute("query-digests")
    code, out, err = await pair64.cli("migrate", "--to", pair64.address, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["status"] == "completed"
    assert stats["iterations"] >= 2
    (device,) = stats["devices"]
    assert device["precopy_bytes"] > 64 * MIB  # the whole state, then dirty pages again
    assert 0 < device["stopcopy_bytes"] < 64 * MIB
    assert await pair64.states(pair64.src) == {"vu0": "STOP"}
    assert await pair64.states(pair64.dst) == {"vu0": "RUNNING"}
    digests = await pair64.src.execute("query-digests")
    assert digests == await pair64.dst.execute("query-digests")
    assert digests != before


async def test_cancel_mid_precopy_leaves_the_source_running_and_intact(pair64: Pair) -> None:
    """A cancel during pre-copy leaves the vfio-user device RUNNING, its state its own."""
    await pair64.dst.subscribe(["INCOMING_MIGRATION"])
    code, _, err = await pair64.cli("migrate", "--to", pair64.address, "--detach", *NEVER_CONVERGES)
    assert code == 0, err
    await pair64.src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
    code, out, err = await pair64.cli("cancel", "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "cancelled"
    assert await pair64.states(pair64.src) == {"vu0": "RUNNING"}
    await pair64.dst.next_event(
        lambda m: m["event"] == "INCOMING_MIGRATION" and m["data"]["status"] == "failed", DEADLINE
    )
    assert await pair64.states(pair64.dst) == {"vu0": "RUNNING"}
    # Intact: the server still runs and a fresh migration carries it over whole.
    code, out, err = await pair64.cli("migrate", "--to", pair64.address, "--json")
    assert code == 0, err
    assert await pair64.src.execute("query-digests") == await pair64.dst.execute("query-digests")


async def test_a_corrupt_stream_is_refused_at_load_and_the_source_kept(
    tmp_path: Path, started: list[Server]
) -> None:
    """A source stream corrupted in device data is refused by the destination's server."""
    source, target = start_pair(tmp_path, started)
    configs = write_configs(
        tmp_path,
        vfio_user_entry("vu0", source.socket, "faults = { corrupt_stream = true }\n"),
        vfio_user_entry("vu0", target.socket, DEST_DEVICE_KEYS),
    )
    async with running_pair(tmp_path, *configs) as pair:
        await pair.dst.subscribe(["INCOMING_MIGRATION"])
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 1, out
        assert "vu0" in err
        stats = json.loads(out)
        assert stats["status"] == "failed"
        assert "RESUMING -> STOP" in stats["error"]
        assert await pair.states(pair.src) == {"vu0": "RUNNING"}
        await pair.dst.next_event(
            lambda m: m["event"] == "INCOMING_MIGRATION" and m["data"]["status"] == "failed",
            DEADLINE,
        )
        assert await pair.states(pair.dst) == {"vu0": "RUNNING"}
    assert source.alive()
    assert target.alive()


async def test_a_mixed_migration_meets_the_p2p_blocker(
    tmp_path: Path, started: list[Server]
) -> None:
    """vfio-user + simulated: refused with p2p on (no P2P states), completes with p2p off."""
    source, target = start_pair(tmp_path, started)
    simulated = '\n[[device]]\nkind = "simulated"\nname = "sim0"\nstate_mib = 1\nseed = 3\n'
    configs = write_configs(
        tmp_path,
        vfio_user_entry("vu0", source.socket) + simulated,
        vfio_user_entry("vu0", target.socket, DEST_DEVICE_KEYS) + simulated + DEST_DEVICE_KEYS,
    )
    async with running_pair(tmp_path, *configs) as pair:
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code != 0
        assert "vu0 cannot quiesce P2P DMA" in out + err
        assert await pair.states(pair.src) == {"vu0": "RUNNING", "sim0": "RUNNING"}
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json", "--no-p2p")
        assert code == 0, err
        assert json.loads(out)["status"] == "completed"
        assert await pair.states(pair.dst) == {"vu0": "RUNNING", "sim0": "RUNNING"}
        assert await pair.src.execute("query-digests") == await pair.dst.execute("query-digests")


async def test_a_daemon_killed_mid_precopy_finds_its_device_running_on_restart(
    tmp_path: Path, started: list[Server]
) -> None:
    """SIGKILL in pre-copy: the server outlives the daemon; the next one ends the session."""
    source, target = start_pair(tmp_path, started)
    source_config, destination_config = write_configs(
        tmp_path,
        vfio_user_entry("vu0", source.socket),
        vfio_user_entry("vu0", target.socket, DEST_DEVICE_KEYS),
    )
    first = DaemonProcess(source_config, name="source")
    destination = DaemonProcess(destination_config, name="destination")
    second = DaemonProcess(source_config, name="restarted", log_file=tmp_path / "second.log")
    try:
        await destination.start(tmp_path / "destination.sock")
        await first.start(tmp_path / "source.sock")
        async with await destination.client() as dst, await first.client() as src:
            address = (await dst.execute("query-daemon"))["listen"][0]
            await src.subscribe(["MIGRATION_PASS"])
            parameters = {"downtime_limit_ms": 0.001, "timeout_s": 120}
            await src.execute("migrate", destination=address, parameters=parameters)
            await src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
            first.signal(signal.SIGKILL)
            assert await first.wait() == -signal.SIGKILL
        assert source.alive()
        await second.start(tmp_path / "source.sock")
        async with await second.client() as src:
            devices = await src.execute("query-devices")
        assert [(d["name"], d["state"]) for d in devices] == [("vu0", "RUNNING")]
        assert '"found": "PRE_COPY", "event": "vfio_user_session_abandoned"' in second.output()
        assert await second.stop() == 0
        assert await destination.stop() == 0
    finally:
        for daemon in (first, second, destination):
            await daemon.kill()


async def test_a_features_mask_migrates_stop_copy_only(
    tmp_path: Path, started: list[Server]
) -> None:
    """features = ["STOP_COPY"] in the config: no pre-copy, the state crosses stopped."""
    source, target = start_pair(tmp_path, started)
    mask = 'features = ["STOP_COPY"]\n'
    configs = write_configs(
        tmp_path,
        vfio_user_entry("vu0", source.socket, mask),
        vfio_user_entry("vu0", target.socket, mask + DEST_DEVICE_KEYS),
    )
    async with running_pair(tmp_path, *configs) as pair:
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 0, err
        (device,) = json.loads(out)["devices"]
        assert device["precopy_bytes"] == 0
        assert device["stopcopy_bytes"] > 4 * MIB
        assert await pair.src.execute("query-digests") == await pair.dst.execute("query-digests")

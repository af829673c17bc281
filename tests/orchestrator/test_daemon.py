"""The daemon as a real process: migrations driven through the CLI and the control socket.

Every wait is on an event or a reply from the daemons, bounded by a deadline; nothing
sleeps to let something happen, and nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devices.fsm import State
from orchestrator.bench.daemons import DaemonFailed, DaemonProcess
from orchestrator.engine.destination import Refused
from orchestrator.service.client import ControlClient
from orchestrator.service.config import parse
from orchestrator.service.service import Service, _ClaimOnLookup

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0
#: Small devices: the whole file stays well under a minute.
DEVICES = """
[[device]]
kind = "simulated"
name = "sim0"
state_mib = 1
dirty_mbps = {rate}
seed = 1

[[device]]
kind = "simulated"
name = "idle0"
state_mib = 1
seed = 2

[[device]]
kind = "ram"
name = "ram0"
size_mib = 2
working_set_mib = 1
dirty_mbps = {rate}
"""
#: Parameters under which pre-copy never converges, so a migration stays active.
NEVER_CONVERGES = ["--downtime-limit-ms", "0.001", "--timeout-s", "120"]


def write_config(folder: Path, role: str, *, psk: str = "psk", listen: str = "") -> Path:
    """A daemon config in ``folder``; only the source's devices run a workload."""
    path = folder / f"{role}.toml"
    path.write_text(
        f'name = "{role}"\n'
        f'control_socket = "{role}.sock"\n'
        f"listen = [{listen}]\n\n"
        f'[auth]\npsk_file = "{psk}"\n' + DEVICES.format(rate=4 if role == "source" else 0)
    )
    return path


def write_pair(folder: Path, *, destination_sim0: str = "") -> tuple[Path, Path]:
    """A PSK and the standard pair's configs; ``destination_sim0``: extra lines for the
    destination's sim0 table (fault injection)."""
    write_psk(folder / "psk", "a" * 32)
    source = write_config(folder, "source")
    destination = write_config(folder, "destination", listen='"127.0.0.1:0"')
    if destination_sim0:
        text = destination.read_text()
        destination.write_text(
            text.replace('name = "sim0"\n', f'name = "sim0"\n{destination_sim0}\n', 1)
        )
    return source, destination


def write_psk(path: Path, key: str) -> None:
    path.write_text(key + "\n")
    path.chmod(0o600)


class Pair:
    """Two running daemons and a control connection to each."""

    def __init__(self, folder: Path, source: DaemonProcess, destination: DaemonProcess) -> None:
        self.folder = folder
        self.source = source
        self.destination = destination
        self.src: ControlClient
        self.dst: ControlClient
        self.address = ""

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """Run ``livemig ARGS`` against the source daemon; (exit code, stdout, stderr)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator.cli",
            *args,
            "--control",
            str(self.folder / "source.sock"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        out, err = await asyncio.wait_for(process.communicate(), DEADLINE)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def states(self, client: ControlClient) -> dict[str, str]:
        """Each device's FSM state."""
        return {d["name"]: d["state"] for d in await client.execute("query-devices")}

    async def migration_event(self, status: str) -> dict[str, Any]:
        """Wait for the source's MIGRATION event with ``status`` (subscribed at start)."""
        return await self.src.next_event(
            lambda m: m["event"] == "MIGRATION" and m["data"]["status"] == status, DEADLINE
        )


@contextlib.asynccontextmanager
async def running_pair(
    folder: Path, source_config: Path, destination_config: Path, *, arm: bool = True
) -> AsyncIterator[Pair]:
    """Both daemons started, a control connection to each; both must exit 0 at the end.

    ``arm``: the destination consents to one migration of each of its devices from the
    daemon named "source" (``livemig incoming``), as an operator would.
    """
    source = DaemonProcess(source_config, name="source")
    destination = DaemonProcess(destination_config, name="destination")
    pair = Pair(folder, source, destination)
    try:
        await asyncio.gather(
            source.start(folder / "source.sock"), destination.start(folder / "destination.sock")
        )
        pair.src = await source.client()
        pair.dst = await destination.client()
        await pair.src.subscribe()
        pair.address = (await pair.dst.execute("query-daemon"))["listen"][0]
        if arm:
            names = [d["name"] for d in await pair.dst.execute("query-devices")]
            await pair.dst.execute("migrate-incoming", devices=names, **{"from": "source"})
        yield pair
        await pair.src.close()
        await pair.dst.close()
        assert await source.stop() == 0, source.output()
        assert await destination.stop() == 0, destination.output()
    finally:
        await source.kill()
        await destination.kill()


async def start_pair(folder: Path, *, destination_psk: str = "psk") -> AsyncIterator[Pair]:
    """The standard pair: configs written, daemons running (see running_pair)."""
    write_psk(folder / "psk", "a" * 32)
    write_psk(folder / "other-psk", "b" * 32)
    source = write_config(folder, "source")
    destination = write_config(folder, "destination", psk=destination_psk, listen='"127.0.0.1:0"')
    async with running_pair(folder, source, destination) as pair:
        yield pair


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """A source and a destination daemon sharing a pre-shared key."""
    async for running in start_pair(tmp_path):
        yield running


async def test_a_migration_through_the_cli_is_byte_exact(pair: Pair) -> None:
    """``livemig migrate --json`` completes, prints the stats object, and digests match."""
    code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["status"] == "completed"
    assert stats["downtime_ms"] > 0
    assert set(stats["downtime_breakdown_ms"]) >= {"quiesce", "stop", "drain", "resume"}
    assert {d["name"] for d in stats["devices"]} == {"sim0", "idle0", "ram0"}
    assert await pair.states(pair.src) == dict.fromkeys(("sim0", "idle0", "ram0"), "STOP")
    assert await pair.states(pair.dst) == dict.fromkeys(("sim0", "idle0", "ram0"), "RUNNING")
    assert await pair.src.execute("query-digests") == await pair.dst.execute("query-digests")


async def test_resume_refuses_devices_that_migrated_away_unless_forced(pair: Pair) -> None:
    """After a completed migration ``resume`` refuses (no split brain); --force runs them."""
    code, _, err = await pair.cli("migrate", "--to", pair.address, "--json")
    assert code == 0, err
    code, _, err = await pair.cli("resume", "sim0", "idle0")
    assert code == 5, err
    assert "migrated away" in err
    assert "--force" in err
    assert await pair.states(pair.src) == dict.fromkeys(("sim0", "idle0", "ram0"), "STOP")
    code, out, err = await pair.cli("resume", "sim0", "idle0", "--force", "--json")
    assert code == 0, err
    assert json.loads(out) == {"sim0": "RUNNING", "idle0": "RUNNING"}
    assert (await pair.states(pair.src))["ram0"] == "STOP"
    assert "device_resume_forced" in pair.source.output()
    code, _, err = await pair.cli("resume", "nope")
    assert code != 0
    assert "no device 'nope'" in err


async def test_status_shows_a_migration_paused_before_switchover(pair: Pair) -> None:
    """``status --json`` reports the running migration; ``continue`` lets it finish."""
    code, out, err = await pair.cli(
        "migrate", "--to", pair.address, "--pause-before-switchover", "--detach", "--json"
    )
    assert code == 0, err
    migration_id = json.loads(out)["id"]
    await pair.migration_event("pre-switchover")
    code, out, err = await pair.cli("status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["migration"]["migration_id"] == migration_id
    assert status["migration"]["status"] == "pre-switchover"
    assert {d["migration"] for d in status["devices"]} == {migration_id}
    code, out, err = await pair.cli("continue", "--json")
    assert code == 0, err
    final = await pair.migration_event("completed")
    assert final["data"]["stats"]["downtime_ms"] is not None


async def test_cancel_through_the_cli_leaves_the_source_running(pair: Pair) -> None:
    """``livemig cancel`` during pre-copy returns once every source device runs again."""
    before = await pair.src.execute("query-digests", devices=["idle0"])
    code, _, err = await pair.cli("migrate", "--to", pair.address, "--detach", *NEVER_CONVERGES)
    assert code == 0, err
    await pair.src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
    code, out, err = await pair.cli("cancel", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "cancelled"
    assert {d["state"] for d in result["devices"]} == {"RUNNING"}
    assert await pair.src.execute("query-digests", devices=["idle0"]) == before
    assert await pair.states(pair.dst) == dict.fromkeys(("sim0", "idle0", "ram0"), "RUNNING")


async def test_sigterm_during_precopy_rolls_back_and_exits_zero(pair: Pair) -> None:
    """SIGTERM cancels the migration, the source devices run again, and the daemon exits 0."""
    code, _, err = await pair.cli("migrate", "--to", pair.address, "--detach", *NEVER_CONVERGES)
    assert code == 0, err
    await pair.src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
    pair.source.signal(signal.SIGTERM)
    cancelled = await pair.migration_event("cancelled")
    assert "SIGTERM" in cancelled["data"]["error"]
    shutdown = await pair.src.next_event(lambda m: m["event"] == "SHUTDOWN", DEADLINE)
    assert shutdown["data"]["devices"] == dict.fromkeys(("sim0", "idle0", "ram0"), "RUNNING")
    assert await pair.source.wait() == 0
    assert '"event": "daemon_stopped"' in pair.source.output()


async def test_a_second_migration_after_a_failed_one_completes(pair: Pair) -> None:
    """A migration that failed in the switchover leaves both daemons ready for the next."""
    code, out, err = await pair.cli(
        "migrate",
        "--to",
        pair.address,
        "--json",
        "--hard-downtime-limit",
        "--downtime-limit-ms",
        "0.001",
        "--policy",
        "force",
        "--force-after-iterations",
        "1",
    )
    assert code == 1, out
    assert json.loads(out)["status"] == "failed"
    assert "hard limit" in err
    assert set((await pair.states(pair.src)).values()) == {"RUNNING"}
    code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "completed"


async def test_a_wrong_pre_shared_key_fails_cleanly(tmp_path: Path) -> None:
    """Daemons with different keys refuse each other; the source devices keep running."""
    async for pair in start_pair(tmp_path, destination_psk="other-psk"):
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 1
        assert json.loads(out)["status"] == "failed"
        assert "auth" in err.lower()
        assert set((await pair.states(pair.src)).values()) == {"RUNNING"}
        assert set((await pair.states(pair.dst)).values()) == {"RUNNING"}


async def test_garbage_on_the_control_socket_gets_errors_not_a_crash(pair: Pair) -> None:
    """Each malformed request gets an error naming the problem; the daemon keeps serving."""
    reader, writer = await asyncio.open_unix_connection(str(pair.folder / "source.sock"))
    greeting = json.loads(await reader.readline())
    assert greeting["QMP"]["name"] == "source"
    writer.write(b'{"execute": "qmp_capabilities"}')
    assert json.loads(await asyncio.wait_for(reader.readline(), DEADLINE)) == {"return": {}}
    cases = [
        (b"hello\n", "InvalidRequest", "not JSON"),
        (b"\xff\xfe\n", "InvalidRequest", "not UTF-8"),
        (b"[1, 2]\n", "InvalidRequest", "must be a JSON object"),
        (b'{"execute": 5}\n', "InvalidRequest", "lacks 'execute'"),
        (b'{"execute": "x", "extra": 1}\n', "InvalidRequest", "unknown member(s): extra"),
        (b'{"execute": "reboot"}\n', "CommandNotFound", "unknown command 'reboot'"),
        (b'{"execute": "migrate", "arguments": {}}\n', "InvalidParameter", "'destination'"),
        (
            b'{"execute": "migrate", "arguments": {"destination": 7}}\n',
            "InvalidParameter",
            "must be a string",
        ),
        (
            b'{"execute": "migrate", "arguments": {"destination": "nowhere"}}\n',
            "InvalidParameter",
            "expected tcp:HOST:PORT",
        ),
        (
            b'{"execute": "migrate", "arguments": {"destination": "127.0.0.1:1",'
            b' "parameters": {"channels": 0}}}\n',
            "MigrationBlocked",
            "channels must be > 0",
        ),
        (b'{"execute": "migrate-cancel"}\n', "MigrationNotFound", "no migration"),
    ]
    for line, error_class, text in cases:
        writer.write(line)
        answer = json.loads(await asyncio.wait_for(reader.readline(), DEADLINE))
        assert answer["error"]["class"] == error_class, line
        assert text in answer["error"]["desc"], line
    writer.close()
    assert await answer_to_an_endless_line(pair.folder / "source.sock")
    assert await pair.states(pair.src) == dict.fromkeys(("sim0", "idle0", "ram0"), "RUNNING")


async def answer_to_an_endless_line(path: Path) -> str:
    """Send a line over the limit; the daemon's error, read before it hangs up."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(path))
        received = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await asyncio.wait_for(loop.sock_sendall(sock, b"x" * (2 << 20) + b"\n"), DEADLINE)
        while received.count(b"\n") < 2:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), DEADLINE)
            if not chunk:
                break
            received += chunk
    answer = json.loads(received.splitlines()[1])
    assert "longer than" in answer["error"]["desc"]
    return str(answer["error"]["desc"])


async def test_the_control_socket_is_private(pair: Pair) -> None:
    """Only the owner may connect: the socket file is mode 0600."""
    assert (pair.folder / "source.sock").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('control_socket = "c.sock"\nbogus = 1\n', "d.toml:2: bogus: unknown key"),
        (
            'control_socket = "c.sock"\n[[device]]\nkind = "simulated"\nname = "x"\n'
            "state_size = 1000\n",
            "d.toml:2: device 'x': (simulated) state size 1000 is not a positive multiple",
        ),
        (
            'control_socket = "c.sock"\n[[device]]\nkind = "vfio"\nname = "x"\n'
            'device = "/nonexistent/vfio-device"\n',
            "cannot open device 'x' (vfio)",
        ),
        ('control_socket = "c.sock"\nlisten = "127.0.0.1:{port}"\n', "address already in use"),
    ],
    ids=["unknown-key", "device-arguments", "device-cannot-open", "port-in-use"],
)
async def test_the_daemon_refuses_to_start_with_a_clear_message(
    tmp_path: Path, text: str, message: str
) -> None:
    """A bad config, a device it cannot open or a taken port: exit 1 and the reason."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "d.toml"
        config.write_text(text.replace("{port}", str(taken.getsockname()[1])))
        daemon = DaemonProcess(config, name="bad")
        with pytest.raises(DaemonFailed) as failed:
            await daemon.start(tmp_path / "c.sock")
    assert daemon.process is not None
    assert await daemon.process.wait() == 1
    assert message in str(failed.value)


async def test_a_device_another_migration_loaded_is_not_offered_to_a_second_one(
    tmp_path: Path,
) -> None:
    """An incoming migration cannot claim a device that another one validated (STOP)."""
    config = parse(
        f'control_socket = "{tmp_path}/c.sock"\n'
        '[[device]]\nkind = "simulated"\nname = "sim0"\nstate_mib = 1\n'
    )
    device = config.devices[0].build()
    service = Service(config, [device])
    first, second = _ClaimOnLookup(service, "first"), _ClaimOnLookup(service, "second")
    assert first.get("sim0") is device
    await device.set_state(State.STOP)  # loaded and validated; waiting for COMMIT
    with pytest.raises(Refused, match=r"sim0: busy \(migration first holds it here\)"):
        second.get("sim0")
    assert service.owners == {"sim0": "first"}

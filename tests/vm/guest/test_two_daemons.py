"""Two livemig daemons in the guest migrate an mtty mdev through the CLI (guest only).

The source daemon owns ``$LIVEMIG_MDEV_SRC`` and the destination daemon
``$LIVEMIG_MDEV_DST``, both as the vfio device ``tty0``; the destination listens on
loopback TCP. Every command is ``python3 -m orchestrator.cli`` as a user would run it.
A VFIO device can be held by one process only, so the UART FIFOs are written and read
through the BAR regions while no daemon runs; while they run, their state is compared
through the daemons' ``query-digests`` (SHA-256 of both ports' registers and FIFOs).

Under TCG every Python process spends about 4 s importing, so the CLI runs only for
the commands under test (``migrate``, ``cancel``) and the tests read states, digests
and events through control connections of their own; the cancel and the completed
migration share one pair of daemons. Each test records what it saw in
``/results/two_daemons.json`` (one object per scenario) before asserting, so the host
test can report it; the daemons' logs go to ``/results/two-daemons/``. Every wait is
on a reply or an event, bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devices.vfio import VfioDevice
from orchestrator.bench.daemons import DaemonProcess
from orchestrator.service.client import ControlClient
from tests.devices import vfio_harness
from tests.devices.vfio_harness import uart_clear, uart_drain, uart_write

pytestmark = pytest.mark.timeout(600)

RESULTS = Path(os.environ.get("LIVEMIG_LAB_RESULTS", "/results"))
REPORT = RESULTS / "two_daemons.json"
#: Seconds any one CLI command, daemon start or status wait may take (TCG is slow).
DEADLINE = 120.0
#: The device name both daemons use.
DEVICE = "tty0"
#: What the destination's FIFOs hold before any migration (so a no-op cannot pass).
DESTINATION_BEFORE = (b"dst-old-0", b"dst-old-1")


def uart_set(uuid: str, contents: tuple[bytes, bytes]) -> None:
    """Open the mdev RUNNING (reset: an earlier test may have left it stopped), make its
    FIFOs hold ``contents`` (ports 0 and 1), close it."""
    device = vfio_harness.open_fresh(uuid, name="uart")
    try:
        for port, data in enumerate(contents):
            uart_clear(device, port)
            uart_write(device, port, data)
    finally:
        device.abort()


def uart_take(uuid: str) -> tuple[bytes, bytes]:
    """Open the mdev, read both FIFOs (emptying them), close it."""
    device = VfioDevice.from_config(uuid, name="uart")
    try:
        return uart_drain(device, 0), uart_drain(device, 1)
    finally:
        device.abort()


def kernel_state(uuid: str) -> str:
    """The migration state the kernel kept for the mdev (opened and closed unchanged)."""
    device = VfioDevice.from_config(uuid, name="peek")
    try:
        assert device.found_at_open is not None
        return device.found_at_open.name
    finally:
        device.abort()


def text(contents: tuple[bytes, bytes]) -> list[str]:
    """FIFO contents as JSON-friendly strings."""
    return [data.decode("latin-1") for data in contents]


class Report:
    """One scenario's observations, merged into the JSON report as they come."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.facts: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        return self.facts[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.facts[key] = value
        document = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
        document[self.scenario] = self.facts
        REPORT.write_text(json.dumps(document, indent=2))


class Daemons:
    """A source and a destination daemon, a control connection to each, and the CLI."""

    def __init__(self, folder: Path, logs: Path) -> None:
        self.folder = folder
        self.logs = logs
        self.processes: dict[str, DaemonProcess] = {}
        self.clients: dict[str, ControlClient] = {}
        self.address = ""

    def config(self, role: str, uuid: str, *, listen: str = "", faults: str = "") -> Path:
        """Write a daemon config owning ``uuid`` as ``tty0``."""
        path = self.folder / f"{role}.toml"
        path.write_text(
            f'name = "{role}"\n'
            f'control_socket = "{role}.sock"\n'
            f"listen = [{listen}]\n\n"
            "[[device]]\n"
            'kind = "vfio"\n'
            f'name = "{DEVICE}"\n'
            f'device = "{uuid}"\n' + (f"faults = {{ {faults} }}\n" if faults else "")
        )
        return path

    def socket(self, role: str) -> Path:
        """A daemon's control socket."""
        return self.folder / f"{role}.sock"

    async def launch(self, role: str, config: Path, log: str) -> None:
        """Start one daemon, wait for READY, connect to it and subscribe to its events."""
        process = DaemonProcess(config, name=role, log_file=self.logs / log)
        self.processes[role] = process
        await process.start(self.socket(role), timeout=DEADLINE)
        self.clients[role] = await process.client()
        await self.clients[role].subscribe(["MIGRATION", "INCOMING_MIGRATION"])

    async def start_source(self, *, faults: str = "", run: int = 0) -> None:
        """Start (or restart) the source daemon."""
        config = self.config("source", os.environ["LIVEMIG_MDEV_SRC"], faults=faults)
        await self.launch("source", config, f"source-{run}.log")

    async def start(self, *, source_faults: str = "") -> None:
        """Start both daemons and learn the destination's migration address."""
        config = self.config("destination", os.environ["LIVEMIG_MDEV_DST"], listen='"127.0.0.1:0"')
        await asyncio.gather(
            self.start_source(faults=source_faults),
            self.launch("destination", config, "destination.log"),
        )
        self.address = (await self.clients["destination"].execute("query-daemon"))["listen"][0]
        # Consent: the destination takes one migration of tty0, from the daemon "source".
        await self.clients["destination"].execute(
            "migrate-incoming", devices=[DEVICE], **{"from": "source"}
        )

    async def stop(self, *roles: str) -> None:
        """SIGTERM the daemons (default both); each must exit 0, its devices released."""
        for role in roles or ("source", "destination"):
            await self.clients.pop(role).close()
            process = self.processes.pop(role)
            code = await process.stop()
            assert code == 0, f"{role} daemon exited {code}:\n{process.output()}"

    async def kill(self) -> None:
        """SIGKILL whatever still runs (after a failed test)."""
        for client in self.clients.values():
            await client.close()
        for process in self.processes.values():
            await process.kill()

    async def cli(self, *args: str) -> tuple[int, Any, str]:
        """``livemig ARGS --json`` against the source: (exit code, JSON output, stderr)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator.cli",
            *args,
            "--json",
            "--control",
            str(self.socket("source")),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), DEADLINE)
        assert process.returncode is not None
        lines = out.decode().strip().splitlines()
        return process.returncode, json.loads(lines[-1]) if lines else None, err.decode()

    async def migrate(self, *options: str) -> tuple[int, dict[str, Any], str]:
        """``livemig migrate --to DESTINATION OPTIONS --json``."""
        code, output, err = await self.cli("migrate", "--to", self.address, *options)
        return code, output or {}, err

    async def digest(self, role: str) -> str:
        """query-digests: the SHA-256 of tty0's registers and FIFOs."""
        return str((await self.clients[role].execute("query-digests"))[DEVICE])

    async def device(self, role: str) -> dict[str, Any]:
        """query-devices: tty0's entry (name, kind, state, features, migration)."""
        devices = await self.clients[role].execute("query-devices")
        return dict(next(d for d in devices if d["name"] == DEVICE))

    async def incoming_ended(self) -> dict[str, Any]:
        """The destination's newest incoming migration, once it ended (bounded)."""
        client = self.clients["destination"]
        records = await client.execute("query-migrations")
        incoming = [r for r in records if r["direction"] == "incoming"]
        assert incoming, f"the destination saw no incoming migration: {records}"
        newest = dict(incoming[-1])
        if newest["status"] != "active":
            return newest
        event = await client.next_event(
            lambda m: (
                m["event"] == "INCOMING_MIGRATION"
                and m["data"]["id"] == newest["id"]
                and m["data"]["status"] != "active"
            ),
            DEADLINE,
        )
        return dict(event["data"])


@pytest.fixture(autouse=True)
def _mdevs_free() -> None:
    """Close the mdevs the other guest tests may still hold (a group opens once)."""
    for device in list(vfio_harness._open.values()):
        device.abort()
    vfio_harness._open.clear()


@pytest.fixture
async def daemons(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Daemons]:
    """A fresh folder for two daemons (started by the test); killed if the test fails."""
    logs = RESULTS / "two-daemons" / request.node.name
    logs.mkdir(parents=True, exist_ok=True)
    pair = Daemons(tmp_path, logs)
    try:
        yield pair
    finally:
        await pair.kill()


async def test_two_daemons_cancel_then_migrate_the_uart_state(daemons: Daemons) -> None:
    """Cancel at pre-switchover keeps the source intact; then a migration carries its FIFOs."""
    cancel, migrate = Report("cancel"), Report("migrate")
    written = (b"two-daemons p0", b"two-daemons p1")
    cancel["written"] = migrate["written"] = text(written)
    uart_set(os.environ["LIVEMIG_MDEV_SRC"], written)
    uart_set(os.environ["LIVEMIG_MDEV_DST"], DESTINATION_BEFORE)
    await daemons.start()
    before = {role: await daemons.digest(role) for role in ("source", "destination")}
    cancel["digests_before"] = migrate["digests_before"] = before
    source = daemons.clients["source"]

    # 1. Cancel mid-pre-copy: paused before the switchover, the source is still live.
    code, started, err = await daemons.migrate("--pause-before-switchover", "--detach")
    cancel["detach_exit"] = code
    assert code == 0, f"migrate --detach: exit {code}: {started} {err}"
    paused = await source.next_event(
        lambda m: m["data"].get("status") in ("pre-switchover", "completed", "failed", "cancelled"),
        DEADLINE,
    )
    cancel["paused_status"] = paused["data"]["status"]
    cancel["source_device_paused"] = await daemons.device("source")
    code, cancelled, err = await daemons.cli("cancel")
    cancel["cancel_exit"] = code
    cancel["cancel_status"] = (cancelled or {}).get("status")
    cancel["source_device"] = next(
        (d for d in (cancelled or {}).get("devices", []) if d["name"] == DEVICE), None
    )
    cancel["digest_after"] = await daemons.digest("source")
    cancel["destination_incoming"] = await daemons.incoming_ended()
    cancel["destination_device"] = await daemons.device("destination")

    assert cancel["paused_status"] == "pre-switchover", paused
    assert cancel["source_device_paused"]["state"] in ("PRE_COPY", "PRE_COPY_P2P"), cancel.facts
    assert (code, cancel["cancel_status"]) == (0, "cancelled"), f"cancel: {cancelled}\n{err}"
    assert cancelled["id"] == started["id"]
    assert cancel["source_device"] is not None, cancelled
    assert cancel["source_device"]["state"] == "RUNNING", cancel["source_device"]
    assert cancel["digest_after"] == before["source"], "the cancel changed the source's state"
    assert cancel["destination_device"]["state"] == "RUNNING", cancel["destination_device"]

    # 2. A real migration completes and the destination holds the source's state.
    code, stats, err = await daemons.migrate()
    migrate["exit"] = code
    migrate["status"] = stats.get("status")
    migrate["error"] = stats.get("error") or err
    migrate["transferred_bytes"] = stats.get("transferred_bytes")
    after = {role: await daemons.digest(role) for role in ("source", "destination")}
    migrate["digests_after"] = after
    migrate["destination_device"] = await daemons.device("destination")
    # 3. A graceful restart of the source (SIGTERM, start) keeps its device stopped with
    # its state: the kernel still holds it, and the record says it migrated away.
    await daemons.stop("source")
    await daemons.start_source(run=1)
    migrate["source_after_restart"] = await daemons.device("source")
    await daemons.stop()
    migrate["source_kernel_state"] = kernel_state(os.environ["LIVEMIG_MDEV_SRC"])
    received = uart_take(os.environ["LIVEMIG_MDEV_DST"])
    migrate["destination_uart"] = text(received)

    assert (code, migrate["status"]) == (0, "completed"), f"migrate: exit {code}: {stats}\n{err}"
    assert before["source"] != before["destination"], "the mdevs started out equal"
    assert after["destination"] == after["source"] == before["source"], (before, after)
    assert migrate["destination_device"]["state"] == "RUNNING", migrate["destination_device"]
    assert received == written, f"destination FIFOs {received!r}, source had {written!r}"
    restarted = migrate["source_after_restart"]
    assert (restarted["state"], restarted["owner"]) == ("STOP", "migrated away"), restarted
    assert migrate["source_kernel_state"] == "STOP", "closing the daemon reset the source"


async def test_two_daemons_corrupted_stream(daemons: Daemons) -> None:
    """A corrupt source stream fails the destination's verdict; the source stays intact."""
    report = Report("corrupt")
    written = (b"corrupt p0", b"corrupt p1")
    report["written"] = text(written)
    uart_set(os.environ["LIVEMIG_MDEV_SRC"], written)
    uart_set(os.environ["LIVEMIG_MDEV_DST"], DESTINATION_BEFORE)
    await daemons.start(source_faults="corrupt_stream = true")
    before = await daemons.digest("source")
    report["digest_before"] = before

    code, stats, err = await daemons.migrate()
    report["exit"] = code
    report["status"] = stats.get("status")
    report["error"] = stats.get("error") or err
    report["source_device"] = await daemons.device("source")
    report["digest_after"] = await daemons.digest("source")
    report["destination_incoming"] = await daemons.incoming_ended()
    report["destination_device"] = await daemons.device("destination")

    # The destination daemon keeps serving: a clean source migrates to it.
    await daemons.stop("source")
    await daemons.start_source(run=1)
    retry_code, retry, retry_err = await daemons.migrate()
    report["retry_exit"] = retry_code
    report["retry_status"] = retry.get("status")
    report["retry_error"] = retry.get("error") or retry_err
    report["retry_digests"] = {r: await daemons.digest(r) for r in ("source", "destination")}
    await daemons.stop()
    received = uart_take(os.environ["LIVEMIG_MDEV_DST"])
    report["destination_uart"] = text(received)

    assert (code, report["status"]) == (1, "failed"), f"migrate: exit {code}: {stats}\n{err}"
    assert DEVICE in report["error"], report["error"]
    assert "EFAULT" in report["error"], report["error"]
    assert report["source_device"]["state"] == "RUNNING", report["source_device"]
    assert report["digest_after"] == before, "the failed migration changed the source's state"
    assert report["destination_incoming"]["status"] == "failed", report["destination_incoming"]
    assert report["destination_device"]["state"] == "RUNNING", report["destination_device"]
    assert (retry_code, report["retry_status"]) == (0, "completed"), (retry, retry_err)
    assert report["retry_digests"]["destination"] == before, report["retry_digests"]
    assert received == written, f"destination FIFOs {received!r}, source had {written!r}"

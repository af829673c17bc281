"""The benchmark of record: two daemon processes on localhost, driven as a user would.

Each run writes a pre-shared key and two configs into a temporary folder, starts a
source and a destination daemon (``python -m orchestrator.cli daemon``), waits until
each says READY (the sd_notify protocol, over a socket of our own), asks the source to
migrate through its control socket, follows the events to the end, reads the stats
with their per-iteration history, and proves the result byte-exact: the digests of the
source devices (stopped at the switchover) equal those of the destination devices
(resumed, with no workload of their own). Then both daemons get SIGTERM.

Every run uses fresh daemons, so repeated runs are independent.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

from orchestrator.bench.inprocess import BenchOptions
from orchestrator.cli.follow import migrate
from orchestrator.service.client import ControlClient

#: Seconds a daemon has to say READY.
START_TIMEOUT = 30.0
#: Seconds a daemon has to exit after SIGTERM.
STOP_TIMEOUT = 30.0


class DaemonFailed(Exception):
    """A daemon process did not start (its stderr says why) or did not stop."""


class DaemonProcess:
    """A ``livemig daemon`` child process, ready once it sent READY=1."""

    def __init__(
        self,
        config: Path,
        *,
        name: str = "daemon",
        log_file: Path | None = None,
        prefix: Sequence[str] = (),
    ):
        self.config = config
        #: A command that runs the daemon elsewhere (``ip netns exec NS``: another host).
        self.prefix = list(prefix)
        self.name = name
        self.log_file = log_file or config.with_suffix(".log")
        self.process: asyncio.subprocess.Process | None = None
        self.control: Path | None = None

    async def start(
        self,
        control: Path,
        timeout: float = START_TIMEOUT,  # noqa: ASYNC109 - one budget for the whole start
    ) -> None:
        """Spawn and wait for READY; DaemonFailed with the daemon's own words if it exits."""
        self.control = control
        notify_path = self.config.with_suffix(".notify")
        notify = _notify_socket(notify_path)
        env = os.environ | {"NOTIFY_SOCKET": os.fspath(notify_path)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        log = _open_log(self.log_file)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.prefix,
                sys.executable,
                "-m",
                "orchestrator.cli",
                "daemon",
                "--config",
                str(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        finally:
            log.close()
        loop = asyncio.get_running_loop()
        exited = asyncio.ensure_future(self.process.wait())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = asyncio.ensure_future(loop.sock_recv(notify, 4096))
                    await asyncio.wait({exited, message}, return_when=asyncio.FIRST_COMPLETED)
                    if message.done():
                        if b"READY=1" in message.result():
                            return
                        continue
                    message.cancel()
                    raise DaemonFailed(f"{self.name} daemon exited: {self.output().strip()}")
        except TimeoutError:
            await self.kill()
            raise DaemonFailed(f"{self.name} daemon not ready in {timeout:g} s") from None
        finally:
            exited.cancel()
            notify.close()
            with contextlib.suppress(FileNotFoundError):
                notify_path.unlink()

    def output(self) -> str:
        """What the daemon logged so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def client(self) -> ControlClient:
        """A new control connection."""
        assert self.control is not None
        return await ControlClient.connect(self.control)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal, if the daemon still runs."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)

    async def wait(self, timeout: float = STOP_TIMEOUT) -> int:  # noqa: ASYNC109 - bounded wait
        """The exit code, once the daemon exits by itself."""
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int:  # noqa: ASYNC109 - bounded wait
        """SIGTERM, then the exit code; DaemonFailed (after SIGKILL) past ``timeout``."""
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise DaemonFailed(f"{self.name} daemon ignored SIGTERM for {timeout:g} s") from None

    async def kill(self) -> None:
        """SIGKILL, for a daemon that will not stop."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


_ROOT = Path(__file__).resolve().parents[2]


def _notify_socket(path: Path) -> socket.socket:
    """A datagram socket at ``path`` to receive sd_notify messages on."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.fspath(path))
    notify.setblocking(False)
    return notify


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")


# -- configs ---------------------------------------------------------------------------------


def device_tables(options: BenchOptions, *, workload: bool) -> str:
    """The ``[[device]]`` tables; only the source runs a workload (see the module doc)."""
    tables = [
        "[[device]]\n"
        'kind = "simulated"\n'
        f'name = "sim{index}"\n'
        f"state_mib = {options.state_mib}\n"
        f"dirty_mbps = {options.dirty_mbps if workload else 0}\n"
        f"seed = {index + 1}\n"
        for index in range(options.devices)
    ]
    if options.ram_mib:
        tables.append(
            "[[device]]\n"
            'kind = "ram"\n'
            'name = "ram0"\n'
            f"size_mib = {options.ram_mib}\n"
            f"working_set_mib = {options.working_set_mib}\n"
            f"dirty_mbps = {options.ram_dirty_mbps if workload else 0}\n"
        )
    return "\n".join(tables)


def write_configs(
    folder: Path,
    options: BenchOptions,
    *,
    prefix: str = "bench",
    destination_listen: str = "127.0.0.1:0",
) -> tuple[Path, Path]:
    """A PSK file and the two daemons' configs in ``folder`` (named ``PREFIX-source`` and
    ``PREFIX-destination``, the destination listening on ``destination_listen``)."""
    psk = folder / "psk"
    psk.write_text(secrets.token_hex(32) + "\n")
    psk.chmod(0o600)
    paths = []
    for role in ("source", "destination"):
        listen = f'["{destination_listen}"]' if role == "destination" else "[]"
        text = (
            f'name = "{prefix}-{role}"\n'
            f'control_socket = "{role}.sock"\n'
            f"listen = {listen}\n\n"
            '[auth]\npsk_file = "psk"\n\n' + device_tables(options, workload=role == "source")
        )
        path = folder / f"{role}.toml"
        path.write_text(text)
        paths.append(path)
    return paths[0], paths[1]


@contextlib.asynccontextmanager
async def daemon_pair(
    folder: Path,
    source_config: Path,
    destination_config: Path,
    *,
    prefixes: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> AsyncIterator[tuple[DaemonProcess, DaemonProcess]]:
    """Both daemons started (and stopped with SIGTERM on the way out); ``prefixes`` run
    each elsewhere (``ip netns exec NS``: on another host)."""
    source = DaemonProcess(source_config, name="source", prefix=prefixes[0])
    destination = DaemonProcess(destination_config, name="destination", prefix=prefixes[1])
    try:
        await asyncio.gather(
            source.start(folder / "source.sock"), destination.start(folder / "destination.sock")
        )
        yield source, destination
    finally:
        await asyncio.gather(source.stop(), destination.stop(), return_exceptions=True)


# -- one run ---------------------------------------------------------------------------------


async def arm(client: ControlClient, devices: Sequence[str], source_name: str) -> None:
    """Consent, on the destination, to one migration of ``devices`` from ``source_name``."""
    await client.execute("migrate-incoming", devices=list(devices), **{"from": source_name})


async def run_once(options: BenchOptions) -> dict[str, Any]:
    """One migration between two fresh daemons; the stats plus ``verified``."""
    with tempfile.TemporaryDirectory(prefix="livemig-bench-") as tmp:
        folder = Path(tmp)
        source_config, destination_config = write_configs(folder, options)
        async with (
            daemon_pair(folder, source_config, destination_config) as (source, dest),
            await source.client() as src,
            await dest.client() as dst,
        ):
            address = (await dst.execute("query-daemon"))["listen"][0]
            await arm(dst, [d["name"] for d in await src.execute("query-devices")], "bench-source")
            stats = await migrate(src, address, options.migration_parameters())
            if stats["status"] == "completed":
                before = await src.execute("query-digests")
                after = await dst.execute("query-digests")
                stats["verified"] = before == after
            return stats


def plot(stats: dict[str, Any], path: Path, *, limit_ms: float | None = None) -> None:
    """Per-iteration pending bytes and expected downtime, and where the switchover came.

    With ``limit_ms`` it also marks the first iteration whose estimate fitted the limit:
    where a switchover at the first fit would have come, against the one at the floor
    (see ``convergence.at_floor``). Needs matplotlib.
    """
    try:  # an optional extra: imported by name so type checking does not need it installed
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'livemig[plot]'") from None
    history = stats.get("history") or []
    figure, axis = plt.subplots(figsize=(8, 4.5))
    times = [sample["t_s"] for sample in history]
    axis.plot(times, [s["pending_bytes"] / 2**20 for s in history], marker=".", label="pending")
    axis.plot(times, [s["dirty_bytes"] / 2**20 for s in history], linestyle="--", label="dirty")
    axis.set_yscale("symlog", linthresh=1)
    expected = axis.twinx()
    expected.plot(
        times,
        [s["expected_downtime_ms"] for s in history],
        color="purple",
        marker="x",
        label="expected downtime (ms)",
    )
    expected.set_yscale("symlog", linthresh=1)
    expected.set_ylabel("expected downtime (ms)")
    if limit_ms is not None:
        expected.axhline(limit_ms, color="purple", linestyle=":", label=f"limit {limit_ms:g} ms")
        first_fit = next((s["t_s"] for s in history if s["expected_downtime_ms"] <= limit_ms), None)
        if first_fit is not None:
            axis.axvline(first_fit, color="orange", linestyle="-.", label="first fit")
    if stats.get("switchover_at_s") is not None:
        axis.axvline(stats["switchover_at_s"], color="red", label="switchover (floor)")
    axis.set_xlabel("time since start (s)")
    axis.set_ylabel("MiB")
    downtime = stats.get("downtime_ms")
    title = f"{stats.get('iterations')} iterations"
    if downtime is not None:
        title += f", downtime {downtime:.1f} ms"
    axis.set_title(title)
    lines, labels = axis.get_legend_handles_labels()
    more, more_labels = expected.get_legend_handles_labels()
    axis.legend(lines + more, labels + more_labels, fontsize="small")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

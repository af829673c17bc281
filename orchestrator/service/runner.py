"""The daemon process: setup, signals and cleanup around one service.

:class:`Runner` builds and opens the devices, starts the listeners (the control socket
last, so a client that reaches it finds a ready daemon), tells systemd it is ready,
waits for SIGTERM/SIGINT, then cancels the migrations in flight (source devices
RUNNING again), stops the listeners in reverse order collecting their errors, closes
the devices and releases the state file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import structlog

from devices.base import MigratableDevice
from orchestrator.service import config as config_module
from orchestrator.service.commands import Commands
from orchestrator.service.config import ConfigError, DaemonConfig
from orchestrator.service.control import ControlServer, RemoteControlListener, greeting
from orchestrator.service.listeners import Listener, MigrationListener
from orchestrator.service.metrics import Metrics, MetricsListener
from orchestrator.service.ownership import OwnershipBook
from orchestrator.service.service import Service, StartupError, open_book

log = structlog.get_logger(__name__)


class Runner:
    """Setup, cleanup and signals of one daemon."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.devices: list[MigratableDevice] = []
        self.service: Service | None = None
        self.book: OwnershipBook | None = None
        self.started: list[Listener] = []
        self._stop = asyncio.Event()
        self._reason = ""

    async def setup(self) -> None:
        """Open the devices and start the listeners; StartupError (all undone) if one fails."""
        try:
            await self._setup()
        except BaseException:
            await self.cleanup()
            raise

    async def _setup(self) -> None:
        config = self.config
        # The state file first: its lock says no other daemon drives these devices, and
        # opening one (a vfio-user session, say) could disturb that daemon's migration.
        try:
            self.book = open_book(config, [d.name for d in config.devices])
        except (ValueError, OSError) as exc:
            raise StartupError(f"cannot use the ownership state: {exc}") from exc
        for device_config in config.devices:
            try:
                device = device_config.build()
                await device.open()
            except ConfigError as exc:
                raise StartupError(str(exc)) from exc
            except Exception as exc:  # whatever the backend raises, the daemon cannot start
                raise StartupError(
                    f"cannot open device {device_config.name!r} ({device_config.kind}): {exc}"
                ) from exc
            self.devices.append(device)
        metrics = Metrics() if config.metrics is not None else None
        service = self.service = Service(config, self.devices, metrics=metrics, book=self.book)
        await service.fence()
        listeners: list[Listener] = [MigrationListener(a, service) for a in config.listen]
        service.control = ControlServer(
            config.control_socket,
            Commands(service).table(),
            greeting=greeting(config.name),
        )
        listeners.append(service.control)
        remote = config.remote_control
        if remote is not None:
            listeners.append(
                RemoteControlListener(
                    remote.address, remote.ssl_context(), remote.allow, service.control
                )
            )
        if metrics is not None and config.metrics is not None:
            listeners.append(MetricsListener(metrics, *config.metrics))
        service.listeners = listeners
        for listener in listeners:
            try:
                await listener.start()
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise StartupError(
                    f"cannot listen on {listener.address} ({listener.name}): {reason}"
                ) from exc
            self.started.append(listener)
        log.info(
            "daemon_started",
            name=config.name,
            config=config.file,
            devices=[d.name for d in self.devices],
            listen=[listener.address for listener in listeners],
            auth=config.auth.method,
        )

    def stop(self, reason: str) -> None:
        """Ask ``run`` to return (signal handlers call this)."""
        self._reason = self._reason or reason
        self._stop.set()

    async def run(self) -> None:
        """Setup, serve until SIGTERM/SIGINT, cleanup."""
        loop = asyncio.get_running_loop()
        await self.setup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, signal.Signals(signum).name)
        try:
            _notify_systemd("READY=1")
            await self._stop.wait()
            log.info("daemon_stopping", reason=self._reason)
            _notify_systemd("STOPPING=1")
        finally:
            # The handlers stay during cleanup: a second signal must not kill a rollback.
            await self.cleanup()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def cleanup(self) -> None:
        """Cancel migrations, stop listeners in reverse order, close devices; log errors."""
        errors: list[tuple[str, BaseException]] = []
        if self.service is not None:
            try:
                await self.service.shutdown(self._reason or "daemon stopping")
            except Exception as exc:
                errors.append(("migrations", exc))
        for listener in reversed(self.started):
            try:
                await listener.stop()
            except Exception as exc:
                errors.append((listener.name, exc))
        self.started.clear()
        for device in reversed(self.devices):
            try:
                await device.close()
            except Exception as exc:
                errors.append((device.name, exc))
        states = {d.name: d.state.name for d in self.devices}
        self.devices.clear()
        if self.book is not None:
            self.book.close()  # the state file is free for the next daemon
            self.book = None
        for what, error in errors:
            log.error("cleanup_failed", what=what, error=repr(error))
        if states:
            log.info("daemon_stopped", devices=states)


def _notify_systemd(state: str) -> None:
    """sd_notify: tell the service manager (or a test harness) how we are doing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.debug("notify_failed", error=str(exc))


async def serve(config_path: str) -> int:
    """Run a daemon from its config file until a signal; the process exit code."""
    try:
        config = config_module.load(config_path)
        runner = Runner(config)
        await runner.run()
    except (ConfigError, StartupError) as exc:
        log.error("daemon_not_started", reason=str(exc))
        print(f"livemig daemon: {exc}", file=sys.stderr)
        return 1
    await _cancel_leftovers()
    return 0


async def _cancel_leftovers() -> None:
    """Cancel and report tasks still alive at exit (they are bugs)."""
    current = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        log.warning("leftover_tasks_cancelled", tasks=[t.get_name() for t in leftovers])
        await asyncio.gather(*leftovers, return_exceptions=True)

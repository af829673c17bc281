"""The livemig daemon: one per host, owning its devices, migrating them out and in.

Three objects, as in aiohttp's ``web_runner``:

* :class:`Service` is what the daemon does: it holds the devices, runs outgoing
  migrations (SourceMigration) and incoming ones (DestinationMigration), answers the
  control commands and emits events. One migration per device at a time. Its
  :class:`orchestrator.ownership.OwnershipBook` says where each device's workload is
  and which devices may receive one (arming), durably: the fence a restart keeps.
* The listeners accept work: :class:`MigrationListener` (one per ``listen`` address),
  the control socket (:class:`orchestrator.control.ControlServer`) and the optional
  metrics endpoint. Each has ``start()`` and ``stop()``.
* :class:`Runner` does setup and cleanup: build and open the devices, start the
  listeners (the control socket last, so a client that reaches it finds a ready
  daemon), tell systemd it is ready, wait for SIGTERM/SIGINT, then cancel the
  migrations in flight (source devices RUNNING again), stop the listeners in reverse
  order collecting their errors, and close the devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import signal
import socket
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

import transport
from devices.base import MigratableDevice
from devices.errors import DeviceError
from devices.fsm import Feature, State
from orchestrator import config as config_module
from orchestrator.config import ConfigError, DaemonConfig
from orchestrator.control import (
    VERSION,
    Arg,
    Command,
    ControlError,
    ControlServer,
    RemoteControlListener,
    greeting,
    qemu_migration_info,
)
from orchestrator.destination import DestinationMigration, Offer, Refused
from orchestrator.errors import MigrationBlocked, MigrationError
from orchestrator.metrics import Metrics, MetricsListener
from orchestrator.ownership import FENCED_OWNERS, RUNNING_OWNERS, Owner, OwnershipBook, Record
from orchestrator.p2p import resume_in_order
from orchestrator.params import LIVE_PARAMETERS, to_qemu_parameters
from orchestrator.source import SourceMigration, check_blockers
from orchestrator.stats import FINAL_STATUSES, MigrationStats, Status

log = structlog.get_logger(__name__)

#: Events the daemon emits; ``subscribe`` takes any subset.
EVENTS = ("MIGRATION", "MIGRATION_PASS", "INCOMING_MIGRATION", "DEVICE_STATE", "SHUTDOWN")


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


class Listener(Protocol):
    """Something that accepts work from outside; started and stopped by the runner."""

    name: str

    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# -- the service ------------------------------------------------------------------------------


@dataclass(slots=True)
class Outgoing:
    """An outgoing migration and the task running it."""

    migration: SourceMigration
    task: asyncio.Task[None] | None = None
    last_status: Status | None = None
    last_iteration: int = 0


@dataclass(slots=True)
class Incoming:
    """An incoming migration, as far as the daemon can see it."""

    id: str
    peer: str
    task: asyncio.Task[Any] | None
    status: str = "active"
    devices: list[str] = field(default_factory=list)
    received_bytes: int = 0
    error: str | None = None
    #: After COMMIT: device name -> "" when it runs here, else why it stayed stopped.
    results: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return {
            "id": self.id,
            "direction": "incoming",
            "peer": self.peer,
            "status": self.status,
            "devices": self.devices,
            "received_bytes": self.received_bytes,
            "error": self.error,
            "results": self.results,
        }


class _Claims(Mapping[str, MigratableDevice]):
    """The devices an incoming migration may take: looking one up claims it.

    DestinationMigration looks up the offered names and refuses the lot when one is
    missing or neither RUNNING nor STOP; a device claimed by another migration in one of
    those two states (that migration has not moved it yet, or has loaded it and waits
    for COMMIT) is hidden, so two migrations never both take it. Claims are released
    when the incoming migration ends.
    """

    def __init__(self, service: Service, migration_id: str) -> None:
        self._service = service
        self._id = migration_id

    def __getitem__(self, name: str) -> MigratableDevice:
        device = self._service.devices[name]
        owner = self._service.owners.setdefault(name, self._id)
        if owner != self._id and device.state in (State.RUNNING, State.STOP):
            raise KeyError(name)
        return device

    def __iter__(self) -> Iterator[str]:
        return iter(self._service.devices)

    def __len__(self) -> int:
        return len(self._service.devices)


class Service:
    """The daemon's work: devices, migrations both ways, control commands, events."""

    def __init__(
        self,
        config: DaemonConfig,
        devices: list[MigratableDevice],
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.devices = {d.name: d for d in devices}
        self.defaults = config.migration
        self.metrics = metrics
        self.client_auth = config.auth.client()
        self.server_auth = config.auth.server()
        #: Device name -> the migration using it.
        self.owners: dict[str, str] = {}
        #: Records of devices being switched over, as they were before the fence.
        self._before_fence: dict[str, dict[str, Record]] = {}
        #: Where each device's workload is, and the arms; durable in the state file.
        self.book = OwnershipBook(
            config.state_file,
            self.devices,
            accept_incoming=[d.name for d in config.devices if d.accept_incoming],
        )
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.control: ControlServer | None = None
        self.listeners: list[Listener] = []
        self.stopping = False
        for device in devices:
            device.add_state_listener(self._device_state_changed)

    # -- events ----------------------------------------------------------------------------

    def emit(self, name: str, data: Mapping[str, Any]) -> None:
        """Send an event to the subscribed control clients."""
        if self.control is not None:
            self.control.broadcast(name, data)

    def _device_state_changed(self, device: MigratableDevice, old: State, new: State) -> None:
        migration = self.owners.get(device.name)
        self.emit(
            "DEVICE_STATE",
            {"device": device.name, "old": old.name, "new": new.name, "migration": migration},
        )

    # -- incoming ---------------------------------------------------------------------------

    async def accept(self, session: transport.Session) -> None:
        """Run one incoming migration on an authenticated session (the listeners' handler)."""
        if self.stopping:
            session.abort()
            return
        claim = uuid.uuid4().hex[:12]
        record = Incoming(claim, session.peer_name, asyncio.current_task())
        migration = DestinationMigration(
            session,
            _Claims(self, claim),
            gate=_IncomingGate(self, record),
            **self.config.incoming_timeouts,
        )
        try:
            resumed = await migration.run()
        finally:
            record.devices = [d.name for d in migration.devices]
            record.received_bytes = migration.received_bytes
            self._release(claim)
            self._release(record.id)
            record.task = None
        if record.id == claim:  # refused before its offer was admitted: no record kept
            self._forget_rejected(record, migration.error)
            return
        record.error = migration.error
        record.results = migration.results
        if resumed:
            record.status = "completed"
        else:
            record.status = "split" if migration.committed else "failed"
        if self.metrics is not None:
            self.metrics.incoming.labels(status=record.status).inc()
        log.info("incoming_migration_ended", migration_id=record.id, status=record.status)
        self.emit("INCOMING_MIGRATION", record.as_dict())
        self._forget_finished()

    def _forget_rejected(self, record: Incoming, error: str | None) -> None:
        """Announce a session refused before its offer was admitted, and keep no record.

        Hostile or mistaken peers must not grow the daemon's memory, one record each.
        """
        log.info("incoming_session_rejected", peer=record.peer, reason=error)
        record.status = "rejected"
        record.error = error
        self.emit("INCOMING_MIGRATION", record.as_dict())

    def _forget_finished(self) -> None:
        """Keep the newest ``max_records`` finished migrations each way; running ones stay."""
        limit = self.config.max_records
        outgoing = [
            k for k, r in self.outgoing.items() if r.migration.stats.status in FINAL_STATUSES
        ]
        incoming = [k for k, r in self.incoming.items() if r.status != "active"]
        for key in outgoing[: max(0, len(outgoing) - limit)]:
            del self.outgoing[key]
        for key in incoming[: max(0, len(incoming) - limit)]:
            del self.incoming[key]
        # A migration leaves reference cycles (tasks, sessions, listeners) that live long
        # enough to reach the oldest generation; collected only now and then, they let
        # RSS creep up by MBs per hundred migrations (examples/soak.py). A full
        # collection per migration keeps it flat for a few ms.
        gc.collect()

    def _admit(self, record: Incoming, offer: Offer) -> None:
        """Consent (arming, ownership) to an offer, before any device changes state."""
        if offer.migration_id in self.incoming or offer.migration_id in self.outgoing:
            raise Refused(f"migration id {offer.migration_id} is already known here")
        problems = [
            p for p in (self.book.admission_problem(n, offer.peer) for n in offer.devices) if p
        ]
        if problems:
            raise Refused("; ".join(problems))
        for name in offer.devices:  # _Claims took them under the claim id: rename it
            if self.owners.get(name) == record.id:
                self.owners[name] = offer.migration_id
        record.id = offer.migration_id
        record.devices = list(offer.devices)
        self.incoming[record.id] = record
        self.emit("INCOMING_MIGRATION", record.as_dict())

    def _incoming_committed(self, offer: Offer) -> None:
        """COMMIT arrived: the workload is ours from now, durably, before anything runs."""
        self.book.set(
            offer.devices, Owner.RECEIVED, peer=offer.peer, migration_id=offer.migration_id
        )
        self.book.spend(offer.devices)

    def _incoming_finished(self, offer: Offer, results: Mapping[str, str] | None) -> None:
        """Record what an incoming migration left: failed devices stay stopped, named."""
        if results is None:
            # Loading had begun, so the devices' earlier state is gone: they hold nothing.
            emptied = [n for n in offer.devices if self.book.get(n).owner != Owner.IDLE]
            if emptied:
                self.book.set(
                    emptied,
                    Owner.IDLE,
                    peer=offer.peer,
                    migration_id=offer.migration_id,
                    reason="an incoming migration failed while loading",
                )
            return
        for name, why in results.items():
            if why:
                self.book.set(
                    [name],
                    Owner.STOPPED,
                    peer=offer.peer,
                    migration_id=offer.migration_id,
                    reason=why,
                )

    def _release(self, migration_id: str) -> None:
        for name in [n for n, owner in self.owners.items() if owner == migration_id]:
            del self.owners[name]

    # -- outgoing -----------------------------------------------------------------------------

    def start_migration(
        self, destination: str, names: list[str] | None, changes: Mapping[str, Any]
    ) -> Outgoing:
        """Start migrating ``names`` (default: every device) in the background."""
        if self.stopping:
            raise ControlError("WrongState", "the daemon is shutting down")
        try:
            transport.parse_address(destination)
        except ValueError as exc:
            raise ControlError("InvalidParameter", f"destination: {exc}") from None
        self._refuse_self(destination)
        names = list(self.devices) if names is None else names
        if not names:
            raise ControlError("InvalidParameter", "devices: the list is empty")
        devices = [self._device(name) for name in names]
        busy = [f"{n} (migration {self.owners[n]})" for n in names if n in self.owners]
        if busy:
            raise ControlError("DeviceBusy", f"devices in another migration: {', '.join(busy)}")
        idle = [
            f"{n} ({self.book.get(n).owner.value})"
            for n in names
            if self.book.get(n).owner not in RUNNING_OWNERS
        ]
        if idle:
            raise ControlError(
                "WrongState",
                f"no workload runs here on {', '.join(idle)}: nothing to migrate "
                "(see livemig devices)",
            )
        try:
            params = self.defaults.updated(changes)
            check_blockers(devices, params)
        except MigrationBlocked as exc:
            raise ControlError("MigrationBlocked", str(exc)) from None
        migration = SourceMigration(
            devices,
            destination,
            params,
            auth=self.client_auth,
            name=self.config.name,
            on_fence=lambda names: self._outgoing_fencing(migration, names),
        )
        record = Outgoing(migration)
        migration_id = migration.stats.migration_id
        for name in names:
            self.owners[name] = migration_id
        self.outgoing[migration_id] = record
        migration.add_listener(lambda stats: self._progress(record, stats))
        if self.metrics is not None:
            self.metrics.migration_started(migration_id)
        record.task = asyncio.create_task(self._run(record), name=f"migration-{migration_id}")
        self._share_bandwidth()
        return record

    def _outgoing_fencing(self, migration: SourceMigration, names: list[str]) -> None:
        """Before the switchover: fence the devices durably, since COMMIT may follow (the
        destination may run them then); a rollback puts the earlier records back."""
        self._before_fence[migration.stats.migration_id] = {n: self.book.get(n) for n in names}
        self.book.set(
            names,
            Owner.OUTCOME_UNKNOWN,
            peer=migration.destination,
            migration_id=migration.stats.migration_id,
            reason="switching over: COMMIT may have been sent; no answer from the destination",
        )

    def _outgoing_ended(self, migration: SourceMigration) -> None:
        """After the commit the destination owns the workload; record it durably."""
        stats = migration.stats
        names = [d.name for d in migration.devices]
        before = self._before_fence.pop(stats.migration_id, None)
        if stats.outcome == "source" and before is not None:
            self.book.restore(before)  # rolled back: the workload never left
        if stats.outcome in ("destination", "split"):
            reason = None if stats.outcome == "destination" else stats.error
            self.book.set(
                names,
                Owner.MIGRATED_AWAY,
                peer=migration.destination,
                migration_id=stats.migration_id,
                reason=reason,
            )

    def _share_bandwidth(self) -> None:
        """Split ``max_total_bandwidth`` between the running outgoing migrations, max-min fair.

        Each gets an equal part of what is left; one whose own max_bandwidth is lower
        takes only that and leaves the rest to the others. Rerun when a migration
        starts, ends, or changes its max_bandwidth.
        """
        left = self.config.max_total_bandwidth
        if left is None:
            return
        running = sorted(
            self._running(), key=lambda r: r.migration.params.max_bandwidth or float("inf")
        )
        for index, record in enumerate(running):
            share = left / (len(running) - index)
            record.migration.set_bandwidth_share(share)
            left -= min(share, record.migration.params.max_bandwidth or share)

    def _refuse_self(self, destination: str) -> None:
        """InvalidParameter when ``destination`` is one of this daemon's own listeners.

        A TCP destination is ours when its port is one we listen on and its host is the
        one we bound, or any local address when we bound a wildcard. Host names other
        than ``localhost`` and our own are not resolved here.
        """
        kind, host, port = transport.parse_address(destination)
        for listener in self.listeners:
            if not isinstance(listener, MigrationListener):
                continue
            own = transport.parse_address(listener.address)
            if (kind, host, port) == own or (
                kind == own[0] == "tcp"
                and port == own[2]
                and (_same_host(host, own[1]) or (own[1] in _WILDCARDS and _is_local(host)))
            ):
                raise ControlError(
                    "InvalidParameter",
                    f"destination {destination} is this daemon ({self.config.name}) itself: "
                    "migrate to the listen address of another daemon",
                )

    def _device(self, name: str) -> MigratableDevice:
        try:
            return self.devices[name]
        except KeyError:
            known = ", ".join(self.devices) or "none"
            raise ControlError("DeviceNotFound", f"no device {name!r} (devices: {known})") from None

    def _progress(self, record: Outgoing, stats: MigrationStats) -> None:
        """Listener of a SourceMigration; a failure here must never reach the migration."""
        try:
            self._report_progress(record, stats)
        except Exception:
            log.exception("progress_report_failed", migration_id=stats.migration_id)

    def _report_progress(self, record: Outgoing, stats: MigrationStats) -> None:
        """Status changes and iterations become events and metrics."""
        if self.metrics is not None:
            self.metrics.observe(stats)
        if stats.status in FINAL_STATUSES:
            return  # _run announces the end once the devices are released
        if stats.status != record.last_status:
            record.last_status = stats.status
            self.emit("MIGRATION", {"id": stats.migration_id, "status": stats.status.value})
        if stats.iterations != record.last_iteration:
            record.last_iteration = stats.iterations
            self.emit("MIGRATION_PASS", {"id": stats.migration_id} | stats.as_dict())

    async def _run(self, record: Outgoing) -> None:
        migration = record.migration
        stats = migration.stats
        try:
            await migration.run()
        except MigrationError:
            pass  # the stats say why; SourceMigration logged it
        except Exception as exc:  # a bug: record it as the migration's failure
            log.exception("migration_crashed", migration_id=stats.migration_id)
            stats.error = stats.error or f"internal error: {exc!r}"
            stats.status = Status.FAILED
        finally:
            self._outgoing_ended(migration)
            self._release(stats.migration_id)
            self._share_bandwidth()
            if self.metrics is not None:
                self.metrics.migration_finished(stats)
        self.emit(
            "MIGRATION",
            {"id": stats.migration_id, "status": stats.status.value, "error": stats.error}
            | {"stats": stats.as_dict()},
        )
        self._forget_finished()

    def _outgoing(self, migration_id: str | None) -> Outgoing:
        """The named migration; unnamed, the one running, else the newest that ran.

        InvalidParameter, naming the candidates, when several run: a default would guess.
        """
        if migration_id is None:
            if not self.outgoing:
                raise ControlError("MigrationNotFound", "no migration has been started here")
            running = self._running()
            if len(running) > 1:
                candidates = ", ".join(
                    f"{r.migration.stats.migration_id} (to {r.migration.destination})"
                    for r in running
                )
                raise ControlError(
                    "InvalidParameter",
                    f"{len(running)} migrations run: {candidates}; give 'id' to choose one",
                )
            return running[0] if running else list(self.outgoing.values())[-1]
        try:
            return self.outgoing[migration_id]
        except KeyError:
            raise ControlError("MigrationNotFound", f"no migration {migration_id!r}") from None

    def _running(self) -> list[Outgoing]:
        return [r for r in self.outgoing.values() if r.migration.stats.status not in FINAL_STATUSES]

    def _active(self, migration_id: str | None) -> Outgoing:
        record = self._outgoing(migration_id)
        if record.migration.stats.status in FINAL_STATUSES:
            raise ControlError(
                "WrongState",
                f"migration {record.migration.stats.migration_id} is already "
                f"{record.migration.stats.status.value}",
            )
        return record

    async def fence(self) -> None:
        """At start: a device whose workload is elsewhere (by the record) must not run here."""
        for name, device in self.devices.items():
            record = self.book.get(name)
            if record.owner in FENCED_OWNERS and device.state in (State.RUNNING, State.RUNNING_P2P):
                log.warning("device_fenced", device=name, record=record.as_dict())
                try:
                    await device.set_state(State.STOP)
                except DeviceError as exc:
                    raise StartupError(f"cannot stop fenced device {name!r}: {exc}") from exc

    # -- shutdown -----------------------------------------------------------------------------

    async def shutdown(self, reason: str) -> None:
        """Cancel every migration in flight and wait for the rollbacks."""
        self.stopping = True
        tasks: list[asyncio.Task[Any]] = []
        for record in self.outgoing.values():
            if record.task is not None and not record.task.done():
                if not record.migration.cancel(reason):
                    log.warning(
                        "migration_past_commit_at_shutdown",
                        migration_id=record.migration.stats.migration_id,
                    )
                tasks.append(record.task)
        for incoming in self.incoming.values():
            if incoming.task is not None and not incoming.task.done():
                incoming.task.cancel()
                tasks.append(incoming.task)
        if tasks:
            log.info("cancelling_migrations", count=len(tasks), reason=reason)
            _, pending = await asyncio.wait(tasks, timeout=30)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.emit(
            "SHUTDOWN",
            {"reason": reason, "devices": {n: d.state.name for n, d in self.devices.items()}},
        )

    # -- control commands ------------------------------------------------------------------------

    def commands(self) -> dict[str, Command]:
        """The control API."""
        params = Arg(dict, help="MigrationParams fields and values")
        mid = Arg(str, help="a migration id (default: the newest)")
        table = [
            Command("query-commands", self.query_commands, {}, "the commands"),
            Command("query-daemon", self.query_daemon, {}, "name, version, pid, addresses"),
            Command("query-devices", self.query_devices, {}, "each device's state"),
            Command(
                "query-digests",
                self.query_digests,
                {"devices": Arg(list)},
                "SHA-256 of each device's state",
            ),
            Command(
                "migrate",
                self.migrate,
                {
                    "destination": Arg(str, required=True, help="HOST:PORT or unix:PATH"),
                    "devices": Arg(list, help="device names (default: all)"),
                    "parameters": params,
                },
                "start a migration; returns its id",
            ),
            Command(
                "query-migrate",
                self.query_migrate,
                {"id": mid, "history": Arg(bool)},
                "a migration's stats",
            ),
            Command("query-migrations", self.query_migrations, {}, "every migration, both ways"),
            Command(
                "migrate-set-parameters",
                self.migrate_set_parameters,
                {"id": mid, "parameters": Arg(dict, required=True)},
                "change live parameters, or the defaults when nothing runs",
            ),
            Command(
                "query-migrate-parameters",
                self.query_migrate_parameters,
                {"id": mid},
                "the parameters in force",
            ),
            Command("migrate-continue", self.migrate_continue, {"id": mid}, "leave pre-switchover"),
            Command("migrate-switchover", self.migrate_switchover, {"id": mid}, "force it now"),
            Command("migrate-cancel", self.migrate_cancel, {"id": mid}, "cancel and roll back"),
            Command(
                "device-resume",
                self.device_resume,
                {
                    "devices": Arg(list, required=True, help="device names"),
                    "force": Arg(
                        bool, help="also devices that migrated away or whose outcome is unknown"
                    ),
                },
                "run stopped devices again, in P2P order",
            ),
            Command(
                "migrate-incoming",
                self.migrate_incoming,
                {
                    "uri": Arg(str, help="a listen address of this daemon (QMP's form)"),
                    "devices": Arg(list, help="device names (default: idle or migrated away)"),
                    "from": Arg(str, help="only this source daemon name"),
                    "timeout-s": Arg((int, float), help="the arm lapses after this long"),
                },
                "arm devices to receive one migration each",
            ),
            Command(
                "subscribe", self.subscribe, {"events": Arg(list)}, "receive events (all or named)"
            ),
        ]
        return {c.name: c for c in table}

    async def query_commands(self) -> list[dict[str, Any]]:
        """Every command with its arguments."""
        return [
            {"name": c.name, "help": c.help, "arguments": sorted(c.args)}
            for c in self.commands().values()
        ]

    async def query_daemon(self) -> dict[str, Any]:
        """Who this daemon is and where it listens."""
        return {
            "name": self.config.name,
            "version": VERSION,
            "pid": os.getpid(),
            "listen": [x.address for x in self.listeners if isinstance(x, MigrationListener)],
            "control": str(self.config.control_socket),
            "remote_control": [
                x.address for x in self.listeners if isinstance(x, RemoteControlListener)
            ],
            "metrics": [x.address for x in self.listeners if isinstance(x, MetricsListener)],
            "auth": self.config.auth.method,
            "max_total_bandwidth": self.config.max_total_bandwidth,
            "events": list(EVENTS),
        }

    async def query_devices(self) -> list[dict[str, Any]]:
        """Each device: name, kind, FSM state, features, owner record, arm, migration."""
        armed = self.book.armed()
        return [
            {
                "name": d.name,
                "kind": d.kind,
                "state": d.state.name,
                "features": [f.name for f in Feature if f in d.features],
                "migration": self.owners.get(d.name),
                **self.book.get(d.name).as_dict(),
                "armed": armed.get(d.name),
            }
            for d in self.devices.values()
        ]

    async def query_digests(self, devices: list[str] | None = None) -> dict[str, str]:
        """SHA-256 of each device's whole state (to prove a migration byte-exact)."""
        chosen = [self._device(str(n)) for n in (devices or list(self.devices))]
        return {d.name: (await d.digest()).hex() for d in chosen}

    async def device_resume(self, devices: list[Any], force: bool = False) -> dict[str, str]:
        """Bring devices no migration holds back to RUNNING in P2P order; states by name.

        A device whose workload migrated away, or whose outcome is unknown, may be
        running on the other host: it is refused unless ``force`` (the operator checked
        that the other host does not run it), and then logged loudly. A device that
        cannot get back to RUNNING by the FSM is reset.
        """
        if not devices or not all(isinstance(n, str) for n in devices):
            raise ControlError("InvalidParameter", "devices: must be a non-empty array of names")
        chosen = [self._device(name) for name in devices]
        busy = [f"{n} (migration {self.owners[n]})" for n in devices if n in self.owners]
        if busy:
            raise ControlError("DeviceBusy", f"devices in a migration: {', '.join(busy)}")
        fenced = [d.name for d in chosen if self.book.get(d.name).owner in FENCED_OWNERS]
        if fenced and not force:
            details = ", ".join(f"{n} ({self._owner_text(n)})" for n in fenced)
            raise ControlError(
                "WrongState",
                f"refusing to resume {details}: the workload may be running on the other "
                "host; check there, and resume here only if it does not run there "
                "(livemig resume --force)",
            )
        for name in fenced:
            log.critical("device_resume_forced", device=name, record=self.book.get(name).as_dict())
        notes = await resume_in_order(chosen, log)
        taken_back = [
            d.name for d in chosen if self.book.get(d.name).owner in (*FENCED_OWNERS, Owner.STOPPED)
        ]
        if taken_back:
            self.book.set(
                taken_back,
                Owner.RUNNING_HERE,
                reason="resumed by the operator" + (" (forced)" if fenced else ""),
            )
        for device in chosen:
            log.warning(
                "device_resumed_by_operator", device=device.name, note=notes.get(device.name)
            )
        return {d.name: d.state.name for d in chosen}

    def _owner_text(self, name: str) -> str:
        record = self.book.get(name)
        parts = [record.owner.value]
        if record.peer:
            parts.append(f"peer {record.peer}")
        if record.migration_id:
            parts.append(f"migration {record.migration_id}")
        return ", ".join(parts)

    async def migrate_incoming(self, **arguments: Any) -> dict[str, Any]:
        """Arm devices to receive one migration each (QMP's migrate-incoming).

        ``devices`` names them; without it (``uri`` alone, QMP's form) every device with
        no workload here (idle or migrated away) is armed. A device that runs a workload
        here is armed only when named. ``from`` limits the sender to that daemon name,
        ``timeout-s`` makes the arm lapse.
        """
        uri, names = arguments.get("uri"), arguments.get("devices")
        peer, timeout_s = arguments.get("from"), arguments.get("timeout-s")
        if uri is not None:
            listening = [x.address for x in self.listeners if isinstance(x, MigrationListener)]
            if not _listens_on(uri, listening):
                raise ControlError(
                    "InvalidParameter",
                    f"uri: this daemon does not listen on {uri!r}; it listens on "
                    f"{', '.join(listening) or 'nothing'} (set listen in its config)",
                )
        if names is None:
            names = self.book.default_armable()
            if not names:
                raise ControlError(
                    "WrongState",
                    "no device is idle or migrated away; name the devices to arm "
                    "(a device running a workload here is armed only by name)",
                )
        elif not names or not all(isinstance(n, str) for n in names):
            raise ControlError("InvalidParameter", "devices: must be a non-empty array of names")
        for name in names:
            self._device(name)
        busy = [f"{n} (migration {self.owners[n]})" for n in names if n in self.owners]
        if busy:
            raise ControlError("DeviceBusy", f"devices in a migration: {', '.join(busy)}")
        if timeout_s is not None and (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not 0 < timeout_s < 1e9
        ):
            raise ControlError("InvalidParameter", "timeout-s: must be a positive number")
        if peer is not None and (not isinstance(peer, str) or not peer):
            raise ControlError("InvalidParameter", "from: must be a daemon name")
        self.book.arm(names, peer, timeout_s)
        log.info("devices_armed", devices=names, peer=peer, timeout_s=timeout_s)
        return {"armed": names, "from": peer, "timeout-s": timeout_s}

    async def migrate(
        self,
        destination: str,
        devices: list[Any] | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start a migration; its id (progress comes as events and via query-migrate)."""
        if devices is not None and not all(isinstance(n, str) for n in devices):
            raise ControlError("InvalidParameter", "devices: must be an array of names")
        record = self.start_migration(destination, devices, parameters or {})
        return {"id": record.migration.stats.migration_id}

    async def query_migrate(self, id: str | None = None, history: bool = False) -> dict[str, Any]:
        """The stats of a migration (query-migrate), with QEMU's names for QEMU's fields.

        An incoming migration's record by its id; without an id, the newest outgoing one,
        else the newest incoming one.
        """
        if id is not None and id in self.incoming:
            return self.incoming[id].as_dict()
        if id is None and not self.outgoing and self.incoming:
            return list(self.incoming.values())[-1].as_dict()
        stats = self._outgoing(id).migration.stats.as_dict(history=history)
        return stats | qemu_migration_info(stats)

    async def query_migrations(self) -> list[dict[str, Any]]:
        """Every migration this daemon ran or runs, outgoing then incoming."""
        outgoing = [
            {
                "id": r.migration.stats.migration_id,
                "direction": "outgoing",
                "peer": r.migration.destination,
                "status": r.migration.stats.status.value,
                "devices": [d.name for d in r.migration.devices],
            }
            for r in self.outgoing.values()
        ]
        return outgoing + [r.as_dict() for r in self.incoming.values()]

    async def migrate_set_parameters(
        self, parameters: dict[str, Any], id: str | None = None
    ) -> dict[str, Any]:
        """Change a running migration's live parameters, or the defaults when none runs."""
        try:
            if id is not None or self._running():
                record = self._active(id)
                changed = record.migration.set_parameters(parameters).as_dict()
                self._share_bandwidth()
                return changed
            self.defaults = self.defaults.updated(parameters)
        except MigrationBlocked as exc:
            raise ControlError("InvalidParameter", str(exc)) from None
        log.info("defaults_changed", **parameters)
        return self.defaults.as_dict()

    async def query_migrate_parameters(self, id: str | None = None) -> dict[str, Any]:
        """A migration's parameters, or the defaults when none runs (what ``set`` changes).

        QEMU's names for the parameters QEMU has come too, in QEMU's units.
        """
        if id is None and not self._running():
            params = self.defaults
        else:
            params = self._outgoing(id).migration.params
        return params.as_dict() | to_qemu_parameters(params) | {"live": sorted(LIVE_PARAMETERS)}

    async def migrate_continue(self, id: str | None = None) -> dict[str, Any]:
        """Release a migration paused before the switchover."""
        record = self._active(id)
        if not record.migration.continue_switchover():
            raise ControlError(
                "WrongState",
                f"migration is {record.migration.stats.status.value}, not pre-switchover",
            )
        return {"id": record.migration.stats.migration_id}

    async def migrate_switchover(self, id: str | None = None) -> dict[str, Any]:
        """Switch over at the next iteration whatever the estimate says."""
        record = self._active(id)
        record.migration.force_switchover()
        return {"id": record.migration.stats.migration_id}

    async def migrate_cancel(self, id: str | None = None) -> dict[str, Any]:
        """Cancel a migration; the source devices go back to RUNNING (watch the events)."""
        record = self._active(id)
        if not record.migration.cancel("cancelled by the user"):
            raise ControlError(
                "WrongState", "the migration is past the point of no return (COMMIT sent)"
            )
        return {"id": record.migration.stats.migration_id}

    async def subscribe(self, events: list[Any] | None = None) -> dict[str, Any]:
        """Receive events on this connection: all of them, or those named."""
        assert self.control is not None
        if events is not None:
            unknown = sorted(str(e) for e in events if e not in EVENTS)
            if unknown:
                raise ControlError(
                    "InvalidParameter",
                    f"unknown event(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}",
                )
        connection = self.control.current
        connection.events = None if events is None else frozenset(str(e) for e in events)
        return {"events": list(EVENTS) if events is None else sorted(connection.events or ())}


class _IncomingGate:
    """The daemon's say over one incoming migration (destination.Gate)."""

    def __init__(self, service: Service, record: Incoming) -> None:
        self._service = service
        self._record = record

    def admit(self, offer: Offer) -> None:
        self._service._admit(self._record, offer)

    def prepare(self, offer: Offer) -> None:
        self._service.book.set(
            offer.devices,
            Owner.OUTCOME_UNKNOWN,
            peer=offer.peer,
            migration_id=offer.migration_id,
            reason="receiving: COMMIT may follow; resumed only after it",
        )

    def committed(self, offer: Offer) -> None:
        self._service._incoming_committed(offer)

    def finished(self, offer: Offer, results: Mapping[str, str] | None) -> None:
        self._service._incoming_finished(offer, results)


def _listens_on(uri: str, listening: list[str]) -> bool:
    """Whether ``uri`` names one of the bound addresses (a wildcard host matches any)."""
    try:
        kind, host, port = transport.parse_address(uri)
    except ValueError:
        return False
    for address in listening:
        there = transport.parse_address(address)
        if kind != there[0] or port != there[2]:
            continue
        if kind == "unix" or host == there[1] or host in ("0.0.0.0", "::", ""):
            return True
        if there[1] in ("0.0.0.0", "::", ""):
            return True
    return False


# -- listeners ---------------------------------------------------------------------------------


class MigrationListener:
    """Accepts incoming migrations on one address (transport.serve)."""

    name = "migration"

    def __init__(self, address: str, service: Service) -> None:
        self.requested = address
        self.service = service
        self._server: transport.Server | None = None

    @property
    def address(self) -> str:
        """The bound address (the real port when 0 was asked for)."""
        return self._server.address if self._server is not None else self.requested

    async def start(self) -> None:
        """Listen; OSError when the address is taken."""
        kind, path, _ = transport.parse_address(self.requested)
        if kind == "unix":
            _remove_stale_migration_socket(path)
        self._server = await transport.serve(
            self.requested,
            self.service.accept,
            name=self.service.config.name,
            auth=self.service.server_auth,
            link_timeout_s=self.service.config.migration.link_timeout_s,
        )

    async def stop(self) -> None:
        """Stop listening; incoming migrations still running are cancelled (and reset)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        kind, path, _ = transport.parse_address(self.requested)
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


_WILDCARDS = ("0.0.0.0", "::", "")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _same_host(a: str, b: str) -> bool:
    return a == b or (a in _LOOPBACK and b in _LOOPBACK)


def _is_local(host: str) -> bool:
    """Whether ``host`` names this machine: loopback, our host name, or a local address."""
    if host in _LOOPBACK or host == socket.gethostname():
        return True
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False  # a name: not resolved here
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))  # only an address of this host can be bound
        except OSError:
            return False
    return True


def _remove_stale_migration_socket(path: str) -> None:
    """Unlink a leftover socket file; OSError when something still listens on it."""
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"{path} is in use by another process")
    finally:
        probe.close()


# -- the runner ---------------------------------------------------------------------------------


class Runner:
    """Setup, cleanup and signals of one daemon."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.devices: list[MigratableDevice] = []
        self.service: Service | None = None
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
        try:
            service = self.service = Service(config, self.devices, metrics=metrics)
        except (ValueError, OSError) as exc:
            raise StartupError(f"cannot use the ownership state: {exc}") from exc
        await service.fence()
        listeners: list[Listener] = [MigrationListener(a, service) for a in config.listen]
        service.control = ControlServer(
            config.control_socket,
            service.commands(),
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

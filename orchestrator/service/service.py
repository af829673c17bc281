"""The daemon's work: devices, migrations both ways, events (the control API is commands.py).

:class:`Service` holds the devices, runs outgoing migrations (SourceMigration) and
incoming ones (DestinationMigration) and emits events. One migration per device at a
time. Its :class:`~orchestrator.service.ownership.OwnershipBook` says where each
device's workload is and which devices may receive one (arming), durably: the fence a
restart keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

import transport
from devices.base import MigratableDevice
from devices.errors import DeviceError
from devices.fsm import RUNNING_STATES, State
from orchestrator.engine.destination import DestinationMigration, Offer, Refused
from orchestrator.engine.errors import MigrationBlocked, MigrationError
from orchestrator.engine.phases import PhaseError
from orchestrator.engine.source import SourceMigration
from orchestrator.engine.stats import FINAL_STATUSES, MigrationStats, Status
from orchestrator.engine.window import WindowHistory
from orchestrator.service.config import DaemonConfig
from orchestrator.service.control import ControlServer
from orchestrator.service.listeners import Listener, MigrationListener, listens_on
from orchestrator.service.metrics import Metrics
from orchestrator.service.ownership import (
    FENCED_OWNERS,
    KEPT_STOPPED,
    RUNNING_OWNERS,
    Owner,
    OwnershipBook,
    Record,
)
from orchestrator.service.protocol import ControlError

log = structlog.get_logger(__name__)

#: Records whose stopped device may hold the workload's only copy (Service.fence).
_ONLY_COPY_OWNERS = frozenset({Owner.OUTCOME_UNKNOWN, Owner.STOPPED})
#: Where such a device keeps that copy across daemons: stopped, or mid-drain.
_KEPT_IN = (State.STOP, State.STOP_COPY)


def _held_in(record: Record) -> State:
    """The state a device with ``record`` is in while it keeps its workload: RUNNING when
    the workload runs here, STOP when it is kept stopped or fenced."""
    return State.RUNNING if record.owner in RUNNING_OWNERS else State.STOP


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


def open_book(config: DaemonConfig, names: Iterable[str]) -> OwnershipBook:
    """The ownership book of devices ``names`` in the config's state file, locked;
    ValueError or OSError naming the file when another daemon holds it or it is bad."""
    return OwnershipBook(
        config.state_file,
        names,
        accept_incoming=[d.name for d in config.devices if d.accept_incoming],
    )


@dataclass(slots=True)
class Outgoing:
    """An outgoing migration and the task running it."""

    migration: SourceMigration
    task: asyncio.Task[None] | None = None
    last_status: Status | None = None
    last_iteration: int = 0
    #: Why it was asked to cancel (by an operator or the daemon's shutdown), once taken.
    cancelling: str | None = None

    def cancel(self, reason: str) -> None:
        """Ask the migration to roll back; PhaseError past COMMIT (see SourceMigration)."""
        self.migration.cancel(reason)
        self.cancelling = reason


@dataclass(slots=True)
class Incoming:
    """An incoming migration, as far as the daemon can see it."""

    id: str
    peer: str
    task: asyncio.Task[Any] | None
    #: While it runs: the migration (its downtime window holds the DEVICE_STATE events).
    migration: DestinationMigration | None = None
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


class _ClaimOnLookup(Mapping[str, MigratableDevice]):
    """The devices an incoming migration may take: looking one up claims it.

    DestinationMigration looks up the offered names and refuses the lot when one is
    missing or neither RUNNING nor STOP; a device claimed by another migration in one of
    those two states (that migration has not moved it yet, or has loaded it and waits
    for COMMIT) is refused as busy with that migration, so two migrations never both
    take it and the source is told why. Claims are released when the incoming
    migration ends.
    """

    def __init__(self, service: Service, migration_id: str) -> None:
        self._service = service
        self._id = migration_id

    def __getitem__(self, name: str) -> MigratableDevice:
        device = self._service.devices[name]
        owner = self._service.owners.setdefault(name, self._id)
        if owner != self._id and device.state in (State.RUNNING, State.STOP):
            raise Refused(f"{name}: busy (migration {owner} holds it here)")
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
        book: OwnershipBook | None = None,
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
        self.book = book if book is not None else open_book(config, self.devices)
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.control: ControlServer | None = None
        self.listeners: list[Listener] = []
        self.stopping = False
        #: Its outgoing windows to each destination, measured against predicted: they
        #: scale the next estimate to that destination. One per destination: a peer that
        #: holds back its verdicts teaches a long window, and must not stop migrations to
        #: the other hosts.
        self.window_histories: dict[str, WindowHistory] = {}
        #: Admitted into an incoming migration while running their workload, and not yet
        #: stopped for good (RESUMING or ERROR): their records before the admission.
        self._unloaded: dict[str, Record] = {}
        for device in devices:
            device.add_state_listener(self._device_state_changed)

    # -- events ----------------------------------------------------------------------------

    def emit(self, name: str, data: Mapping[str, Any]) -> None:
        """Send an event to the subscribed control clients."""
        if self.control is not None:
            self.control.broadcast(name, data)

    def _device_state_changed(self, device: MigratableDevice, old: State, new: State) -> None:
        if self._unloaded and new in (State.RESUMING, State.ERROR):
            self._unloaded.pop(device.name, None)  # its workload's state is gone from here
        # No report when no client listens: a switchover changes every device's state in
        # its window, where even deferring a report costs a microsecond a device and arc.
        if self.control is None or not self.control.wants("DEVICE_STATE"):
            return
        migration = self.owners.get(device.name)
        record = self.outgoing.get(migration) or self.incoming.get(migration) if migration else None
        if record is None or record.migration is None:
            self._emit_device_state(device.name, old, new, migration)
        else:
            record.migration.after_window(
                self._emit_device_state, (device.name, old, new, migration)
            )

    def _emit_device_state(self, name: str, old: State, new: State, migration: str | None) -> None:
        data = {"device": name, "old": old.name, "new": new.name, "migration": migration}
        self.emit("DEVICE_STATE", data)

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
            _ClaimOnLookup(self, claim),
            gate=_IncomingGate(self, record),
            **self.config.incoming_timeouts,
        )
        record.migration = migration
        try:
            resumed = await migration.run()
        finally:
            record.migration = None
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
        held = {
            n: r
            for n, r in ((n, self.book.get(n)) for n in offer.devices)
            if r.owner in RUNNING_OWNERS | KEPT_STOPPED
        }
        try:  # loading replaces what the devices held: durably no workload from now
            self.book.set(
                offer.devices,
                Owner.IDLE,
                peer=offer.peer,
                migration_id=offer.migration_id,
                reason="receiving: the state here is being replaced",
                before=held,  # until the load reaches them: for a restart to judge
            )
        except OSError as exc:
            raise Refused(f"cannot record the devices as receiving: {exc}") from None
        self._unloaded.update(held)
        for name in offer.devices:  # _ClaimOnLookup took them under the claim id: rename it
            if self.owners.get(name) == record.id:
                self.owners[name] = offer.migration_id
        record.id = offer.migration_id
        record.devices = list(offer.devices)
        self.incoming[record.id] = record
        self.emit("INCOMING_MIGRATION", record.as_dict())

    def _incoming_committed(self, offer: Offer) -> None:
        """After COMMIT and the resume (outside the window): the workload is ours, durably;
        until this write the SYNC fence ("outcome unknown") covered a crash."""
        self.book.set(
            offer.devices, Owner.RECEIVED, peer=offer.peer, migration_id=offer.migration_id
        )
        self.book.spend(offer.devices)

    def _incoming_finished(self, offer: Offer, results: Mapping[str, str] | None) -> None:
        """Record what an incoming migration left: failed devices stay stopped, named."""
        # A device the load never reached kept its workload, running or kept stopped (its
        # first arc failed, so it never entered RESUMING) and keeps its record.
        kept = {n: self._unloaded.pop(n) for n in offer.devices if n in self._unloaded}
        if results is None:
            # One whose driver stopped it on the way and could not go on nor back holds
            # its workload's state, stopped: for the operator to resume.
            halted = [
                n
                for n, r in kept.items()
                if r.owner in RUNNING_OWNERS and self.devices[n].state == State.STOP
            ]
            kept = {n: r for n, r in kept.items() if self.devices[n].state == _held_in(r)}
            # The others' loading had begun, so their earlier state is gone: nothing, unless
            # the reset failed: one still RESUMING, or in STOP once the barrier's note was
            # made (so loaded), holds (part of) the peer's copy, which runs there again:
            # resumed here unasked, it would run in two places.
            emptied = [n for n in offer.devices if n not in kept and n not in halted]
            copies = [
                n
                for n in emptied
                if self.devices[n].state == State.RESUMING
                or (
                    self.devices[n].state == State.STOP
                    and self.book.get(n).owner == Owner.OUTCOME_UNKNOWN
                )
            ]
            emptied = [n for n in emptied if n not in copies]
            for names, owner, reason in (
                (halted, Owner.STOPPED, "an incoming migration stopped it and failed"),
                (emptied, Owner.IDLE, "an incoming migration failed while loading"),
                (
                    copies,
                    Owner.MIGRATED_AWAY,
                    "an incoming migration failed and the state it loaded could not be "
                    "reset: the workload runs on the peer, not this stopped copy",
                ),
            ):
                if names:
                    self.book.set(
                        names,
                        owner,
                        peer=offer.peer,
                        migration_id=offer.migration_id,
                        reason=reason,
                    )
            if kept:
                self.book.restore(kept)
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

    def refuse_busy(self, names: Iterable[str], *, another: bool = False) -> None:
        """DeviceBusy naming each of ``names`` that a migration holds, with that migration."""
        busy = [f"{n} (migration {self.owners[n]})" for n in names if n in self.owners]
        if busy:
            which = "another migration" if another else "a migration"
            raise ControlError("DeviceBusy", f"devices in {which}: {', '.join(busy)}")

    def may_move(self, name: str) -> bool:
        """Whether what holds ``name`` may still change its state: anything but an
        incoming migration past its resume (it only closes its session now)."""
        holder = self.owners.get(name)
        if holder is None:
            return False
        incoming = self.incoming.get(holder)
        if incoming is None:
            return True
        return incoming.migration is not None and not (
            incoming.migration.committed and incoming.migration.results
        )

    @contextlib.contextmanager
    def holding(self, names: Iterable[str], what: str) -> Iterator[None]:
        """Hold ``names`` in ``owners`` while a command walks them, as a migration does,
        so no arm, migration or offer drives them meanwhile."""
        token = f"{what}-{uuid.uuid4().hex[:6]}"
        for name in names:
            self.owners[name] = token
        try:
            yield
        finally:
            self._release(token)

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
            kind, _, port = transport.parse_address(destination)
        except ValueError as exc:
            raise ControlError("InvalidParameter", f"destination: {exc}") from None
        if kind == "tcp" and port == 0:
            raise ControlError(
                "InvalidParameter",
                f"destination: port 0 in {destination!r} is no daemon's port; give the port "
                "the destination listens on (livemig status there)",
            )
        self._refuse_self(destination)
        names = list(self.devices) if names is None else names
        if not names:
            raise ControlError("InvalidParameter", "devices: the list is empty")
        devices = [self._device(name) for name in names]
        self.refuse_busy(names, another=True)
        stopped = [n for n in names if self.book.get(n).owner == Owner.STOPPED]
        if stopped:
            raise ControlError(
                "WrongState",
                f"{', '.join(stopped)} (stopped: its workload is here but does not run): "
                f"livemig resume {' '.join(stopped)} first, then migrate",
            )
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
            migration = SourceMigration(
                devices,
                destination,
                self.defaults.updated(changes),
                auth=self.client_auth,
                name=self.config.name,
                on_fence=lambda names: self._outgoing_fencing(migration, names),
                window_history=self.window_histories.setdefault(destination, WindowHistory()),
            )
            migration.check()
        except MigrationBlocked as exc:
            raise ControlError("MigrationBlocked", str(exc)) from None
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
        if stats.outcome == "source":
            reset = {name: where for name, where in stats.placement.items() if where != "source"}
            self.record_state_lost(reset, "rollback")
        if stats.outcome in ("destination", "split"):
            reason = None if stats.outcome == "destination" else stats.error
            self.book.set(
                names,
                Owner.MIGRATED_AWAY,
                peer=migration.destination,
                migration_id=stats.migration_id,
                reason=reason,
            )

    def record_state_lost(self, notes: Mapping[str, str], during: str) -> None:
        """Devices that ``resume_in_order`` could only reset (``notes``: name -> what
        happened) during a ``rollback`` or an operator's ``resume``: they hold no workload
        any more, so they are ``idle``, loudly, never the workload running here."""
        for name, note in notes.items():
            log.critical("device_state_lost", device=name, during=during, note=note)
            self.book.set([name], Owner.IDLE, reason=f"{during}: {note}; its state is lost")

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
        bound = [x.address for x in self.listeners if isinstance(x, MigrationListener)]
        if listens_on(destination, bound):
            raise ControlError(
                "InvalidParameter",
                f"destination {destination} is this daemon ({self.config.name}) itself: "
                "migrate to the listen address of another daemon",
            )
        if listens_on(destination, [f"unix:{self.config.control_socket}"]):
            raise ControlError(
                "InvalidParameter",
                f"destination {destination} is this daemon's control socket, where livemig "
                "commands go: migrate to the listen address of another daemon (livemig "
                "status there shows it)",
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
            migration.record_crash(exc)
        finally:
            try:
                self._outgoing_ended(migration)
            except OSError as exc:  # the records keep their fence; the devices must be freed
                log.critical("owner_record_failed", migration_id=stats.migration_id, error=str(exc))
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
        """The outgoing migration a command acts on (cancel, continue, set), still running.

        An incoming migration, named or the only one running when none goes out, is
        refused with WrongState sending the operator to its source, which drives it.
        """
        active = [r for r in self.incoming.values() if r.status == "active"]
        incoming = self.incoming.get(migration_id or "")
        if migration_id is None and not self._running() and len(active) == 1:
            incoming = active[0]
        if incoming is not None:
            raise ControlError(
                "WrongState",
                f"migration {incoming.id} is incoming from {incoming.peer} ({incoming.status}); "
                "its source drives it: cancel, continue or set it on its source",
            )
        record = self._outgoing(migration_id)
        if record.migration.stats.status in FINAL_STATUSES:
            raise ControlError(
                "WrongState",
                f"migration {record.migration.stats.migration_id} is already "
                f"{record.migration.stats.status.value}",
            )
        return record

    def steerable(self, migration_id: str | None) -> Outgoing:
        """The running outgoing migration to continue or force, unless a cancel of it
        was taken or it failed: it is ending, and "continues" would be a false answer."""
        record = self._active(migration_id)
        stats = record.migration.stats
        if record.cancelling is not None:
            raise ControlError(
                "WrongState",
                f"migration {stats.migration_id} is being cancelled "
                f"({record.cancelling}): it rolls back and the source devices run again",
            )
        if stats.error is not None:  # failed on its own: ending, as a cancel would
            raise ControlError(
                "WrongState", f"migration {stats.migration_id} is failing ({stats.error})"
            )
        return record

    async def fence(self) -> None:
        """At start: a device whose workload is elsewhere (by the record) must not run here,
        and one whose record says it runs here but that is found in STOP is recorded
        ``stopped`` (a backend that keeps devices across daemons had it stopped): the file
        must not claim a workload runs where none does."""
        self._judge_cut_short_admissions()
        self._flag_kept_states_gone()
        stopped = [
            n
            for n, d in self.devices.items()
            if self.book.get(n).owner in RUNNING_OWNERS and d.state == State.STOP
        ]
        for name in stopped:
            record = self.book.get(name)
            log.warning("workload_found_stopped", device=name, record=record.as_dict())
            self._rewrite_at_start(
                name,
                Owner.STOPPED,
                f"found stopped when the daemon started (the record said "
                f"{record.owner.value}): it runs nowhere; livemig resume runs it here",
            )
        for name, device in self.devices.items():
            record = self.book.get(name)
            if record.owner in FENCED_OWNERS and device.state in RUNNING_STATES:
                log.warning("device_fenced", device=name, record=record.as_dict())
                try:
                    await device.set_state(State.STOP)
                except DeviceError as exc:
                    raise StartupError(f"cannot stop fenced device {name!r}: {exc}") from exc

    def _flag_kept_states_gone(self) -> None:
        """At start: a device kept stopped here with a state that may be the workload's
        only copy (``outcome unknown``, ``stopped``) but found neither in STOP nor in
        STOP_COPY (where a source killed mid-drain leaves it) was reset or run since the
        last daemon: vfio-pci resets on open, a VMM may have run it. The record keeps its
        owner and fence, and says so: resuming it as the workload would run what is left."""
        for name, device in self.devices.items():
            record, found = self.book.get(name), device.found_at_open
            if record.owner not in _ONLY_COPY_OWNERS or found is None or found in _KEPT_IN:
                continue
            log.critical(
                "kept_state_found_gone", device=name, found=found.name, record=record.as_dict()
            )
            self._rewrite_at_start(
                name,
                record.owner,
                f"found {found.name} when the daemon started, not stopped as recorded "
                f"({record.owner.value}): reset or run since, the state it kept may be "
                "gone; check where the workload runs before resuming it",
            )

    def _rewrite_at_start(self, name: str, owner: Owner, reason: str) -> None:
        """``name``'s record anew, same migration, for what the daemon found at start; a
        StartupError when the state file cannot take it (no daemon on a stale record)."""
        record = self.book.get(name)
        try:
            self.book.set(
                [name], owner, peer=record.peer, migration_id=record.migration_id, reason=reason
            )
        except OSError as exc:
            raise StartupError(f"cannot record {name!r} as {owner.value}: {exc}") from exc

    def _judge_cut_short_admissions(self) -> None:
        """At start: a device the last daemon admitted into an incoming migration that
        did not end (the daemon died) is ``idle`` with the record it replaced. A backend
        that keeps its devices across daemons tells where it had the device: in RUNNING
        as that workload ran, or in STOP (where a first arc leaves a running one, and a
        kept-stopped one waits), the load never reached it and the workload is still
        there, so the earlier record comes back. Found in RESUMING or ERROR, or reset to
        RUNNING, or a device that starts afresh: its state was replaced, ``idle`` is true."""
        for name, device in self.devices.items():
            record = self.book.get(name)
            if record.before is None:
                continue
            found = device.found_at_open
            log.warning(
                "incoming_cut_short",
                device=name,
                migration_id=record.migration_id,
                found=None if found is None else found.name,
                before=record.before.as_dict(),
            )
            if found != State.STOP and found != _held_in(record.before):
                self._rewrite_at_start(
                    name,
                    Owner.IDLE,
                    "an incoming migration ended with the daemon while it loaded: the "
                    "state here was replaced",
                )
                continue
            try:
                self.book.restore({name: record.before})
            except OSError as exc:
                raise StartupError(f"cannot record what {name!r} holds: {exc}") from exc

    # -- shutdown -----------------------------------------------------------------------------

    async def shutdown(self, reason: str) -> None:
        """Cancel every migration in flight and wait for the rollbacks; one past COMMIT
        (either way) is left to finish, since the workload then belongs to the
        destination."""
        self.stopping = True
        tasks: list[asyncio.Task[Any]] = []
        for record in self.outgoing.values():
            if record.task is not None and not record.task.done():
                try:
                    record.cancel(reason)
                except PhaseError:
                    log.warning(
                        "migration_past_commit_at_shutdown",
                        migration_id=record.migration.stats.migration_id,
                    )
                tasks.append(record.task)
        for incoming in self.incoming.values():
            if incoming.task is None or incoming.task.done():
                continue
            if incoming.migration is not None and incoming.migration.committed:
                # The source gave the workload away: let the resume finish, never cancel it.
                log.warning("incoming_past_commit_at_shutdown", migration_id=incoming.id)
            else:
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

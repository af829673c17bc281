"""The daemon's control API: the commands a control client runs, and their table."""

from __future__ import annotations

import os
from typing import Any

import structlog

from devices.fsm import Feature
from orchestrator.engine.errors import MigrationBlocked
from orchestrator.engine.p2p import resume_in_order
from orchestrator.engine.params import LIVE_PARAMETERS, to_qemu_parameters
from orchestrator.engine.phases import Phase, PhaseError
from orchestrator.service.control import RemoteControlListener
from orchestrator.service.listeners import MigrationListener, listens_on
from orchestrator.service.metrics import MetricsListener
from orchestrator.service.ownership import FENCED_OWNERS, KEPT_STOPPED, Owner
from orchestrator.service.protocol import VERSION, Arg, Command, ControlError, qemu_migration_info
from orchestrator.service.service import Service
from transport.address import parse_address
from transport.checks import has_type

log = structlog.get_logger(__name__)

#: Events the daemon emits; ``subscribe`` takes any subset.
EVENTS = ("MIGRATION", "MIGRATION_PASS", "INCOMING_MIGRATION", "DEVICE_STATE", "SHUTDOWN")
#: The phases in which a forced switchover still changes something: before pre-copy
#: decided (it then switches over at the first iteration).
_FORCEABLE = frozenset({Phase.NEW, Phase.SETUP, Phase.PRECOPY})


class Commands:
    """The control commands of one service (QMP-style names; see control.py)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def table(self) -> dict[str, Command]:
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
            for c in self.table().values()
        ]

    async def query_daemon(self) -> dict[str, Any]:
        """Who this daemon is and where it listens."""
        return {
            "name": self.service.config.name,
            "version": VERSION,
            "pid": os.getpid(),
            "listen": [
                x.address for x in self.service.listeners if isinstance(x, MigrationListener)
            ],
            "control": str(self.service.config.control_socket),
            "remote_control": [
                x.address for x in self.service.listeners if isinstance(x, RemoteControlListener)
            ],
            "metrics": [
                x.address for x in self.service.listeners if isinstance(x, MetricsListener)
            ],
            "auth": self.service.config.auth.method,
            "max_total_bandwidth": self.service.config.max_total_bandwidth,
            "events": list(EVENTS),
        }

    async def query_devices(self) -> list[dict[str, Any]]:
        """Each device: name, kind, FSM state, features, owner record, arm, migration."""
        armed = self.service.book.armed()
        return [
            {
                "name": d.name,
                "kind": d.kind,
                "state": d.state.name,
                "features": [f.name for f in Feature if f in d.features],
                "migration": self.service.owners.get(d.name),
                **self.service.book.get(d.name).as_dict(),
                "armed": armed.get(d.name),
            }
            for d in self.service.devices.values()
        ]

    async def query_digests(self, devices: list[str] | None = None) -> dict[str, str]:
        """SHA-256 of each device's whole state (to prove a migration byte-exact).

        A real device is walked aside to take it, so a device that a migration may
        still move is refused (DeviceBusy), and the devices are held meanwhile.
        """
        _refuse_repeats(devices or [])
        chosen = [self.service._device(str(n)) for n in (devices or list(self.service.devices))]
        self.service.refuse_busy([d.name for d in chosen if self.service.may_move(d.name)])
        # From an incoming migration past its resume, too.
        with self.service.holding([d.name for d in chosen], "digest"):
            return {d.name: (await d.digest()).hex() for d in chosen}

    async def device_resume(self, devices: list[Any], force: bool = False) -> dict[str, str]:
        """Bring devices no migration holds back to RUNNING in P2P order; states by name.

        A device whose workload migrated away, or whose outcome is unknown, may be
        running on the other host: it is refused unless ``force`` (the operator checked
        that the other host does not run it), and then logged loudly. A device that
        cannot get back to RUNNING by the FSM is reset, which drops its state: it is
        recorded ``idle`` (it holds no workload now) and the reply is a GenericError
        naming it, after the others resumed, so the operator never takes it for the
        workload resumed.
        """
        if not devices or not all(isinstance(n, str) for n in devices):
            raise ControlError("InvalidParameter", "devices: must be a non-empty array of names")
        _refuse_repeats(devices)
        chosen = [self.service._device(name) for name in devices]
        self.service.refuse_busy(devices)
        fenced = [d.name for d in chosen if self.service.book.get(d.name).owner in FENCED_OWNERS]
        if fenced and not force:
            details = ", ".join(f"{n} ({self._owner_text(n)})" for n in fenced)
            raise ControlError(
                "WrongState",
                f"refusing to resume {details}: the workload may be running on the other "
                "host; check there, and resume here only if it does not run there "
                "(livemig resume --force)",
            )
        for name in fenced:
            log.critical(
                "device_resume_forced", device=name, record=self.service.book.get(name).as_dict()
            )
        # Held like a migration's while the arcs run, so no arm, migration or offer
        # drives these devices at the same time.
        with self.service.holding(devices, "operator-resume"):
            notes = await resume_in_order(chosen, log)
            taken_back = [
                d.name
                for d in chosen
                if d.name not in notes and self.service.book.get(d.name).owner in KEPT_STOPPED
            ]
            if taken_back:
                self.service.book.set(
                    taken_back,
                    Owner.RUNNING_HERE,
                    reason="resumed by the operator" + (" (forced)" if fenced else ""),
                )
            self.service.record_state_lost(notes, "resume")
        for device in chosen:
            log.warning(
                "device_resumed_by_operator", device=device.name, note=notes.get(device.name)
            )
        if notes:
            details = "; ".join(f"{name}: {note}" for name, note in notes.items())
            states = ", ".join(f"{d.name} {d.state.name}" for d in chosen)
            raise ControlError(
                "GenericError",
                f"the state of {', '.join(notes)} is lost: the FSM could not resume it "
                f"({details}); now {states}",
            )
        return {d.name: d.state.name for d in chosen}

    def _owner_text(self, name: str) -> str:
        record = self.service.book.get(name)
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
            try:
                parse_address(uri)
            except ValueError as exc:
                raise ControlError("InvalidParameter", f"uri: {exc}") from None
            listening = [
                x.address for x in self.service.listeners if isinstance(x, MigrationListener)
            ]
            if not listens_on(uri, listening):
                raise ControlError(
                    "InvalidParameter",
                    f"uri: this daemon does not listen on {uri!r}; it listens on "
                    f"{', '.join(listening) or 'nothing'} (set listen in its config)",
                )
        if names is None:
            names = self.service.book.default_armable()
            if not names:
                raise ControlError(
                    "WrongState",
                    "no device is idle or migrated away; name the devices to arm "
                    "(a device running a workload here is armed only by name)",
                )
        elif not names or not all(isinstance(n, str) for n in names):
            raise ControlError("InvalidParameter", "devices: must be a non-empty array of names")
        _refuse_repeats(names)
        for name in names:
            self.service._device(name)
        self.service.refuse_busy(names)
        if timeout_s is not None and (
            not has_type(timeout_s, (int, float)) or not 0 < timeout_s < 1e9
        ):
            raise ControlError("InvalidParameter", "timeout-s: must be a positive number")
        if peer is not None and (not isinstance(peer, str) or not peer):
            raise ControlError("InvalidParameter", "from: must be a daemon name")
        self.service.book.arm(names, peer, timeout_s)
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
        record = self.service.start_migration(destination, devices, parameters or {})
        return {"id": record.migration.stats.migration_id}

    async def query_migrate(self, id: str | None = None, history: bool = False) -> dict[str, Any]:
        """The stats of a migration (query-migrate), with QEMU's names for QEMU's fields.

        An incoming migration's record by its id; without an id, the newest outgoing one,
        else the newest incoming one.
        """
        if id is not None and id in self.service.incoming:
            return self.service.incoming[id].as_dict()
        if id is None and not self.service.outgoing and self.service.incoming:
            return list(self.service.incoming.values())[-1].as_dict()
        stats = self.service._outgoing(id).migration.stats.as_dict(history=history)
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
            for r in self.service.outgoing.values()
        ]
        return outgoing + [r.as_dict() for r in self.service.incoming.values()]

    async def migrate_set_parameters(
        self, parameters: dict[str, Any], id: str | None = None
    ) -> dict[str, Any]:
        """Change a running migration's live parameters, or the defaults when none runs."""
        try:
            if id is not None or self.service._running():
                record = self.service._active(id)
                changed = record.migration.set_parameters(parameters).as_dict()
                self.service._share_bandwidth()
                return changed
            self.service.defaults = self.service.defaults.updated(parameters)
        except MigrationBlocked as exc:
            raise ControlError("InvalidParameter", str(exc)) from None
        log.info("defaults_changed", **parameters)
        return self.service.defaults.as_dict()

    async def query_migrate_parameters(self, id: str | None = None) -> dict[str, Any]:
        """A migration's parameters, or the defaults when none runs (what ``set`` changes).

        QEMU's names for the parameters QEMU has come too, in QEMU's units.
        """
        if id is None and not self.service._running():
            params = self.service.defaults
        else:
            params = self.service._outgoing(id).migration.params
        return params.as_dict() | to_qemu_parameters(params) | {"live": sorted(LIVE_PARAMETERS)}

    async def migrate_continue(self, id: str | None = None) -> dict[str, Any]:
        """Release a migration paused before the switchover."""
        record = self.service.steerable(id)
        try:
            record.migration.continue_switchover()
        except PhaseError as exc:
            raise ControlError("WrongState", str(exc)) from None
        return {"id": record.migration.stats.migration_id}

    async def migrate_switchover(self, id: str | None = None) -> dict[str, Any]:
        """Switch over at the next iteration whatever the estimate says.

        Refused (WrongState) where it would do nothing: paused before the switchover,
        whose gate only ``continue`` opens (a force there is a script's or a second
        operator's, racing the one who holds the pause), or already switching over.
        """
        record = self.service.steerable(id)
        migration = record.migration
        migration_id = migration.stats.migration_id
        if migration.phase is Phase.PAUSED:
            raise ControlError(
                "WrongState",
                f"migration {migration_id} is paused before the switchover "
                "(pause_before_switchover): it switches over when you release it with "
                "livemig continue (migrate-continue)",
            )
        if migration.phase not in _FORCEABLE:
            raise ControlError(
                "WrongState",
                f"migration {migration_id} is already switching over ({migration.phase.value})",
            )
        migration.force_switchover()
        return {"id": migration_id}

    async def migrate_cancel(self, id: str | None = None) -> dict[str, Any]:
        """Cancel a migration; the source devices go back to RUNNING (watch the events)."""
        record = self.service._active(id)
        migration_id = record.migration.stats.migration_id
        try:
            record.cancel("cancelled by the user")
        except PhaseError as exc:
            raise ControlError(
                "WrongState",
                f"{exc} (past the point of no return): COMMIT is on its way, so the "
                f"destination may run the workload; livemig status --id {migration_id} "
                "shows where it ends (the source runs it again only if COMMIT provably "
                "never left this host)",
            ) from None
        return {"id": migration_id}

    async def subscribe(self, events: list[Any] | None = None) -> dict[str, Any]:
        """Receive events on this connection: all of them, or those named."""
        assert self.service.control is not None
        if events is not None:
            unknown = sorted(str(e) for e in events if e not in EVENTS)
            if unknown:
                raise ControlError(
                    "InvalidParameter",
                    f"unknown event(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}",
                )
        control = self.service.control
        connection = control.current
        control.subscribe(connection, None if events is None else frozenset(map(str, events)))
        return {"events": list(EVENTS) if events is None else sorted(connection.events or ())}


def _refuse_repeats(names: list[Any]) -> None:
    """InvalidParameter naming a device given twice: resume and digests walk the named
    devices at once, and two walks of one device would race."""
    seen: set[str] = set()
    for name in map(str, names):  # digests takes any JSON here and names it later
        if name in seen:
            raise ControlError("InvalidParameter", f"devices: {name} is named twice")
        seen.add(name)

"""Who owns each device's workload, as this daemon knows it, and who may send one here.

The record is the fence that keeps a workload in one place. Each device has an
:class:`Owner` value, kept in a small JSON state file written atomically (write a
temporary file, fsync, rename, fsync the folder) *before* the act it guards, and
outside the downtime window: a destination records its devices "idle" when it admits
a migration (loading replaces their state); both hosts record "outcome unknown" at the
SYNC barrier, before the source stops its devices (COMMIT may follow from there); a
source that rolls back puts its records back, a destination records "received" once
it resumed the devices. A daemon restarted on failure reads the file back, so a restart never
lifts the fence.

Arming is the destination's consent: an incoming migration may take only devices armed
for it (``migrate-incoming``), or devices configured with ``accept_incoming = true``
while they hold no workload here (idle or migrated away). An arm is spent when a
migration into the device commits; a failed attempt before COMMIT leaves it armed, so
the source may retry.

One daemon per state file: a book holds an exclusive lock on ``.NAME.lock`` beside it
until closed (the kernel drops it when the process dies), since two daemons writing
one file would overwrite each other's fences; a book whose lock file was removed or
replaced refuses to write. Records of devices the config no longer
names are kept in the file, so a device left out for one restart finds its fence again.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import errno
import fcntl
import json
import os
import re
import stat
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

STATE_FILE_VERSION = 1


class Owner(enum.StrEnum):
    """Where a device's workload is, from this host's point of view."""

    #: The workload runs on this host (a configured device starts so).
    RUNNING_HERE = "running here"
    #: No workload here: the device waits to receive one (accept_incoming devices start so).
    IDLE = "idle"
    #: The workload moved to ``peer``; the device is stopped here and must not run.
    MIGRATED_AWAY = "migrated away"
    #: The workload came from ``peer`` and runs here.
    RECEIVED = "received"
    #: COMMIT was sent and no answer came: stopped here, the peer may be running it.
    OUTCOME_UNKNOWN = "outcome unknown"
    #: This host owns the workload but the device did not resume: stopped, state kept.
    STOPPED = "stopped"


#: Owners whose device runs a workload here.
RUNNING_OWNERS = frozenset({Owner.RUNNING_HERE, Owner.RECEIVED})
#: Owners whose device must not run here without an operator's --force.
FENCED_OWNERS = frozenset({Owner.MIGRATED_AWAY, Owner.OUTCOME_UNKNOWN})
#: Owners that keep a device stopped: the fenced ones, and a workload here that did not
#: resume. Forgetting one could run the device twice, or unasked.
KEPT_STOPPED = FENCED_OWNERS | {Owner.STOPPED}
#: Owners a bare ``migrate-incoming`` (no device names) arms.
ARMABLE_BY_DEFAULT = frozenset({Owner.IDLE, Owner.MIGRATED_AWAY})


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One device's owner, and the migration that made it so."""

    owner: Owner
    peer: str | None = None
    migration_id: str | None = None
    #: Wall-clock time of the change, ISO 8601 UTC.
    at: str | None = None
    reason: str | None = None
    #: On the ``idle`` an admitted incoming migration writes: the record it replaced, if it
    #: held a workload here, for a restart to judge (Service.fence); else None.
    before: Record | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (the state file, query-devices)."""
        fields = {
            "owner": self.owner.value,
            "peer": self.peer,
            "migration_id": self.migration_id,
            "at": self.at,
            "reason": self.reason,
        }
        return fields if self.before is None else fields | {"before": self.before.as_dict()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, nested: bool = False) -> Record:
        """Validate one entry of the state file; ValueError names the problem."""
        try:
            owner = Owner(raw["owner"])
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"unknown owner {raw.get('owner')!r:.60}") from None

        def text(key: str) -> str | None:
            value = raw.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key} must be a string, got {value!r:.60}")
            return value

        before = raw.get("before")
        if before is not None and (nested or not isinstance(before, Mapping)):
            raise ValueError(f"before must be a record without a before, got {before!r:.60}")
        kept = None if before is None else cls.from_dict(before, nested=True)
        return cls(owner, text("peer"), text("migration_id"), text("at"), text("reason"), kept)


@dataclasses.dataclass(frozen=True, slots=True)
class Arm:
    """Consent to receive one migration into a device."""

    #: Only a source announcing this name may send it (None: any authenticated peer).
    peer: str | None
    #: The book's clock reading after which the arm lapses (None: never).
    expires: float | None
    #: Armed by the config's accept_incoming rather than by an operator.
    standing: bool = False

    def admits(self, peer: str, now: float) -> str | None:
        """None when ``peer`` may send now, else why not."""
        if self.expires is not None and now > self.expires:
            return "its arming expired"
        if self.peer is not None and self.peer != peer:
            return f"it is armed for {self.peer!r}, not {peer!r}"
        return None


#: File systems whose content a reboot erases.
VOLATILE_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})
#: mountinfo's escapes (a space is \040).
_OCTAL = re.compile(r"\\([0-7]{3})")


def file_system(path: Path, mountinfo: str) -> str | None:
    """The type of the file system holding ``path``: that of the longest mount point of
    ``mountinfo`` (the text of /proc/self/mountinfo) above it; None if none is."""
    target = os.path.realpath(path)  # /var/run is a symlink to /run (tmpfs) on most hosts
    best, kind = "", None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        mount = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])  # \040: a space
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fields[fields.index("-", 6) + 1]
    return kind


def now_iso() -> str:
    """The current wall-clock time, for records people read."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class OwnershipBook:
    """Every device's record and arm; records persist in ``path`` (None: memory only)."""

    def __init__(
        self,
        path: Path | None,
        devices: Iterable[str],
        *,
        accept_incoming: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._clock = clock
        self.accept_incoming = frozenset(accept_incoming)
        self.records: dict[str, Record] = {}
        self.arms: dict[str, Arm] = {}
        #: The lock file and the descriptor that holds it (None without a state file).
        self._lock_path: Path | None = None
        self._lock_fd: int | None = None
        self._unlock = self._lock()
        try:
            if self.path is not None:
                self._warn_if_volatile()
            if self.path is not None and not self.path.exists():
                self._warn_of_other_files(devices)
            stored = self._load()
            for name in devices:
                default = Owner.IDLE if name in self.accept_incoming else Owner.RUNNING_HERE
                self.records[name] = stored.get(name, Record(default))
            #: Records of devices the config does not name: kept, never acted on.
            self._unconfigured = {n: r for n, r in stored.items() if n not in self.records}
            if self._unconfigured:
                log.warning("owner_records_kept", devices=sorted(self._unconfigured))
            self._save()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> Callable[[], None]:
        """Lock the state file for this book; ValueError naming it when a daemon holds it."""
        if self.path is None:
            return lambda: None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        # Truncated and written below: a symlink there (to the state file, say) or a FIFO
        # would have its target erased or the start hang, so only a regular file is used.
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(lock_path, flags, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            raise ValueError(
                f"{lock_path} is not a regular file: the lock of the state file {self.path} "
                "must be one; remove it"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"state file {self.path} is in use by another daemon (pid {holder}); "
                "give each daemon its own state_file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_path, self._lock_fd = lock_path, fd
        return weakref.finalize(self, os.close, fd)

    def _check_lock(self) -> None:
        """OSError unless the lock file is still the one this book holds: removed (an
        operator's clean-up), another daemon may have locked a new one on the same file."""
        if self._lock_path is None or self._lock_fd is None:
            return
        try:
            now, ours = os.stat(self._lock_path), os.fstat(self._lock_fd)
            # An inode number names a file only within its file system.
            held = (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)
        except FileNotFoundError:
            held = False
        if not held:
            raise OSError(
                errno.ENOLCK,
                f"cannot write the state file {self.path}: its lock {self._lock_path} was "
                "removed or replaced, so another daemon may use the file; stop this daemon",
            )

    def _warn_if_volatile(self) -> None:
        """A state file on tmpfs (the default beside /run/livemig/control.sock) loses every
        fence at a reboot; say so at each start, since nothing else would."""
        assert self.path is not None
        try:
            kind = file_system(self.path.parent, Path("/proc/self/mountinfo").read_text())
        except OSError:
            return  # no /proc: nothing to tell
        if kind in VOLATILE_FILE_SYSTEMS:
            log.warning(
                "state_file_on_volatile_storage",
                state_file=str(self.path),
                file_system=kind,
                hint="a reboot erases the records (and every fence in them); "
                "set state_file under /var/lib/livemig",
            )

    def _warn_of_other_files(self, devices: Iterable[str]) -> None:
        """A new state file beside one that says some of our devices must not run (the
        default file is named after the daemon: a renamed daemon starts afresh and would
        forget that its devices migrated away) is worth a warning naming that file."""
        assert self.path is not None
        ours = set(devices)
        for other in sorted(self.path.parent.glob("*.owners.json")):
            if other == self.path:
                continue
            try:
                stored = json.loads(other.read_text(encoding="utf-8")).get("devices", {})
                held = sorted(
                    name
                    for name, raw in stored.items()
                    if name in ours and raw.get("owner") in KEPT_STOPPED
                )
            except (OSError, ValueError, AttributeError):
                continue  # not ours to judge; it is never read as this daemon's records
            if held:
                log.warning(
                    "state_file_new_beside_records",
                    state_file=str(self.path),
                    other=str(other),
                    devices=held,
                    hint="if this daemon was renamed, set state_file to the other file",
                )

    def close(self) -> None:
        """Release the state file (idempotent; also when the book is collected)."""
        self._lock_path = self._lock_fd = None  # the number may name another file soon
        self._unlock()

    def _load(self) -> dict[str, Record]:
        """The records of the state file; ValueError naming the file when it is damaged."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(document, dict) or document.get("version") != STATE_FILE_VERSION:
                raise ValueError(f"not a version {STATE_FILE_VERSION} state file")
            devices = document.get("devices")
            if not isinstance(devices, dict):
                raise ValueError("devices must be an object")
            return {str(name): Record.from_dict(raw) for name, raw in devices.items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"state file {self.path}: {exc}") from exc

    def _save(self, records: Mapping[str, Record] | None = None) -> None:
        """Write every record (``records``: those about to be) atomically, durable before
        returning; OSError naming the state file when it cannot be written."""
        if self.path is None:
            return
        records = self.records if records is None else records
        document = {
            "version": STATE_FILE_VERSION,
            "devices": {
                name: record.as_dict() for name, record in {**self._unconfigured, **records}.items()
            },
        }
        self._check_lock()
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A leftover (a crashed daemon of the same pid) or a symlink there is replaced,
            # never written through.
            temporary.unlink(missing_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with open(os.open(temporary, flags, 0o666), "w", encoding="utf-8") as file:
                json.dump(document, file, indent=1)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            folder = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot write the state file {self.path}: {exc.strerror or exc}"
            ) from exc

    def get(self, name: str) -> Record:
        """A device's record."""
        return self.records[name]

    def restore(self, records: Mapping[str, Record]) -> None:
        """Put earlier records back (a switchover that rolled back) and make it durable."""
        updated = self.records | dict(records)
        self._save(updated)
        self.records = updated
        log.info("owner_restored", devices=list(records))

    def set(
        self,
        names: Iterable[str],
        owner: Owner,
        *,
        peer: str | None = None,
        migration_id: str | None = None,
        reason: str | None = None,
        before: Mapping[str, Record] | None = None,
    ) -> None:
        """Change the records of ``names`` (``before``: the records some of them replace,
        kept in theirs) and make the change durable; on OSError (the state file cannot be
        written) the records stay as they were."""
        at, names, kept = now_iso(), list(names), before or {}
        new = {n: Record(owner, peer, migration_id, at, reason, kept.get(n)) for n in names}
        updated = self.records | new
        self._save(updated)
        self.records = updated
        log.info(
            "owner_changed",
            devices=names,
            owner=owner.value,
            peer=peer,
            migration_id=migration_id,
            reason=reason,
        )

    # -- arming -------------------------------------------------------------------------

    def arm(self, names: Iterable[str], peer: str | None, timeout_s: float | None) -> None:
        """Consent to one incoming migration into each of ``names``."""
        expires = None if timeout_s is None else self._clock() + timeout_s
        for name in names:
            self.arms[name] = Arm(peer, expires)

    def default_armable(self) -> list[str]:
        """The devices a bare ``migrate-incoming`` arms: those with no workload here."""
        return [n for n, r in self.records.items() if r.owner in ARMABLE_BY_DEFAULT]

    def arm_of(self, name: str) -> Arm | None:
        """The arm that admits a migration into ``name`` now, if any."""
        arm = self.arms.get(name)
        if arm is not None:
            return arm
        if name in self.accept_incoming and self.records[name].owner in ARMABLE_BY_DEFAULT:
            return Arm(None, None, standing=True)
        return None

    def admission_problem(self, name: str, peer: str) -> str | None:
        """None when ``peer`` may migrate into ``name`` now, else the reason for the source."""
        arm = self.arm_of(name)
        if arm is None:
            record = self.records[name]
            return (
                f"{name} is not armed to receive (owner here: {record.owner.value}); "
                f"run 'livemig incoming --devices {name}' on the destination first"
            )
        problem = arm.admits(peer, self._clock())
        return None if problem is None else f"{name}: {problem}"

    def spend(self, names: Iterable[str]) -> None:
        """A migration into ``names`` committed: their arms are used up."""
        for name in names:
            self.arms.pop(name, None)

    def armed(self) -> dict[str, dict[str, Any]]:
        """The arms that admit now, for query-devices (a lapsed one is not shown)."""
        now = self._clock()
        result = {}
        for name in self.records:
            arm = self.arm_of(name)
            if arm is None or (arm.expires is not None and now > arm.expires):
                continue
            expires_in = None if arm.expires is None else round(arm.expires - now, 3)
            result[name] = {"peer": arm.peer, "expires_in_s": expires_in, "standing": arm.standing}
        return result

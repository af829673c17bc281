"""The destination side of a migration: load every device, then resume them together.

Guarantees:

* Consent: the offer is checked (descriptors, then the daemon's :class:`Gate`: arming
  and ownership) before any device changes state; a refusal names every problem.
* No device runs the migrated state unless every device validated its state and the
  source sent COMMIT. A failure before COMMIT sends a "failed" verdict naming the
  device and cause, resets the devices this migration loaded, and leaves the daemon
  listening.
* After COMMIT nothing is reset or rolled back: every device that can run does, in P2P
  order (each P2P-capable device reaches RUNNING_P2P before any reaches RUNNING), and a
  device that cannot stays stopped with its state; the "resumed" verdict names each
  device's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

import transport
from devices.base import DeviceDescriptor, MigratableDevice
from devices.errors import DeviceError
from devices.fsm import Feature, State
from orchestrator.engine import fanout
from orchestrator.engine.messages import Devices, Verdict, boot_id
from orchestrator.engine.phases import Phase, Phased, PhaseMachine, wait_out
from orchestrator.engine.stats import Downtime
from transport import Tag

log = structlog.get_logger(__name__)
SPARED = (State.RUNNING, State.STOP)  # a device in one before PRECOPY was never loaded


class Refused(Exception):
    """The destination will not take these devices; the message says why."""


@dataclass(frozen=True, slots=True)
class Offer:
    """What a source asks this host to take: its migration id, its name, the devices."""

    migration_id: str
    peer: str
    devices: tuple[str, ...]


class Gate(Protocol):
    """The daemon's say over an incoming migration (arming and ownership records)."""

    def admit(self, offer: Offer) -> None:
        """Raise Refused unless this host consents to ``offer``; before any state change."""

    def prepare(self, offer: Offer) -> None:
        """The switchover is next (SYNC): make a durable note that COMMIT may follow, so a
        crash from here on is never mistaken for "nothing arrived". Before the downtime
        window, so the write costs no downtime."""

    def committed(self, offer: Offer) -> None:
        """COMMIT arrived and the devices were resumed: record the new ownership."""

    def finished(self, offer: Offer, results: Mapping[str, str] | None) -> None:
        """The migration ended: per-device results after COMMIT, None if it failed before."""


def match_devices(
    offered: Sequence[DeviceDescriptor],
    local: Mapping[str, MigratableDevice],
    *,
    p2p: bool,
) -> list[MigratableDevice]:
    """The local device for each offered one, in the offered order, or Refused saying why."""
    matched: list[MigratableDevice] = []
    problems: list[str] = []
    for desc in offered:
        device = local.get(desc.name)
        if device is None:
            problems.append(f"no device named {desc.name!r} here")
            continue
        # The descriptor, not the class: a VFIO device's kind names its model too.
        here = device.descriptor()
        if here.kind != desc.kind:
            problems.append(f"{desc.name}: kind {desc.kind!r} offered, {here.kind!r} here")
        elif here.format_version != desc.format_version:
            problems.append(
                f"{desc.name}: state format v{desc.format_version} offered, "
                f"v{here.format_version} here"
            )
        elif None not in (here.state_size, desc.state_size) and here.state_size != desc.state_size:
            problems.append(
                f"{desc.name}: {desc.state_size} bytes of state offered, the device here "
                f"holds {here.state_size}; configure both alike"
            )
        elif p2p and len(offered) > 1 and not device.features & Feature.P2P:
            problems.append(f"{desc.name}: P2P requested but this device lacks it")
        elif device.state not in (State.RUNNING, State.STOP):
            # RUNNING: idle and waiting; STOP: migrated away earlier, its state is stale.
            problems.append(f"{desc.name}: busy ({device.state.name})")
        matched.append(device)
    if problems:
        raise Refused("; ".join(problems))
    return matched


class DestinationMigration(Phased):
    """One incoming migration on an authenticated session."""

    def __init__(
        self,
        session: transport.Session,
        devices: Mapping[str, MigratableDevice],
        *,
        gate: Gate | None = None,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.session = session
        self.local = devices
        self.gate = gate
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.offer: Offer | None = None
        self.devices: list[MigratableDevice] = []
        #: After COMMIT: device name -> "" when it runs, else why it stayed stopped.
        self.results: dict[str, str] = {}
        self._loading = False
        #: The devices that resume through RUNNING_P2P (when the offer asks for P2P).
        self._p2p_capable: list[MigratableDevice] = []
        self._models = False  # whether every device is a model (fanout.never_waits)
        self.marks: dict[str, float] = {}
        self.device_marks: dict[str, dict[str, float]] = {}
        self.received_bytes = 0
        #: Why the migration failed, once it did.
        self.error: str | None = None
        self.log = log.bind(peer=session.peer_name)
        self._phases = PhaseMachine(self.log)
        #: A cancel came while the devices resumed after COMMIT (re-raised at the end).
        self._cancelled = False

    @property
    def committed(self) -> bool:
        """Whether COMMIT arrived: from then on nothing is reset."""
        return Phase.COMMITTED in self._phases.history

    @property
    def migration_id(self) -> str | None:
        """The source's id of this migration, once its offer arrived."""
        return None if self.offer is None else self.offer.migration_id

    async def run(self) -> bool:
        """Receive, load and resume; True when every device runs here. Never raises on failure.

        After COMMIT it returns False when some device stayed stopped (see ``results``).
        """
        self._set_phase(Phase.SETUP)
        try:
            await self._receive()
        except Refused as exc:
            self.error = f"refused: {exc}"
            self._set_phase(Phase.FAILED)
            return False
        except asyncio.CancelledError:
            ending = Phase.FAILED if self.committed else Phase.CANCELLED
            await self._end("destination daemon shutting down", None, ending)
            raise
        except Exception as exc:
            cancelled = isinstance(exc, transport.PeerCancelled) and not self.committed
            ending = Phase.CANCELLED if cancelled else Phase.FAILED
            if await self._end(
                str(exc) or type(exc).__name__, getattr(exc, "device", None), ending
            ):
                raise asyncio.CancelledError from None
            return False
        failed = {n: why for n, why in self.results.items() if why}
        if failed:
            self.error = "; ".join(f"{n}: {why}" for n, why in failed.items())
        self._set_phase(Phase.FAILED if failed else Phase.COMPLETED)
        if self._cancelled:
            raise asyncio.CancelledError  # held back while the devices resumed
        return not failed

    async def _end(self, reason: str, device: Any, phase: Phase) -> bool:
        """Give up and end in ``phase``, through cancels: cut short, the devices would stay
        loaded and the downtime window open. Whether a cancel came meanwhile (the caller
        re-raises it); an error of the give-up itself (the gate's records) propagates,
        the phase set all the same."""
        giving_up = asyncio.ensure_future(self._give_up(reason, device))
        try:
            cancelled = await wait_out(giving_up)
            giving_up.result()
        finally:
            self._set_phase(phase)
        return cancelled

    async def _receive(self) -> None:
        session = self.session
        hello = await asyncio.wait_for(session.recv(), self.handshake_timeout_s)
        if hello.tag != Tag.DEVICES:
            raise transport.ProtocolError(f"expected DEVICES, got {hello.tag.name}")
        devices = Devices.parse(hello.fields(), self.session.limits)
        offered, p2p = devices.devices, devices.p2p
        want_ack, precopy_devices = devices.switchover_ack, devices.precopy_devices
        session.set_device_count(len(offered))
        offer = Offer(devices.migration_id, session.peer_name, tuple(d.name for d in offered))
        self.offer = offer
        self.log = self.log.bind(migration_id=offer.migration_id)
        try:
            self.devices = match_devices(offered, self.local, p2p=p2p)
            if self.gate is not None:
                self.gate.admit(offer)
        except Refused as exc:
            self.log.warning("devices_refused", reason=str(exc))
            await self._send_verdict("failed", reason=f"refused: {exc}")
            await session.close()
            raise
        self.device_marks = {d.name: {} for d in self.devices}
        # Listed now, not in the window: an IntFlag test costs 0.5 us a device.
        self._p2p_capable = [d for d in self.devices if p2p and d.features & Feature.P2P]
        self._models = fanout.never_waits(self.devices)
        self.log.info("migration_incoming", devices=[d.name for d in self.devices])
        self._loading = True
        await self._transition(self.devices, State.RESUMING)
        await session.send_control(Tag.DEVICES_ACCEPTED, {"boot_id": boot_id()})
        self._set_phase(Phase.PRECOPY)

        channels = [d.resume_channel() for d in self.devices]
        initial_loaded: set[int] = set()
        ended: set[int] = set()
        prepared = False
        loop, moved = asyncio.get_running_loop(), 0.0
        # One timer (wait_for: a task a frame), moved once a second (2 us a frame), not in a window.
        async with _idle_deadline(self.idle_timeout_s) as idle:
            while True:
                if (now := loop.time()) >= moved:
                    idle.reschedule(now + self.idle_timeout_s + 1.0)
                    moved = now + 1.0 if not ended else float("inf")
                frame = await session.recv()
                tag, index = frame.tag, frame.device
                if tag in (Tag.PRECOPY_DATA, Tag.STOPCOPY_DATA):
                    if index in ended:
                        raise transport.ProtocolError(
                            f"data for device {self.devices[index].name} after its END_OF_DEVICE"
                        )
                    await channels[index].write(frame.payload)
                    self.received_bytes += len(frame.payload)
                elif tag == Tag.INITIAL_DATA_SENT:
                    initial_loaded.add(index)
                    if want_ack and len(initial_loaded) == precopy_devices:
                        await session.send_control(Tag.SWITCHOVER_ACK)
                        self.log.info("switchover_ack_sent")
                elif tag == Tag.END_OF_DEVICE:
                    if not prepared:  # a source's window opens after its barriers: not yet
                        raise transport.ProtocolError("END_OF_DEVICE before any SYNC")
                    ended.add(index)
                    self._phases.hold()  # the source's window is open: reports wait
                    if fanout.never_waits(model := (self.devices[index],)):
                        # A model loads now, as the source drains the others: less downtime.
                        await self._transition(model, State.STOP, mark=Downtime.LOAD)
                elif tag == Tag.SYNC:
                    if not prepared:
                        if self.gate is not None:
                            self.gate.prepare(offer)  # once: the source sends two barriers
                        prepared = True
                    await session.send_control(Tag.SYNC_ACK)
                elif tag == Tag.END_OF_STREAM:
                    if not prepared:
                        # No barrier, so no durable note that COMMIT may follow (the
                        # gate's prepare): a crash after it would look like nothing came.
                        raise transport.ProtocolError("END_OF_STREAM before any SYNC")
                    break
                else:
                    raise transport.ProtocolError(f"unexpected {tag.name} during the stream")
        self.marks[Downtime.WIRE] = time.monotonic()
        if len(ended) < len(self.devices):
            missing = [d.name for i, d in enumerate(self.devices) if i not in ended]
            raise transport.ProtocolError(f"stream ended before devices {missing} finished")
        self._phases.set(Phase.SWITCHOVER, in_window=True)
        if not self._models:  # models loaded as their END_OF_DEVICE came
            unloaded = [d for d in self.devices if d.state == State.RESUMING]
            await self._transition(unloaded, State.STOP, mark=Downtime.LOAD)
        self.marks[Downtime.LOAD] = time.monotonic()
        await self._send_verdict("loaded")
        try:
            async with asyncio.timeout(self.idle_timeout_s):  # no task in the window
                commit = await session.recv()
        except TimeoutError:
            raise TimeoutError(
                f"no COMMIT from the source {self.idle_timeout_s:g} s after 'loaded' "
                "(idle_timeout_s)"
            ) from None
        if commit.tag != Tag.COMMIT:
            raise transport.ProtocolError(f"expected COMMIT, got {commit.tag.name}")
        self.marks[Downtime.COMMIT] = time.monotonic()
        self._phases.set(Phase.COMMITTED, in_window=True)
        started = time.monotonic()
        if self._models:
            failed = await self._resume()  # no cancel can land between its arcs
        else:
            # The devices are ours to run now: a cancel (daemon shutdown) cutting the
            # resume short would leave some stopped or quiesced, the only copy of the
            # workload not running. It waits; run() re-raises it at the end.
            resuming = asyncio.ensure_future(self._resume())
            self._cancelled = await wait_out(resuming)
            failed = resuming.result()
        self.marks[Downtime.RESUME] = time.monotonic()
        self.results = {d.name: failed.get(d.name, "") for d in self.devices}
        self._phases.announce()
        for marks in self.device_marks.values():
            marks[Downtime.RESUME] = (self.marks[Downtime.RESUME] - started) * 1e3
        if self.gate is not None:
            # The note made at SYNC fenced a crash until now; the records are written
            # after the window closed, so they cost no downtime. The devices run here
            # whether or not they can be written: the source must still hear "resumed".
            self._record(self.gate.committed, offer)
            self._record(self.gate.finished, offer, self.results)
        if failed:
            self.log.critical("devices_not_resumed", failed=failed)
        self.log.info(
            "migration_resumed",
            devices=len(self.devices),
            received_bytes=self.received_bytes,
        )
        # The devices run the workload now: losing the source from here on is no reason
        # to stop them (it keeps its devices stopped when it cannot hear this verdict).
        try:
            await self._send_verdict("resumed")
            await session.close()
        except (transport.TransportError, OSError) as exc:
            self.log.warning("resumed_verdict_not_delivered", error=str(exc))

    async def _resume(self) -> dict[str, str]:
        """Every loaded device to RUNNING, P2P-capable ones through RUNNING_P2P first.

        Each P2P-capable device reaches RUNNING_P2P before any device reaches RUNNING, so
        no device issues P2P DMA to a peer that is still stopped. A device that fails
        stays stopped (STOP, or ERROR when its driver broke) with its state: never reset,
        since after COMMIT it holds the only running copy's state. Returns the devices
        that did not resume, with why.
        """
        failed: dict[str, str] = {}
        for device, error in await self._move_all(self._p2p_capable, State.RUNNING_P2P):
            failed[device.name] = f"{State.RUNNING_P2P.name}: {error}"
        ready = [d for d in self.devices if d.name not in failed] if failed else self.devices
        for device, error in await self._move_all(ready, State.RUNNING):
            failed[device.name] = f"{State.RUNNING.name}: {error}"
        if failed:
            # A device left RUNNING_P2P by a failed last step goes back to STOP: it must
            # not run half-resumed, and its state stays for the operator.
            stranded = [
                d for d in self.devices if d.name in failed and d.state == State.RUNNING_P2P
            ]
            for device, error in await self._move_all(stranded, State.STOP):
                failed[device.name] += f"; and STOP failed: {error}"
        return failed

    async def _transition(
        self, devices: Sequence[MigratableDevice], target: State, *, mark: str = ""
    ) -> None:
        """Devices to ``target`` in parallel; the first failure names its device."""
        results = await fanout.move(devices, target, models=self._models)
        for device, result in zip(devices, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            if mark:
                self.device_marks[device.name][mark] = (result[1] - result[0]) * 1e3

    async def _move_all(
        self, devices: Sequence[MigratableDevice], target: State
    ) -> list[tuple[MigratableDevice, str]]:
        """Move ``devices`` to ``target`` in parallel; the ones that failed, with why."""
        failed = []
        results = await fanout.move(devices, target, models=self._models)
        for device, result in zip(devices, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failed.append((device, str(result) or type(result).__name__))
        return failed

    async def _send_verdict(
        self, stage: str, *, reason: str = "", device: str | None = None
    ) -> None:
        # The per-device marks travel with "resumed", after the window: "loaded" is inside
        # it, where encoding and parsing a map per device would be downtime.
        device_marks = {} if stage == "loaded" else self.device_marks
        verdict = Verdict(stage, reason, device, self.marks, device_marks, self.results)
        await self.session.send_control(Tag.VERDICT, verdict.to_fields())

    async def _give_up(self, reason: str, device: Any) -> None:
        """Before COMMIT: tell the source, reset the devices we loaded (not one still in
        the RUNNING or STOP it was admitted in: a reset would drop the state it keeps),
        drop the session. After COMMIT nothing is reset: the devices hold the workload."""
        self.error = reason
        if self.committed:
            self.log.critical("failed_after_commit", reason=reason)
            self.session.abort()
            return
        self.log.warning("migration_rejected", reason=reason, device=device)
        device = device if isinstance(device, str) else None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._send_verdict("failed", reason=reason, device=device), 2.0)
        self.session.abort()
        if not self._loading:
            return
        spared = SPARED if Phase.PRECOPY not in self._phases.history else (State.RUNNING,)
        for target in self.devices:
            if target.state in spared:
                continue
            try:
                await target.reset()
            except DeviceError as exc:
                self.log.critical(
                    "destination_device_reset_failed", device=target.name, error=str(exc)
                )
        if self.gate is not None and self.offer is not None:
            self._record(self.gate.finished, self.offer, None)

    def _record(self, write: Callable[..., None], *args: Any) -> None:
        """Write the daemon's ownership records; a failure (the state file) is logged, not
        raised: it cannot change where the devices are. The note made at the first barrier
        ("outcome unknown") stays on disk, so a restart keeps the devices stopped."""
        try:
            write(*args)
        except OSError as exc:
            names = [d.name for d in self.devices]
            self.log.critical(
                "ownership_not_recorded", error=str(exc), devices=names, committed=self.committed
            )


@contextlib.asynccontextmanager
async def _idle_deadline(seconds: float) -> AsyncIterator[asyncio.Timeout]:
    """The stream's deadline; past it a TimeoutError naming it, for the source to report."""
    deadline = asyncio.timeout(None)
    try:
        async with deadline:
            yield deadline
    except TimeoutError:
        if not deadline.expired():
            raise
        raise TimeoutError(
            f"no frame, or no END_OF_STREAM after END_OF_DEVICE, for {seconds:g} s (idle_timeout_s)"
        ) from None

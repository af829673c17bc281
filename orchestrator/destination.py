"""The destination side of a migration: load every device, then resume them together.

Guarantee: no device runs the migrated state unless every device validated its state
and the source sent COMMIT. Any failure sends a "failed" verdict naming the device and
cause, resets the destination devices, and leaves the daemon listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

import transport
from devices.base import MigratableDevice
from devices.errors import DeviceError
from devices.fsm import Feature, State
from orchestrator.wire import Verdict, boot_id
from transport import Tag

log = structlog.get_logger(__name__)


class Refused(Exception):
    """The destination will not take these devices; the message says why."""


def match_devices(
    offered: Sequence[transport.DeviceDescriptor],
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
        elif p2p and len(offered) > 1 and not device.features & Feature.P2P:
            problems.append(f"{desc.name}: P2P requested but this device lacks it")
        elif device.state not in (State.RUNNING, State.STOP):
            # RUNNING: idle and waiting; STOP: migrated away earlier, its state is stale.
            problems.append(f"{desc.name}: busy ({device.state.name})")
        matched.append(device)
    if problems:
        raise Refused("; ".join(problems))
    return matched


class DestinationMigration:
    """One incoming migration on an authenticated session."""

    def __init__(
        self,
        session: transport.Session,
        devices: Mapping[str, MigratableDevice],
        *,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self.session = session
        self.local = devices
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.devices: list[MigratableDevice] = []
        self.marks: dict[str, float] = {}
        self.device_marks: dict[str, dict[str, float]] = {}
        self.received_bytes = 0
        #: Why the migration failed, once it did.
        self.error: str | None = None
        self.log = log.bind(peer=session.peer_name)

    async def run(self) -> bool:
        """Receive, load and resume; True when the devices run here. Never raises on failure."""
        try:
            await self._receive()
        except Refused as exc:
            self.error = f"refused: {exc}"
            return False
        except asyncio.CancelledError:
            await asyncio.shield(self._give_up("destination daemon shutting down", None))
            raise
        except Exception as exc:
            device = getattr(exc, "device", None)
            await self._give_up(str(exc) or type(exc).__name__, device)
            return False
        return True

    async def _receive(self) -> None:
        session = self.session
        hello = await asyncio.wait_for(session.recv(), self.handshake_timeout_s)
        if hello.tag != Tag.DEVICES:
            raise transport.ProtocolError(f"expected DEVICES, got {hello.tag.name}")
        fields = hello.fields()
        offered = transport.decode_devices(fields, self.session.limits)
        p2p = bool(transport.require(fields, "p2p", bool))
        want_ack = bool(transport.require(fields, "switchover_ack", bool))
        precopy_devices = int(transport.require(fields, "precopy_devices", int))
        try:
            self.devices = match_devices(offered, self.local, p2p=p2p)
        except Refused as exc:
            self.log.warning("devices_refused", reason=str(exc))
            await self._send_verdict("failed", reason=f"refused: {exc}")
            await session.close()
            raise
        self.device_marks = {d.name: {} for d in self.devices}
        self.log.info("migration_incoming", devices=[d.name for d in self.devices])
        await self._transition(State.RESUMING)
        await session.send_control(Tag.DEVICES_ACCEPTED, {"boot_id": boot_id()})

        channels = [d.resume_channel() for d in self.devices]
        initial_loaded: set[int] = set()
        ended: set[int] = set()
        while True:
            frame = await asyncio.wait_for(session.recv(), self.idle_timeout_s)
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
                ended.add(index)
            elif tag == Tag.SYNC:
                await session.send_control(Tag.SYNC_ACK)
            elif tag == Tag.END_OF_STREAM:
                break
            else:
                raise transport.ProtocolError(f"unexpected {tag.name} during the stream")
        self.marks["wire"] = time.monotonic()
        missing = [d.name for i, d in enumerate(self.devices) if i not in ended]
        if missing:
            raise transport.ProtocolError(f"stream ended before devices {missing} finished")

        await self._transition(State.STOP, mark="load")
        self.marks["load"] = time.monotonic()
        await self._send_verdict("loaded")
        commit = await asyncio.wait_for(session.recv(), self.idle_timeout_s)
        if commit.tag != Tag.COMMIT:
            raise transport.ProtocolError(f"expected COMMIT, got {commit.tag.name}")
        self.marks["commit"] = time.monotonic()
        started = time.monotonic()
        if p2p:  # devices without P2P states have nothing to quiesce (the source's rule)
            await self._transition(State.RUNNING_P2P, p2p_only=True)
        await self._transition(State.RUNNING)
        self.marks["resume"] = time.monotonic()
        for marks in self.device_marks.values():
            marks["resume"] = (self.marks["resume"] - started) * 1e3
        self.log.info("migration_resumed", received_bytes=self.received_bytes)
        # The devices run the workload now: losing the source from here on is no reason
        # to stop them (it keeps its devices stopped when it cannot hear this verdict).
        try:
            await self._send_verdict("resumed")
            await session.close()
        except (transport.TransportError, OSError) as exc:
            self.log.warning("resumed_verdict_not_delivered", error=str(exc))

    async def _transition(self, target: State, *, mark: str = "", p2p_only: bool = False) -> None:
        """All devices (or those with P2P) to ``target`` in parallel; failures name the device."""

        async def move(device: MigratableDevice) -> None:
            started = time.monotonic()
            await device.set_state(target)
            if mark:
                self.device_marks[device.name][mark] = (time.monotonic() - started) * 1e3

        chosen = [d for d in self.devices if not p2p_only or d.features & Feature.P2P]
        results = await asyncio.gather(*(move(d) for d in chosen), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _send_verdict(
        self, stage: str, *, reason: str = "", device: str | None = None
    ) -> None:
        verdict = Verdict(stage, reason, device, self.marks, self.device_marks)
        await self.session.send_control(Tag.VERDICT, verdict.to_fields())

    async def _give_up(self, reason: str, device: Any) -> None:
        """Tell the source (if it still listens), reset our devices, drop the session."""
        self.error = reason
        self.log.warning("migration_rejected", reason=reason, device=device)
        if not isinstance(device, str):
            device = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._send_verdict("failed", reason=reason, device=device), 2.0)
        self.session.abort()
        for target in self.devices:
            if target.state == State.RUNNING:
                continue
            try:
                await target.reset()
            except DeviceError as exc:
                self.log.critical(
                    "destination_device_reset_failed", device=target.name, error=str(exc)
                )

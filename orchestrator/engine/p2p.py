"""Bringing devices back to RUNNING in P2P order, for a rollback and for the operator.

The seed's rule for stopping (every P2P-capable device is quiesced before any stops)
has a mirror image for starting: every P2P-capable device that is quiesced or stopped
reaches RUNNING_P2P before any device reaches RUNNING, so no running device issues
peer-to-peer DMA into a peer that is still stopped. A device in PRE_COPY was never
quiesced, so it may go straight to RUNNING.

A failed step is not a reason to reset: the FSM leaves the device where its driver
says it is, and when that is a valid state the walk is retried from there once. Only a
device in ERROR, or one whose retry failed too, is reset, and only after every other
device took its step, since a reset drops the device's state and lands in RUNNING.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from devices.base import MigratableDevice
from devices.errors import DeviceError
from devices.fsm import Feature, State
from orchestrator.engine import fanout

#: States in which a device's P2P DMA was never quiesced.
UNQUIESCED = frozenset({State.RUNNING, State.PRE_COPY})


async def resume_in_order(
    devices: Sequence[MigratableDevice], log: structlog.typing.FilteringBoundLogger
) -> dict[str, str]:
    """Every device to RUNNING in P2P order; returns the devices that had to be reset.

    The answer maps a device name to what happened to it ("reset: ..." when its state
    was lost, "not restored: ..." when even the reset failed); a device absent from it
    is RUNNING with its state.
    """
    stopped_capable = [d for d in devices if d.features & Feature.P2P and d.state not in UNQUIESCED]
    broken: dict[str, str] = {}
    #: Devices whose step raised what is not a device's failure (a bug): they stay where
    #: they are, with their state, and the first such error is raised once the others
    #: are back.
    crashed: dict[str, BaseException] = {}
    for device, error in await _reach_all(stopped_capable, State.RUNNING_P2P, log, crashed):
        broken[device.name] = error
    rest = [
        d
        for d in devices
        if d.name not in broken and d.name not in crashed and d.state != State.RUNNING
    ]
    for device, error in await _reach_all(rest, State.RUNNING, log, crashed):
        broken[device.name] = error
    notes: dict[str, str] = {}
    for device in devices:
        if device.name not in broken:
            continue
        log.error(
            "device_reset", device=device.name, state=device.state.name, error=broken[device.name]
        )
        try:
            await device.reset()
        except DeviceError as exc:
            log.critical("device_not_restored", device=device.name, error=str(exc))
            notes[device.name] = f"not restored: {exc}"
        else:
            notes[device.name] = f"reset (state lost): {broken[device.name]}"
    if crashed:
        raise next(iter(crashed.values()))
    return notes


async def _reach_all(
    devices: Sequence[MigratableDevice],
    target: State,
    log: structlog.typing.FilteringBoundLogger,
    crashed: dict[str, BaseException],
) -> list[tuple[MigratableDevice, str]]:
    """Move ``devices`` to ``target`` in parallel; those that could not, with why (and
    into ``crashed`` those whose step raised: _reach answers a device's failure, so
    anything else is a bug, which a reset would not mend)."""
    failed = []
    for device, error in zip(
        devices, await fanout.each(devices, lambda d: _reach(d, target, log)), strict=True
    ):
        if isinstance(error, BaseException):
            crashed[device.name] = error
        elif error is not None:
            failed.append((device, error))
    return failed


async def _reach(
    device: MigratableDevice, target: State, log: structlog.typing.FilteringBoundLogger
) -> str | None:
    """Move one device to ``target``, retrying once from the state it reports; None if done."""
    error = ""
    for attempt in (1, 2):
        if device.state == State.ERROR:
            break
        try:
            await device.set_state(target)
        except DeviceError as exc:
            error = str(exc)
            log.error(
                "restore_arc_failed",
                device=device.name,
                target=target.name,
                attempt=attempt,
                now=device.state.name,
                error=error,
            )
        else:
            if attempt > 1:
                log.warning("restore_arc_retried", device=device.name, target=target.name)
            return None
    return error or f"device is {device.state.name}"

"""Errors raised by devices and the FSM engine.

Every error a device raises is a :class:`DeviceError` and names the device::

    DeviceError
     +-- TransitionError        a requested state change failed; carries the resulting state
     |    +-- TransitionNotAllowed   the FSM forbids the change (blocked, unsupported, ERROR)
     +-- ArcFailed              one arc of a device failed (raised by arc hooks)
     +-- InvalidStateError      an operation used in a state where it is not valid (misuse)
     +-- ChannelClosedError     the data channel was used while it does not exist
     +-- ChannelIOError         reading or writing the data channel failed
     +-- StateValidationError   RESUMING -> STOP found the loaded state short, corrupt or foreign
     +-- Unsupported            an optional query (precopy info, stop-copy size) is not offered
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devices.fsm import State


class DeviceError(Exception):
    """Base of every device-side error; ``device`` names the device concerned."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device


class TransitionError(DeviceError):
    """A state change failed.

    ``state`` is where the device ended: the starting state after a clean unwind, or
    ERROR when the unwind was impossible or failed. The arc failure that started it all
    is ``__cause__``.
    """

    def __init__(
        self,
        device: str,
        message: str,
        *,
        start: State,
        target: State,
        state: State,
        failed_arc: tuple[State, State] | None = None,
    ) -> None:
        super().__init__(device, message)
        self.start = start
        self.target = target
        self.state = state
        self.failed_arc = failed_arc


class TransitionNotAllowed(TransitionError):
    """The FSM does not allow this change for the device's feature set."""


class ArcFailed(DeviceError):
    """One FSM arc failed inside a device (a hardware error or an injected fault)."""


class InvalidStateError(DeviceError):
    """An operation was used in a device state where it is not valid (like -EINVAL)."""


class ChannelClosedError(DeviceError):
    """The data channel was used outside the saving group and RESUMING."""


class ChannelIOError(DeviceError):
    """Reading from or writing to the data channel failed."""


class StateValidationError(DeviceError):
    """The state loaded in RESUMING is short, corrupt or from a foreign device."""


class Unsupported(DeviceError):
    """The device does not offer an optional query of the uAPI (like ENOTTY).

    Precopy info and the stop-copy size are optional: the orchestrator falls back to
    what the device's stream shows instead of failing the migration.
    """

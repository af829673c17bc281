"""The device contract: what the orchestrator may ask of a migratable device.

The orchestrator talks to every backend (simulated, guest RAM, real VFIO) through
:class:`MigratableDevice` alone. A backend whose driver implements single arcs derives
from :class:`ArcDevice` and lets :mod:`devices.fsm` walk combination transitions; a
backend whose driver walks them itself (the kernel, for VFIO) implements ``set_state``
and ``reset`` directly. Either way the orchestrator sees the same thing.

Data channel semantics (the data_fd of the uAPI):

* It exists while the device is in the saving group (PRE_COPY, PRE_COPY_P2P,
  STOP_COPY) or in RESUMING. The arc entering the group opens it, moves inside the
  group keep it, the arc leaving closes it. A channel object used after it was closed
  raises :class:`ChannelClosedError` naming the device and its state.
* ``SaveChannel.read()`` returns the next chunk as a tuple of buffers (gathered on the
  wire without joining them). The bytes of a returned chunk never change afterwards,
  so the caller may hold them without copying (a backend may hand out views of its
  state while it is stopped, so the caller finishes with STOP_COPY chunks before it
  lets the device run again). It returns ``None`` at the temporary end
  of stream in PRE_COPY states (ENOMSG: nothing now, more may come); the caller then
  awaits ``wait_readable()`` (poll) instead of spinning. In STOP_COPY it returns ``()``
  at the permanent end of stream, forever.
* ``ResumeChannel.write()`` takes chunks in stream order; the buffer is not kept after
  the call returns, so the caller may reuse it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import structlog

from devices import fsm
from devices.errors import ArcFailed, ChannelClosedError, InvalidStateError
from devices.fsm import CHANNEL_STATES, ERROR, SAVING_GROUP, Feature, State

log = structlog.get_logger(__name__)

Buffer = bytes | bytearray | memoryview
#: One chunk of the device's migration stream: buffers sent back to back.
Chunk = tuple[Buffer, ...]
StateListener = Callable[["MigratableDevice", State, State], None]


class PrecopyInfo(NamedTuple):
    """What VFIO_MIG_GET_PRECOPY_INFO reports: bytes still to read in pre-copy."""

    initial_bytes: int
    dirty_bytes: int


@dataclass(frozen=True, slots=True)
class DeviceDescriptor:
    """What the destination needs to know to accept a device's stream."""

    name: str
    kind: str
    format_version: int
    features: Feature
    #: Bytes of device state, when the model fixes it (a destination of another size
    #: could not load the stream); None when the device cannot say (VFIO, vfio-user).
    state_size: int | None = None


class Channel:
    """A data session of one device; dead once the arc leaving its states ran."""

    def __init__(self, device: MigratableDevice) -> None:
        self.device = device
        self.closed = False

    def check_open(self) -> None:
        """Raise ChannelClosedError if this session has ended."""
        if self.closed:
            raise ChannelClosedError(
                self.device.name,
                f"data channel used after it was closed (device is {self.device.state.name})",
            )

    def close(self) -> None:
        """End the session; idempotent. Called by the arc that leaves the channel states."""
        self.closed = True


class SaveChannel(Channel):
    """The saving side of a data session (PRE_COPY, PRE_COPY_P2P, STOP_COPY)."""

    @abc.abstractmethod
    async def read(self) -> Chunk | None:
        """Next chunk; None at the temporary end (PRE_COPY states); () at the permanent end."""

    @abc.abstractmethod
    async def wait_readable(self) -> None:
        """Return once a read may yield data or the permanent end (poll for POLLIN)."""


class DriverSaveChannel(SaveChannel):
    """A saving session read piece by piece from a driver (VFIO's data fd, a vfio-user
    server): what each read's bytes mean for the stream, the same for both drivers."""

    #: Which byte of the stream's first piece the corrupt_stream fault flips (each
    #: driver says which its destination can catch).
    spoil_at: ClassVar[int]

    def __init__(self, device: MigratableDevice) -> None:
        super().__init__(device)
        #: Whether the permanent end of stream was read (STOP_COPY).
        self.ended = False
        #: Bytes of the stream returned so far.
        self.offset = 0
        #: Fault injection (corrupt_stream): spoil the stream's first piece.
        self.corrupt = False
        self._idle = False

    def took(self, data: Buffer, state: State) -> Chunk | None:
        """What a read that got ``data`` while the device was in ``state`` returns: the
        chunk; at no data, the permanent end ``()`` in STOP_COPY, else None (nothing now)."""
        if data:
            self._idle = False
            if self.offset == 0 and self.corrupt:
                spoiled = bytearray(data)
                spoiled[self.spoil_at] ^= 0xFF
                data = spoiled
                log.warning("fault_corrupt_stream", device=self.device.name)
            self.offset += len(data)
            return (data,)
        if state == State.STOP_COPY:
            self.ended = True
            return ()
        self._idle = True
        return None

    def waits_idle(self) -> bool:
        """Whether the last read found nothing for now, so a wait should not spin."""
        return self._idle and self.device.state != State.STOP_COPY


class ResumeChannel(Channel):
    """The resuming side of a data session (RESUMING)."""

    @abc.abstractmethod
    async def write(self, data: Buffer) -> None:
        """Load the next piece of the stream, in order; ``data`` is not kept."""


class MigratableDevice(abc.ABC):
    """A device whose internal state can be saved on one host and loaded on another.

    ``state`` is the device's FSM state. State changes go through ``set_state``, which
    raises :class:`devices.errors.TransitionError` with the resulting state attached when
    it fails, and ``reset``, which brings any state back to RUNNING.
    """

    #: Kind of device, compared by the destination before accepting a stream.
    kind: ClassVar[str]
    #: Version of the device's stream format; the destination must speak the same one.
    format_version: ClassVar[int]
    #: The state a backend that keeps its devices across daemons (a vfio-user server, the
    #: kernel) had this one in when it was opened, before any session left behind was
    #: ended; None for a device that starts afresh with each daemon.
    found_at_open: State | None = None

    def __init__(self, name: str, features: Feature) -> None:
        if features not in fsm.LEGAL_FEATURE_SETS:
            raise ValueError(f"{name}: undefined migration feature set {features!r}")
        self.name = name
        self.features = features
        self._state = State.RUNNING
        self._listeners: list[StateListener] = []
        #: The data session of the saving group or of RESUMING; None outside them.
        self._channel: Channel | None = None

    @property
    def state(self) -> State:
        """The current FSM state."""
        return self._state

    @state.setter
    def state(self, new: State) -> None:
        old, self._state = self._state, new
        if old != new:
            if new == ERROR:
                # The uAPI's ERROR has no data session, whether an arc broke the device
                # or an unwind failed: the listeners already see none.
                self._drop_channel()
            for listener in self._listeners:
                listener(self, old, new)

    def add_state_listener(self, listener: StateListener) -> None:
        """Call ``listener(device, old, new)`` after every state change (for traces)."""
        self._listeners.append(listener)

    def descriptor(self) -> DeviceDescriptor:
        """The identity the handshake announces for this device."""
        return DeviceDescriptor(self.name, self.kind, self.format_version, self.features)

    async def open(self) -> None:  # noqa: B027 - optional hook, most devices need nothing
        """Acquire the device (file descriptors, workload); called once before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``open`` acquired."""

    @abc.abstractmethod
    async def set_state(self, target: State) -> None:
        """Move to ``target`` through the FSM; on failure raise TransitionError."""

    @abc.abstractmethod
    async def reset(self) -> None:
        """Take any state, ERROR included, back to RUNNING (losing any data session)."""

    def save_channel(self) -> SaveChannel:
        """The current saving session; InvalidStateError outside the saving group."""
        self.require(*SAVING_GROUP, what="the saving data channel")
        assert isinstance(self._channel, SaveChannel)
        return self._channel

    def resume_channel(self) -> ResumeChannel:
        """The current resuming session; InvalidStateError outside RESUMING."""
        self.require(State.RESUMING, what="the resuming data channel")
        assert isinstance(self._channel, ResumeChannel)
        return self._channel

    def _drop_channel(self) -> None:
        """End the data session, if there is one."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @abc.abstractmethod
    def precopy_info(self) -> PrecopyInfo:
        """initial/dirty bytes; only in PRE_COPY and PRE_COPY_P2P (InvalidStateError else).

        Optional in the uAPI: a device without it raises :class:`devices.errors.Unsupported`
        and the source falls back to what the stream shows (``orchestrator.engine.convergence``).
        """

    @abc.abstractmethod
    def stop_copy_size(self) -> int:
        """Estimate of the bytes STOP_COPY would still have to move.

        Raises :class:`devices.errors.Unsupported` when the device cannot say; the source
        then estimates from the bytes it has seen.
        """

    @abc.abstractmethod
    async def digest(self) -> bytes:
        """A strong hash of the whole device state (for proving byte equality)."""

    def can_throttle(self) -> bool:
        """Whether ``set_throttle`` slows the device's workload (auto-converge)."""
        return False

    def set_throttle(self, fraction: float) -> None:
        """Slow the workload to ``1 - fraction`` of its speed; only if ``can_throttle``."""
        raise InvalidStateError(self.name, "device does not support throttling")

    def require(self, *states: State, what: str) -> None:
        """Raise InvalidStateError unless the device is in one of ``states``."""
        if self._state not in states:
            allowed = ", ".join(s.name for s in states)
            raise InvalidStateError(
                self.name, f"{what} is valid only in {allowed}, device is {self._state.name}"
            )


Arc = tuple[State, State]
ArcHandler = Callable[[], None]


class ArcDevice(MigratableDevice):
    """A device that implements single arcs; :mod:`devices.fsm` walks the rest.

    Subclasses provide ``arc_actions()`` (a dict keyed by arc, one handler each) and the
    channel factories; this base opens and closes data sessions on the arcs that enter
    and leave the channel states, so no subclass can get a session's lifetime wrong.
    """

    def __init__(self, name: str, features: Feature) -> None:
        super().__init__(name, features)
        actions = self.arc_actions()
        missing = fsm.ARCS[features] - actions.keys()
        if missing:
            arcs = ", ".join(f"{a.name}->{b.name}" for a, b in sorted(missing))
            raise TypeError(f"{type(self).__name__} lacks handlers for arcs {arcs}")
        #: Per arc: its action, whether it ends the data session, what opens the next
        #: one. Decided once: the switchover runs every device's arcs in its window.
        #: Its keys are the arcs the feature set allows: those a state change takes alone.
        self._arcs: dict[Arc, tuple[ArcHandler, bool, Callable[[], Channel] | None]] = {}
        for arc_from, arc_to in fsm.ARCS[features]:
            action = actions[arc_from, arc_to]
            entering_saving = arc_to in SAVING_GROUP and arc_from not in SAVING_GROUP
            opens = (
                self.new_save_channel
                if entering_saving
                else self.new_resume_channel
                if arc_to == State.RESUMING
                else None
            )
            ends = arc_to not in CHANNEL_STATES or opens is not None
            self._arcs[arc_from, arc_to] = (action, ends, opens)

    @abc.abstractmethod
    def arc_actions(self) -> dict[Arc, ArcHandler]:
        """The device's action for every arc it implements."""

    @abc.abstractmethod
    def new_save_channel(self) -> SaveChannel:
        """Open a saving session (called on the arc entering the saving group)."""

    @abc.abstractmethod
    def new_resume_channel(self) -> ResumeChannel:
        """Open a resuming session (called on the arc entering RESUMING)."""

    def fail_arc(self, arc_from: State, arc_to: State) -> None:
        """Hook for fault injection: raise ArcFailed to make an arc fail."""

    def step(self, arc_from: State, arc_to: State) -> None:
        """Run one arc: the device's action plus the data-session bookkeeping."""
        plan = self._arcs.get((arc_from, arc_to))
        if plan is None:
            raise ArcFailed(self.name, f"no handler for arc {arc_from.name} -> {arc_to.name}")
        action, ends, opens = plan
        self.fail_arc(arc_from, arc_to)
        action()
        if ends and self._channel is not None:
            self._channel.close()
            self._channel = None
        if opens is not None:
            self._channel = opens()

    async def set_state(self, target: State) -> None:
        self.set_state_now(target)

    def set_state_now(self, target: State) -> None:
        """``set_state`` as a plain call: a model's walk never waits, so a switchover moves
        many models in one loop without a coroutine per device and arc."""
        start = self._state
        if (start, target) not in self._arcs:
            fsm.walk(self, target)
            return
        # One arc, as each of a switchover's steps is: the walk's work without its table,
        # loop and list (a fifth of a model's arc in the window).
        try:
            self.step(start, target)
        except Exception as exc:
            raise fsm.arc_failed(self, start, target, (start, target), exc) from exc
        self.state = target

    async def hard_reset(self) -> None:
        """Drop any data session; subclasses extend this to reset their own machinery."""
        self._drop_channel()

    async def reset(self) -> None:
        await fsm.reset(self)

"""A device served by a vfio-user server (libvfio-user and the like) over a UNIX socket.

The server runs the device in its own process; this client drives its migration with
the same v2 state machine as the kernel's VFIO uAPI, carried in messages.

How the FSM core and the server's own walking fit together: the server walks
combination transitions itself (SET MIG_DEVICE_STATE to a far state runs every arc on
the way, as the kernel does), over its own arcs, STOP_COPY|PRE_COPY for libvfio-user.
:mod:`devices.fsm` therefore validates instead of walking: a target is checked
against the table for the *configured* feature set before the server is asked (a
``features`` mask of STOP_COPY alone makes PRE_COPY unreachable although the server
has it), and the arcs the server walked are replayed to the state listeners from the
same table (libvfio-user's ``next_state`` table equals the kernel's for its
features). libvfio-user does not unwind: an arc that fails leaves the device where
the walk stopped. So after a failed SET the state is read back (GET); if that state
still holds the data session of the start, the start is requested again, as QEMU
does; otherwise the device stays where it is (a valid state without the session).
The device is in ERROR when the server says so (the spec lets a server that could
not restore any valid state report it) or cannot be asked (the connection is lost).

What vfio-user lacks compared with the kernel uAPI, and what stands in:

* No precopy info and no MIG_DATA_SIZE: :meth:`precopy_info` and
  :meth:`stop_copy_size` raise :class:`devices.errors.Unsupported`; the orchestrator
  falls back to what the stream shows.
* No data fd: the saving stream is MIG_DATA_READ, the resuming one MIG_DATA_WRITE.
  The rule for "nothing now" versus "ended": a read of 0 bytes in STOP_COPY is the
  permanent end; in PRE_COPY(_P2P) it means nothing now (the server had nothing
  dirty when asked), never the end. The spec also calls a reply shorter than asked
  "no more data"; livemig reads again anyway and stops only at 0 bytes, which is
  the same for a server that follows the spec and safe for one that returns what its
  device had at hand (libvfio-user passes the device's ``read_data`` through).
  Nothing can signal readiness, so after a "nothing now" read
  :meth:`SaveChannel.wait_readable` waits ``idle_wait`` before the next poll, and
  returns early when the session ends or the device enters STOP_COPY.
* No P2P states (libvfio-user advertises STOP_COPY|PRE_COPY), so several devices
  with one of these cannot be quiesced together: the orchestrator's P2P blocker.
* DEVICE_RESET is refused in STOP and STOP_COPY and leaves the migration state as it
  is, so :meth:`reset` pairs it with SET RUNNING.
* The handshake's kind is ``vfio-user:VENDOR:DEVICE`` from PCI config space (as
  ``vfio:`` names the model for the kernel backend): only the same model loads the
  stream. A server without config space is ``vfio-user:unknown``.
* The server takes one client: while this device is open no VMM can attach to it.
  A server keeps its migration state when the client leaves (libvfio-user only calls
  the device's reset callback with LOST_CONN); :meth:`open` ends a session found in
  progress (PRE_COPY back to RUNNING, STOP_COPY and RESUMING to STOP: a stopped
  device stays stopped, it may have been committed elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
from dataclasses import dataclass
from typing import ClassVar

import structlog

from devices import fsm
from devices.base import (
    Buffer,
    Chunk,
    DeviceDescriptor,
    DriverSaveChannel,
    MigratableDevice,
    PrecopyInfo,
    ResumeChannel,
)
from devices.errors import (
    ChannelIOError,
    DeviceError,
    TransitionError,
    TransitionNotAllowed,
    Unsupported,
)
from devices.fsm import CHANNEL_STATES, SAVING_GROUP, Feature, State
from devices.vfio_user import protocol as p

log = structlog.get_logger(__name__)

#: libvfio-user's region index of PCI config space (VFU_PCI_DEV_CFG_REGION_IDX).
PCI_CONFIG_REGION = 7
#: What every libvfio-user server advertises.
DEFAULT_FEATURES = Feature.STOP_COPY | Feature.PRE_COPY


@dataclass(frozen=True)
class VfioUserFaults:
    """Faults to inject, for tests only; a default one injects none."""

    #: Flip the last byte of each saving session's first chunk: device data rather
    #: than a header, which only a destination that checks the state it loads notices
    #: (the transport's checksums cannot: the corruption happens before them).
    corrupt_stream: bool = False


class VfioUserSaveChannel(DriverSaveChannel):
    """The saving stream: MIG_DATA_READ until 0 bytes (see the module's rule)."""

    #: How long a reader at the temporary end waits before polling again, in seconds.
    idle_wait = 0.01
    #: The corrupt_stream fault flips the first piece's last byte (see VfioUserFaults).
    spoil_at = -1

    def __init__(self, device: VfioUserDevice) -> None:
        super().__init__(device)
        self.vu = device
        self._torn = False
        self._changed = asyncio.Event()
        self.corrupt = device.faults.corrupt_stream

    async def read(self) -> Chunk | None:
        self.check_open()
        if self._torn:
            raise ChannelIOError(self.device.name, "a read was cancelled midway: data was lost")
        if self.ended:
            return ()
        state = self.device.state
        try:
            data = await self.vu.mig_data_read()
        except asyncio.CancelledError:
            self._torn = True
            raise
        self.check_open()
        return self.took(data, state)

    async def wait_readable(self) -> None:
        self.check_open()
        if self.waits_idle():
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.idle_wait)
        self.check_open()

    def wake(self) -> None:
        """The device changed state: a waiting reader polls again now."""
        self._changed.set()

    def close(self) -> None:
        super().close()
        self._changed.set()


class VfioUserResumeChannel(ResumeChannel):
    """The resuming stream: MIG_DATA_WRITE in pieces the server receives whole."""

    def __init__(self, device: VfioUserDevice) -> None:
        super().__init__(device)
        self.vu = device
        self.written = 0
        self._torn = False

    async def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        step = self.vu.write_limit
        for start in range(0, len(view), step):
            self.check_open()
            if self._torn:
                raise ChannelIOError(self.device.name, "a write was cancelled midway")
            piece = view[start : start + step]
            try:
                await self.vu.mig_data_write(piece, self.written)
            except asyncio.CancelledError:
                self._torn = True
                raise
            self.written += len(piece)


class VfioUserDevice(MigratableDevice):
    """A vfio-user device at a UNIX socket path; connects on first use or ``open``."""

    kind: ClassVar[str] = "vfio-user"
    #: The stream is the server's own; livemig only frames it.
    format_version: ClassVar[int] = 1

    def __init__(
        self,
        name: str,
        *,
        socket: str,
        features: Feature | None = None,
        faults: VfioUserFaults | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__(name, DEFAULT_FEATURES if features is None else features)
        self.socket = socket
        self.faults = faults or VfioUserFaults()
        self.timeout_s = timeout_s
        #: What the server walks over (GET MIGRATION), known once connected.
        self.server_features = DEFAULT_FEATURES
        self._conn: p.Connection | None = None
        self._connecting = asyncio.Lock()
        self._model = "unknown"

    # --- the connection ---

    @property
    def write_limit(self) -> int:
        """Largest payload we send: the message fits one socket buffer and the server's limit."""
        limit = self._conn.max_data_xfer if self._conn else p.DEFAULT_MAX_DATA_XFER
        return min(p.SEND_LIMIT - p.SEND_OVERHEAD, limit)

    async def open(self) -> None:
        await self._connected()

    async def _connected(self) -> p.Connection:
        if self._conn is not None and self._conn.broken is None:
            return self._conn
        async with self._connecting:
            if self._conn is None or self._conn.broken is not None:
                await self._connect()
        assert self._conn is not None
        return self._conn

    async def _connect(self) -> None:
        try:
            self._conn = await p.Connection.open(self.socket, request_timeout=self.timeout_s)
        except p.ProtocolFailure as exc:
            raise DeviceError(self.name, f"vfio-user server at {self.socket}: {exc}") from exc
        try:
            await self._adopt_server()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    async def _adopt_server(self) -> None:
        """Check the server's features; end a session a previous client left behind."""
        flags = _decode_flags(await self._feature_get(p.FEATURE_MIGRATION, "MIGRATION"))
        if flags not in fsm.LEGAL_FEATURE_SETS:
            raise DeviceError(self.name, f"server's migration flags {flags!r} are not legal")
        if self.features & ~flags:
            raise DeviceError(
                self.name, f"features {self.features!r} exceed the server's {flags!r}"
            )
        self.server_features = flags
        found = self.found_at_open = await self._get_state()
        if found in CHANNEL_STATES:
            # A session whose client left: end it without letting a stopped device run.
            goal = State.RUNNING if found == State.PRE_COPY else State.STOP
            if found == State.RESUMING:
                await self._command(p.DEVICE_RESET, "DEVICE_RESET")
            await self._set_mig_state(goal)
            log.warning("vfio_user_session_abandoned", device=self.name, found=found.name)
        self._state = await self._get_state()
        self._model = await self._pci_model()
        log.info(
            "vfio_user_device_opened",
            device=self.name,
            socket=self.socket,
            features=repr(self.features),
            max_data_xfer=self._conn.max_data_xfer if self._conn else None,
            state=self._state.name,
            model=self._model,
        )

    async def _pci_model(self) -> str:
        """``vendor:device`` from PCI config space, or "unknown" for a server without one."""
        try:
            config = await self.region_read(PCI_CONFIG_REGION, 0, 4)
        except DeviceError:
            if self._conn is None or self._conn.broken is not None:
                raise
            return "unknown"
        vendor, device = struct.unpack("<HH", config)
        return f"{vendor:04x}:{device:04x}"

    def descriptor(self) -> DeviceDescriptor:
        """The handshake identity: the kind names the PCI model, as only it loads the stream."""
        return DeviceDescriptor(
            self.name, f"{self.kind}:{self._model}", self.format_version, self.features
        )

    async def _command(self, command: int, what: str, *body: Buffer) -> memoryview:
        """One exchange; DeviceError naming the command, device and state on failure."""
        conn = await self._connected()
        try:
            return await conn.request(command, *body)
        except p.ProtocolFailure as exc:
            error = DeviceError(self.name, f"{what} failed in state {self._state.name}: {exc}")
            if conn.broken is not None:
                self._lost()
            raise error from exc

    def _lost(self) -> None:
        """The server is out of reach: no session survives, the state is unknown."""
        self._drop_channel()
        self.state = State.ERROR

    async def _feature_get(self, feature: int, what: str) -> memoryview:
        argsz = p.FEATURE.size + 8
        reply = await self._command(
            p.DEVICE_FEATURE,
            f"DEVICE_FEATURE(GET|{what})",
            p.FEATURE.pack(argsz, p.FEATURE_GET | feature),
            bytes(8),
        )
        if len(reply) < argsz:
            raise DeviceError(self.name, f"DEVICE_FEATURE(GET|{what}) reply is {len(reply)} bytes")
        return reply[p.FEATURE.size : argsz]

    async def _get_state(self) -> State:
        payload = await self._feature_get(p.FEATURE_MIG_DEVICE_STATE, "MIG_DEVICE_STATE")
        value = p.MIG_STATE.unpack_from(payload)[0]
        try:
            return State(value)
        except ValueError:
            raise DeviceError(self.name, f"server reports unknown state {value}") from None

    async def _set_mig_state(self, target: State) -> None:
        await self._command(
            p.DEVICE_FEATURE,
            f"DEVICE_FEATURE(SET|MIG_DEVICE_STATE={target.name})",
            p.FEATURE.pack(
                p.FEATURE.size + p.MIG_STATE.size, p.FEATURE_SET | p.FEATURE_MIG_DEVICE_STATE
            ),
            p.MIG_STATE.pack(target, 0),
        )

    # --- state changes ---

    async def set_state(self, target: State) -> None:
        if self.state != State.ERROR:  # ERROR (server lost) is left by reset() alone
            await self._connected()
        start = self.state
        if start == target:
            return
        if start == State.ERROR or fsm.next_state(start, target, self.features) == State.ERROR:
            raise TransitionNotAllowed(
                self.name,
                f"transition {start.name} -> {target.name} is not allowed "
                f"for features {self.features!r}",
                start=start,
                target=target,
                state=start,
            )
        try:
            await self._set_mig_state(target)
        except DeviceError as cause:
            raise await self._recover(start, target, cause) from cause
        keeps = start in SAVING_GROUP and target in SAVING_GROUP
        if not keeps:
            self._drop_channel()
        if target in CHANNEL_STATES and not keeps:
            self._channel = (
                VfioUserResumeChannel(self)
                if target == State.RESUMING
                else VfioUserSaveChannel(self)
            )
        for step in fsm.path(start, target, self.server_features)[1:]:
            self.state = step
        if isinstance(self._channel, VfioUserSaveChannel):
            self._channel.wake()
        log.debug("vfio_user_state_set", device=self.name, start=start.name, target=target.name)

    async def _recover(self, start: State, target: State, cause: DeviceError) -> TransitionError:
        """After a failed SET: back to ``start`` if its session survives; the error to raise."""
        recovery = "none needed"
        try:
            walked = await self._get_state()
        except DeviceError:
            walked = State.ERROR
        final = walked
        if walked not in (start, State.ERROR):
            if fsm.session_lost(start, walked):
                recovery = f"stayed in {walked.name} (data session gone)"
            else:
                recovery = f"requested {start.name}"
                with contextlib.suppress(DeviceError):
                    await self._set_mig_state(start)
            try:
                final = await self._get_state()
            except DeviceError:
                final = State.ERROR
        if final == State.ERROR or fsm.session_lost(start, final):
            self._drop_channel()
        self.state = final
        log.warning(
            "vfio_user_set_state_failed",
            device=self.name,
            start=start.name,
            target=target.name,
            walked_to=walked.name,
            recovery=recovery,
            state=final.name,
            error=str(cause),
        )
        return TransitionError(
            self.name,
            f"{start.name} -> {target.name} failed: {_reason(cause)}; "
            f"server walked to {walked.name}, recovery: {recovery}; device is now {final.name}",
            start=start,
            target=target,
            state=final,
        )

    async def reset(self) -> None:
        """DEVICE_RESET plus SET RUNNING (the server refuses the reset when stopped)."""
        self._drop_channel()
        await self._connected()
        found = await self._get_state()
        reset_done = found not in (State.STOP, State.STOP_COPY)
        if reset_done:
            await self._command(p.DEVICE_RESET, "DEVICE_RESET")
        if found != State.RUNNING:
            await self._set_mig_state(State.RUNNING)
        if not reset_done:
            await self._command(p.DEVICE_RESET, "DEVICE_RESET")
        self.state = await self._get_state()
        log.info("vfio_user_device_reset", device=self.name, found=found.name)

    # --- data ---

    async def mig_data_read(self) -> memoryview:
        """One MIG_DATA_READ of up to ``max_data_xfer_size``; the data the reply carries."""
        size = self._conn.max_data_xfer if self._conn else p.DEFAULT_MAX_DATA_XFER
        try:
            reply = await self._command(
                p.MIG_DATA_READ, "MIG_DATA_READ", p.MIG_DATA.pack(p.MIG_DATA.size + size, size)
            )
        except DeviceError as exc:
            raise ChannelIOError(self.name, _reason(exc)) from exc
        _, got = p.MIG_DATA.unpack_from(reply)
        if got > size or p.MIG_DATA.size + got > len(reply):
            raise ChannelIOError(self.name, f"MIG_DATA_READ reply claims {got} of {size} bytes")
        # The reply is padded to the size asked for: only ``got`` bytes are data.
        return reply[p.MIG_DATA.size : p.MIG_DATA.size + got]

    async def mig_data_write(self, data: memoryview, offset: int) -> None:
        """One MIG_DATA_WRITE of at most ``write_limit`` bytes at stream ``offset``."""
        try:
            await self._command(
                p.MIG_DATA_WRITE,
                f"MIG_DATA_WRITE at stream offset {offset}",
                p.MIG_DATA.pack(p.MIG_DATA.size + len(data), len(data)),
                data,
            )
        except DeviceError as exc:
            raise ChannelIOError(self.name, _reason(exc)) from exc

    def precopy_info(self) -> PrecopyInfo:
        raise Unsupported(self.name, "vfio-user has no precopy info (initial/dirty bytes)")

    def stop_copy_size(self) -> int:
        raise Unsupported(self.name, "vfio-user has no MIG_DATA_SIZE (stop-copy size)")

    async def digest(self) -> bytes:
        """SHA-256 of a full STOP_COPY stream taken aside.

        Valid in RUNNING and STOP, and in STOP_COPY once its stream was read to the end.
        The server is walked to STOP_COPY (through STOP), a fresh stream read to its
        end and the server walked back, without telling the state listeners. The
        device is paused meanwhile: this is a verification tool.
        """
        start = self.state
        channel = self._channel
        if start == State.STOP_COPY and isinstance(channel, VfioUserSaveChannel) and channel.ended:
            await self._set_mig_state(State.STOP)
        else:
            self.require(State.RUNNING, State.STOP, what="digest()")
        hasher = hashlib.sha256()
        await self._set_mig_state(State.STOP_COPY)
        try:
            while data := await self.mig_data_read():
                hasher.update(data)
        finally:
            await self._set_mig_state(start)
        return hasher.digest()

    # --- device regions ---

    async def region_read(self, index: int, offset: int, length: int) -> bytes:
        """REGION_READ of ``length`` bytes, in pieces of at most ``max_data_xfer_size``."""
        out = bytearray()
        limit = self._conn.max_data_xfer if self._conn else p.DEFAULT_MAX_DATA_XFER
        while len(out) < length:
            count = min(limit, length - len(out))
            where = offset + len(out)
            reply = await self._command(
                p.REGION_READ,
                f"REGION_READ(region {index}, {where}+{count})",
                p.REGION_ACCESS.pack(where, index, count),
            )
            data = reply[p.REGION_ACCESS.size : p.REGION_ACCESS.size + count]
            if len(data) != count:
                raise DeviceError(self.name, f"REGION_READ(region {index}) returned {len(data)}")
            out += data
        return bytes(out)

    async def region_write(self, index: int, offset: int, data: Buffer) -> None:
        """REGION_WRITE of ``data``, in pieces the server receives whole."""
        view = memoryview(data).cast("B")
        step = self.write_limit
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            await self._command(
                p.REGION_WRITE,
                f"REGION_WRITE(region {index}, {offset + start}+{len(piece)})",
                p.REGION_ACCESS.pack(offset + start, index, len(piece)),
                piece,
            )

    async def close(self) -> None:
        """Hang up, leaving the server's device in the state it is in (see the module)."""
        self._drop_channel()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            log.info("vfio_user_device_closed", device=self.name, state=self._state.name)


def _reason(error: DeviceError) -> str:
    """An error's text without the device name in front (for wrapping it)."""
    return str(error).removeprefix(f"{error.device}: ")


def _decode_flags(payload: memoryview) -> Feature:
    """The feature flags livemig knows, from the GET MIGRATION payload (a u64)."""
    (flags,) = p.MIGRATION_FLAGS.unpack_from(payload)
    return Feature(flags & (Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY))

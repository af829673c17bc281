"""A real Linux VFIO device driven through the kernel's migration uAPI v2.

The device is opened through the legacy group/container interface: ``/dev/vfio/N`` of
the device's IOMMU group, a type1v2 container, then VFIO_GROUP_GET_DEVICE_FD by the
device's name (the mdev UUID or PCI address). The cdev/iommufd interface
(``/dev/vfio/devices/vfioX``) is not implemented: Debian's 6.12 kernels build neither
CONFIG_IOMMUFD nor CONFIG_VFIO_NOIOMMU, so nothing here could exercise it, and mdevs
need no IOMMU (type1v2 accepts their emulated group).

The kernel walks combination transitions itself (``vfio_mig_get_next_state``), so this
backend implements ``set_state`` directly with one VFIO_DEVICE_FEATURE SET call. What it
adds on top of the kernel:

* STOP_COPY -> PRE_COPY(_P2P), ERROR and states the device lacks are refused before the
  kernel is asked (older kernels loop forever on the first).
* A failed SET is recovered like QEMU does, with one difference: request the recover
  state (the starting state, when reaching it does not reopen a data session the failed
  walk closed), and when that fails too, read the state the device reports and, while
  it is a valid state other than ERROR, retry the walk from there
  (``RECOVERY_ATTEMPTS`` in all); only a device in ERROR, or one that still cannot get
  back, is reset with VFIO_DEVICE_RESET (which loses its state). The TransitionError
  carries the state read back from the kernel afterwards.
* The optional queries are optional: VFIO_MIG_GET_PRECOPY_INFO failing with ENOTTY (the
  driver has no such ioctl) raises :class:`devices.errors.Unsupported` and is not asked
  again; MIG_DATA_SIZE failing raises Unsupported (and is not asked again after
  ENOTTY). The orchestrator then estimates from the stream (``orchestrator.engine.convergence``).
* Arcs run off the event loop: a SET can block in the driver for as long as the device
  takes to save or load (tens of ms for NICs and GPUs in STOP_COPY), so the ioctls of a
  state change or reset run in a thread pool with one worker per open device, and N
  devices' arcs overlap. Only the ioctls run there: data sessions, the state and the
  state listeners are updated back on the loop thread. A state change this device last
  made in under ``INLINE_ARC_S`` runs inline instead: mtty's take 30-55 us, and handing
  them to a thread cost 8 mdevs ~75 ms more downtime in the lab guest, where a thread
  round trip costs far more than the ioctl; a slow arc measured once goes to the pool.
* Data fds: non-blocking, watched with the loop's reader/writer callbacks. In PRE_COPY
  states both ENOMSG and ``read() == 0`` mean "nothing now" (mtty returns 0 where the
  uAPI says ENOMSG); 0 is the permanent end only in STOP_COPY. A new data fd while one
  is held is a fatal desynchronisation.
* Drivers may accept RESUMING -> STOP after a failed ``write()`` (mtty rejects a foreign
  header with EFAULT yet loads nothing and still says yes), so every failed write is
  remembered and RESUMING -> STOP is failed here with StateValidationError.
* Open and close end a data session left open by the uAPI's own arcs (PRE_COPY to
  RUNNING, STOP_COPY to STOP) and reset only RESUMING and ERROR: a stopped device keeps
  its state across daemons, since it may hold a workload's only copy
  (:meth:`VfioDevice._settle`). A caller that wants a fresh device resets it itself.
* Fault injection, for tests only (:class:`VfioFaults`, the config's ``faults`` table):
  a source whose saved stream is corrupt, so that a destination's driver has a foreign
  stream to refuse. The transport's checksum catches corruption on the wire, before any
  device sees it; this is the corruption it cannot catch.

Every errno becomes a DeviceError naming the call, the device and its state; the
OSError is its ``__cause__``. Queries and data-fd reads and writes run inline on the
loop: they do not wait for the device (43-650 us measured for mtty under TCG).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, TypeVar

import structlog

from devices import fsm
from devices.base import (
    DeviceDescriptor,
    MigratableDevice,
    PrecopyInfo,
)
from devices.errors import (
    ChannelIOError,
    DeviceError,
    StateValidationError,
    TransitionError,
    TransitionNotAllowed,
    Unsupported,
)
from devices.fsm import CHANNEL_STATES, SAVING_GROUP, Feature, State
from devices.vfio import uapi
from devices.vfio.channels import READ_SIZE, VfioResumeChannel, VfioSaveChannel
from devices.vfio.sysfs import VfioFds, VfioPath, open_fds
from devices.vfio.uapi import (
    FEATURE_HEADER,
    MIG_DATA_SIZE_PAYLOAD,
    MIG_STATE_PAYLOAD,
    MIGRATION_PAYLOAD,
    PRECOPY_INFO,
    REGION_INFO,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_RESET,
    VFIO_MIG_GET_PRECOPY_INFO,
    errno_name,
    feature_request,
    os_error,
)

log = structlog.get_logger(__name__)

#: Walks back to the recover state after a failed SET (the first and the retries).
RECOVERY_ATTEMPTS = 3
#: errnos that say an optional query does not exist, not that it failed this time.
ABSENT = frozenset({errno.ENOTTY, errno.EOPNOTSUPP})
#: A state change this device last made faster than this runs on the loop thread: it
#: blocks the loop no longer than one callback, and a worker round trip would cost more.
INLINE_ARC_S = 0.001
#: Where ending a data session found at open or close leaves the device: the uAPI's own
#: arc out of the session, which keeps the device's state and whether it runs.
SESSION_END = {
    State.PRE_COPY: State.RUNNING,
    State.PRE_COPY_P2P: State.RUNNING_P2P,
    State.STOP_COPY: State.STOP,
}
#: States reset at open and close: they hold no workload (see VfioDevice._settle).
HOLDS_NO_WORKLOAD = frozenset({State.RESUMING, State.ERROR})
_T = TypeVar("_T")


@dataclass(frozen=True)
class VfioFaults:
    """Faults to inject into a real device, for tests only; a default one injects none."""

    #: Flip every bit of the first byte of each saving session's stream, as a device
    #: that saved a corrupt state would (for mtty: a foreign magic, refused with EFAULT).
    corrupt_stream: bool = False


class RegionInfo(NamedTuple):
    """Where a device region (a BAR, config space) lives in the device fd."""

    number: int
    flags: int
    size: int
    offset: int


class _ArcPool:
    """Threads for blocking arcs: one worker per open device, so every arc can overlap.

    The loop's default executor has ``cpu_count + 4`` workers (6 here), fewer than the
    devices a switchover may move at once. Workers start lazily, so the pool holds only
    as many threads as arcs ever ran at the same time.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._size = 0
        self._devices = 0

    def attach(self) -> None:
        """Count an opened device (the pool grows to it before its next arc)."""
        self._devices += 1

    def detach(self) -> None:
        """Count a closed device."""
        self._devices -= 1

    async def run(self, call: Callable[..., _T], *args: Any) -> _T:
        """Run ``call(*args)`` in a worker; the result comes back on the loop thread."""
        if self._executor is None or self._size < self._devices:
            previous = self._executor
            self._size = max(self._devices, 1)
            self._executor = ThreadPoolExecutor(self._size, thread_name_prefix="vfio-arc")
            if previous is not None:
                previous.shutdown(wait=False)  # its running arcs finish; nothing new goes there
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)


_ARC_POOL = _ArcPool()


def _timed(call: Callable[..., _T], *args: Any) -> tuple[_T, float]:
    """``call(*args)`` and the seconds it took (measured where it runs)."""
    started = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - started


async def _to_completion(work: Coroutine[Any, Any, _T]) -> _T:
    """Await ``work`` in a task that a cancel of the caller does not interrupt.

    An ioctl started in a worker cannot be taken back; the task records its outcome
    (the state, a new data fd) even when the caller is cancelled meanwhile, and the
    cancel reaches the caller at once.
    """
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shielded task's error as seen: its caller was cancelled and will not look."""
    if not task.cancelled():
        task.exception()


class _Recovery(NamedTuple):
    """What the recovery after a failed SET did, computed in a worker thread."""

    #: Where the failed walk left the device.
    walked_to: State
    #: Where the device is now.
    final: State
    #: What was tried, for the log and the error.
    recovery: str


class VfioDevice(MigratableDevice):
    """A VFIO device with migration support, opened through its group and a container.

    ``kind`` is "vfio"; the descriptor's kind adds the device model (the mdev type such
    as ``vfio:mtty-2``, or ``vfio:vendor:device`` for PCI), since only the same model
    can load a stream. Build one with :meth:`from_config`; it owns its fds from then on
    and releases them in :meth:`close`.
    """

    kind: ClassVar[str] = "vfio"
    #: The stream is the driver's own; the framing around it is the uAPI v2 data fd.
    format_version: ClassVar[int] = 1

    def __init__(
        self,
        name: str,
        path: VfioPath,
        fds: VfioFds,
        features: Feature | None = None,
        faults: VfioFaults | None = None,
    ) -> None:
        self.path = path
        self.fds = fds
        #: Faults injected for tests (none by default).
        self.faults = faults or VfioFaults()
        #: (stream offset, OSError) of every failed write in the current RESUMING session.
        self._failed_writes: list[tuple[int, OSError]] = []
        #: Why VFIO_MIG_GET_PRECOPY_INFO / MIG_DATA_SIZE are not offered, once known.
        self._no_precopy_info: str | None = None
        self._no_data_size: str | None = None
        #: One state change or reset at a time (their ioctls run in a worker).
        self._arc_lock = asyncio.Lock()
        #: Seconds each (start, target) state change last took in the kernel.
        self._arc_seconds: dict[tuple[State, State], float] = {}
        self._model = path.model()
        #: What the driver implements; the kernel walks transitions over these arcs.
        self.kernel_features = self._query_features(name)
        if features is None:
            features = self.kernel_features
        elif features & ~self.kernel_features:
            raise DeviceError(
                name, f"features {features!r} exceed the driver's {self.kernel_features!r}"
            )
        super().__init__(name, features)
        self._state = self.found_at_open = self._get_state()
        # A session whose fd we do not hold (a previous owner died mid-migration): end
        # it, keeping what the device holds (a DeviceError here stops the open).
        self._settle()
        _ARC_POOL.attach()
        log.info(
            "vfio_device_opened",
            device=name,
            sysfs=str(path.sysfs),
            group=path.group,
            model=self._model,
            features=repr(features),
            state=self._state.name,
        )

    @classmethod
    def from_config(
        cls,
        spec: str,
        *,
        name: str | None = None,
        features: Feature | None = None,
        faults: VfioFaults | None = None,
    ) -> VfioDevice:
        """Open the device named by an mdev UUID, a PCI address or a sysfs path.

        ``features`` restricts the states used to a legal subset of what the driver
        offers (say, STOP_COPY alone to migrate without pre-copy); ``faults`` injects
        faults, for tests.
        """
        path = VfioPath.resolve(spec)
        fds = open_fds(path)
        try:
            return cls(name or path.name, path, fds, features, faults)
        except BaseException:
            fds.close()
            raise

    # --- ioctls ---

    def _feature(self, flags: int, payload: bytes = b"", payload_size: int = 0) -> bytes:
        """Run VFIO_DEVICE_FEATURE and return the payload the kernel filled in."""
        request = feature_request(flags, payload, payload_size)
        uapi.ioctl(self.fds.device, VFIO_DEVICE_FEATURE, request)
        return bytes(request[FEATURE_HEADER.size :])

    def _query_features(self, name: str) -> Feature:
        """The migration flags (VFIO_DEVICE_FEATURE GET|MIGRATION)."""
        try:
            payload = self._feature(
                VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
                payload_size=MIGRATION_PAYLOAD.size,
            )
        except OSError as exc:
            message = f"VFIO_DEVICE_FEATURE(GET|MIGRATION) failed: {errno_name(exc.errno)}"
            if exc.errno == errno.ENOTTY:
                message += " (the device does not support migration)"
            raise DeviceError(name, message) from exc
        (flags,) = MIGRATION_PAYLOAD.unpack(payload)
        features = Feature(flags & (Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY))
        if features not in fsm.LEGAL_FEATURE_SETS:
            raise DeviceError(name, f"migration flags {flags:#x} are not a set the uAPI defines")
        return features

    def _get_state(self) -> State:
        """The state the kernel reports (GET|MIG_DEVICE_STATE)."""
        try:
            payload = self._feature(
                VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                payload_size=MIG_STATE_PAYLOAD.size,
            )
        except OSError as exc:
            call = "VFIO_DEVICE_FEATURE(GET|MIG_DEVICE_STATE)"
            raise os_error(self.name, call, self._state, exc) from exc
        return State(MIG_STATE_PAYLOAD.unpack(payload)[0])

    def _set_state_ioctl(self, target: State) -> int:
        """SET|MIG_DEVICE_STATE; return the data fd the kernel opened, or -1."""
        payload = self._feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            MIG_STATE_PAYLOAD.pack(target, -1),
        )
        return int(MIG_STATE_PAYLOAD.unpack(payload)[1])

    def _reset_device(self) -> None:
        """VFIO_DEVICE_RESET: the kernel drops any session and the device is RUNNING."""
        try:
            uapi.ioctl(self.fds.device, VFIO_DEVICE_RESET)
        except OSError as exc:
            raise os_error(self.name, "VFIO_DEVICE_RESET", self._state, exc) from exc

    # --- state changes ---

    async def set_state(self, target: State) -> None:
        await _to_completion(self._set_state(target))

    async def _set_state(self, target: State) -> None:
        async with self._arc_lock:
            start = self.state
            if start == target:
                return
            if fsm.next_state(start, target, self.features) == State.ERROR:
                raise TransitionNotAllowed(
                    self.name,
                    f"transition {start.name} -> {target.name} is not allowed "
                    f"for features {self.features!r}",
                    start=start,
                    target=target,
                    state=start,
                )
            if start == State.RESUMING and self._failed_writes:
                offset, first = self._failed_writes[0]
                invalid = StateValidationError(
                    self.name,
                    f"{len(self._failed_writes)} write(s) of the stream failed, the first at "
                    f"offset {offset} with {errno_name(first.errno)}; refusing to load it",
                )
                raise TransitionError(
                    self.name,
                    f"RESUMING -> STOP refused on the way to {target.name}: {invalid}",
                    start=start,
                    target=target,
                    state=start,
                    failed_arc=(State.RESUMING, State.STOP),
                ) from invalid
            data_fd, failure, recovery = await self._walk_measured(start, target)
            if failure is not None:
                assert recovery is not None
                call = f"VFIO_DEVICE_FEATURE(SET|MIG_DEVICE_STATE={target.name})"
                cause = os_error(self.name, call, start, failure)
                cause.__cause__ = failure
                raise self._recovered(start, target, cause, recovery) from cause
            self._adopt(start, target, data_fd)

    async def _walk_measured(
        self, start: State, target: State
    ) -> tuple[int, OSError | None, _Recovery | None]:
        """``_walk`` inline when this change was fast last time, else in a worker."""
        known = self._arc_seconds.get((start, target))
        if known is not None and known < INLINE_ARC_S:
            outcome, seconds = _timed(self._walk, start, target)
        else:
            outcome, seconds = await _ARC_POOL.run(_timed, self._walk, start, target)
        self._arc_seconds[(start, target)] = seconds
        return outcome

    def _walk(self, start: State, target: State) -> tuple[int, OSError | None, _Recovery | None]:
        """In a worker: SET ``target``; after a failure, the recovery's ioctls as well.

        Returns the new data fd (or -1), and on failure the error and the recovery.
        Touches no channel, state or listener: the loop thread applies the outcome.
        """
        try:
            return self._set_state_ioctl(target), None, None
        except OSError as exc:
            return -1, exc, self._recover(start)

    def _adopt(self, start: State, target: State, data_fd: int) -> None:
        """Track the session after a successful SET: keep, close or open the channel."""
        keeps = start in SAVING_GROUP and target in SAVING_GROUP
        if self._channel is not None and not keeps:
            self._drop_channel()
        opens = target in CHANNEL_STATES and not keeps
        if data_fd >= 0 and not opens:
            os.close(data_fd)
            self._desync(start, target, "the kernel opened a new data fd while one is held")
        if opens and data_fd < 0:
            self._desync(start, target, "the kernel opened no data fd for a new session")
        if opens:
            if target == State.RESUMING:
                self._channel = VfioResumeChannel(self, data_fd)
            else:
                self._channel = VfioSaveChannel(self, data_fd)
                self._channel.corrupt = self.faults.corrupt_stream
            self._failed_writes.clear()
        # The kernel walked the same arcs fsm derives (the FSM tests pin that): show
        # each to the listeners, as a device whose arcs are walked here would.
        for step in fsm.path(start, target, self.kernel_features)[1:]:
            self.state = step
        log.debug("vfio_state_set", device=self.name, start=start.name, target=target.name)

    def _desync(self, start: State, target: State, what: str) -> None:
        """Fatal: this side and the kernel disagree on the data session. Reset and raise."""
        log.error("vfio_session_desync", device=self.name, start=start.name, target=target.name)
        self._drop_channel()
        self._reset_device()
        self.state = self._get_state()
        raise TransitionError(
            self.name,
            f"{start.name} -> {target.name}: {what}; device reset, now {self.state.name}",
            start=start,
            target=target,
            state=self.state,
        )

    def _read_state(self) -> State:
        """The state the kernel reports, ERROR when even that fails."""
        try:
            return self._get_state()
        except DeviceError:
            return State.ERROR

    def _recover(self, start: State) -> _Recovery:
        """In a worker, after a failed SET: walk back to ``start``, retrying, reset last.

        A device the failed walk left in a valid state is walked back from there, and
        after each failed attempt from whatever valid state the device then reports: a
        reset loses the device's state, so it comes only when the device is in ERROR or
        ``RECOVERY_ATTEMPTS`` walks did not get it back. A device whose data session the
        walk closed cannot get it back and stays where it is.
        """
        walked_to = now = self._read_state()
        steps: list[str] = []
        attempts = 0
        while now not in (start, State.ERROR) and not fsm.session_lost(start, now):
            if attempts == RECOVERY_ATTEMPTS:
                break
            attempts += 1
            try:
                stray = self._set_state_ioctl(start)
            except OSError as exc:
                steps.append(f"requested {start.name} from {now.name}: {errno_name(exc.errno)}")
                now = self._read_state()
                continue
            if stray >= 0:  # start has no session to open: the kernel disagrees with us
                os.close(stray)
                steps.append(f"requested {start.name} from {now.name}: unexpected data fd")
                now = State.ERROR
                break
            steps.append(f"requested {start.name} from {now.name}")
            now = self._read_state()
        if now == start:
            recovery = "; ".join(steps) or "none needed"
        elif now != State.ERROR and fsm.session_lost(start, now):
            recovery = "; ".join([*steps, f"stayed in {now.name} (data session gone)"])
        else:
            steps.append("device in ERROR" if now == State.ERROR else "gave up")
            try:
                self._reset_device()
                steps.append("then VFIO_DEVICE_RESET")
            except DeviceError as exc:
                steps.append(f"then {exc}")
            now = self._read_state()
            recovery = "; ".join(steps)
        return _Recovery(walked_to, now, recovery)

    def _recovered(
        self, start: State, target: State, cause: DeviceError, outcome: _Recovery
    ) -> TransitionError:
        """On the loop thread: apply a recovery's outcome; return the error to raise."""
        final = outcome.final
        if fsm.session_lost(start, final) or final == State.ERROR:
            self._drop_channel()
        log.warning(
            "vfio_set_state_failed",
            device=self.name,
            start=start.name,
            target=target.name,
            walked_to=outcome.walked_to.name,
            recovery=outcome.recovery,
            state=final.name,
            error=str(cause),
        )
        self.state = final
        return TransitionError(
            self.name,
            f"{start.name} -> {target.name} failed: {cause}; kernel walked to "
            f"{outcome.walked_to.name}, recovery: {outcome.recovery}; device is now {final.name}",
            start=start,
            target=target,
            state=final,
        )

    async def reset(self) -> None:
        await _to_completion(self._reset())

    async def _reset(self) -> None:
        async with self._arc_lock:
            self._drop_channel()
            state = await _ARC_POOL.run(self._reset_and_read)
            self._failed_writes.clear()
            self.state = state
            log.info("vfio_device_reset", device=self.name, state=self.state.name)

    def _reset_and_read(self) -> State:
        """In a worker: VFIO_DEVICE_RESET, then the state the kernel reports."""
        self._reset_device()
        return self._get_state()

    def write_failed(self, offset: int, exc: OSError) -> None:
        """Remember a failed write of the resuming stream (RESUMING -> STOP will refuse)."""
        self._failed_writes.append((offset, exc))
        log.warning(
            "vfio_resume_write_failed",
            device=self.name,
            offset=offset,
            errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
        )

    # --- data and queries ---

    def precopy_info(self) -> PrecopyInfo:
        """VFIO_MIG_GET_PRECOPY_INFO; Unsupported once the driver said it has none (ENOTTY)."""
        self.require(
            State.PRE_COPY, State.PRE_COPY_P2P, what="precopy_info (VFIO_MIG_GET_PRECOPY_INFO)"
        )
        if self._no_precopy_info is not None:
            raise Unsupported(self.name, self._no_precopy_info)
        channel = self.save_channel()
        assert isinstance(channel, VfioSaveChannel)
        request = bytearray(PRECOPY_INFO.pack(PRECOPY_INFO.size, 0, 0, 0))
        try:
            uapi.ioctl(channel.fd, VFIO_MIG_GET_PRECOPY_INFO, request)
        except OSError as exc:
            if exc.errno in ABSENT:
                # The ioctl is optional in the uAPI: remember, the answer will not change.
                self._no_precopy_info = (
                    f"VFIO_MIG_GET_PRECOPY_INFO is not offered: {errno_name(exc.errno)}"
                )
                log.info("vfio_precopy_info_unsupported", device=self.name, errno=exc.errno)
                raise Unsupported(self.name, self._no_precopy_info) from exc
            raise os_error(
                self.name, "VFIO_MIG_GET_PRECOPY_INFO", self.state, exc, ChannelIOError
            ) from exc
        _, _, initial, dirty = PRECOPY_INFO.unpack(request)
        return PrecopyInfo(initial, dirty)

    def stop_copy_size(self) -> int:
        """The driver's MIG_DATA_SIZE estimate; 0 once STOP_COPY's stream was read to its end.

        Any failure raises Unsupported (the figure is an estimate, the migration can go on
        without it); after ENOTTY the feature is not asked for again.
        """
        if isinstance(self._channel, VfioSaveChannel) and self._channel.ended:
            return 0
        if self._no_data_size is not None:
            raise Unsupported(self.name, self._no_data_size)
        try:
            payload = self._feature(
                VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
                payload_size=MIG_DATA_SIZE_PAYLOAD.size,
            )
        except OSError as exc:
            call = "VFIO_DEVICE_FEATURE(GET|MIG_DATA_SIZE)"
            message = f"{call} failed in state {self.state.name}: {errno_name(exc.errno)}"
            if exc.errno in ABSENT:
                self._no_data_size = f"{call} is not offered: {errno_name(exc.errno)}"
                log.info("vfio_data_size_unsupported", device=self.name, errno=exc.errno)
            raise Unsupported(self.name, message) from exc
        return int(MIG_DATA_SIZE_PAYLOAD.unpack(payload)[0])

    async def digest(self) -> bytes:
        """SHA-256 of everything the driver saves, from a STOP_COPY snapshot taken aside.

        For mtty that is both ports' registers, FIFO and FIFO indices: exactly what a
        migration carries. The kernel is walked to STOP_COPY, a fresh stream drained, and
        walked back, without telling the state listeners (the FSM state does not change).
        Valid in RUNNING, RUNNING_P2P and STOP, and in STOP_COPY once its stream was read
        to the end (the channel then goes on with the snapshot's fd, also at its end).
        A real device is paused meanwhile: this is a verification tool.
        """
        start = self.state
        channel = self._channel
        if start == State.STOP_COPY and isinstance(channel, VfioSaveChannel) and channel.ended:
            self._walk_aside(State.STOP)
            digest, fd = self._snapshot()
            channel.replace_fd(fd)
            return digest
        self.require(State.RUNNING, State.RUNNING_P2P, State.STOP, what="digest()")
        digest, fd = self._snapshot()
        os.close(fd)
        self._walk_aside(start)
        return digest

    def _snapshot(self) -> tuple[bytes, int]:
        """Enter STOP_COPY from outside the saving group; hash its stream; return the fd."""
        call = "VFIO_DEVICE_FEATURE(SET|MIG_DEVICE_STATE=STOP_COPY) for digest()"
        try:
            fd = self._set_state_ioctl(State.STOP_COPY)
        except OSError as exc:
            raise os_error(self.name, call, self.state, exc) from exc
        hasher = hashlib.sha256()
        try:
            while chunk := os.read(fd, READ_SIZE):
                hasher.update(chunk)
        except OSError as exc:
            os.close(fd)
            self._walk_aside(self.state)
            raise os_error(self.name, "read(data_fd) for digest()", self.state, exc) from exc
        return hasher.digest(), fd

    def _walk_aside(self, target: State) -> None:
        """SET ``target`` without telling listeners. On failure the device stays where the
        kernel left it, with its state (a digest of a stopped device may be taken of a
        workload's only copy); only one in ERROR, with nothing left to keep, is reset."""
        try:
            stray = self._set_state_ioctl(target)
        except OSError as exc:
            now = self._read_state()
            if now not in SAVING_GROUP:
                self._drop_channel()
            self.state = now
            if now == State.ERROR:
                self._reset_device()
                self.state = self._get_state()
            raise os_error(
                self.name, f"returning to {target.name} in digest()", self.state, exc
            ) from exc
        if stray >= 0:
            os.close(stray)

    def descriptor(self) -> DeviceDescriptor:
        """The handshake identity; the kind names the model, as only it can load the stream."""
        return DeviceDescriptor(
            self.name, f"{self.kind}:{self._model}", self.format_version, self.features
        )

    # --- device regions (BARs) ---

    def region_info(self, index: int) -> RegionInfo:
        """VFIO_DEVICE_GET_REGION_INFO for region ``index`` (0-5 BARs, 7 config space)."""
        request = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
        try:
            uapi.ioctl(self.fds.device, VFIO_DEVICE_GET_REGION_INFO, request)
        except OSError as exc:
            raise os_error(
                self.name, f"VFIO_DEVICE_GET_REGION_INFO({index})", self.state, exc
            ) from exc
        _, flags, _, _, size, offset = REGION_INFO.unpack(request)
        return RegionInfo(index, flags, size, offset)

    def region_read(self, index: int, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of a region (device register reads)."""
        region = self._region_range(index, offset, length)
        try:
            return os.pread(self.fds.device, length, region.offset + offset)
        except OSError as exc:
            raise os_error(self.name, f"pread(region {index}+{offset})", self.state, exc) from exc

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of a region (device register writes)."""
        region = self._region_range(index, offset, len(data))
        try:
            written = os.pwrite(self.fds.device, data, region.offset + offset)
        except OSError as exc:
            raise os_error(self.name, f"pwrite(region {index}+{offset})", self.state, exc) from exc
        if written != len(data):
            raise DeviceError(self.name, f"pwrite(region {index}+{offset}) wrote {written} bytes")

    def _region_range(self, index: int, offset: int, length: int) -> RegionInfo:
        region = self.region_info(index)
        if offset < 0 or offset + length > region.size:
            raise DeviceError(
                self.name,
                f"region {index} access {offset}+{length} outside its {region.size} bytes",
            )
        return region

    def _settle(self) -> None:
        """End a data session the device is in without losing what it may hold.

        Run at open and at close. The kernel keeps a device's migration state across
        both (mtty does), and only the daemon's records say what a stopped device holds:

        * RUNNING, RUNNING_P2P: nothing; the workload runs, P2P quiescence is kept.
        * STOP: nothing; it may be kept stopped, migrated away, or hold the only copy of
          a workload whose migration's outcome is unknown.
        * PRE_COPY(_P2P): SET RUNNING(_P2P), STOP_COPY: SET STOP; the uAPI's own arcs out
          of the session keep the state and whether the device runs.
        * RESUMING: reset; half a stream is no workload (COMMIT waits for the load, so
          the source still has it), and a SET STOP would load it (after a reopen, mtty's
          load would dereference a NULL resume file).
        * ERROR: reset; its state is already undefined, and only a reset makes it usable.

        A failed SET that leaves the device in ERROR is reset; any other failure raises
        DeviceError and leaves the device as it is.
        """
        start = self._state
        target = SESSION_END.get(start)
        if target is not None:
            try:
                stray = self._set_state_ioctl(target)
            except OSError as exc:
                self.state = self._read_state()
                if self.state != State.ERROR:
                    call = f"VFIO_DEVICE_FEATURE(SET|MIG_DEVICE_STATE={target.name})"
                    raise os_error(self.name, call, start, exc) from exc
            else:
                if stray >= 0:
                    os.close(stray)
                self.state = target
        if self.state in HOLDS_NO_WORKLOAD:
            self._reset_device()
            self.state = self._get_state()
        if self.state != start:
            log.info(
                "vfio_session_ended", device=self.name, found=start.name, state=self.state.name
            )

    async def close(self) -> None:
        """Hand the device back to the kernel once an arc in flight ended (see :meth:`abort`)."""
        async with self._arc_lock:
            self.abort()

    def abort(self) -> None:
        """Drop any session, end it in the kernel without losing state, close the fds.

        Idempotent. A stopped device stays stopped with its state (:meth:`_settle` says
        why); a caller that wants a fresh device resets it itself.
        """
        if self.fds.device < 0:
            return
        self._drop_channel()
        try:
            self._settle()
        except DeviceError as exc:
            log.error("vfio_session_end_on_close_failed", device=self.name, error=str(exc))
        self.fds.close()
        _ARC_POOL.detach()
        log.info("vfio_device_closed", device=self.name, state=self._state.name)

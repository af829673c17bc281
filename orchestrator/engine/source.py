"""The source side of a migration: pre-copy iteration, switchover, and rollback.

Guarantee: when ``run`` raises anything but OutcomeUnknown or SplitOutcome, every source
device is RUNNING again with the state its own workload gave it, brought back in P2P
order (a device that ended in ERROR on the way is reset and the reset is logged as an
error). After COMMIT the source never runs its devices again on its own, whatever the
destination says or does: after success, OutcomeUnknown or SplitOutcome they are in STOP.
(COMMIT counts as sent once a byte of it may have left this host: one still whole in our
write buffer when its send or the wait for "resumed" times out is withdrawn, see
``_withdraw_commit``, and the migration rolls back.)
The stats' ``outcome`` and ``placement`` say where the workload runs.

The switchover, in order: every device to its P2P state (PRE_COPY_P2P or RUNNING_P2P)
before any leaves the quiesced group; every device to STOP_COPY in parallel; each data
channel drained to its permanent end; END_OF_STREAM; the destination loads and
validates everything and answers "loaded"; the source sends COMMIT, the point of no
return, and the destination resumes. A failure before COMMIT rolls everything back; the
devices stay stopped before COMMIT for at most ``params.stop_bound_s``
(max_stop_ms, or the hard downtime limit), whatever the link does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

import transport
from devices.base import MigratableDevice
from devices.errors import DeviceError, Unsupported
from devices.fsm import Feature, State
from orchestrator.engine import convergence, fanout, window
from orchestrator.engine.convergence import Action, DeviceProgress
from orchestrator.engine.errors import (
    ConvergenceFailed,
    DestinationFailed,
    DowntimeExceeded,
    MigrationBlocked,
    MigrationCancelled,
    MigrationError,
    OutcomeUnknown,
    SplitOutcome,
)
from orchestrator.engine.messages import Devices, Verdict, boot_id
from orchestrator.engine.p2p import resume_in_order
from orchestrator.engine.pacing import Pacer
from orchestrator.engine.params import LIVE_PARAMETERS, MigrationParams
from orchestrator.engine.phases import (
    FINAL_PHASES,
    REVERSIBLE_PHASES,
    STATUS_OF,
    Phase,
    Phased,
    PhaseMachine,
    wait_out,
)
from orchestrator.engine.stats import (
    BusyMeter,
    DeviceStats,
    Downtime,
    DowntimeClock,
    IterationSample,
    LinkMeter,
    MigrationStats,
    RateMeter,
)
from transport import Tag

log = structlog.get_logger(__name__)

StatusListener = Callable[[MigrationStats], None]
#: Link crossings inside the downtime window, in round trips: the stop-copy data's way
#: to the destination, its "loaded" back, and COMMIT out again. The last two are the
#: price of never running twice: the destination may not run before the source knows
#: every device loaded and has given the workload away (SYNC runs before the window).
WINDOW_ROUND_TRIPS = 1.5
#: Called with the device names before the downtime window opens, from which point the
#: devices may be given away; must make the fence durable (it costs no downtime there).
FenceHook = Callable[[list[str]], None]
#: What every OutcomeUnknown tells the operator to do.
UNKNOWN_ADVICE = (
    "the destination may be running the devices, so the source devices stay stopped; "
    "resume them (livemig resume --force) only if the destination did not take over"
)


def check_blockers(devices: Sequence[MigratableDevice], params: MigrationParams) -> None:
    """Raise MigrationBlocked, saying what to change, if these devices cannot migrate."""
    if not devices:
        raise MigrationBlocked("no devices to migrate")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise MigrationBlocked(f"device names must be unique, got {names}")
    for device in devices:
        if not device.features & Feature.STOP_COPY:
            raise MigrationBlocked(f"device {device.name} does not support STOP_COPY")
        if device.state != State.RUNNING:
            raise MigrationBlocked(
                f"device {device.name} is {device.state.name}, not RUNNING; "
                "reset it or wait for the migration using it to end"
            )
    if params.p2p and len(devices) > 1:
        lacking = [d.name for d in devices if not d.features & Feature.P2P]
        if lacking:
            raise MigrationBlocked(
                f"devices {', '.join(lacking)} cannot quiesce P2P DMA, so {len(devices)} "
                "devices cannot be stopped safely together; migrate them separately or set "
                "p2p off to accept the risk of P2P DMA during the stop"
            )


class SourceMigration(Phased):
    """One outgoing migration of a set of devices to a destination daemon."""

    def __init__(
        self,
        devices: Sequence[MigratableDevice],
        destination: str,
        params: MigrationParams,
        *,
        auth: transport.AuthConfig,
        name: str = "livemig-source",
        migration_id: str | None = None,
        on_fence: FenceHook | None = None,
        window_history: window.WindowHistory | None = None,
    ) -> None:
        self.devices = list(devices)
        self.destination = destination
        self.params = params
        self.auth = auth
        self.name = name
        self.stats = MigrationStats(
            migration_id=migration_id or uuid.uuid4().hex[:12],
            destination=destination,
            devices=[DeviceStats(d.name, d.kind) for d in self.devices],
        )
        self.log = log.bind(migration_id=self.stats.migration_id)
        self._on_fence = on_fence
        #: Past windows of this process (its daemon's), which scale the window's cost.
        self._window_history = window_history
        self._window_cost: window.WindowCost | None = None
        self._listeners: list[StatusListener] = []
        self._session: transport.Session | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._stop_readers = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._ack = asyncio.Event()
        self._synced = asyncio.Event()
        self._continue = asyncio.Event()
        self._verdicts: asyncio.Queue[Verdict | BaseException] = asyncio.Queue()
        #: The verdict the destination may send now ("loaded" once END_OF_STREAM went,
        #: "resumed" once COMMIT went), one each: any other but "failed" is a protocol
        #: error, or a stray "loaded" queued early would answer the window's wait.
        self._expected_verdict: str | None = None
        self._link_error: BaseException | None = None
        self._reader_error: BaseException | None = None
        self._body: asyncio.Task[None] | None = None
        self._cancel_reason: str | None = None
        self._checked = False
        self._force = False
        self._phases = PhaseMachine(self.log, self._phase_changed)
        self._inflight: asyncio.Future[Any] | None = None
        #: The window's per-device times, in ms by phase (made before the window opens).
        self._source_marks: dict[str, dict[str, float]] = {}
        #: The window's arcs by phase, turned into ``_source_marks`` once it closed.
        self._arc_spans: dict[str, tuple[Sequence[MigratableDevice], list[fanout.Span]]] = {}
        self._meter = RateMeter()
        #: This migration's part of its daemon's host-wide budget (bytes/s), if it has one.
        self.bandwidth_share: float | None = None
        self._link = BusyMeter()
        self._link_meter = LinkMeter(self._link)
        self._clock_offset = 0.0
        self._arc_overhead_s = 0.0
        #: When the last iteration sample was taken, and each device's pre-copy bytes then.
        self._last_sample: tuple[float, list[int]] | None = None
        self._precopy_indices = [
            i for i, d in enumerate(self.devices) if d.features & Feature.PRE_COPY
        ]
        self._passes = [convergence.StreamPasses() for _ in self.devices]
        #: Bytes read from each device's save channel in pre-copy, counted as read (a
        #: chunk may wait in send_chunk while the figures are sampled).
        self._read_bytes = [0 for _ in self.devices]
        #: The devices the switchover quiesces first (flag tests cost 0.5 us a device).
        self._quiescible = [d for d in self.devices if d.features & Feature.P2P]
        #: Whether every device is a model, whose arcs never wait (see fanout).
        self._models = fanout.never_waits(self.devices)
        self._index = {d.name: i for i, d in enumerate(self.devices)}

    @property
    def _want_ack(self) -> bool:
        """Whether the switchover waits for the destination's switchover-ack."""
        return self.params.switchover_ack and bool(self._precopy_indices)

    # -- control (called by the daemon while ``run`` is going) --------------------------

    def add_listener(self, listener: StatusListener) -> None:
        """Call ``listener(stats)`` on every status change and iteration."""
        self._listeners.append(listener)

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the migration to stop and roll back; PhaseError once COMMIT was sent or it
        ended (past the point of no return)."""
        self._phases.require("cancel", REVERSIBLE_PHASES)
        self._cancel_reason = reason
        if self._body is not None:
            self._body.cancel()

    def continue_switchover(self) -> None:
        """Release a migration paused before the switchover; PhaseError if it is not paused."""
        self._phases.require("continue", frozenset({Phase.PAUSED}))
        self._continue.set()

    def force_switchover(self) -> None:
        """Switch over at the next iteration whatever the estimate says."""
        self._force = True
        self._wakeup.set()

    def set_bandwidth_share(self, share: float | None) -> None:
        """Cap the rate at ``share`` too (the daemon splits its total between migrations)."""
        self.bandwidth_share = share
        if self._session is not None:
            self._session.set_max_bandwidth(self._cap())

    def _cap(self) -> float | None:
        """The rate cap in force: max_bandwidth or the share, the lower."""
        caps = [c for c in (self.params.max_bandwidth, self.bandwidth_share) if c is not None]
        return min(caps) if caps else None

    def set_parameters(self, changes: dict[str, Any]) -> MigrationParams:
        """Change live parameters (downtime limit, bandwidth); others are refused."""
        fixed = sorted(set(changes) - LIVE_PARAMETERS)
        if fixed:
            raise MigrationBlocked(
                f"parameter(s) {', '.join(fixed)} cannot change during a migration; "
                f"live ones: {', '.join(sorted(LIVE_PARAMETERS))}"
            )
        self.params = self.params.updated(changes)
        if "max_bandwidth" in changes and self._session is not None:
            self._session.set_max_bandwidth(self._cap())
        self.log.info("parameters_changed", **changes)
        self._wakeup.set()
        return self.params

    # -- the migration -----------------------------------------------------------------

    async def run(self) -> MigrationStats:
        """Migrate; return the final stats or raise a MigrationError saying why not.

        When our caller is cancelled, the rollback (or, past COMMIT, the stop) still runs
        to its end before the CancelledError propagates.
        """
        if self._cancel_reason is not None:
            return await self._end(MigrationCancelled(self._cancel_reason))
        self._body = asyncio.create_task(self._migrate(), name="migration")
        try:
            await asyncio.shield(self._body)
        except asyncio.CancelledError:
            reason = self._requested_cancel()  # set by cancel() while we awaited
            if self._body.done() and reason is not None:
                return await self._end(MigrationCancelled(reason))
            # Our caller is being cancelled (daemon shutdown): roll back, then propagate.
            self._cancel_reason = self._cancel_reason or "daemon shutting down"
            self._body.cancel()
            await wait_out(self._body)
            with contextlib.suppress(BaseException):
                self._body.result()  # its end is the cancel we asked for, or what _end says
            if self.phase is Phase.COMPLETED:
                raise  # it completed as it was cancelled: nothing to undo or report
            with contextlib.suppress(MigrationError):
                await self._end(MigrationCancelled(self._cancel_reason))
            raise
        except MigrationError as exc:
            return await self._end(exc)
        except Exception as exc:  # a device, the link, or a bug here: the source must survive
            if not isinstance(exc, DeviceError | transport.TransportError | OSError | TimeoutError):
                self.log.exception("migration_internal_error")
            return await self._end(MigrationError(_describe(exc)))
        return self.stats

    async def _end(self, error: MigrationError) -> MigrationStats:
        """``_fail(error)`` run to its end even if our caller is cancelled meanwhile: a
        rollback cut short leaves the devices stopped and the downtime window open (the
        collector off). The cancel propagates once it is done."""
        ending = asyncio.ensure_future(self._fail(error))
        if await wait_out(ending):
            ending.exception()  # the failure is recorded in the stats; the caller gets the cancel
            raise asyncio.CancelledError
        return ending.result()

    def _requested_cancel(self) -> str | None:
        return self._cancel_reason

    def record_crash(self, exc: BaseException) -> None:
        """A bug escaped ``run()``: end FAILED with the error, through the phase's writer."""
        if self.phase not in FINAL_PHASES:
            self.stats.error = self.stats.error or f"internal error: {exc!r}"
            self._set_phase(Phase.FAILED)

    def check(self) -> None:
        """MigrationBlocked if this migration cannot work, checked once: the daemon asks
        before it accepts the command, run() asks if nobody did."""
        if not self._checked:
            check_blockers(self.devices, self.params)
            self._checked = True

    async def _migrate(self) -> None:
        self.check()
        await self._setup()
        await self._precopy()
        await self._switchover()
        await self._finish()

    async def _setup(self) -> None:
        self._set_phase(Phase.SETUP)
        params = self.params
        self.log.info(
            "migration_started",
            destination=self.destination,
            devices=[d.name for d in self.devices],
            **params.as_dict(),
        )
        try:
            self._session = await asyncio.wait_for(
                transport.connect(
                    self.destination,
                    name=self.name,
                    auth=self.auth,
                    channels=min(params.channels, len(self.devices)),
                    timeout=params.connect_timeout_s,
                    link_timeout_s=params.link_timeout_s,
                ),
                params.connect_timeout_s,
            )
        except (OSError, TimeoutError, transport.TransportError) as exc:
            raise MigrationError(
                f"cannot reach destination {self.destination}: {_describe(exc)}"
            ) from exc
        session = self._session
        session.set_max_bandwidth(self._cap())
        offer = Devices(
            devices=tuple(d.descriptor() for d in self.devices),
            p2p=params.p2p,
            switchover_ack=self._want_ack,
            precopy_devices=len(self._precopy_indices),
            boot_id=boot_id(),
            migration_id=self.stats.migration_id,
        )
        session.set_device_count(len(offer.devices))
        await session.send_control(Tag.DEVICES, offer.to_fields())
        answer = await asyncio.wait_for(session.recv(), params.connect_timeout_s)
        if answer.tag == Tag.VERDICT:
            verdict = Verdict.parse(answer.fields())
            raise DestinationFailed(f"destination refused the devices: {verdict.reason}")
        if answer.tag != Tag.DEVICES_ACCEPTED:
            raise transport.ProtocolError(f"expected DEVICES_ACCEPTED, got {answer.tag.name}")
        try:
            # PONGs come from the peer's transport: one that answers none but sends
            # keep-alives would hold the setup here forever.
            async with asyncio.timeout(params.connect_timeout_s):
                await self._measure_clock(answer.fields().get("boot_id") == boot_id())
        except TimeoutError:
            raise MigrationError(
                f"destination {self.destination} answered no PING within "
                f"{params.connect_timeout_s:g} s (connect_timeout_s)"
            ) from None
        self._receiver = asyncio.create_task(self._receive(), name="migration-receiver")

        # What the arcs themselves took (the union of their spans), not the loop's other
        # work before they started (on a daemon, a millisecond or more of it).
        self._arc_overhead_s = _covered(
            await self._transition(
                [d for d in self.devices if d.features & Feature.PRE_COPY], State.PRE_COPY
            )
        )
        # Nothing flowed in the window before the readers start: saying so gives the first
        # iteration a full window, so progress shows a rate as soon as bytes move.
        self._meter.sample(self.stats.transferred_bytes, time.monotonic() - self._meter.window_s)
        session = self._session
        assert session is not None
        self._pacer = Pacer(
            self._link_meter.measured,
            session.backlog,
            session.limit_unsent,
            lambda: session.error is None,
        )
        self._readers = [
            asyncio.create_task(self._precopy_reader(i), name=f"precopy-{self.devices[i].name}")
            for i in self._precopy_indices
        ]
        self.stats.setup_ms = self.stats.elapsed_s() * 1e3

    async def _measure_clock(self, same_boot: bool) -> None:
        """Measure the round trip, and place the destination's clock on ours: exact on
        one boot, else from the best of the round trips (its half is the uncertainty)."""
        assert self._session is not None
        best: tuple[float, float] | None = None
        for _ in range(3 if same_boot else 5):
            sent, peer, received = await self._session.ping()
            rtt = received - sent
            if best is None or rtt < best[1]:
                best = (peer - (sent + received) / 2, rtt)
        assert best is not None
        self.stats.rtt_ms = best[1] * 1e3
        if same_boot:
            self._clock_offset, self.stats.clock_offset_uncertainty_ms = 0.0, 0.0
            return
        self._clock_offset = best[0]
        self.stats.clock_offset_uncertainty_ms = best[1] / 2 * 1e3

    async def _precopy(self) -> None:
        self._set_phase(Phase.PRECOPY)
        if not self._precopy_indices:
            self.log.info("no_precopy_devices", detail="nothing to iterate: switching over")
            return
        params_start = time.monotonic()
        throttle = 0.0
        previous: list[DeviceProgress] | None = None
        recent: deque[convergence.Estimate] = deque(maxlen=convergence.FLOOR_PATIENCE + 1)
        while True:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.params.iteration_s)
            self._raise_background_errors()
            self.stats.iterations += 1
            progress = self._progress()
            est = self._estimate(progress)
            recent.append(est)
            self._sample(progress, previous, est)
            previous = progress
            elapsed = time.monotonic() - params_start
            action = convergence.decide(
                est,
                self.params,
                iteration=self.stats.iterations,
                elapsed_s=elapsed,
                ack_pending=self._want_ack and not self._ack.is_set(),
            )
            limit_s = self.params.downtime_limit_ms / 1000
            if action is Action.SWITCHOVER and not convergence.at_floor(recent, limit_s):
                action = Action.CONTINUE  # fits, but still falling: wait for the floor
            if self._force:
                action = Action.FORCE
            self.log.info(
                "iteration",
                iteration=self.stats.iterations,
                pending_bytes=est.remaining_bytes,
                initial_done=est.initial_done,
                bandwidth_bps=round(est.bandwidth),
                expected_downtime_ms=round(est.expected_downtime_s * 1e3, 3),
                ack=self._ack.is_set(),
                action=action.value,
            )
            if action is Action.SWITCHOVER:
                return
            if action is Action.FORCE:
                self.stats.forced = True
                return
            if action is Action.FAIL:
                raise ConvergenceFailed(
                    f"pre-copy did not converge in {self.params.timeout_s:g} s: "
                    f"{est.remaining_bytes} bytes pending would take "
                    f"{est.expected_downtime_s * 1e3:.0f} ms, over the "
                    f"{self.params.downtime_limit_ms:g} ms limit; raise downtime_limit_ms, "
                    "or choose the force or throttle policy"
                )
            if action is Action.THROTTLE:
                throttle = convergence.next_throttle(throttle, self.params)
                for device in self.devices:
                    if device.can_throttle():
                        device.set_throttle(throttle)
                self.stats.throttle = throttle
                self.log.info("throttled", throttle=throttle)

    def _progress(self) -> list[DeviceProgress]:
        """Each device's figures now; devices without PRE_COPY owe everything at stop-copy.

        What a device cannot report (Unsupported) comes from its stream, by the rule in
        ``convergence.device_progress``.
        """
        progress = []
        for index, device in enumerate(self.devices):
            dstats = self.stats.devices[index]
            info: tuple[int, int] | None = (0, 0)
            if device.state in (State.PRE_COPY, State.PRE_COPY_P2P):
                info = self._precopy_info(index)
            try:
                remaining: int | None = device.stop_copy_size()
            except Unsupported:
                remaining = None
            figures = convergence.device_progress(device.name, self._passes[index], info, remaining)
            dstats.initial_bytes, dstats.dirty_bytes = figures.initial_bytes, figures.dirty_bytes
            dstats.remaining_bytes = max(figures.stop_copy_bytes, figures.dirty_bytes)
            progress.append(figures)
        return progress

    def _precopy_info(self, index: int) -> tuple[int, int] | None:
        """The device's (initial, dirty) bytes; None when it does not offer them."""
        try:
            return self.devices[index].precopy_info()
        except Unsupported:
            return None

    def _initial_sent(self, index: int) -> bool:
        """Whether the device's initial data is sent (switchover-ack's announcement)."""
        return convergence.initial_sent(self._passes[index], self._precopy_info(index))

    def _estimate(self, progress: list[DeviceProgress]) -> convergence.Estimate:
        rate = self._meter.sample(self.stats.transferred_bytes)
        self.stats.bandwidth = rate
        # One reading of every channel's kernel queue serves the meter and the pipe.
        delivered, in_pipe = (0, 0) if self._session is None else self._session.delivery()
        if self.params.switchover_bandwidth is not None:
            assumed = self.params.switchover_bandwidth
        else:
            if self._session is not None:
                self._link_meter.sample(delivered, in_pipe)
            assumed = self._link_meter.rate()
            if (cap := self._cap()) is not None:
                assumed = min(assumed, cap)
        self.stats.switchover_bandwidth = assumed
        # Rounds of arcs, each costing about what entering PRE_COPY cost: quiesce and
        # stop here, load (RESUMING -> STOP) and resume there (through RUNNING_P2P with
        # p2p); and the window's crossings of the link (WINDOW_ROUND_TRIPS round trips).
        rtt_s = self.stats.rtt_ms / 1e3
        rounds = 5 if self.params.p2p else 3
        cost = window.window_cost(
            len(self.devices),
            self._arc_overhead_s,
            rounds,
            WINDOW_ROUND_TRIPS * rtt_s,
            self._window_history,
        )
        self._window_cost = cost
        syncing = convergence.dirtied_while_syncing(self.stats.dirty_rate, in_pipe, assumed, rtt_s)
        est = convergence.estimate(progress, assumed, cost, syncing)
        self.stats.expected_downtime_ms = est.expected_downtime_s * 1e3
        self.stats.expected_downtime_parts_ms = convergence.expected_parts_ms(est, cost)
        return est

    def _sample(
        self,
        progress: list[DeviceProgress],
        previous: list[DeviceProgress] | None,
        est: convergence.Estimate,
    ) -> None:
        now = time.monotonic()
        read = list(self._read_bytes)
        if previous is not None and self._last_sample is not None:
            # Bytes dirtied = growth of what is pending + what was read meanwhile (a
            # read lowers the pending figures by what it carries).
            then, read_then = self._last_sample
            produced = 0
            for after, before, read_now, read_before in zip(
                progress, previous, read, read_then, strict=True
            ):
                growth = after.initial_bytes + after.dirty_bytes
                growth -= before.initial_bytes + before.dirty_bytes
                produced += max(0, growth + read_now - read_before)
            if now > then:
                self.stats.dirty_rate = produced / (now - then)
        self._last_sample = (now, read)
        self.stats.history.append(
            IterationSample(
                t_s=self.stats.elapsed_s(),
                pending_bytes=est.remaining_bytes,
                dirty_bytes=sum(p.dirty_bytes for p in progress),
                bandwidth=est.bandwidth,
                expected_downtime_ms=est.expected_downtime_s * 1e3,
            )
        )
        self._notify()

    async def _precopy_reader(self, index: int) -> None:
        """Stream one device's pre-copy data until told to stop; never loses a read chunk."""
        device = self.devices[index]
        dstats = self.stats.devices[index]
        channel = device.save_channel()
        session = self._session
        assert session is not None
        passes = self._passes[index]
        announce = self._want_ack
        busy = False
        try:
            while not self._stop_readers.is_set():
                if announce and self._initial_sent(index):
                    await session.send_chunk(Tag.INITIAL_DATA_SENT, index, ())
                    announce = False
                await self._pacer.wait(self._stop_readers)
                if self._stop_readers.is_set():
                    break
                chunk = await channel.read()
                if chunk is None:
                    passes.pause()
                    if busy:
                        self._link.stop()
                        busy = False
                    if announce and self._initial_sent(index):
                        continue  # announce before a wait that may be long
                    await _first_of(channel.wait_readable(), self._stop_readers.wait())
                    continue
                self._read_bytes[index] += sum(memoryview(part).nbytes for part in chunk)
                if not busy:
                    self._link.start()
                    busy = True
                sent = await session.send_chunk(Tag.PRECOPY_DATA, index, chunk)
                passes.read(sent)
                dstats.precopy_bytes += sent
                self._link.add(sent)
                if self._link_meter.due():
                    self._link_meter.sample(*session.delivery())
        except Exception as exc:
            self._reader_error = self._reader_error or exc
            self._wakeup.set()
            raise
        finally:
            if busy:
                self._link.stop()

    async def _receive(self) -> None:
        """Dispatch what the destination sends; a link failure wakes whoever waits."""
        assert self._session is not None
        try:
            while True:
                frame = await self._session.recv()
                if frame.tag == Tag.SYNC_ACK:
                    self._synced.set()
                elif frame.tag == Tag.SWITCHOVER_ACK:
                    if not self._ack.is_set():  # a peer repeating it gets one line
                        self.log.info("switchover_ack_received")
                    self._ack.set()
                    self._wakeup.set()
                elif frame.tag == Tag.VERDICT:
                    verdict = Verdict.parse(frame.fields())
                    if verdict.stage != "failed":
                        if verdict.stage != self._expected_verdict:
                            raise transport.ProtocolError(
                                "verdict",
                                f"{verdict.stage!r} when none was asked for"
                                if self._expected_verdict is None
                                else f"{verdict.stage!r} when {self._expected_verdict!r} was due",
                            )
                        self._expected_verdict = None
                    self._verdicts.put_nowait(verdict)
                    if verdict.stage == "failed":
                        # Keep the destination's reason, not the hang-up that follows it.
                        self._link_error = _destination_failure(verdict)
                        self._wakeup.set()
                        return
                else:
                    raise transport.ProtocolError(
                        f"unexpected {frame.tag.name} from the destination"
                    )
        except Exception as exc:
            self._link_error = exc
            self._verdicts.put_nowait(exc)
            self._wakeup.set()

    def _raise_background_errors(self) -> None:
        """Raise what a background task or a cancel asked for, after every wait.

        The cancel check matters: Python 3.11's ``wait_for`` swallows a cancellation
        that arrives as its inner wait completes, so ``cancel()`` alone can be lost.
        """
        if self._cancel_reason is not None and self.phase in REVERSIBLE_PHASES:
            raise MigrationCancelled(self._cancel_reason)
        for error in (self._link_error, self._reader_error):
            if isinstance(error, MigrationError):
                raise error
            if error is not None:
                raise MigrationError(_describe(error)) from error

    async def _switchover(self) -> None:
        if self.params.pause_before_switchover:
            self._set_phase(Phase.PAUSED)
            self.log.info("paused_before_switchover")
            await self._wait_continue()
        limit_s = self.params.downtime_limit_ms / 1000
        bound_s = self.params.stop_bound_s
        est = self._estimate(self._progress())
        if self.params.hard_downtime_limit and est.expected_downtime_s > limit_s:
            raise DowntimeExceeded(
                f"switchover would take about {est.expected_downtime_s * 1e3:.0f} ms, over "
                f"the hard limit of {self.params.downtime_limit_ms:g} ms; raise the limit "
                "or the bandwidth and retry"
            )
        self._set_phase(Phase.SWITCHOVER)
        # The fences (an fsync on each host), then two barriers. Through the fences and
        # the first barrier the readers still stream: the destination catches up with
        # its backlog while what the devices dirty meanwhile keeps crossing, instead of
        # piling up for the window (at 200 MB/s those 3-6 ms were 1-1.4 MB of
        # stop-copy). The second, after the readers stopped, waits only for what they
        # sent since.
        if self._on_fence is not None:
            self._on_fence([d.name for d in self.devices])
        await self._sync()
        await self._stop_precopy_readers()
        await self._sync()
        # The devices' last figures before they stop (the stats' final pending bytes);
        # a model also runs its workload up to now here, not in the quiesce arc.
        self._progress()
        self.stats.switchover_at_s = self.stats.elapsed_s()
        self._source_marks = {d.name: {} for d in self.devices}
        clock = DowntimeClock()
        self._clock = clock
        start = clock.begin()
        # The bound on the stop holds whatever the link does: past it, roll back.
        deadline = start + bound_s
        assert self._session is not None
        try:
            async with asyncio.timeout_at(_loop_time_of(deadline)):
                await self._stop_and_drain(clock)
                loaded = await self._verdict("loaded")
                self._raise_background_errors()  # a cancel that raced the verdict wins
                if (lost := self._session.error) is not None:
                    # The link failed in this very turn, before the receiver saw it:
                    # COMMIT cannot leave, so this is still a certain rollback.
                    raise MigrationError(f"lost the destination: {_describe(lost)}") from lost
            if time.monotonic() > deadline:
                raise TimeoutError
        except TimeoutError:
            self._learn_window(clock.elapsed_s())  # at least this long: teach the next one
            if self.params.hard_downtime_limit:
                raise DowntimeExceeded(
                    f"switchover passed the hard downtime limit of "
                    f"{self.params.downtime_limit_ms:g} ms before the destination had loaded "
                    "the state; the source runs again. Raise the limit or the bandwidth and "
                    "retry"
                ) from None
            raise MigrationError(
                f"the destination had not loaded the state {bound_s * 1e3:g} ms after the "
                f"devices stopped (max_stop_ms): the link to {self.destination} or the "
                "destination is stalled or slower than estimated; the source runs again"
            ) from None
        self._phases.set(Phase.COMMITTED, in_window=True)
        self._expected_verdict = "resumed"
        timeout = self.params.verdict_timeout_s
        commit = self._session.control_written()
        try:
            # A timer, not a task: the send is inside the window, and with the peer alive
            # but not reading its wait for the write buffer to drain would never end.
            async with asyncio.timeout(timeout):
                await self._session.send_control(Tag.COMMIT)
        except TimeoutError:
            why = f"COMMIT was not taken by the link within {timeout:g} s (verdict_timeout_s)"
            self._withdraw_commit(commit, why)
            raise OutcomeUnknown(f"{why}; {UNKNOWN_ADVICE}") from None
        self._phases.announce()
        try:
            resumed = await self._verdict("resumed")
        except MigrationError as exc:
            why = f"no word from the destination after telling it to resume ({exc})"
            self._withdraw_commit(commit, why)
            raise OutcomeUnknown(f"{why}; {UNKNOWN_ADVICE}") from exc
        self._account_downtime(clock, loaded, resumed)
        failed = resumed.failed_devices()
        if failed:
            self.stats.placement = {
                d.name: f"stopped on the destination: {failed[d.name]}"
                if d.name in failed
                else "destination"
                for d in self.devices
            }
            raise SplitOutcome(
                "split outcome: after COMMIT the destination could not resume "
                + "; ".join(f"{n} ({why})" for n, why in failed.items())
                + "; they stay stopped there with their state, the other devices run on the "
                "destination, and the source devices stay stopped",
                failed,
            )

    async def _stop_precopy_readers(self) -> None:
        """End pre-copy streaming; a reader never stops between reading and sending.

        A reader whose read or send never returns (a device that does not answer) would
        hold the switchover forever: past verdict_timeout_s it fails, and the rollback
        cancels the readers.
        """
        self._stop_readers.set()
        if not self._readers:
            return
        timeout = self.params.verdict_timeout_s
        _, stuck = await asyncio.wait(self._readers, timeout=timeout)
        if stuck:
            names = ", ".join(t.get_name().removeprefix("precopy-") for t in stuck)
            raise MigrationError(
                f"the pre-copy reader of {names} did not stop within {timeout:g} s "
                "(verdict_timeout_s): its device's read or the link is stuck"
            )
        errors = [e for t in self._readers if not t.cancelled() and (e := t.exception())]
        if errors:
            raise MigrationError(f"pre-copy stream failed: {_describe(errors[0])}")

    async def _sync(self) -> None:
        """Wait until the destination has taken in everything sent so far.

        Done before the devices stop, so the downtime window starts with an empty pipe:
        otherwise the pre-copy data still in socket and receive buffers (tens of MB on
        loopback) would be loaded inside the window.
        """
        session = self._session
        assert session is not None
        started = time.monotonic()
        self._synced.clear()

        async def barrier() -> None:
            # The send is in the bound too: with the peer alive but not reading, its
            # wait for the write buffer to drain would never end.
            await session.send_control(Tag.SYNC)
            await self._synced.wait()

        try:
            await asyncio.wait_for(
                _first_of(barrier(), self._wakeup_on_error()), self.params.verdict_timeout_s
            )
        except TimeoutError:
            raise MigrationError(
                f"destination did not catch up within {self.params.verdict_timeout_s:g} s "
                "(verdict_timeout_s)"
            ) from None
        self._raise_background_errors()
        self.log.info("destination_synced", wait_ms=round((time.monotonic() - started) * 1e3, 3))

    async def _wait_continue(self) -> None:
        """Paused before the switchover: the devices run and stream on, so keep sampling.

        Each iteration_s the figures are taken as in pre-copy (an iteration, a
        MIGRATION_PASS) without a convergence decision, until ``continue`` or an error.
        An iteration that sent nothing (devices that dirty nothing) sends an empty data
        frame: a destination gives up after idle_timeout_s without a frame, and a pause
        may last as long as the operator likes. Not while bytes wait in our buffers: they
        say the same once the destination reads, and a send behind them would wait on a
        destination that reads nothing, and the pause would take no ``continue``.
        """
        previous: list[DeviceProgress] | None = None
        sent = self.stats.transferred_bytes
        while not self._continue.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    _first_of(self._continue.wait(), self._wakeup_on_error()),
                    self.params.iteration_s,
                )
            self._raise_background_errors()
            if self._continue.is_set():
                return
            self.stats.iterations += 1
            if (
                self.stats.transferred_bytes == sent
                and self._session is not None
                and self._session.backlog() == 0
            ):
                await self._session.send_chunk(Tag.PRECOPY_DATA, 0, ())
            sent = self.stats.transferred_bytes
            progress = self._progress()
            self._sample(progress, previous, self._estimate(progress))
            previous = progress

    def _withdraw_commit(self, commit: int, why: str) -> None:
        """Raise the MigrationError that rolls back after all when COMMIT provably never
        left this host: every byte of it (written after the ``commit`` mark) still in our
        own write buffer, and the connection then shut for writing, so nothing queued
        leaves any more and the destination cannot have committed. Returns when that
        cannot be proven: the outcome stays unknown."""
        assert self._session is not None
        if not self._session.withdraw_control(commit):
            return
        self._phases.set(Phase.SWITCHOVER, in_window=True)  # before the point of no return
        self.log.warning("commit_withdrawn", reason=why)
        raise MigrationError(
            f"{why}; COMMIT never left this host (it was still whole in our write buffer, "
            "dropped with the connection), so the destination cannot run the devices and "
            "the source runs them again"
        )

    async def _wakeup_on_error(self) -> None:
        while self._link_error is None and self._reader_error is None:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _stop_and_drain(self, clock: DowntimeClock) -> None:
        """Quiesce all, stop all, drain every channel, then mark the end of the stream."""
        self._phases.hold()  # reports of the devices' changes wait for the window's end
        if self.params.p2p:
            await self._transition(self._quiescible, _quiesced, mark=Downtime.QUIESCE)
        clock.mark(Downtime.QUIESCE)
        await self._transition(self.devices, State.STOP_COPY, mark=Downtime.STOP)
        clock.mark(Downtime.STOP)
        # Models one after the other in this task (a task each cost more than a model's
        # drain), the others overlapped: fanout.each. Each drain ends before any error counts.
        drained = await fanout.each(self.devices, self._drain)
        if failed := [e for e in drained if isinstance(e, BaseException)]:
            raise failed[0]
        assert self._session is not None
        self._expected_verdict = "loaded"
        await self._session.send_control(Tag.END_OF_STREAM)
        clock.mark(Downtime.DRAIN)

    async def _drain(self, device: MigratableDevice) -> None:
        index = self._index[device.name]
        dstats = self.stats.devices[index]
        channel = device.save_channel()
        session = self._session
        assert session is not None
        started = time.monotonic()
        while True:
            chunk = await channel.read()
            if chunk is None:
                # Only PRE_COPY states may say "nothing now"; a device doing so in
                # STOP_COPY breaks the uAPI, so wait for it rather than lose data.
                await channel.wait_readable()
                continue
            if not chunk:
                break
            dstats.stopcopy_bytes += await session.send_chunk(Tag.STOPCOPY_DATA, index, chunk)
        await session.send_end_of_device(index)
        self._source_marks[device.name][Downtime.DRAIN] = (time.monotonic() - started) * 1e3

    async def _verdict(self, stage: str) -> Verdict:
        timeout = self.params.verdict_timeout_s
        try:
            async with asyncio.timeout(timeout):  # a timer, not wait_for's task: in the window
                answer = await self._verdicts.get()
        except TimeoutError:
            raise MigrationError(
                f"destination gave no verdict within {timeout:g} s (verdict_timeout_s)"
            ) from None
        if isinstance(answer, BaseException):
            raise MigrationError(f"lost the destination: {_describe(answer)}") from answer
        if answer.stage == "failed":
            raise _destination_failure(answer)
        if answer.stage != stage:
            raise transport.ProtocolError(f"expected verdict {stage!r}, got {answer.stage!r}")
        return answer

    def _account_downtime(self, clock: DowntimeClock, loaded: Verdict, resumed: Verdict) -> None:
        """Put the destination's marks on our clock and fill in the downtime breakdown."""
        offset, now = self._clock_offset, time.monotonic()
        peer = loaded.marks | resumed.marks
        for phase in (Downtime.WIRE, Downtime.LOAD, Downtime.COMMIT, Downtime.RESUME):
            if phase in peer:
                # The peer's word, no later than it reached us (min(now, NaN) is now): a
                # mark far late would be reported, and learned by the window history.
                clock.mark(phase, min(now, peer[phase] - offset))
        self.stats.downtime_breakdown_ms = clock.breakdown_ms()
        self.stats.window_round_trips = WINDOW_ROUND_TRIPS
        self.stats.downtime_ms = clock.total_ms()
        if self.stats.downtime_ms is not None:
            self._learn_window(self.stats.downtime_ms / 1e3)
        for name, (devices, spans) in self._arc_spans.items():
            for device, span in zip(devices, spans, strict=True):
                self._source_marks[device.name][name] = (span[1] - span[0]) * 1e3
        for dstats in self.stats.devices:
            source_side = self._source_marks.get(dstats.name, {})
            dest_side = loaded.device_marks.get(dstats.name, {}) | resumed.device_marks.get(
                dstats.name, {}
            )
            dstats.downtime_ms = source_side | dest_side

    def _learn_window(self, downtime_s: float) -> None:
        """Tell the process's window history what this window took against its estimate."""
        history, cost = self._window_history, self._window_cost
        if history is not None and cost is not None:
            stopcopy = sum(d.stopcopy_bytes for d in self.stats.devices)
            history.observe(cost, downtime_s, stopcopy, self.stats.switchover_bandwidth)

    async def _finish(self) -> None:
        """Release the source devices: STOP_COPY -> STOP, outside the downtime window.

        The workload already runs on the destination, so a device that fails to leave
        STOP_COPY is reported but changes nothing: the migration completed. A cancel
        (daemon shutdown) waits for the release and the session's close (bounded by its
        timeout), so the end is reported as it is; it propagates after.
        """
        releasing = asyncio.ensure_future(self._release())
        cancelled = await wait_out(releasing)
        releasing.result()
        self._end_clock()
        self.stats.outcome = "destination"
        self.stats.placement = {d.name: "destination" for d in self.devices}
        self._set_phase(Phase.COMPLETED)
        self.log.info(
            "migration_completed",
            downtime_ms=self.stats.downtime_ms,
            breakdown_ms=self.stats.downtime_breakdown_ms,
            total_ms=self.stats.total_ms,
            iterations=self.stats.iterations,
            transferred_bytes=self.stats.transferred_bytes,
        )
        if cancelled:
            raise asyncio.CancelledError

    async def _release(self) -> None:
        """The source devices to STOP (a failure only logged), then the session closed."""
        try:
            await self._transition(self.devices, State.STOP)
        except MigrationError as exc:
            self.log.error("source_release_failed", error=str(exc))
        await self._close_session()

    # -- device transitions --------------------------------------------------------------

    async def _transition(
        self,
        devices: Sequence[MigratableDevice],
        target: State | Callable[[MigratableDevice], State],
        *,
        mark: str = "",
    ) -> list[fanout.Span]:
        """Move devices in parallel; shielded so a cancel never interrupts an arc midway.

        Returns when each device's arc ran; with ``mark``, those times become the
        devices' marks of that phase once the window closed (work there is downtime).
        """
        results: Sequence[fanout.Span | BaseException]
        if self._models:
            # Nothing to shield: the arcs run to their end before anything else can.
            results = fanout.walk(devices, target)
        else:
            self._inflight = asyncio.ensure_future(fanout.move(devices, target))
            results = await asyncio.shield(self._inflight)
        spans = [r for r in results if not isinstance(r, BaseException)]
        if len(spans) < len(results):
            failure = next(r for r in results if isinstance(r, BaseException))
            raise MigrationError(_describe(failure)) from failure
        if mark:
            self._arc_spans[mark] = (devices, spans)
        return spans

    async def _fail(self, error: MigrationError) -> MigrationStats:
        """Roll back (unless committed), record why, and raise ``error``.

        Past COMMIT every error is an OutcomeUnknown (unless a SplitOutcome) that says
        what the operator must do: a cancel or a crash there rolls nothing back.
        """
        if self.phase not in REVERSIBLE_PHASES and not isinstance(
            error, OutcomeUnknown | SplitOutcome
        ):
            unknown = OutcomeUnknown(f"after COMMIT: {error}; {UNKNOWN_ADVICE}")
            unknown.__cause__ = error
            error = unknown
        self.stats.error = str(error)
        self.log.error("migration_failed", reason=str(error), error_type=type(error).__name__)
        try:
            if self.phase in REVERSIBLE_PHASES:
                notes = await self._rollback()
                self.stats.outcome = "source"
                self.stats.placement = {d.name: notes.get(d.name, "source") for d in self.devices}
            else:
                await self._stop_background()
                if self._session is not None:
                    self._session.abort()
                # Keep them stopped but release the data sessions.
                with contextlib.suppress(MigrationError):
                    await self._transition(self.devices, State.STOP)
                if isinstance(error, SplitOutcome):
                    self.stats.outcome = "split"
                else:
                    self.stats.outcome = "unknown"
                    self.stats.placement = {
                        d.name: "unknown: stopped here, the destination may run it"
                        for d in self.devices
                    }
        finally:
            # Even when a bug broke the rollback: the migration ends, its window closes.
            self._end_clock()
            cancelled = isinstance(error, MigrationCancelled)
            self._set_phase(Phase.CANCELLED if cancelled else Phase.FAILED)
        raise error

    async def _stop_background(self) -> None:
        self._stop_readers.set()
        tasks = [*self._readers, *([self._receiver] if self._receiver else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _rollback(self) -> dict[str, str]:
        """Every source device back to RUNNING in P2P order; tell the destination to give up.

        Returns the devices that had to be reset (their state is lost), with why.
        """
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)
        await self._stop_background()
        for device in self.devices:
            if device.can_throttle():
                device.set_throttle(0.0)
        # The devices first: COMMIT was not sent, so the destination cannot run them, and
        # the goodbye waits on the link (a second and more when it stalls with data
        # unsent), which would all be stop time past max_stop_ms.
        notes = await resume_in_order(self.devices, self.log)
        self.log.info("source_devices_restored", reset=notes)
        if self._session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._session.cancel(self.stats.error or "failed"), 2.0)
            self._session.abort()
        return notes

    async def _close_session(self) -> None:
        await self._stop_background()
        if self._session is not None:
            await self._session.close()

    def _end_clock(self) -> None:
        """Total time, and the bandwidth as the average over the whole migration."""
        elapsed = self.stats.elapsed_s()
        self.stats.total_ms = elapsed * 1e3
        self.stats.end_cpu()
        self.stats.bandwidth = self.stats.transferred_bytes / elapsed if elapsed > 0 else 0.0

    def _phase_changed(self, old: Phase, new: Phase) -> None:
        status = STATUS_OF[new]
        if old is not Phase.NEW and status == STATUS_OF[old]:
            return
        self.stats.status = status
        self.log.info("status_changed", status=status.value)
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener(self.stats)
            except Exception:  # an observer's bug must not stop a migration halfway
                self.log.exception("listener_failed", listener=repr(listener))


async def _first_of(*waits: Awaitable[Any]) -> None:
    """Return when the first of ``waits`` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


#: Where the quiesce takes a device from PRE_COPY, and from anywhere else. Looked up
#: once: a State member read through its class costs 70 ns (Python 3.11), per device.
_QUIESCED_FROM_PRECOPY, _QUIESCED = State.PRE_COPY_P2P, State.RUNNING_P2P
_PRE_COPY = State.PRE_COPY


def _quiesced(device: MigratableDevice) -> State:
    """Where the quiesce takes a device: its P2P state, keeping a pre-copy session."""
    return _QUIESCED_FROM_PRECOPY if device.state == _PRE_COPY else _QUIESCED


def _covered(spans: list[fanout.Span]) -> float:
    """The length of the union of ``(start, end)`` spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _destination_failure(verdict: Verdict) -> DestinationFailed:
    where = f" (device {verdict.device})" if verdict.device else ""
    return DestinationFailed(f"destination failed{where}: {verdict.reason}")


def _loop_time_of(deadline: float | None) -> float | None:
    """Convert a time.monotonic() deadline to the running loop's clock."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _describe(exc: BaseException) -> str:
    """A one-line reason naming the error's kind when its text does not say enough."""
    text = str(exc)
    return text if text else type(exc).__name__

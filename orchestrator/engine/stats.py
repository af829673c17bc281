"""Migration statistics and the downtime clock, readable at any time (QEMU's query-migrate).

Downtime starts at the first source arc out of full operation (PRE_COPY ->
PRE_COPY_P2P, or the STOP_COPY arc with P2P off) and ends when the last destination
device is RUNNING. Destination timestamps come back in its verdicts and are placed on
the source's monotonic clock: exactly when both daemons share a boot (one clock), else
through the offset measured by the handshake's round trips, whose uncertainty is
reported.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections import deque
from typing import Any


class Status(enum.StrEnum):
    """Where a migration is; the names QEMU's query-migrate uses."""

    #: Connecting, handshake, devices entering PRE_COPY.
    SETUP = "setup"
    #: Pre-copy iterations while the devices run.
    ACTIVE = "active"
    #: Waiting for the user's go-ahead before the switchover.
    PRE_SWITCHOVER = "pre-switchover"
    #: The switchover: devices quiesced, stopped, drained and loaded.
    DEVICE = "device"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class Downtime(enum.StrEnum):
    """The phases of the downtime window, in order; each ends at the mark of its name."""

    #: The source devices quiesced (no P2P DMA), still holding their state.
    QUIESCE = "quiesce"
    #: The source devices stopped.
    STOP = "stop"
    #: The rest of their state read out (stop-copy) and sent.
    DRAIN = "drain"
    #: The last byte arrived at the destination.
    WIRE = "wire"
    #: The destination devices loaded the state (in STOP).
    LOAD = "load"
    #: COMMIT arrived at the destination.
    COMMIT = "commit"
    #: The destination devices run.
    RESUME = "resume"


#: Phases of the downtime window, in order.
DOWNTIME_PHASES = tuple(Downtime)


class RateMeter:
    """Bytes per second over windows of at least ``window_s``."""

    def __init__(self, window_s: float = 0.1) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()
        self.rate = 0.0

    def sample(self, total_bytes: int, now: float | None = None) -> float:
        """Record the running total; return the rate over the newest full window."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, total_bytes))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        start, first = self._samples[0]
        if now - start >= self.window_s:
            self.rate = (total_bytes - first) / (now - start)
        return self.rate


class LinkMeter:
    """The link's rate, from what the peer acknowledged while the link was the bottleneck.

    Bytes handed to a socket say little on a capped link: the kernel accepts megabytes
    at memory speed and sends them at line rate, so a rate of bytes sent counts the
    buffers in. Here every sample reads what the peer has acknowledged and what still
    waits unacknowledged; while at least ``SATURATED`` bytes waited at both ends of an
    interval, the link (or the peer) set the pace throughout, and the bytes
    acknowledged over such intervals per their duration is the link's rate. Until a
    link was seen saturated (a link faster than the devices yield, e.g. loopback), the
    rate falls back to ``fallback``'s.
    """

    #: Unacknowledged bytes that mean the link, not the sender, sets the pace.
    SATURATED = 256 * 1024
    #: Saturated time needed before the measure is trusted over the fallback.
    MIN_SECONDS = 0.05

    #: Shortest time between two samples (each reads every channel's kernel queue).
    INTERVAL = 0.005

    def __init__(self, fallback: BusyMeter) -> None:
        self.fallback = fallback
        self._last: tuple[float, int, int] | None = None
        self._bytes = 0
        self._seconds = 0.0

    def due(self) -> bool:
        """Whether a sample would be INTERVAL after the last one."""
        return self._last is None or time.monotonic() - self._last[0] >= self.INTERVAL

    def sample(self, delivered: int, waiting: int) -> None:
        """Record the peer's acknowledged total and what waits, now."""
        now = time.monotonic()
        if self._last is not None:
            then, delivered_then, waiting_then = self._last
            if min(waiting, waiting_then) >= self.SATURATED and delivered >= delivered_then:
                self._bytes += delivered - delivered_then
                self._seconds += now - then
        self._last = (now, delivered, waiting)

    def measured(self) -> float | None:
        """Bytes per second of the saturated link; None until it was seen saturated."""
        if self._seconds >= self.MIN_SECONDS:
            return self._bytes / self._seconds
        return None

    def rate(self) -> float:
        """Bytes per second of the saturated link, else the fallback's rate."""
        measured = self.measured()
        return self.fallback.rate() if measured is None else measured


class BusyMeter:
    """Throughput while the stream had data to carry: bytes over busy time.

    The stream only carries what the devices yield, so bytes per wall-clock second
    measures the devices once they idle, not the link. QEMU's iterations keep its
    sender busy; here the readers report when they start and stop having data, and the
    link's rate is what moved while at least one of them had some.
    """

    def __init__(self) -> None:
        self._active = 0
        self._since = 0.0
        self._busy_s = 0.0
        self._bytes = 0

    def start(self) -> None:
        """A reader has data to send."""
        if self._active == 0:
            self._since = time.monotonic()
        self._active += 1

    def stop(self) -> None:
        """A reader has nothing more for now."""
        self._active -= 1
        if self._active == 0:
            self._busy_s += time.monotonic() - self._since

    def add(self, nbytes: int) -> None:
        """Bytes sent while busy."""
        self._bytes += nbytes

    def rate(self) -> float:
        """Bytes per busy second so far; 0.0 before anything was measured."""
        busy = self._busy_s + (time.monotonic() - self._since if self._active else 0.0)
        return self._bytes / busy if busy > 0 else 0.0


@dataclasses.dataclass(slots=True)
class DeviceStats:
    """Per-device counters of one migration."""

    name: str
    kind: str
    precopy_bytes: int = 0
    stopcopy_bytes: int = 0
    initial_bytes: int = 0
    dirty_bytes: int = 0
    remaining_bytes: int = 0
    #: Per-device share of the downtime window, in ms (source and destination arcs).
    downtime_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def transferred_bytes(self) -> int:
        """Everything this device put on the wire."""
        return self.precopy_bytes + self.stopcopy_bytes

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return {
            "name": self.name,
            "kind": self.kind,
            "transferred_bytes": self.transferred_bytes,
            "precopy_bytes": self.precopy_bytes,
            "stopcopy_bytes": self.stopcopy_bytes,
            "initial_bytes": self.initial_bytes,
            "dirty_bytes": self.dirty_bytes,
            "remaining_bytes": self.remaining_bytes,
            "downtime_ms": {k: round(v, 3) for k, v in self.downtime_ms.items()},
        }


@dataclasses.dataclass(slots=True)
class IterationSample:
    """One pre-copy iteration, kept for plots of convergence."""

    t_s: float
    pending_bytes: int
    dirty_bytes: int
    bandwidth: float
    expected_downtime_ms: float


@dataclasses.dataclass(slots=True)
class MigrationStats:
    """The live state of one migration; ``as_dict`` is the query-migrate answer."""

    migration_id: str
    destination: str
    devices: list[DeviceStats]
    status: Status = Status.SETUP
    started_at: float = dataclasses.field(default_factory=time.time)
    started_mono: float = dataclasses.field(default_factory=time.monotonic)
    #: This process's CPU seconds (user + system, all threads) when the migration began.
    started_cpu: float = dataclasses.field(default_factory=time.process_time)
    #: CPU seconds this process spent during the migration, set when it ends: what
    #: moving the devices cost the host's workload (the whole daemon, so a concurrent
    #: migration or control traffic is counted too).
    cpu_s: float | None = None
    setup_ms: float | None = None
    total_ms: float | None = None
    iterations: int = 0
    bandwidth: float = 0.0
    switchover_bandwidth: float = 0.0
    dirty_rate: float = 0.0
    expected_downtime_ms: float | None = None
    #: What the expected downtime is made of, in ms: the transfer of the pending bytes
    #: and the window's fixed work (see ``window.WindowCost.parts_ms``).
    expected_downtime_parts_ms: dict[str, float | None] = dataclasses.field(default_factory=dict)
    downtime_ms: float | None = None
    downtime_breakdown_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    clock_offset_uncertainty_ms: float = 0.0
    #: The best round trip to the destination measured at setup.
    rtt_ms: float = 0.0
    #: Round trips over the link inside the downtime window (once it switched over).
    window_round_trips: float | None = None
    throttle: float = 0.0
    forced: bool = False
    error: str | None = None
    verified: bool | None = None
    history: deque[IterationSample] = dataclasses.field(
        default_factory=lambda: deque(maxlen=10_000)
    )
    switchover_at_s: float | None = None
    #: Where the workload runs once it ended: "source", "destination", "unknown" (the
    #: link died after COMMIT) or "split" (some devices did not resume after COMMIT).
    outcome: str | None = None
    #: Device name -> where it runs ("source", "destination") or why it runs nowhere.
    placement: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def transferred_bytes(self) -> int:
        """Bytes of device state put on the wire so far."""
        return sum(d.transferred_bytes for d in self.devices)

    @property
    def remaining_bytes(self) -> int:
        """What the devices estimate is still to move."""
        return sum(d.remaining_bytes for d in self.devices)

    def elapsed_s(self) -> float:
        """Seconds since the migration started."""
        return time.monotonic() - self.started_mono

    def end_cpu(self) -> None:
        """Record the CPU seconds spent since the migration started."""
        self.cpu_s = time.process_time() - self.started_cpu

    @property
    def cpu_s_per_gb(self) -> float | None:
        """CPU seconds per 10**9 bytes moved; None until the end, or if nothing moved."""
        moved = self.transferred_bytes
        return None if self.cpu_s is None or not moved else self.cpu_s / (moved / 1e9)

    def as_dict(self, *, history: bool = False) -> dict[str, Any]:
        """Plain values for JSON; the same fields for ``migrate --json`` and ``bench --json``."""

        def ms(value: float | None) -> float | None:
            """Rounded milliseconds; None when unknown (JSON has no infinity)."""
            return None if value is None or not math.isfinite(value) else round(value, 3)

        per_gb = self.cpu_s_per_gb
        answer: dict[str, Any] = {
            "migration_id": self.migration_id,
            "destination": self.destination,
            "status": self.status.value,
            "outcome": self.outcome,
            "placement": self.placement,
            "started_at": self.started_at,
            "setup_ms": ms(self.setup_ms),
            "total_ms": ms(self.total_ms if self.total_ms is not None else self.elapsed_s() * 1e3),
            "iterations": self.iterations,
            "transferred_bytes": self.transferred_bytes,
            "remaining_bytes": self.remaining_bytes,
            "total_bytes": self.transferred_bytes + self.remaining_bytes,
            "bandwidth_bps": round(self.bandwidth),
            "switchover_bandwidth_bps": round(self.switchover_bandwidth),
            "dirty_rate_bps": round(self.dirty_rate),
            "expected_downtime_ms": ms(self.expected_downtime_ms),
            "expected_downtime_parts_ms": dict(self.expected_downtime_parts_ms),
            "downtime_ms": ms(self.downtime_ms),
            "downtime_breakdown_ms": {
                k: round(v, 3) for k, v in self.downtime_breakdown_ms.items()
            },
            "clock_offset_uncertainty_ms": round(self.clock_offset_uncertainty_ms, 3),
            "rtt_ms": round(self.rtt_ms, 3),
            "window_round_trips": self.window_round_trips,
            "throttle": self.throttle,
            "forced": self.forced,
            "error": self.error,
            "verified": self.verified,
            "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 4),
            "cpu_s_per_gb": None if per_gb is None else round(per_gb, 4),
            "devices": [d.as_dict() for d in self.devices],
        }
        if history:
            answer["history"] = [dataclasses.asdict(s) for s in self.history]
            answer["switchover_at_s"] = self.switchover_at_s
        return answer


class DowntimeClock:
    """Marks of the switchover on the source's clock, turned into a breakdown."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.marks: dict[str, float] = {}

    def begin(self) -> float:
        """The first arc out of full operation is about to run: downtime starts."""
        self.start = time.monotonic()
        return self.start

    def mark(self, phase: str, at: float | None = None) -> None:
        """Record the end of ``phase`` (a name from DOWNTIME_PHASES)."""
        if phase not in DOWNTIME_PHASES:
            raise ValueError(f"unknown downtime phase {phase!r}")
        self.marks[phase] = time.monotonic() if at is None else at

    def elapsed_s(self) -> float:
        """Seconds since downtime began (0 before it did)."""
        return 0.0 if self.start is None else time.monotonic() - self.start

    def breakdown_ms(self) -> dict[str, float]:
        """Duration of each marked phase, in order, from the previous mark."""
        if self.start is None:
            return {}
        result: dict[str, float] = {}
        previous = self.start
        for phase in DOWNTIME_PHASES:
            if phase in self.marks:
                at = max(self.marks[phase], previous)  # clock offset error never goes negative
                result[phase] = (at - previous) * 1e3
                previous = at
        return result

    def total_ms(self) -> float | None:
        """The whole window up to the last destination device RUNNING."""
        if self.start is None or Downtime.RESUME not in self.marks:
            return None
        return sum(self.breakdown_ms().values())

"""The downtime window's fixed work: what no amount of pre-copy reduces.

The window does work once whatever the device count (END_OF_STREAM, the "loaded"
verdict and COMMIT handled at each end, the gathers), and per device, one after another
on each end's event loop: the quiesce and stop arcs, the drain's read, its
STOPCOPY_DATA and END_OF_DEVICE frames, the destination's dispatch and write of them,
its load and resume arcs. Leaving the per-device work out predicted 5.1 ms for 64
devices whose window took 7.9-9.2 ms, so a tight limit, a hard ceiling, could be passed.
The rule, :func:`window_cost`:

* The arcs: ``rounds`` of them (quiesce, stop, load, resume), each costing what this
  migration's arcs into PRE_COPY cost (the union of their spans: one arc's length when
  the devices' arcs overlap in threads, their sum when models run one after the other),
  so devices whose arcs are slow raise the estimate as soon as they are seen.
* The rest: ``WINDOW_BASE_S`` once and ``DEVICE_WORK_S`` per device, this code's own
  cost measured on the project's 2-core machine while it was shared (see the
  constants). It depends on this code and the host, not on the devices' kind.
* What the defaults miss on a host (a slower or busier machine, a device whose stop arc
  saves far more than its arc into PRE_COPY showed): :class:`WindowHistory` compares
  each window with its prediction and scales the next predictions up by the smallest
  ratio of the last few, never down. A process's first migration has no history and
  relies on the defaults.

When in doubt this over-estimates: a switchover held back costs one more iteration of
total time; a window past the limit costs the workload its promised ceiling. The
convergence rule's floor test counts only the measured part (``WindowCost.measured_s``):
see ``convergence.at_floor`` for why.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

#: The window's work done once, whatever the device count, besides its round trips and
#: arcs. Measured with ``livemig bench --devices N --state-mib 4 --dirty-mbps 1
#: --downtime-limit-ms 300 --repeat 5`` for N = 1, 8 and 64 on the project's 2-core
#: machine, shared with other engineers' tests: the window's phases
#: (``downtime_breakdown_ms``) less the round trips, the arcs and the transfer,
#: extrapolated to no device, came to 0.5-0.6 ms.
WINDOW_BASE_S = 0.0006
#: Each device's work in the window besides its arcs, both ends together. From the same
#: runs, the phases' growth from 1 to 64 devices less the arcs' own: the drain (a read,
#: STOPCOPY_DATA and END_OF_DEVICE here, their dispatch and write there) 40 us a device
#: on a quiet machine and 75 us loaded, and the walks around the arcs about 8 us more.
#: This is the loaded end. (For simulated devices the arcs' proxy, five times their arc
#: into PRE_COPY, already charges about 40 us a device more than their switchover arcs
#: take: the sum stays above what the window took, loaded or not.)
DEVICE_WORK_S = 0.00008
#: How many windows :class:`WindowHistory` remembers.
WINDOW_HISTORY = 5
#: How long :class:`WindowHistory` remembers a window, in seconds: a prediction over the
#: limit means no switchover, so no new window to learn from; a slow stretch that ended
#: must not hold a daemon's migrations back for good.
WINDOW_MEMORY_S = 600.0


@dataclass(frozen=True, slots=True)
class WindowCost:
    """The switchover window's fixed work, in seconds: what no iteration reduces."""

    #: Once per window (END_OF_STREAM, the verdicts, COMMIT).
    base_s: float
    #: Per device (frames, dispatch, bookkeeping on both ends).
    device_s: float
    devices: int
    #: All rounds of arcs, as measured on this migration.
    arcs_s: float
    #: The link's crossings inside the window.
    round_trips_s: float
    #: What :class:`WindowHistory` learned: past windows' work (base, devices, arcs)
    #: ran this many times the prediction (1.0 without history; never below).
    scale: float = 1.0

    @property
    def measured_s(self) -> float:
        """What this migration measured, unscaled: its round trips and its arcs."""
        return self.round_trips_s + self.arcs_s

    @property
    def total_s(self) -> float:
        """The whole fixed cost: the round trips plus the scaled work."""
        return self.round_trips_s + self.scale * (
            self.base_s + self.devices * self.device_s + self.arcs_s
        )

    def parts_ms(self) -> dict[str, float]:
        """The parts in ms (each scaled as it counts), and the figures behind them."""
        return {
            "round_trips": round(self.round_trips_s * 1e3, 3),
            "arcs": round(self.scale * self.arcs_s * 1e3, 3),
            "base": round(self.scale * self.base_s * 1e3, 3),
            "devices": round(self.scale * self.devices * self.device_s * 1e3, 3),
            "per_device": round(self.scale * self.device_s * 1e3, 4),
            "scale": round(self.scale, 3),
        }


def window_cost(
    devices: int,
    arc_s: float,
    rounds: int,
    round_trips_s: float,
    history: WindowHistory | None = None,
) -> WindowCost:
    """The fixed cost of a window over ``devices`` devices, by the rule above.

    ``arc_s`` is one round of this migration's arcs as measured (the union of their
    spans); ``rounds`` how many rounds the window runs; ``round_trips_s`` its crossings
    of the link.
    """
    return WindowCost(
        base_s=WINDOW_BASE_S,
        device_s=DEVICE_WORK_S,
        devices=devices,
        arcs_s=rounds * arc_s,
        round_trips_s=round_trips_s,
        scale=1.0 if history is None else history.scale(),
    )


class WindowHistory:
    """How much longer than predicted this host's recent windows ran: the learned part.

    One per process that migrates (a daemon), shared by its migrations. After each
    window the source reports what it measured (a window cut short at the hard limit
    reports what it lasted, a lower bound); its fixed part (the downtime less the
    stop-copy bytes at the assumed bandwidth and less the round trips) over the work
    predicted is a ratio. The next predictions are scaled by the smallest ratio of the
    last ``WINDOW_HISTORY`` windows of the last ``WINDOW_MEMORY_S``, or 1 when that is
    smaller: the defaults are a floor and learning only raises them. The smallest,
    because a host or device that is slower than predicted is slower every time, while
    one window slowed by a burst of load would otherwise stop every migration whose
    limit it pushes the prediction past.
    """

    def __init__(self) -> None:
        self._ratios: deque[tuple[float, float]] = deque(maxlen=WINDOW_HISTORY)

    def observe(
        self,
        cost: WindowCost,
        downtime_s: float,
        stopcopy_bytes: int,
        bandwidth: float,
        *,
        now: float | None = None,
    ) -> None:
        """Record a window: its predicted ``cost``, the measured ``downtime_s``, and the
        ``stopcopy_bytes`` it moved at the assumed ``bandwidth``; ``now`` is monotonic."""
        work = cost.base_s + cost.devices * cost.device_s + cost.arcs_s
        if work <= 0 or bandwidth <= 0 or not math.isfinite(downtime_s):
            return
        fixed = downtime_s - stopcopy_bytes / bandwidth - cost.round_trips_s
        at = time.monotonic() if now is None else now
        self._ratios.append((at, max(0.0, fixed) / work))

    def _recent(self, now: float | None) -> list[float]:
        at = time.monotonic() if now is None else now
        return [ratio for when, ratio in self._ratios if at - when <= WINDOW_MEMORY_S]

    def windows(self, *, now: float | None = None) -> int:
        """How many windows it remembers now."""
        return len(self._recent(now))

    def scale(self, *, now: float | None = None) -> float:
        """The factor for the next prediction: the smallest recent ratio, at least 1."""
        return max(1.0, min(self._recent(now), default=1.0))

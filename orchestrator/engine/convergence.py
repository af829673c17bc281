"""The convergence rule: when does what is left fit the downtime budget?

As in QEMU, the budget in bytes is ``bandwidth x downtime_limit``. livemig also charges
the window's fixed work, which no iteration reduces (``window.window_cost``: the arcs,
each device's frames and bookkeeping, the round trips), so a device set with slow
transitions or many devices is not switched over on the promise of a fast link. The
switchover happens when every device has sent its initial data (initial_bytes == 0)
and the remaining bytes plus that fixed cost fit the limit. The remaining bytes are
each device's own stop-copy estimate, which counts its dirty bytes. The fixed cost errs
high (the limit is a hard ceiling: a window past it costs the workload, a switchover
held back one more iteration).

Devices that cannot report their figures (precopy info and the stop-copy size are
optional in the uAPI, and a vfio-user device may offer neither) are estimated from
their pre-copy stream by one rule, :func:`device_progress`, whatever their backend.

The limit is a ceiling, not a target: :func:`at_floor` holds a switchover that fits
until the expected downtime has stopped improving.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.engine.params import MigrationParams, Policy
from orchestrator.engine.window import WindowCost


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    """One device's pre-copy figures at one iteration."""

    name: str
    initial_bytes: int
    dirty_bytes: int
    stop_copy_bytes: int


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a switchover started now would cost."""

    remaining_bytes: int
    bandwidth: float
    overhead_s: float
    initial_done: bool
    #: The part of ``overhead_s`` measured on this migration (its arcs and round trips),
    #: which :func:`at_floor` compares against; None: all of it.
    measured_overhead_s: float | None = None

    @property
    def expected_downtime_s(self) -> float:
        """Transfer of the remaining bytes at ``bandwidth`` plus the fixed arc cost."""
        if self.bandwidth <= 0:
            return float("inf") if self.remaining_bytes else self.overhead_s
        return self.remaining_bytes / self.bandwidth + self.overhead_s

    @property
    def floor_overhead_s(self) -> float:
        """The fixed cost the floor rule counts: the measured part of ``overhead_s``."""
        return self.overhead_s if self.measured_overhead_s is None else self.measured_overhead_s

    @property
    def floor_downtime_s(self) -> float:
        """The expected downtime as :func:`at_floor` sees it: with only the measured
        fixed cost (the defaults' margin is for the ceiling, see there)."""
        return self.expected_downtime_s - self.overhead_s + self.floor_overhead_s

    def fits(self, downtime_limit_s: float) -> bool:
        """Initial data all sent and the expected downtime within the limit."""
        return self.initial_done and self.expected_downtime_s <= downtime_limit_s


def estimate(
    progress: Sequence[DeviceProgress],
    bandwidth: float,
    overhead_s: float | WindowCost,
    dirtied_before_stop: int = 0,
) -> Estimate:
    """Sum the devices' figures into one estimate.

    ``overhead_s`` is the window's fixed cost: seconds, or a :class:`WindowCost`
    (whose measured part the floor rule uses). ``dirtied_before_stop`` is what the
    devices will dirty between the decision and the stop (see
    :func:`dirtied_while_syncing`): the stop-copy carries it too.
    """
    if isinstance(overhead_s, WindowCost):
        total, measured = overhead_s.total_s, overhead_s.measured_s
    else:
        total, measured = overhead_s, None
    return Estimate(
        remaining_bytes=dirtied_before_stop
        + sum(max(p.stop_copy_bytes, p.dirty_bytes) for p in progress),
        bandwidth=bandwidth,
        overhead_s=total,
        initial_done=all(p.initial_bytes == 0 for p in progress),
        measured_overhead_s=measured,
    )


def dirtied_while_syncing(
    dirty_rate: float, unacknowledged: int, bandwidth: float, rtt_s: float
) -> int:
    """Bytes the devices dirty while the SYNC barrier waits, before the window opens.

    The devices stop only once the destination has taken in everything sent (SYNC), so
    a switchover decided now first waits for the bytes still in the pipe (our buffers,
    the kernel's send queue, the link) to cross, plus a round trip; the devices run
    and dirty meanwhile, and the stop-copy carries that dirt. On a fast link this is
    nothing; on a slow one it is the bulk of the downtime: at 100 Mbit/s a pipe of
    1.5 MB, the kernel's autotuned buffers, takes 120 ms to drain, and two devices
    dirtying 1 MB/s each leave 240 KB, about 20 ms of stop-copy, for an estimate that
    said 2 ms. Counting it makes the estimate honest and lets :func:`at_floor` hold the
    switchover until the pipe has drained (the estimate falls as it drains). It is a
    bound: the readers stream through the first of the switchover's two barriers, so
    much of that dirt crosses before the window.
    """
    if bandwidth <= 0:
        return 0
    return round(dirty_rate * (unacknowledged / bandwidth + rtt_s))


def expected_parts_ms(est: Estimate, cost: WindowCost) -> dict[str, float | None]:
    """The expected downtime's parts in ms: the pending bytes' transfer (None while no
    bandwidth is known), then ``cost``'s."""
    transfer = est.expected_downtime_s - cost.total_s
    parts: dict[str, float | None] = {
        "transfer": round(transfer * 1e3, 3) if math.isfinite(transfer) else None
    }
    return parts | cost.parts_ms()


# -- devices without precopy info or stop-copy size -------------------------------------
#
# The rule. A device in PRE_COPY that cannot report precopy info still streams, and
# its save channel says "nothing now" whenever it has nothing pending. So:
#
# * Its initial data counts as sent when the channel first reports "nothing now" after
#   the arc into PRE_COPY: at that moment everything it had, initial data included, was
#   read. This is also the moment of its switchover-ack announcement.
# * A pass is what was read between two "nothing now" answers. All of it was produced
#   (dirtied) after the previous answer, so the last pass is what the device produces
#   in one pass, and a stop now would carry about what it produced since the last
#   answer: its dirty estimate is the last pass, or the pass in progress when that is
#   already bigger (a device dirtying faster than it is read never pauses, and its
#   figure must not stay at an old, small pass). What was read before the first answer
#   is initial data, not dirty data, so the estimate starts from 0 there, as a device's
#   own dirty_bytes does (and a device that dirties nothing, whose channel may never
#   be readable again, is not held back by its initial size). QEMU, for such a device,
#   counts 0/0 and leans on the stop-copy size alone; the stream says more than that.
# * Without a stop-copy size the remaining estimate is that same figure. Not the
#   largest pass seen: a maximum never falls, so a device whose dirty rate falls or is
#   throttled, or that had one burst, would never converge. The last pass follows the
#   dirty rate now, which is what the stop-copy will carry; the hard downtime limit
#   stays the backstop for a device that saves more in STOP_COPY than its stream
#   showed (nothing in the stream can tell).
# * A device without PRE_COPY shows no stream before the stop: without a stop-copy size
#   its estimate is 0, for the same reason.

#: Initial bytes reported for a device without precopy info until its stream first
#: pauses: how many are left is unknown, only that it is not none.
UNKNOWN_INITIAL = 1


@dataclass(slots=True)
class StreamPasses:
    """What a device's pre-copy stream has shown: the input of the fallback rule.

    The source feeds it every chunk read (``read``) and every "nothing now" (``pause``).
    """

    #: Whether the channel said "nothing now" since the arc into PRE_COPY.
    paused: bool = False
    #: Bytes read between the last two "nothing now" answers (0 until there were two).
    last_pass_bytes: int = 0
    #: Bytes read since the last "nothing now" (or since the start).
    pass_bytes: int = 0

    def read(self, nbytes: int) -> None:
        """Count bytes of a chunk read from the save channel."""
        self.pass_bytes += nbytes

    def pause(self) -> None:
        """The channel said "nothing now": the pass in progress ends."""
        # The pass before the first answer carried the initial data, not dirty data.
        self.last_pass_bytes = self.pass_bytes if self.paused else 0
        self.pass_bytes = 0
        self.paused = True

    @property
    def pending_bytes(self) -> int:
        """The dirty estimate: the last pass, or the pass in progress when bigger."""
        return max(self.last_pass_bytes, self.pass_bytes)


def initial_sent(passes: StreamPasses, info: tuple[int, int] | None) -> bool:
    """Whether a device's initial data is sent; ``info`` is None without precopy info."""
    return passes.paused if info is None else info[0] == 0


def device_progress(
    name: str, passes: StreamPasses, info: tuple[int, int] | None, stop_copy_bytes: int | None
) -> DeviceProgress:
    """A device's figures, the ones it cannot report (None) estimated from its stream."""
    if info is None:
        initial = 0 if initial_sent(passes, info) else UNKNOWN_INITIAL
        info = (initial, passes.pending_bytes)
    if stop_copy_bytes is None:
        stop_copy_bytes = passes.pending_bytes
    return DeviceProgress(name, info[0], info[1], stop_copy_bytes)


class Action(enum.Enum):
    """What the source loop does after an iteration."""

    #: Keep pre-copying.
    CONTINUE = "continue"
    #: The estimate fits: switch over.
    SWITCHOVER = "switchover"
    #: The force policy gave up waiting: switch over and accept the downtime.
    FORCE = "force"
    #: The throttle policy slows the devices that allow it, then keeps going.
    THROTTLE = "throttle"
    #: The time allowed for pre-copy ran out: fail, the source keeps running.
    FAIL = "fail"


def decide(
    est: Estimate,
    params: MigrationParams,
    *,
    iteration: int,
    elapsed_s: float,
    ack_pending: bool,
) -> Action:
    """The next step of the pre-copy loop, from the estimate and the chosen policy.

    ``ack_pending`` is true while the destination has not yet confirmed it loaded the
    initial data (switchover-ack): a switchover waits for it unless forced.
    """
    if est.fits(params.downtime_limit_ms / 1000) and not ack_pending:
        return Action.SWITCHOVER
    if elapsed_s >= params.timeout_s:
        return Action.FAIL
    if params.policy == Policy.FORCE and (
        (params.force_after_iterations is not None and iteration >= params.force_after_iterations)
        or (params.force_after_s is not None and elapsed_s >= params.force_after_s)
    ):
        return Action.FORCE
    if (
        params.policy == Policy.THROTTLE
        and est.initial_done
        and iteration >= params.throttle_after_iterations
    ):
        return Action.THROTTLE
    return Action.CONTINUE


#: A drop smaller than this fraction of the previous expected downtime is no longer
#: "improving": the series has reached its floor (measurement noise is about this big).
FLOOR_TOLERANCE = 0.15
#: An expected downtime within this many times the fixed cost of the arcs (which no
#: iteration reduces), plus ``FLOOR_SLACK_S``, is as good as the floor.
FLOOR_FACTOR = 2.0
#: Measurement slack added to that bound: a millisecond is below what a user notices.
FLOOR_SLACK_S = 0.001
#: Consecutive fitting iterations after which the switchover goes ahead whatever the
#: trend: a floor that keeps receding must not cost unbounded total time.
FLOOR_PATIENCE = 5


def at_floor(history: Sequence[Estimate], downtime_limit_s: float) -> bool:
    """Whether the newest estimate (``history[-1]``) is as low as waiting will make it.

    The downtime limit is a ceiling the operator tolerates, not a target: switching over
    at the first iteration that fits gives whatever downtime that iteration happened to
    leave, anywhere under the limit (at 200 MB/s of dirtying that was a few ms in some
    runs and 30 ms in others). Pre-copy keeps sending what is dirtied, so the pending
    bytes fall iteration by iteration to a floor set by the dirty rate and the
    bandwidth (what is dirtied while the last dirty bytes are sent), and stay there;
    the lowest downtime this link allows is a switchover at that floor. So, once the
    estimate fits the limit (``decide`` checks that, and this only delays a switchover
    it allowed), switch over when any of these holds:

    * the expected downtime is at most ``FLOOR_FACTOR`` times the fixed cost of the
      arcs plus ``FLOOR_SLACK_S``: no iteration goes below that fixed cost, so waiting
      could win back at most half of the downtime, for a whole iteration of total time;
    * the expected downtime stopped falling: it is no new low (not ``FLOOR_TOLERANCE``
      below the best fitting estimate before it) yet within that tolerance of that
      best, which is the floor and not a momentary bump above it; or it is a new low
      that fell less than the tolerance since the previous iteration;
    * ``FLOOR_PATIENCE`` consecutive iterations have fitted: take what fits rather
      than trade unbounded total time for a floor that keeps receding.

    Otherwise keep iterating: the expected downtime is still falling (the first
    fitting iteration usually comes straight out of the initial copy with tens of MB
    pending), or the newest estimate is a bump above the floor that the next iteration
    will likely undo. The cost is about one iteration of total time.

    "Expected downtime" and "fixed cost" here count only the fixed cost measured on
    this migration (``Estimate.floor_downtime_s``), not the window's default work
    (``window.window_cost``): that margin keeps the ceiling safe, but here a larger fixed
    cost would only make a switchover with more bytes pending look as good as the
    floor, which is the wrong side to err on for a rule that chases the lowest downtime.
    """
    if not history:
        return True
    latest = history[-1]
    fitting = 0
    for est in reversed(history):
        if not est.fits(downtime_limit_s):
            break
        fitting += 1
    if fitting >= FLOOR_PATIENCE:
        return True
    expected = latest.floor_downtime_s
    if expected <= FLOOR_FACTOR * latest.floor_overhead_s + FLOOR_SLACK_S:
        return True
    earlier = [est.floor_downtime_s for est in list(history)[len(history) - fitting : -1]]
    if earlier and expected >= min(earlier) * (1 - FLOOR_TOLERANCE):
        # Not a new low: back at the floor seen before, or a bump above it.
        return expected <= min(earlier) * (1 + FLOOR_TOLERANCE) + FLOOR_SLACK_S
    # A new low (or the first fit): the floor only if it barely moved since the last one.
    return len(history) >= 2 and expected >= history[-2].floor_downtime_s * (1 - FLOOR_TOLERANCE)


def next_throttle(current: float, params: MigrationParams) -> float:
    """Auto-converge's next throttle: start at the initial value, then step up to the cap."""
    if current <= 0:
        return params.throttle_initial
    return min(params.throttle_max, current + params.throttle_increment)

"""The convergence rule: when does what is left fit the downtime budget?

As in QEMU, the budget in bytes is ``bandwidth x downtime_limit``. livemig also charges
the fixed cost of the switchover arcs (quiesce, stop, load, resume), measured on this
migration, so a device set with slow transitions is not switched over on the promise of
a fast link. The switchover happens when every device has sent its initial data
(initial_bytes == 0) and the remaining bytes plus that fixed cost fit the limit. The
remaining bytes are each device's own stop-copy estimate, which counts its dirty bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.params import MigrationParams, Policy


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

    @property
    def expected_downtime_s(self) -> float:
        """Transfer of the remaining bytes at ``bandwidth`` plus the fixed arc cost."""
        if self.bandwidth <= 0:
            return float("inf") if self.remaining_bytes else self.overhead_s
        return self.remaining_bytes / self.bandwidth + self.overhead_s

    def fits(self, downtime_limit_s: float) -> bool:
        """Initial data all sent and the expected downtime within the limit."""
        return self.initial_done and self.expected_downtime_s <= downtime_limit_s


def estimate(progress: Sequence[DeviceProgress], bandwidth: float, overhead_s: float) -> Estimate:
    """Sum the devices' figures into one estimate."""
    return Estimate(
        remaining_bytes=sum(max(p.stop_copy_bytes, p.dirty_bytes) for p in progress),
        bandwidth=bandwidth,
        overhead_s=overhead_s,
        initial_done=all(p.initial_bytes == 0 for p in progress),
    )


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


def next_throttle(current: float, params: MigrationParams) -> float:
    """Auto-converge's next throttle: start at the initial value, then step up to the cap."""
    if current <= 0:
        return params.throttle_initial
    return min(params.throttle_max, current + params.throttle_increment)

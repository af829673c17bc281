"""Migration parameters: what a user may set, with defaults and validation."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from orchestrator.errors import MigrationBlocked
from transport.limits import Limits


class Policy(enum.StrEnum):
    """What to do when pre-copy does not converge."""

    #: Keep iterating until ``timeout_s``, then fail; the source keeps running.
    WAIT = "wait"
    #: Switch over anyway after ``force_after_iterations`` or ``force_after_s``.
    FORCE = "force"
    #: Throttle devices that support it (auto-converge), more each iteration.
    THROTTLE = "throttle"


@dataclasses.dataclass(slots=True)
class MigrationParams:
    """Knobs of one migration; the ``livemig`` CLI and the config file map onto these."""

    #: Downtime budget used by the convergence rule (bandwidth x limit).
    downtime_limit_ms: float = 300.0
    #: Abort the switchover (source back to RUNNING) if it cannot fit the limit.
    hard_downtime_limit: bool = False
    #: Bandwidth cap in bytes/s (token bucket); None is unlimited.
    max_bandwidth: float | None = None
    #: Bandwidth in bytes/s to assume at switchover instead of the measured one.
    switchover_bandwidth: float | None = None
    #: Parallel connections; each device is pinned to one, so at most one per device is
    #: opened. Four moved the most data in ``livemig bench transport`` on a 2-core host.
    channels: int = 4
    #: Quiesce every device in a P2P state before any device stops.
    p2p: bool = True
    #: Wait for the destination to confirm it loaded the initial pre-copy data.
    switchover_ack: bool = True
    #: Stop before the switchover until ``continue`` is requested.
    pause_before_switchover: bool = False
    policy: Policy = Policy.WAIT
    #: Overall limit on pre-copy; the migration fails (source running) past it.
    timeout_s: float = 300.0
    force_after_iterations: int | None = None
    force_after_s: float | None = None
    #: Auto-converge: first throttle, its increment per iteration, and its ceiling.
    throttle_initial: float = 0.2
    throttle_increment: float = 0.1
    throttle_max: float = 0.99
    #: Iterations without convergence before the throttle policy starts throttling.
    throttle_after_iterations: int = 3
    #: Length of one pre-copy iteration (a convergence check and a stats sample).
    iteration_s: float = 0.1
    #: How long to wait for the destination's verdict after the end of the stream.
    verdict_timeout_s: float = 30.0
    #: How long to wait for a connection and the handshake, retries included (a busy
    #: destination may drop a pending handshake; the source retries with backoff).
    connect_timeout_s: float = 10.0
    #: Silence on the link (no byte from the peer, keep-alives included) after which
    #: the migration counts the link as lost and fails; both ends send keep-alives.
    link_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MigrationBlocked naming the first parameter that makes no sense."""
        for field in dataclasses.fields(self):
            _check_type(field.name, field.type, getattr(self, field.name))
        positive = {
            "downtime_limit_ms": self.downtime_limit_ms,
            "timeout_s": self.timeout_s,
            "iteration_s": self.iteration_s,
            "verdict_timeout_s": self.verdict_timeout_s,
            "connect_timeout_s": self.connect_timeout_s,
            "link_timeout_s": self.link_timeout_s,
            "channels": self.channels,
        }
        optional_positive = {
            "max_bandwidth": self.max_bandwidth,
            "switchover_bandwidth": self.switchover_bandwidth,
            "force_after_iterations": self.force_after_iterations,
            "force_after_s": self.force_after_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise MigrationBlocked(f"parameter {name} must be > 0, got {value!r}")
        for name, opt in optional_positive.items():
            if opt is not None and not opt > 0:
                raise MigrationBlocked(f"parameter {name} must be > 0 when set, got {opt!r}")
        for name, fraction in (
            ("throttle_initial", self.throttle_initial),
            ("throttle_increment", self.throttle_increment),
            ("throttle_max", self.throttle_max),
        ):
            if not 0 < fraction < 1:
                raise MigrationBlocked(f"parameter {name} must be in (0, 1), got {fraction!r}")
        most = Limits().max_channels
        if self.channels > most:
            raise MigrationBlocked(f"parameter channels must be <= {most}, got {self.channels}")
        if self.policy == Policy.FORCE and (
            self.force_after_iterations is None and self.force_after_s is None
        ):
            raise MigrationBlocked("policy 'force' needs force_after_iterations or force_after_s")

    def updated(self, changes: Mapping[str, Any]) -> MigrationParams:
        """A validated copy with ``changes`` applied; unknown names are refused."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise MigrationBlocked(f"unknown parameter(s): {', '.join(unknown)}")
        values = dataclasses.asdict(self) | dict(changes)
        values["policy"] = _policy(values["policy"])
        return MigrationParams(**values)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (the policy as its name)."""
        values = dataclasses.asdict(self)
        values["policy"] = self.policy.value
        return values


_TYPES: dict[str, tuple[type, ...]] = {
    "float": (int, float),
    "float | None": (int, float, type(None)),
    "int": (int,),
    "int | None": (int, type(None)),
    "bool": (bool,),
    "Policy": (Policy,),
}


def _check_type(name: str, annotation: object, value: object) -> None:
    """Refuse a value of the wrong type (bool is not a number here)."""
    allowed = _TYPES[str(annotation)]
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise MigrationBlocked(
            f"parameter {name} must be {annotation}, got {type(value).__name__} {value!r}"
        )


def _policy(value: object) -> Policy:
    try:
        return Policy(str(value))
    except ValueError:
        choices = ", ".join(p.value for p in Policy)
        raise MigrationBlocked(
            f"parameter policy must be one of {choices}, got {value!r}"
        ) from None


#: Parameters a user may change while a migration runs.
LIVE_PARAMETERS = frozenset(
    {"downtime_limit_ms", "max_bandwidth", "switchover_bandwidth", "hard_downtime_limit"}
)

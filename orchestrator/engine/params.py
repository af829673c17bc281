"""Migration parameters: what a user may set, with defaults and validation.

Units: bytes/s for bandwidths, ms for the downtime limit, seconds elsewhere, fractions
for throttles. QEMU's names and units for the parameters QEMU also has are mapped in
:data:`QEMU_PARAMETERS` (``downtime-limit`` in ms, ``max-bandwidth`` in bytes/s, ...).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

from orchestrator.engine.errors import MigrationBlocked
from transport.checks import has_type, kinds_of
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
    #: Longest the source devices may stay stopped before COMMIT (the switchover rolls
    #: back past it, whatever the link does); None: max(10 x downtime_limit_ms, 1000),
    #: or downtime_limit_ms itself under hard_downtime_limit.
    max_stop_ms: float | None = None
    #: Bandwidth cap in bytes/s (token bucket); None is unlimited.
    max_bandwidth: float | None = None
    #: Bandwidth in bytes/s to assume at switchover instead of the measured one.
    switchover_bandwidth: float | None = None
    #: Parallel connections; each device is pinned to one, so at most one per device is
    #: opened. One: it filled every link measured (loopback, 1 Gbit/s, a 100 Mbit/s
    #: 30 ms RTT long fat pipe) with less CPU than four; more are for links a single
    #: TCP flow cannot fill (README, Real networks).
    channels: int = 1
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
    #: destination may drop a pending handshake; the source retries with backoff); and
    #: then for DEVICES_ACCEPTED, and for the PINGs that measure the clock.
    connect_timeout_s: float = 10.0
    #: Silence on the link (no byte from the peer, keep-alives included) after which
    #: the migration counts the link as lost and fails; both ends send keep-alives.
    link_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise MigrationBlocked naming the first parameter that makes no sense."""
        hints = field_types()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _check_type(field.name, hints[field.name], value)
            if isinstance(value, float) and not math.isfinite(value):
                raise MigrationBlocked(
                    f"parameter {field.name} must be finite, got {value!r}", field.name
                )
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
            "max_stop_ms": self.max_stop_ms,
        }
        for name, value in positive.items():
            if not value > 0:
                raise MigrationBlocked(f"parameter {name} must be > 0, got {value!r}", name)
        for name, opt in optional_positive.items():
            if opt is not None and not opt > 0:
                raise MigrationBlocked(f"parameter {name} must be > 0 when set, got {opt!r}", name)
        for name, fraction in (
            ("throttle_initial", self.throttle_initial),
            ("throttle_increment", self.throttle_increment),
            ("throttle_max", self.throttle_max),
        ):
            if not 0 < fraction < 1:
                raise MigrationBlocked(
                    f"parameter {name} must be in (0, 1), got {fraction!r}", name
                )
        most = Limits().max_channels
        if self.channels > most:
            raise MigrationBlocked(
                f"parameter channels must be <= {most}, got {self.channels}", "channels"
            )
        if self.policy == Policy.FORCE and (
            self.force_after_iterations is None and self.force_after_s is None
        ):
            raise MigrationBlocked(
                "policy 'force' needs force_after_iterations or force_after_s", "policy"
            )

    @property
    def stop_bound_s(self) -> float:
        """How long the switchover may hold the source devices stopped before COMMIT."""
        if self.hard_downtime_limit:
            return self.downtime_limit_ms / 1e3
        if self.max_stop_ms is not None:
            return self.max_stop_ms / 1e3
        return max(10 * self.downtime_limit_ms, 1000.0) / 1e3

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


@functools.cache
def field_types() -> dict[str, Any]:
    """Each parameter's resolved type (the annotations are text under __future__)."""
    return typing.get_type_hints(MigrationParams)


def _check_type(name: str, annotation: object, value: object) -> None:
    """Refuse a value of the wrong type (bool is not a number here)."""
    if not has_type(value, kinds_of(annotation)):
        shown = getattr(annotation, "__name__", None) or str(annotation)
        raise MigrationBlocked(
            f"parameter {name} must be {shown}, got {type(value).__name__} {value!r}", name
        )


def _policy(value: object) -> Policy:
    try:
        return Policy(str(value))
    except ValueError:
        choices = ", ".join(p.value for p in Policy)
        raise MigrationBlocked(
            f"parameter policy must be one of {choices}, got {value!r}", "policy"
        ) from None


#: Parameters a user may change while a migration runs.
LIVE_PARAMETERS = frozenset(
    {
        "downtime_limit_ms",
        "max_bandwidth",
        "switchover_bandwidth",
        "hard_downtime_limit",
        "max_stop_ms",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class QemuParameter:
    """A QEMU migration parameter with a livemig equivalent, and its unit conversion."""

    name: str
    #: Its value in livemig's unit, from QEMU's (and back).
    to_ours: Callable[[float], Any]
    to_qemu: Callable[[Any], float]


def _whole(value: float) -> float:
    """An integral float as an int: QEMU's parameters are integers, ours may be fractions."""
    return int(value) if float(value).is_integer() else value


def _zero_is_none(value: float) -> float | None:
    return None if value == 0 else float(value)


def _unset_is_zero(value: float | None) -> float:
    return _whole(value or 0)


def _fraction(percent: float) -> float:
    return percent / 100


def _percent(fraction: float) -> float:
    return _whole(round(fraction * 100, 6))


#: QEMU's migration parameters that livemig has, by QEMU name. For ``max-bandwidth`` and
#: ``avail-switchover-bandwidth`` 0 means "no value" in QEMU (unlimited; use the
#: measured bandwidth), as None does here; throttles are percentages there.
QEMU_PARAMETERS: dict[str, QemuParameter] = {
    "downtime-limit": QemuParameter("downtime_limit_ms", float, _whole),
    "max-bandwidth": QemuParameter("max_bandwidth", _zero_is_none, _unset_is_zero),
    "avail-switchover-bandwidth": QemuParameter(
        "switchover_bandwidth", _zero_is_none, _unset_is_zero
    ),
    "multifd-channels": QemuParameter("channels", int, int),
    "cpu-throttle-initial": QemuParameter("throttle_initial", _fraction, _percent),
    "cpu-throttle-increment": QemuParameter("throttle_increment", _fraction, _percent),
    "max-cpu-throttle": QemuParameter("throttle_max", _fraction, _percent),
}


def from_qemu_parameters(given: Mapping[str, Any]) -> dict[str, Any]:
    """QEMU-named parameters (``migrate-set-parameters``) as MigrationParams changes.

    MigrationBlocked names a parameter QEMU has but livemig does not, or a bad value.
    """
    changes: dict[str, Any] = {}
    for name, value in given.items():
        parameter = QEMU_PARAMETERS.get(name)
        if parameter is None:
            mapped = ", ".join(sorted(QEMU_PARAMETERS))
            raise MigrationBlocked(
                f"unknown argument {name!r}: livemig maps these QEMU parameters: {mapped} "
                "(and takes its own in 'parameters')"
            )
        if not has_type(value, (int, float)):
            raise MigrationBlocked(f"parameter {name} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise MigrationBlocked(f"parameter {name} must be a finite number >= 0, got {value!r}")
        if parameter.to_ours is int and not float(value).is_integer():
            raise MigrationBlocked(f"parameter {name} must be an integer, got {value!r}")
        changes[parameter.name] = parameter.to_ours(value)
    return changes


def to_qemu_parameters(params: MigrationParams) -> dict[str, Any]:
    """The parameters QEMU also has, under QEMU's names and in its units."""
    return {
        name: parameter.to_qemu(getattr(params, parameter.name))
        for name, parameter in QEMU_PARAMETERS.items()
    }

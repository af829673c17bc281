"""The orchestrator's messages on top of the transport's control frames.

Source to destination: DEVICES (descriptors and the options the destination must
honour), INITIAL_DATA_SENT (per device, on its channel, after its initial data),
END_OF_DEVICE, END_OF_STREAM, COMMIT (go ahead and run), CANCEL.
Destination to source: DEVICES_ACCEPTED, SWITCHOVER_ACK (initial data loaded),
VERDICT with ``stage`` "loaded" (every device validated, waiting for COMMIT),
"resumed" (after COMMIT: ``results`` maps each device to "" when it runs, else why it
stayed stopped) or "failed" (before COMMIT only, with ``reason``), and CANCEL.
DEVICES carries the source's ``migration_id``, which names the migration on both hosts.
Timestamps are the sender's ``time.monotonic()``; ``boot_id`` tells whether both
ends share that clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transport.errors import ProtocolError
from transport.frames import require


def boot_id() -> str:
    """This machine's boot identity: equal boot ids share one monotonic clock."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def stamps(fields: Mapping[str, Any], name: str) -> dict[str, float]:
    """A mapping of mark name to timestamp, validated."""
    raw = require(fields, name, dict)
    result: dict[str, float] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, int | float):
            raise ProtocolError(name, f"holds a bad entry {key!r:.60}")
        result[key] = float(value)
    return result


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """The destination's word on the state it received."""

    stage: str
    reason: str
    device: str | None
    marks: dict[str, float]
    device_marks: dict[str, dict[str, float]]
    #: After COMMIT: device name -> "" when it runs, else why it stayed stopped.
    results: dict[str, str] = dataclasses.field(default_factory=dict)

    STAGES = ("loaded", "resumed", "failed")

    @classmethod
    def parse(cls, fields: Mapping[str, Any]) -> Verdict:
        """Validate a VERDICT message."""
        stage = require(fields, "stage", str)
        if stage not in cls.STAGES:
            raise ProtocolError("stage", f"unknown value {stage!r:.60}")
        device = fields.get("device")
        if device is not None and not isinstance(device, str):
            raise ProtocolError("device", "is not a string")
        per_device = require(fields, "device_marks", dict)
        device_marks = {str(name): stamps(per_device, name) for name in per_device}
        raw_results = fields.get("results", {})
        if not isinstance(raw_results, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw_results.items()
        ):
            raise ProtocolError("results", "must map device names to strings")
        return cls(
            stage=stage,
            reason=str(fields.get("reason", "")),
            device=device,
            marks=stamps(fields, "marks"),
            device_marks=device_marks,
            results=dict(raw_results),
        )

    def to_fields(self) -> dict[str, Any]:
        """The message payload."""
        return {
            "stage": self.stage,
            "reason": self.reason,
            "device": self.device,
            "marks": self.marks,
            "device_marks": self.device_marks,
            "results": self.results,
        }

    def failed_devices(self) -> dict[str, str]:
        """The devices that did not resume after COMMIT, with the reason of each."""
        return {name: why for name, why in self.results.items() if why}


#: A migration id: what the source makes and both hosts show.
MIGRATION_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def migration_id(fields: Mapping[str, Any]) -> str:
    """The ``migration_id`` of a DEVICES message, validated (1..64 of [A-Za-z0-9._-])."""
    value: str = require(fields, "migration_id", str)
    if not 0 < len(value) <= 64 or not set(value) <= MIGRATION_ID_CHARS:
        raise ProtocolError("migration_id", f"must be 1..64 of [A-Za-z0-9._-], got {value!r:.70}")
    return value

"""The orchestrator's messages on top of the transport's control frames.

Source to destination: DEVICES (:class:`Devices`: descriptors and the options the
destination must honour; the transport carries it unread), INITIAL_DATA_SENT (per
device, on its channel, after its initial data), END_OF_DEVICE, END_OF_STREAM, COMMIT
(go ahead and run), CANCEL.
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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from devices.base import DeviceDescriptor
from devices.fsm import Feature
from transport.errors import LimitExceeded, ProtocolError
from transport.frames import typed_field
from transport.limits import Limits

_U32 = 1 << 32


def boot_id() -> str:
    """This machine's boot identity: equal boot ids share one monotonic clock."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def stamps(fields: Mapping[str, Any], name: str) -> dict[str, float]:
    """A mapping of mark name to timestamp, validated."""
    raw = typed_field(fields, name, dict)
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
        stage = typed_field(fields, "stage", str)
        if stage not in cls.STAGES:
            raise ProtocolError("stage", f"unknown value {stage!r:.60}")
        device = fields.get("device")
        if device is not None and not isinstance(device, str):
            raise ProtocolError("device", "is not a string")
        per_device = typed_field(fields, "device_marks", dict)
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
    value: str = typed_field(fields, "migration_id", str)
    if not 0 < len(value) <= 64 or not set(value) <= MIGRATION_ID_CHARS:
        raise ProtocolError("migration_id", f"must be 1..64 of [A-Za-z0-9._-], got {value!r:.70}")
    return value


def encode_devices(descriptors: Iterable[DeviceDescriptor]) -> list[dict[str, Any]]:
    """The ``devices`` field of DEVICES announcing ``descriptors``, in index order."""
    return [
        {
            "name": d.name,
            "kind": d.kind,
            "format_version": d.format_version,
            "features": int(d.features),
            "state_size": d.state_size,
        }
        for d in descriptors
    ]


def decode_devices(
    fields: Mapping[str, Any] | list[Any], limits: Limits | None = None
) -> list[DeviceDescriptor]:
    """Validate DEVICES fields (or their ``devices`` list) into descriptors.

    ProtocolError names the bad field (``devices[3].name``); LimitExceeded the count or
    a name's length.
    """
    limits = limits or Limits()
    devices = fields if isinstance(fields, list) else typed_field(fields, "devices", list)
    if len(devices) > limits.max_devices:
        raise LimitExceeded("devices", len(devices), limits.max_devices)
    known = sum(int(flag) for flag in Feature)
    result: list[DeviceDescriptor] = []
    names: set[str] = set()
    for index, entry in enumerate(devices):
        where = f"devices[{index}]"
        if not isinstance(entry, dict):
            raise ProtocolError(where, "expected a map")
        texts = []
        for key in ("name", "kind"):
            text = typed_field(entry, key, str)
            if len(text) > limits.max_name_length:
                raise LimitExceeded(f"{where}.{key}", len(text), limits.max_name_length)
            texts.append(text)
        version = typed_field(entry, "format_version", int)
        features = typed_field(entry, "features", int)
        if not 0 <= version < _U32:
            raise ProtocolError(f"{where}.format_version", f"{version} is out of range")
        if features < 0 or features & ~known:
            raise ProtocolError(f"{where}.features", f"unknown feature bits {features:#x}")
        size = entry.get("state_size")
        if size is not None and (type(size) is not int or not 0 < size < 1 << 63):
            raise ProtocolError(f"{where}.state_size", f"{size!r:.40} is not a byte count")
        if texts[0] in names:
            raise ProtocolError(f"{where}.name", f"duplicate device name {texts[0]!r}")
        names.add(texts[0])
        result.append(DeviceDescriptor(texts[0], texts[1], version, Feature(features), size))
    return result


@dataclasses.dataclass(frozen=True, slots=True)
class Devices:
    """The source's DEVICES: what it offers and how the destination must take it."""

    devices: tuple[DeviceDescriptor, ...]
    #: Quiesce every device in a P2P state before any stops (both ends must).
    p2p: bool
    #: Whether the source waits for SWITCHOVER_ACK.
    switchover_ack: bool
    #: Devices with pre-copy data: SWITCHOVER_ACK follows their INITIAL_DATA_SENT.
    precopy_devices: int
    boot_id: str
    migration_id: str

    @classmethod
    def parse(cls, fields: Mapping[str, Any], limits: Limits | None = None) -> Devices:
        """Validate a DEVICES message (ProtocolError or LimitExceeded naming the field)."""
        return cls(
            devices=tuple(decode_devices(fields, limits)),
            p2p=bool(typed_field(fields, "p2p", bool)),
            switchover_ack=bool(typed_field(fields, "switchover_ack", bool)),
            precopy_devices=int(typed_field(fields, "precopy_devices", int)),
            boot_id=str(fields.get("boot_id", "")),
            migration_id=migration_id(fields),
        )

    def to_fields(self) -> dict[str, Any]:
        """The message payload."""
        return {
            "devices": encode_devices(self.devices),
            "p2p": self.p2p,
            "switchover_ack": self.switchover_ack,
            "precopy_devices": self.precopy_devices,
            "boot_id": self.boot_id,
            "migration_id": self.migration_id,
        }

"""The config's ``[[device]]`` tables: each kind's keys, checked, as a device factory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from devices.base import MigratableDevice
from devices.fsm import Feature, State
from devices.paged import Faults
from orchestrator.service.tomlreader import ConfigError, KeyPath, Reader
from transport.checks import has_type

MIB = 1 << 20
KIB = 1 << 10
MB = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceConfig:
    """One ``[[device]]`` entry: the constructor and its arguments, already validated."""

    kind: str
    name: str
    line: int | None
    factory: Callable[..., MigratableDevice]
    arguments: Mapping[str, Any]

    file: str = "<config>"
    #: The device exists to receive: it starts idle and is armed while it holds no workload.
    accept_incoming: bool = False

    def build(self) -> MigratableDevice:
        """A new device object (not yet opened); ConfigError when its arguments clash."""
        try:
            return self.factory(self.name, **self.arguments)
        except (ValueError, TypeError) as exc:
            problem = str(exc).removeprefix(f"{self.name}: ")
            raise ConfigError(
                self.file, self.line, f"device {self.name!r}", f"({self.kind}) {problem}"
            ) from None


#: A device key: the constructor argument it sets and how to turn the TOML value into it.
_Convert = Callable[[Any], Any]
_Key = tuple[str, type | tuple[type, ...], _Convert]
_NUMBER = (int, float)


def _features(value: list[Any]) -> Feature:
    flags = Feature(0)
    for name in value:
        try:
            flags |= Feature[str(name).upper()]
        except KeyError:
            known = ", ".join(f.name for f in Feature if f.name)
            raise ValueError(f"unknown feature {name!r} (known: {known})") from None
    return flags


def _faults(value: dict[str, Any]) -> Faults:
    known = {f.name for f in dataclasses.fields(Faults)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    arcs = []
    for text in value.get("fail_arcs", []):
        start, _, end = str(text).partition("->")
        try:
            arcs.append((State[start.strip().upper()], State[end.strip().upper()]))
        except KeyError:
            raise ValueError(f"fail_arcs entry {text!r} is not STATE->STATE") from None
    for name in ("fail_read_after", "stall_read_after"):
        count = value.get(name)
        if count is not None and (type(count) is not int or count < 0):
            raise ValueError(f"{name} must be a byte count (an integer >= 0), got {count!r}")
    if not isinstance(value.get("corrupt_validation", False), bool):
        raise ValueError("corrupt_validation must be true or false")
    return Faults(**(dict(value) | {"fail_arcs": frozenset(arcs)}))


def _mib(value: float) -> int:
    return round(value * MIB)


def _mbps(value: float) -> float:
    return float(value) * MB


_COMMON: dict[str, _Key] = {
    "features": ("features", list, _features),
    "seed": ("seed", int, int),
    "dirty_rate": ("dirty_rate", _NUMBER, float),
    "dirty_mbps": ("dirty_rate", _NUMBER, _mbps),
    "chunk_size": ("chunk_size", int, int),
    "chunk_kib": ("chunk_size", _NUMBER, lambda v: round(v * KIB)),
    "faults": ("faults", dict, _faults),
}

_SIMULATED: dict[str, _Key] = _COMMON | {
    "state_size": ("state_size", int, int),
    "state_mib": ("state_size", _NUMBER, _mib),
    "block_size": ("block_size", int, int),
    "hot_set": ("hot_set", _NUMBER, float),
}

_RAM: dict[str, _Key] = _COMMON | {
    "size": ("size", int, int),
    "size_mib": ("size", _NUMBER, _mib),
    "page_size": ("page_size", int, int),
    "working_set": ("working_set", int, int),
    "working_set_mib": ("working_set", _NUMBER, _mib),
    "zero_outside": ("zero_outside", bool, bool),
}


def _fault_flags(faults: type, value: dict[str, Any]) -> Any:
    """A ``faults`` table (fault injection, for tests) as ``faults``, a dataclass of flags."""
    known = {f.name for f in dataclasses.fields(faults)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for key, flag in value.items():
        if not isinstance(flag, bool):
            raise ValueError(f"fault {key!r} must be true or false, got {flag!r}")
    return faults(**value)


def _vfio_faults(value: dict[str, Any]) -> Any:
    """A VFIO device's ``faults`` table: VfioFaults."""
    from devices.vfio import VfioFaults

    return _fault_flags(VfioFaults, value)


_VFIO: dict[str, _Key] = {
    "device": ("spec", str, str),
    "features": ("features", list, _features),
    "faults": ("faults", dict, _vfio_faults),  # fault injection, for tests
}


def _vfio(
    name: str, *, spec: str, features: Feature | None = None, faults: Any = None
) -> MigratableDevice:
    """Open a VFIO device (an mdev UUID, a PCI address or a sysfs path)."""
    from devices.vfio import VfioDevice

    return VfioDevice.from_config(spec, name=name, features=features, faults=faults)


def _vfio_user_faults(value: dict[str, Any]) -> Any:
    """A vfio-user device's ``faults`` table: VfioUserFaults."""
    from devices.vfio_user import VfioUserFaults

    return _fault_flags(VfioUserFaults, value)


def _socket_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path to the server's UNIX socket, got {value!r}")
    return value


def _positive_seconds(value: float) -> float:
    if not value > 0:
        raise ValueError(f"must be > 0 seconds, got {value!r}")
    return float(value)


_VFIO_USER: dict[str, _Key] = {
    "socket": ("socket", str, _socket_path),
    "features": ("features", list, _features),
    "timeout_s": ("timeout_s", _NUMBER, _positive_seconds),
    "faults": ("faults", dict, _vfio_user_faults),  # fault injection, for tests
}


def _vfio_user(name: str, **arguments: Any) -> MigratableDevice:
    """A device served by a vfio-user server at a UNIX socket (connected by ``open``)."""
    from devices.vfio_user import VfioUserDevice

    return VfioUserDevice(name, **arguments)


def _device_kinds() -> dict[str, tuple[Callable[..., MigratableDevice], dict[str, _Key]]]:
    """The kinds a config may name: the constructor and the keys each takes."""
    from devices.ram import RamDevice
    from devices.simulated import SimulatedDevice

    return {
        "simulated": (SimulatedDevice, _SIMULATED),
        "ram": (RamDevice, _RAM),
        "vfio": (_vfio, _VFIO),
        "vfio-user": (_vfio_user, _VFIO_USER),
    }


def device_config(reader: Reader, entry: object, index: int) -> DeviceConfig:
    path: KeyPath = ("device", index)
    if not isinstance(entry, dict):
        raise reader.error(path, "must be a table ([[device]])")
    kind = reader.get(entry, path, "kind", str)
    kinds = _device_kinds()
    if kind not in kinds:
        raise reader.error(
            (*path, "kind"), f"unknown device kind {kind!r}; known: {', '.join(sorted(kinds))}"
        )
    name = reader.get(entry, path, "name", str)
    if not name or len(name) > 64 or not name.isprintable():
        raise reader.error((*path, "name"), "must be 1 to 64 printable characters")
    factory, keys = kinds[kind]
    accept_incoming = reader.get(entry, path, "accept_incoming", bool, False)
    rest = {k: v for k, v in entry.items() if k not in ("kind", "name", "accept_incoming")}
    arguments: dict[str, Any] = {}
    reader.refuse_unknown(rest, path, set(keys) | {"kind", "name"})
    given: dict[str, str] = {}
    for key, value in rest.items():
        argument, kinds_allowed, convert = keys[key]
        if argument in given:
            raise reader.error(
                (*path, key), f"sets {argument} like {given[argument]!r} does; keep one"
            )
        given[argument] = key
        reader.get(rest, path, key, kinds_allowed)
        if has_type(value, (int, float)) and value < 0:
            raise reader.error((*path, key), f"must not be negative, got {value!r}")
        try:
            arguments[argument] = convert(value)
        except (ValueError, TypeError) as exc:
            raise reader.error((*path, key), str(exc)) from None
    if kind == "vfio-user" and "socket" not in arguments:
        raise reader.error(path, "missing required key 'socket' (the vfio-user server's socket)")
    if kind == "vfio" and "spec" not in arguments:
        raise reader.error(path, "missing required key 'device' (mdev UUID, PCI address or path)")
    return DeviceConfig(
        kind, name, reader.where.line(path), factory, arguments, reader.file, accept_incoming
    )

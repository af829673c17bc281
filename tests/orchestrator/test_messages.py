"""The orchestrator's messages: DEVICES and its descriptors, parsed once into types."""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from devices.base import DeviceDescriptor
from devices.fsm import Feature
from orchestrator.engine.messages import Devices, decode_devices, encode_devices
from transport import LimitExceeded, Limits, ProtocolError
from transport.frames import encode_fields


def descriptors(count: int) -> list[DeviceDescriptor]:
    """``count`` distinct device descriptors."""
    return [DeviceDescriptor(f"dev{i}", "sim", 1, Feature.STOP_COPY) for i in range(count)]


def test_devices_round_trip() -> None:
    """encode_devices / decode_devices preserve every descriptor field."""
    devices = [*descriptors(3), DeviceDescriptor("gpu", "vfio", 7, Feature(7))]
    fields = msgpack.unpackb(encode_fields({"devices": encode_devices(devices)}))
    assert decode_devices(fields, Limits()) == devices
    assert decode_devices(fields["devices"]) == devices


def test_devices_message_round_trips() -> None:
    """Devices.to_fields and Devices.parse agree on every field."""
    message = Devices(tuple(descriptors(2)), True, False, 1, "boot", "m-1")
    fields = msgpack.unpackb(encode_fields(message.to_fields()))
    assert Devices.parse(fields) == message


def test_devices_message_names_a_bad_option() -> None:
    """A DEVICES message with a mistyped option is refused naming it."""
    fields = Devices(tuple(descriptors(1)), True, False, 1, "b", "m").to_fields()
    with pytest.raises(ProtocolError) as caught:
        Devices.parse(fields | {"p2p": 1})
    assert caught.value.field == "p2p"


@pytest.mark.parametrize(
    ("fields", "field", "exc"),
    [
        ({"devices": "x"}, "devices", ProtocolError),
        ({"devices": [{"name": "a"}] * 5}, "devices", LimitExceeded),
        ({"devices": [1]}, "devices[0]", ProtocolError),
        ({"devices": [{"name": "n" * 9, "kind": "k"}]}, "devices[0].name", LimitExceeded),
        ({"devices": [{"name": "n", "kind": "k" * 9}]}, "devices[0].kind", LimitExceeded),
        (
            {"devices": [{"name": "n", "kind": "k", "format_version": -1, "features": 1}]},
            "devices[0].format_version",
            ProtocolError,
        ),
        (
            {"devices": [{"name": "n", "kind": "k", "format_version": 1, "features": 64}]},
            "devices[0].features",
            ProtocolError,
        ),
        (
            {"devices": [{"name": "n", "kind": "k", "format_version": True, "features": 1}]},
            "format_version",
            ProtocolError,
        ),
        ({"devices": encode_devices(descriptors(1)) * 2}, "devices[1].name", ProtocolError),
    ],
)
def test_device_list_refusals(fields: dict[str, Any], field: str, exc: type[Exception]) -> None:
    """A bad DEVICES list is refused naming the device and field, or the limit."""
    limits = Limits(max_devices=4, max_name_length=8)
    with pytest.raises(exc) as caught:
        decode_devices(fields, limits)
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.field == field


def test_a_device_descriptor_carries_its_state_size() -> None:
    """DEVICES round-trips the state size (or None), and a bad one names its field."""
    sized = DeviceDescriptor("a", "simulated", 1, Feature.STOP_COPY, 4096)
    blind = DeviceDescriptor("b", "vfio:mtty", 1, Feature.STOP_COPY)
    assert decode_devices(encode_devices([sized, blind])) == [sized, blind]
    bad = encode_devices([sized])
    bad[0]["state_size"] = -1
    with pytest.raises(ProtocolError, match=r"devices\[0\].state_size"):
        decode_devices(bad)

"""A second look at model stream format 2: every split and every flipped bit end to end
in the decoder, and a format-1 peer refused by name (at the handshake, and in-stream
should a peer announce one format and send the other)."""

from __future__ import annotations

import struct
import zlib

import pytest

from devices import stream
from devices.base import DeviceDescriptor
from devices.simulated import SimulatedDevice
from orchestrator.engine.destination import Refused, match_devices
from tests.devices.test_stream import SIZE, decode, records, source_stream

#: Format 1's record header: type, body length, seq and a CRC-32 (16 bytes).
HEADER_V1 = struct.Struct("<BxxxIII")


def record_v1(kind: int, seq: int, body: bytes) -> bytes:
    """One record as format 1 framed it."""
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<BxxxII", kind, len(body), seq)))
    return HEADER_V1.pack(kind, len(body), seq, crc) + body


def test_every_two_way_split_and_a_byte_at_a_time_decode_exactly() -> None:
    """Cut at every byte position (inside each header, check and body), and fed one byte
    at a time, the stream rebuilds the source state exactly."""
    data, state = source_stream()
    for cut in range(len(data) + 1):
        assert decode([data[:cut], data[cut:]]) == (None, state), cut
    assert decode([data[i : i + 1] for i in range(len(data))]) == (None, state)


def test_a_flipped_bit_anywhere_is_refused_or_changes_nothing() -> None:
    """Flipping the lowest or highest bit of any byte is caught by a record's check, or
    lands in a header's padding, which carries nothing: never a wrong state accepted."""
    data, state = source_stream()
    pads = set()
    start = 0
    for each in records(data):
        pads |= {start + 1, start + 2, start + 3, *range(start + 12, start + 16)}
        start += len(each)
    for position in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[position] ^= bit
            verdict, decoded = decode([bytes(damaged)])
            if position in pads:
                assert (verdict, decoded) == (None, state), position
            else:
                assert verdict is not None, position  # corrupt, or short: a length grew


def test_a_format_1_device_is_refused_at_the_handshake_by_name() -> None:
    """A source announcing format 1 for a simulated device is refused naming both
    versions, before any device changes state."""
    here = SimulatedDevice("sim0", state_size=SIZE)
    offered = DeviceDescriptor("sim0", here.kind, 1, here.features, SIZE)
    with pytest.raises(Refused, match="sim0: state format v1 offered, v2 here"):
        match_devices([offered], {"sim0": here}, p2p=False)


def test_a_format_1_stream_is_refused_naming_its_format() -> None:
    """Format-1 records behind a handshake that said format 2 are refused as a format-1
    stream, not reported as corruption in transit."""
    data, _ = source_stream()
    hello_body = bytearray(records(data)[0][stream.HEADER.size :])
    struct.pack_into("<H", hello_body, 8, 1)  # the HELLO's version field
    following = records(data)[1][stream.HEADER.size :]
    old = record_v1(stream.HELLO, 0, bytes(hello_body)) + record_v1(stream.BLOCKS, 1, following)
    verdict, _ = decode([old])
    assert verdict is not None
    assert verdict == (
        "foreign stream: format 1 (16-byte record headers), this device reads format 2"
    )

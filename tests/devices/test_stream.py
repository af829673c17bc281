"""The block-device stream: decoding over any split, and short/corrupt/foreign rejection."""

from __future__ import annotations

import asyncio
import functools
import itertools
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import stream
from devices.errors import StateValidationError, TransitionError
from devices.fsm import State
from devices.ram import RamDevice
from devices.simulated import SimulatedDevice
from devices.stream import StreamDecoder, StreamIdentity
from devices.testing import read_until_pause

BLOCK = 64
SIZE = 64 * BLOCK
V = SimulatedDevice.format_version
IDENTITY = StreamIdentity("simulated", V, SIZE, BLOCK)


@functools.cache
def source_stream() -> tuple[bytes, bytes]:
    """A STOP_COPY stream of a small simulated device with ten zero blocks, and its state."""
    device = SimulatedDevice("src", state_size=SIZE, block_size=BLOCK, chunk_size=4 * BLOCK)
    device.memory[10 * BLOCK : 20 * BLOCK] = bytes(10 * BLOCK)

    async def read() -> list[bytes]:
        await device.set_state(State.STOP_COPY)
        return [b"".join(c) for c in await read_until_pause(device.save_channel())]

    return b"".join(asyncio.run(read())), bytes(device.memory)


def records(data: bytes) -> list[bytes]:
    """Split a stream into its records."""
    out, pos = [], 0
    while pos < len(data):
        size = stream.HEADER.size + stream.HEADER.unpack_from(data, pos)[1]
        out.append(data[pos : pos + size])
        pos += size
    return out


def decode(pieces: list[bytes], identity: StreamIdentity = IDENTITY) -> tuple[str | None, bytes]:
    """Feed ``pieces`` to a decoder over a state of 0xff bytes; its verdict and the state."""
    target = bytearray(b"\xff" * identity.state_size)

    def write(first: int, data: memoryview) -> None:
        target[first * BLOCK : first * BLOCK + len(data)] = data

    def zero(first: int, count: int) -> None:
        target[first * BLOCK : (first + count) * BLOCK] = bytes(count * BLOCK)

    decoder = StreamDecoder(identity, write, zero)
    for piece in pieces:
        decoder.feed(piece)
    return decoder.verdict(), bytes(target)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 1 << 20)))
def test_any_split_decodes_to_the_source_state(cuts: list[int]) -> None:
    """Fed in pieces split anywhere, the stream rebuilds the source state exactly."""
    data, state = source_stream()
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert decode(pieces) == (None, state)


def test_zero_runs_cost_no_data() -> None:
    """Ten zero blocks travel as one run entry, not as ten blocks of zeros."""
    data, _ = source_stream()
    # A header, a run count and two runs per record.
    framing = (stream.HEADER.size + 4 + 16) * len(records(data))
    assert len(data) <= (64 - 10) * BLOCK + framing  # no byte for the ten zero blocks


@pytest.mark.parametrize(
    ("identity", "reason"),
    [
        (StreamIdentity("ram", V, SIZE, BLOCK), "kind is 'simulated', this device has 'ram'"),
        (
            StreamIdentity("simulated", V + 1, SIZE, BLOCK),
            f"version is {V}, this device has {V + 1}",
        ),
        (StreamIdentity("simulated", V, 2 * SIZE, BLOCK), f"state size is {SIZE}"),
        (StreamIdentity("simulated", V, SIZE, 2 * BLOCK), f"block size is {BLOCK}"),
    ],
)
def test_foreign_stream_is_rejected_naming_the_field(identity: StreamIdentity, reason: str) -> None:
    """A stream of another kind, version, size or block size is foreign, and says which."""
    verdict, _ = decode([source_stream()[0]], identity)
    assert verdict is not None
    assert verdict.startswith("foreign stream: ")
    assert reason in verdict


def test_bytes_of_no_stream_are_rejected() -> None:
    """Bytes that are not a livemig stream at all are refused."""
    assert decode([b"\x01" + bytes(15) + b"GARBAGE" * 10])[0] is not None
    hello = stream.HEADER.pack(stream.HELLO, 4, 0, 0) + b"nope"
    assert "corrupt stream: checksum" in (decode([hello])[0] or "")


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda r: [], "short stream: nothing was received"),
        (lambda r: r[:-1], "before its END record"),
        (lambda r: r[:2] + r[3:], "record 3 arrived where record 2 was due"),
        (
            lambda r: [r[0], r[1][:-1] + b"?", *r[2:]],
            "corrupt stream: checksum mismatch in record 1",
        ),
        (lambda r: [*r, r[1]], "corrupt stream: data after the END record"),
        (lambda r: r[1:], "short stream: record 1 arrived where record 0 was due"),
        (
            lambda r: [r[0], stream.HEADER.pack(stream.BLOCKS, 1 << 30, 1, 0)],
            "claims a 1073741824-byte body",
        ),
    ],
    ids=["empty", "no-end", "lost-record", "flipped-byte", "after-end", "no-hello", "huge"],
)
def test_damaged_stream_is_rejected_with_the_reason(mangle: object, reason: str) -> None:
    """Short and corrupt streams are rejected, and the verdict names what is wrong."""
    assert callable(mangle)
    verdict, _ = decode(mangle(records(source_stream()[0])))
    assert reason in (verdict or "")


def test_blocks_never_sent_make_the_stream_short() -> None:
    """A well-formed session that never sent some blocks is short, naming the first missing."""
    data = stream.blocks(1, array("I", [0, 10]), [bytes(10 * BLOCK)])
    pieces = [stream.hello(IDENTITY), b"".join(data), stream.end(2, 10)]
    verdict, _ = decode(pieces)
    assert verdict == "short stream: 54 of 64 blocks never arrived (first missing block 10)"


async def test_device_rejects_a_foreign_stream_on_resuming_to_stop() -> None:
    """A RamDevice fed a simulated device's stream refuses it at RESUMING -> STOP, in ERROR."""
    dest = RamDevice("dst", size=SIZE, page_size=BLOCK, chunk_size=4 * BLOCK)
    await dest.set_state(State.RESUMING)
    await dest.resume_channel().write(source_stream()[0])
    with pytest.raises(TransitionError) as info:
        await dest.set_state(State.STOP)
    assert isinstance(info.value.__cause__, StateValidationError)
    assert str(info.value.__cause__) == (
        "dst: ram state rejected: foreign stream: kind is 'simulated', this device has 'ram'"
    )
    assert dest.state == State.ERROR

"""Every backend's resume channel takes its stream in pieces of any size.

The transport splits a chunk over several frames when the destination's
``max_payload`` is below it, so a destination device is fed pieces that cut records
and buffers anywhere; what it loads must be what the source saved.
"""

from __future__ import annotations

import pytest

from devices.fsm import State
from devices.testing import opened, read_until_pause
from tests.devices.contract import HARNESSES, Harness


@pytest.fixture(params=HARNESSES, ids=str)
def harness(request: pytest.FixtureRequest) -> Harness:
    """Each backend in turn."""
    return request.param  # type: ignore[no-any-return]


@pytest.mark.parametrize("piece", [1, 4093, 65536])
async def test_a_stream_written_in_pieces_of_any_size_loads_byte_exact(
    harness: Harness, piece: int
) -> None:
    """A stopped source's whole stream, written to the destination ``piece`` bytes at a
    time (cutting every record and buffer boundary), validates and ends byte-identical."""
    source = harness.make("src", seed=1)
    dest = harness.make("dst", seed=2)
    async with opened(source, dest):
        await source.set_state(State.STOP_COPY)
        chunks = await read_until_pause(source.save_channel())
        stream = b"".join(bytes(part) for chunk in chunks for part in chunk)
        head = 4096 if piece == 1 else len(stream)  # one-byte writes: a page of them
        stream_pieces = [stream[at : at + piece] for at in range(0, head, piece)]
        stream_pieces += [stream[head:]] if head < len(stream) else []
        await dest.set_state(State.RESUMING)
        sink = dest.resume_channel()
        for data in stream_pieces:
            await sink.write(data)
        await dest.set_state(State.STOP)
        assert await source.digest() == await dest.digest()

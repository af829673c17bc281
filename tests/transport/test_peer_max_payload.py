"""A peer's max_payload has a floor: a chunk goes in frames of at most that size, so a
peer announcing a few bytes would turn each MiB of state into a million frames (a header,
a checksum and a few Python objects each: 36 times the memory of the data buffered, and
seconds of the event loop), enough to starve every timer of the daemon."""

from __future__ import annotations

import asyncio
import os

import pytest
from transport_helpers import RawPeer, hello_fields

from transport import AuthConfig, Limits, ProtocolError, Server, Tag, connect
from transport.limits import MIN_MAX_PAYLOAD

#: Bound of every wait.
DEADLINE_S = 10.0


@pytest.mark.parametrize("announced", [0, 1, MIN_MAX_PAYLOAD - 1])
async def test_a_destination_taking_tiny_payloads_is_refused_naming_max_payload(
    announced: int,
) -> None:
    """A destination whose AUTH announces a max_payload under the floor fails connect()
    with a ProtocolError naming the field and the floor, before any chunk is cut."""
    done = asyncio.Event()

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = RawPeer(reader, writer)
        await peer.read_frame()
        answer = {"version": 1, "nonce": os.urandom(32), "auth": "none", "checksum": True}
        await peer.send(Tag.HELLO, answer)
        await peer.read_frame()
        await peer.send(Tag.AUTH, {"name": "dest", "max_payload": announced})
        assert await peer.read_frame() is None  # the source hung up
        await peer.close()
        done.set()

    listener = await asyncio.start_server(destination, "127.0.0.1", 0)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(ProtocolError) as caught:
            await connect(f"127.0.0.1:{port}", name="source", auth=AuthConfig(), timeout=DEADLINE_S)
        await asyncio.wait_for(done.wait(), DEADLINE_S)
    assert caught.value.field == "max_payload"
    assert str(caught.value) == f"max_payload: {announced} is below {MIN_MAX_PAYLOAD}"


async def test_a_source_taking_tiny_payloads_is_refused_with_a_cancel(server: Server) -> None:
    """A source whose HELLO announces a max_payload under the floor gets a CANCEL naming
    the field, and no session forms."""
    peer = await RawPeer.open(server.address)
    fields = hello_fields(os.urandom(16), os.urandom(32)) | {"max_payload": 16}
    await peer.send(Tag.HELLO, fields)
    answer = await asyncio.wait_for(peer.read_frame(), DEADLINE_S)
    await peer.close()
    assert answer is not None
    assert answer.tag is Tag.CANCEL
    assert answer.fields()["reason"] == f"max_payload: 16 is below {MIN_MAX_PAYLOAD}"


@pytest.mark.parametrize("value", [0, MIN_MAX_PAYLOAD - 1])
def test_limits_under_the_floor_are_refused(value: int) -> None:
    """Limits with a max_payload every peer would refuse fail where they are made."""
    with pytest.raises(ValueError, match=f"max_payload must be at least {MIN_MAX_PAYLOAD}"):
        Limits(max_payload=value)

"""What a session holds for an application that stops taking frames.

A peer's application may stall (a device load that hangs) or a hostile peer may send
faster than the application reads. Data frames wait in the receive buffers, whose
number is bounded; control frames are copied out of them as they are decoded, so
their queue needs a bound in bytes of its own: otherwise ``max_queued_frames`` control
payloads of ``max_control_payload`` each (256 MiB a channel with the defaults) could
pile up before reading pauses.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from transport_helpers import PSK, RawPeer, announce

from transport import AuthConfig, Limits, Session, Tag, serve
from transport.limits import KiB

#: Small limits, so the unbounded queue would be 16 MiB and the bounded one 272 KiB.
LIMITS = Limits(max_control_payload=16 * KiB, receive_segment_size=256 * KiB)
FLOOD = 1500


def queued_control_bytes(session: Session) -> int:
    """Payload bytes of the control frames waiting for recv()."""
    return sum(len(frame.payload) for _, frame in session._queue if frame._segment is None)


@pytest.mark.xfail(strict=True, reason="queued control frames are bounded by count only")
async def test_control_frames_an_application_does_not_take_stay_within_a_segment() -> None:
    """A peer floods control frames that the application does not take: reading pauses
    once they hold about one receive segment, not after max_queued_frames of them."""
    sessions: list[Session] = []
    arrived = asyncio.Event()

    async def handler(session: Session) -> None:
        sessions.append(session)
        arrived.set()
        await asyncio.Event().wait()  # takes nothing: the server's close ends it

    async with await serve(
        "127.0.0.1:0", handler, name="dest", auth=AuthConfig(psk=PSK), limits=LIMITS
    ) as server:
        peer = await RawPeer.open(server.address)
        assert (await peer.handshake(PSK)).tag is Tag.AUTH  # type: ignore[union-attr]
        await peer.send(Tag.DEVICES, announce(1))
        await arrived.wait()
        session = sessions[0]
        filler = {"x": "a" * (LIMITS.max_control_payload - 64)}
        for _ in range(FLOOD):
            peer.writer.write(peer.encode(Tag.COMMIT, filler))
        async with asyncio.timeout(10):
            while not session._chans[0].reading_paused:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.01)
        held = queued_control_bytes(session)
        peer.writer.transport.abort()
        with contextlib.suppress(ConnectionError):
            await peer.writer.wait_closed()
    assert held <= LIMITS.receive_segment_size + LIMITS.max_control_payload, held

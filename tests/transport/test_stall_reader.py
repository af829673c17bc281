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

from test_transport_hostile_tls import settled
from transport_helpers import PSK, RawPeer

from transport import AuthConfig, Limits, Session, Tag, serve
from transport.limits import KiB

#: Small limits: a queue bounded by count would hold 16 MiB, one bounded in bytes 528 KiB.
LIMITS = Limits(max_control_payload=16 * KiB, receive_segment_size=256 * KiB)
FLOOD = 1500


def queued_control_bytes(session: Session) -> int:
    """Payload bytes of the control frames waiting for recv()."""
    return sum(len(frame.payload) for _, frame in session._queue if frame._segment is None)


async def test_control_frames_an_application_does_not_take_stay_within_a_segment() -> None:
    """A peer floods control frames that the application does not take: reading pauses
    once their copies hold a receive segment's worth, not after max_queued_frames; when
    the application takes them again, reading resumes and every frame arrives."""
    sessions: list[Session] = []
    arrived, take, all_taken = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handler(session: Session) -> None:
        sessions.append(session)
        assert (await session.recv()).tag is Tag.DEVICES
        arrived.set()
        await take.wait()
        for _ in range(FLOOD):
            assert (await session.recv()).tag is Tag.COMMIT
        all_taken.set()

    async with await serve(
        "127.0.0.1:0", handler, name="dest", auth=AuthConfig(psk=PSK), limits=LIMITS
    ) as server:
        peer = await RawPeer.in_session(server.address)
        await arrived.wait()
        session = sessions[0]
        filler = {"x": "a" * (LIMITS.max_control_payload - 64)}
        for _ in range(FLOOD):
            peer.writer.write(peer.encode(Tag.COMMIT, filler))
        await settled(lambda: session._chans[0].reading_paused, "reading paused")
        held = queued_control_bytes(session)
        take.set()
        async with asyncio.timeout(10):
            await all_taken.wait()
        peer.writer.transport.abort()
        with contextlib.suppress(ConnectionError):
            await peer.writer.wait_closed()
    # The budget, then what the read that crossed it brought (at most a segment).
    assert held <= 2 * LIMITS.receive_segment_size + LIMITS.max_control_payload, held

"""Pacing against peers that stop: the paced readers stay bounded and get the error.

The pacer (orchestrator/engine/pacing.py) holds pre-copy readers while the session's
buffers are over budget; it never looks at the session's error. These tests check that
a stalled or failing peer still ends a held reader with an error that names it, and
that the buffers stay within the budget while it is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from orchestrator.engine import pacing
from orchestrator.engine.pacing import Pacer
from tests.conftest import Runner
from tests.faultproxy import FaultProxy
from transport import (
    AuthConfig,
    ConnectionLost,
    Limits,
    PeerCancelled,
    Session,
    SessionClosed,
    Tag,
    TransportError,
    connect,
    serve,
)
from transport.limits import KiB

PSK = b"pacing faults key"
CHUNK = 256 * KiB
LINK = 0.5
#: Upper bound for what must end "soon" (the link timeout plus slack for a loaded
#: machine): an upper bound, not a measurement.
BOUND = LINK * 1.25 + 5.0


class Held:
    """``session.backlog`` as the pacer reads it, noting when a reader is held: three
    readings in a row over the budget mean it read, waited, and read again."""

    def __init__(self, session: Session, budget: int) -> None:
        self.session = session
        self.budget = budget
        self.over = 0
        self.held = asyncio.Event()
        self.peak = 0

    def __call__(self) -> int:
        backlog = self.session.backlog()
        self.peak = max(self.peak, backlog)
        self.over = self.over + 1 if backlog > self.budget else 0
        if self.over >= 3:
            self.held.set()
        return backlog


async def paced_reader(session: Session, gate: Pacer) -> TransportError:
    """A pre-copy reader's loop (wait at the gate, send a chunk) until the session fails."""
    stop = asyncio.Event()  # never set: only the session's end may end this reader
    chunk = (os.urandom(CHUNK),)
    try:
        while True:
            await gate.wait(stop)
            await session.send_chunk(Tag.PRECOPY_DATA, 0, chunk)
    except TransportError as exc:
        return exc


@contextlib.asynccontextmanager
async def stuck() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A destination that takes DEVICES, then reads no more until the event is set, and
    then aborts its session with a reason (its buffers are small: it stops reading soon)."""
    give_up = asyncio.Event()

    async def handler(session: Session) -> None:
        frame = await session.recv()
        session.set_device_count(len(frame.fields()["devices"]))
        await give_up.wait()
        session.abort("disk full", code="device")

    limits = Limits(max_payload=CHUNK, receive_segment_size=CHUNK, receive_segments=2)
    async with await serve(
        "127.0.0.1:0",
        handler,
        name="dest",
        auth=AuthConfig(psk=PSK),
        limits=limits,
        link_timeout_s=LINK,
    ) as server:
        yield server.address, give_up


async def source(address: str) -> Session:
    """A one-device source with the short link timeout."""
    session = await connect(address, name="source", auth=AuthConfig(psk=PSK), link_timeout_s=LINK)
    await session.send_control(Tag.DEVICES, {"devices": ["dev0"]})
    session.set_device_count(1)
    return session


async def held_reader(session: Session) -> tuple[asyncio.Task[TransportError], Held]:
    """A paced reader on ``session`` before the link's rate is known (budget
    INITIAL_PIPE), once its pacer holds it: the reader's task and the pacer's view."""
    held = Held(session, pacing.INITIAL_PIPE)
    gate = Pacer(lambda: None, held, session.limit_unsent, lambda: session.error is None)
    reader = asyncio.create_task(paced_reader(session, gate))
    await asyncio.wait_for(held.held.wait(), BOUND)
    return reader, held


def test_a_destination_that_stops_reading_holds_the_reader_within_budget(run: Runner) -> None:
    """While the destination reads nothing the reader is held with our buffers at most a
    chunk over the budget; the destination's abort then ends it with its reason."""

    async def body() -> None:
        async with stuck() as (address, give_up):
            session = await source(address)
            reader, held = await held_reader(session)
            assert not reader.done()
            assert held.peak <= pacing.INITIAL_PIPE + CHUNK + 4 * KiB  # a chunk and headers
            give_up.set()
            error = await asyncio.wait_for(reader, BOUND)
        assert isinstance(error, PeerCancelled)
        assert str(error) == "destination refused: disk full"
        assert session.backlog() == 0

    run(body())


def test_a_link_that_stops_ends_a_held_reader_with_the_link_timeout(run: Runner) -> None:
    """A link that stops forwarding both ways while the reader is held ends it with
    ConnectionLost naming link_timeout_s, within about that timeout."""

    async def body() -> None:
        async with stuck() as (address, _):
            proxy = FaultProxy(address)
            try:
                session = await source(await proxy.start())
                reader, _ = await held_reader(session)
                proxy.stall()
                error = await asyncio.wait_for(reader, BOUND)
            finally:
                await proxy.close()
        assert isinstance(error, ConnectionLost)
        assert "(link_timeout_s)" in str(error)

    run(body())


def test_our_own_abort_with_a_reason_frees_a_held_reader(run: Runner) -> None:
    """Aborting with a reason lingers to deliver the CANCEL while the peer reads nothing;
    the held reader still gets out, with our reason."""

    async def body() -> None:
        async with stuck() as (address, _):
            session = await source(address)
            reader, _ = await held_reader(session)
            session.abort("operator gave up", code="cancelled")
            error = await asyncio.wait_for(reader, BOUND)
        assert isinstance(error, SessionClosed)
        assert str(error) == "session aborted: operator gave up"

    run(body())


async def test_a_failed_session_frees_a_held_reader_whatever_its_buffers_do() -> None:
    """A session that failed may never drain (a CANCEL lingering toward a peer that reads
    nothing holds them up to 2 s): the gate lets its reader go at once, to the send
    that raises the session's error, instead of waiting for the buffers."""
    failed = asyncio.Event()
    gate = Pacer(lambda: None, lambda: 10 * pacing.INITIAL_PIPE, lambda nbytes: None,
                 lambda: not failed.is_set())  # fmt: skip
    waiting = asyncio.create_task(gate.wait(asyncio.Event()))
    await asyncio.sleep(0)  # the reader is at the gate, over budget
    assert not waiting.done()
    failed.set()
    await asyncio.wait_for(waiting, BOUND)


async def test_cancelling_a_held_reader_leaves_no_task_and_the_gate_usable() -> None:
    """A reader cancelled while held at the gate raises CancelledError, leaves no task
    behind, and the gate lets the next reader through once the buffers are in budget."""
    backlog = [10 * pacing.INITIAL_PIPE]
    readings = 0
    read_again = asyncio.Event()

    def reading() -> int:
        nonlocal readings
        readings += 1
        if readings >= 2:
            read_again.set()
        return backlog[0]

    gate = Pacer(lambda: None, reading, lambda nbytes: None)
    waiter = asyncio.create_task(gate.wait(asyncio.Event()))
    await read_again.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert asyncio.all_tasks() == {asyncio.current_task()}
    backlog[0] = 0
    await asyncio.wait_for(gate.wait(asyncio.Event()), BOUND)

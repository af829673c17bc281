"""A destination that stops reading at one step of a migration, seen from the source.

The destination's application stops taking frames at one step and never comes back (a
load that hangs, a hostile peer): its transport fills its buffers and pauses reading,
and it goes on sending keep-alives (as a hostile peer may: our own transport sends
none on a channel whose reading it paused, which ends the wait sooner, at the source's
link timeout), so only the source's own bounds end the wait. Each test names the step
and the parameter that bounds it, and checks how long the source devices stayed out
of their running states. Where the destination stops reading -> source devices, bound:

- setup, PINGs unanswered (the clock's measure) -> running, connect_timeout_s;
- paused before the switchover, our buffers full -> running, until the operator's
  ``continue`` (taken) or cancel;
- SYNC barrier 1 or 2, before the window -> running, verdict_timeout_s;
- the STOP_COPY drain, a send blocked on the full pipe -> stopped, rolled back at
  max_stop_ms;
- END_OF_DEVICE or END_OF_STREAM ("loaded" awaited), or the source's send of either
  never returning -> stopped, rolled back at max_stop_ms;
- after it sent "loaded" (COMMIT out, "resumed" awaited) -> stopped with the outcome
  unknown after verdict_timeout_s (past COMMIT the source never runs them again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import transport
from devices.fsm import Feature, State
from orchestrator.engine.errors import OutcomeUnknown
from orchestrator.engine.phases import Phase
from tests.orchestrator.conftest import MB, MIB, SessionView, Spec
from tests.orchestrator.test_switchover_faults import Pair, Script, longest_stop, run_to_end, two
from tests.transport.transport_helpers import tls_auth
from transport import Frame, Tag
from transport.limits import KiB

#: The link timeout on both ends: shorter than the bounds, so a link that fell silent
#: (no keep-alives) would end these tests with its own error instead of the bound's.
LINK_S = 0.5
#: The bound under test: max_stop_ms and verdict_timeout_s alike.
BOUND_S = 0.8
PARAMS: dict[str, Any] = {
    "max_stop_ms": BOUND_S * 1e3,
    "verdict_timeout_s": BOUND_S,
    "link_timeout_s": LINK_S,
}
#: What a rollback's arcs may add to a bound on a loaded machine (an upper bound).
SLACK_S = 0.6
#: Stop-copy data well over what the buffers between the two hold (the source's write
#: buffer, the kernel's queues, the destination's receive segments), so the source's
#: drain blocks on a send.
BIG = Spec("big", size=16 * MIB, features=Feature.STOP_COPY | Feature.P2P)
#: The source's write buffer limits in the tests that fill it (8 and 2 MiB otherwise).
HIGH_WATER, LOW_WATER = 64 * KiB, 16 * KiB
#: Small receive buffers at the destination: its reading pauses soon after it stops.
DEST_LIMITS = transport.Limits(receive_segment_size=1 * MIB, receive_segments=2)


class Deaf(SessionView):
    """A destination session whose application stops taking frames at one point: the
    ``count``-th frame of ``tag`` (held, not delivered), or with ``tag`` None the first
    recv() after it sent "loaded". ``held`` is set then; ``release`` lets it go on.

    While deaf it sends keep-alives itself, as a hostile peer may: our own transport
    sends none on a channel whose reading it paused, so the source would end the wait
    with its link timeout instead of the bound under test.
    """

    def __init__(self, session: transport.Session, tag: Tag | None, count: int) -> None:
        super().__init__(session)
        self._tag = tag
        self._count = count
        self._seen = 0
        self._loaded = False
        self._now = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def _deafen(self) -> None:
        self.held.set()
        while not self.release.is_set():
            for channel in self._session._chans:
                if not channel.closing:
                    channel.send_control(Tag.PING, {"id": 0, "t": time.monotonic(), "reply": False})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), LINK_S / 4)  # the peer's timer

    async def send_control(self, tag: Tag, fields: Any = None, **kw: Any) -> None:
        await self._session.send_control(tag, fields, **kw)
        if tag == Tag.VERDICT and (fields or {}).get("stage") == "loaded":
            self._loaded = True

    def deafen(self) -> None:
        """Stop taking frames from the next recv() on (or the one after the frame that
        the application waits for now)."""
        self._now = True

    async def recv(self) -> Frame:
        if (self._now or (self._tag is None and self._loaded)) and not self.held.is_set():
            await self._deafen()
        frame = await self._session.recv()
        if frame.tag == self._tag:
            self._seen += 1
            if self._seen == self._count:
                await self._deafen()
        return frame


@pytest.fixture
def make_deaf(make_ends: Callable[..., Any], tmp_path: Path) -> Callable[..., Any]:
    """Factory of migration ends whose destination stops reading as a Deaf says."""

    async def make(
        specs: Sequence[Spec],
        tag: Tag | None,
        count: int = 1,
        tls: bool = False,
        mute: bool = False,
    ) -> Pair:
        """``mute``: the destination's transport answers no PING (keep-alives still go)."""
        deaf: list[Any] = []

        def deafen(session: transport.Session) -> Deaf:
            if mute:
                mute_pongs(session)
            deaf.append(Deaf(session, tag, count))
            return deaf[-1]

        # Its idle timeout stays long: the source's bounds must end the wait.
        ends = await make_ends(
            specs, wrap=deafen, idle_timeout_s=60.0, limits=DEST_LIMITS, link_timeout_s=LINK_S,
            auth=tls_auth(tmp_path) if tls else None,
        )  # fmt: skip
        return Pair(ends, Script(), deaf, ends.tasks, ends.accepted, asyncio.all_tasks())

    return make


def mute_pongs(session: transport.Session) -> None:
    """Make ``session`` drop the PINGs that ask for an answer, as a hostile peer may."""
    route = session._on_frame

    def on_frame(channel: Any, frame: Frame) -> None:
        if frame.tag is Tag.PING and frame.fields().get("reply") is not False:
            return
        route(channel, frame)

    session._on_frame = on_frame  # type: ignore[method-assign]


def small_write_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels opened from now on pause writing past HIGH_WATER bytes."""
    monkeypatch.setattr("transport.channel.WRITE_HIGH_WATER", HIGH_WATER)
    monkeypatch.setattr("transport.channel.WRITE_LOW_WATER", LOW_WATER)


def cut_sends(monkeypatch: pytest.MonkeyPatch, stuck: Tag | None = None) -> list[Tag]:
    """The tags of the source's sends that a cancel cut short (they were blocked);
    sends of ``stuck`` never return (a write buffer that never drains)."""
    cut: list[Tag] = []
    connect = transport.connect

    async def connect_and_watch(*args: Any, **kwargs: Any) -> transport.Session:
        session = await connect(*args, **kwargs)
        sending, controlling = session.send_chunk, session.send_control

        async def send_chunk(tag: Tag, device: int, chunk: Any) -> int:
            try:
                return await sending(tag, device, chunk)
            except asyncio.CancelledError:
                cut.append(tag)
                raise

        async def send_control(tag: Tag, fields: Any = None, **kw: Any) -> None:
            try:
                if tag == stuck:
                    await asyncio.Event().wait()
                await controlling(tag, fields, **kw)
            except asyncio.CancelledError:
                cut.append(tag)
                raise

        session.send_chunk = send_chunk  # type: ignore[method-assign]
        session.send_control = send_control  # type: ignore[method-assign]
        return session

    monkeypatch.setattr(transport, "connect", connect_and_watch)
    return cut


def assert_named(error: BaseException | None, parameter: str) -> None:
    """The migration failed with an error naming ``parameter``, not the link's timeout."""
    assert error is not None
    assert parameter in str(error), str(error)
    assert "link_timeout_s" not in str(error), str(error)


async def test_a_destination_that_answers_no_ping_fails_the_setup_in_time(make_deaf: Any) -> None:
    """Past DEVICES_ACCEPTED the destination answers no PING (keep-alives still flow):
    the setup's clock measure fails after connect_timeout_s, the devices never stopped."""
    pair = await make_deaf(two(), None, mute=True)
    migration = pair.migration(**(PARAMS | {"connect_timeout_s": BOUND_S}))
    async with asyncio.timeout(BOUND_S + 4 * SLACK_S):  # unbounded, it never ends
        error = await run_to_end(migration)
    assert_named(error, "connect_timeout_s")
    assert "PING" in str(error), str(error)
    assert longest_stop(pair.ends.trace) == 0.0
    await pair.assert_rolled_back(migration)


async def test_a_pause_with_a_destination_that_stops_reading_still_takes_continue(
    make_deaf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused before the switchover when the destination stops reading, our write buffer
    full: the pause goes on sampling (it must not wait on the link to say it is alive)
    and takes ``continue``; the first barrier then fails at verdict_timeout_s with the
    devices running."""
    small_write_buffer(monkeypatch)
    hot = [Spec(name, seed=i, dirty_rate=100 * MB) for i, name in enumerate("ab")]
    pair = await make_deaf(hot, None)
    migration = pair.migration(**(PARAMS | {"pause_before_switchover": True}))
    paused, stalled = asyncio.Event(), asyncio.Event()
    last: tuple[int, int] = (0, -1)
    idle_samples = 0

    def watch(stats: Any) -> None:
        """Count the samples (one an iteration) in which nothing more was sent."""
        nonlocal last, idle_samples
        paused.set() if stats.status == "pre-switchover" else None
        if stats.iterations != last[0]:
            idle_samples += stats.transferred_bytes == last[1] and pair.scripted[0].held.is_set()
            last = (stats.iterations, stats.transferred_bytes)
        if idle_samples >= 3:
            stalled.set()

    migration.add_listener(watch)
    run = asyncio.create_task(run_to_end(migration))
    await paused.wait()
    pair.scripted[0].deafen()
    try:
        async with asyncio.timeout(5):  # the pipe fills in a few iterations of 0.1 s
            await stalled.wait()
    finally:
        migration.continue_switchover()
    error = await run
    assert_named(error, "verdict_timeout_s")
    assert longest_stop(pair.ends.trace) == 0.0
    await pair.assert_rolled_back(migration)


@pytest.mark.parametrize("barrier", [1, 2])
async def test_a_destination_deaf_at_a_barrier_fails_it_with_the_devices_running(
    make_deaf: Any, barrier: int
) -> None:
    """Stopped reading at a SYNC barrier (the pre-copy readers still streaming at the
    first): the barrier fails after verdict_timeout_s and the devices never stopped."""
    pair = await make_deaf(two(), Tag.SYNC, barrier)
    migration = pair.migration(**PARAMS)
    error = await run_to_end(migration)
    assert_named(error, "verdict_timeout_s")
    assert "did not catch up" in str(error)
    assert pair.scripted[0].held.is_set()
    assert longest_stop(pair.ends.trace) == 0.0
    assert all(e.new in (State.PRE_COPY, State.RUNNING) for e in pair.ends.trace.entries)
    await pair.assert_rolled_back(migration)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_destination_deaf_in_the_drain_rolls_back_at_the_stop_bound(
    make_deaf: Any, monkeypatch: pytest.MonkeyPatch, tls: bool
) -> None:
    """Stopped reading at the first stop-copy chunk, with more to send than the pipe
    holds: the source's drain blocks on a send, and max_stop_ms ends it and rolls back
    about the bound after the devices stopped."""
    cut = cut_sends(monkeypatch)
    small_write_buffer(monkeypatch)
    pair = await make_deaf([BIG], Tag.STOPCOPY_DATA, tls=tls)
    migration = pair.migration(**PARAMS)
    error = await run_to_end(migration)
    assert_named(error, "max_stop_ms")
    assert cut == [Tag.STOPCOPY_DATA], "the bound cut a blocked stop-copy send"
    assert longest_stop(pair.ends.trace) < BOUND_S + SLACK_S
    await pair.assert_rolled_back(migration)


@pytest.mark.parametrize("tag", [Tag.END_OF_DEVICE, Tag.END_OF_STREAM], ids=lambda t: t.name)
async def test_a_destination_deaf_before_loading_rolls_back_at_the_stop_bound(
    make_deaf: Any, tag: Tag
) -> None:
    """Stopped reading at a device's or the stream's end, so "loaded" never comes: the
    wait ends at max_stop_ms with a rollback, not at verdict_timeout_s or timeout_s."""
    pair = await make_deaf(two(), tag)
    # A verdict timeout far past the stop bound: the stop bound must be what ends it.
    migration = pair.migration(**(PARAMS | {"verdict_timeout_s": 30.0}))
    error = await run_to_end(migration)
    assert_named(error, "max_stop_ms")
    assert pair.scripted[0].held.is_set()
    assert longest_stop(pair.ends.trace) < BOUND_S + SLACK_S
    await pair.assert_rolled_back(migration)


@pytest.mark.parametrize("tag", [Tag.END_OF_DEVICE, Tag.END_OF_STREAM], ids=lambda t: t.name)
async def test_a_device_or_stream_end_that_cannot_be_sent_rolls_back_at_the_stop_bound(
    make_deaf: Any, monkeypatch: pytest.MonkeyPatch, tag: Tag
) -> None:
    """The source's send of END_OF_DEVICE or END_OF_STREAM never returns (its write
    buffer full behind a destination that reads nothing): max_stop_ms ends the send and
    rolls back, the devices stopped about the bound."""
    cut = cut_sends(monkeypatch, stuck=tag)
    pair = await make_deaf(two(), None)
    migration = pair.migration(**(PARAMS | {"verdict_timeout_s": 30.0}))
    error = await run_to_end(migration)
    assert_named(error, "max_stop_ms")
    assert tag in cut, cut
    assert longest_stop(pair.ends.trace) < BOUND_S + SLACK_S
    await pair.assert_rolled_back(migration)


async def test_a_destination_deaf_after_loaded_leaves_an_unknown_outcome(make_deaf: Any) -> None:
    """Stopped reading once it said "loaded": COMMIT went, so the source must not run the
    devices again; after verdict_timeout_s it reports the outcome unknown, stopped."""
    pair = await make_deaf(two(), None)
    migration = pair.migration(**PARAMS)
    run = asyncio.create_task(run_to_end(migration))
    await pair.held()
    held_at = time.monotonic()
    error = await run
    waited = time.monotonic() - held_at
    assert isinstance(error, OutcomeUnknown), repr(error)
    assert_named(error, "verdict_timeout_s")
    assert Phase.COMMITTED in migration.phases
    assert waited < BOUND_S + SLACK_S
    assert [d.state for d in pair.ends.sources] == [State.STOP, State.STOP]
    await pair.settle()
    assert [d.state for d in pair.ends.sources] == [State.STOP, State.STOP]

"""Pre-copy pacing: the pipe to the destination holds a few milliseconds of link."""

from __future__ import annotations

import asyncio

from orchestrator.engine import pacing
from orchestrator.engine.pacing import Pacer

MB = 1_000_000


class Pipe:
    """A fake session: what was submitted, and a queue the 'link' drains per reading."""

    def __init__(self, waiting: list[int], submitted: int) -> None:
        self.readings = list(waiting)
        self.submitted = submitted
        self.calls = 0
        self.read_again = asyncio.Event()

    def waiting(self) -> int:
        self.calls += 1
        if self.calls >= 2:
            self.read_again.set()
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def pacer(pipe: Pipe, rate: float | None = 100 * MB, rtt_s: float = 0.01) -> Pacer:
    return Pacer(lambda: rate, lambda: rtt_s, lambda: pipe.submitted, pipe.waiting)


def test_budget_is_link_time_plus_two_round_trips_with_a_floor() -> None:
    """The budget follows the measured rate and round trip, never below MIN_PIPE."""
    pipe = Pipe([0], 0)
    assert pacer(pipe, 100 * MB, 0.01).budget() == 100 * MB * (pacing.PIPE_S + 0.02)
    assert pacer(pipe, 1 * MB, 0.0).budget() == pacing.MIN_PIPE
    assert pacer(pipe, None).budget() == pacing.INITIAL_PIPE


async def test_within_budget_it_returns_without_reading_the_kernel_queues() -> None:
    """While fewer bytes than the budget were ever submitted, no system call is made."""
    pipe = Pipe([10 * MB], submitted=pacing.MIN_PIPE)
    await pacer(pipe, 1 * MB, 0.0).wait(asyncio.Event())
    assert pipe.calls == 0


async def test_over_budget_it_waits_until_the_pipe_drained_below_it() -> None:
    """Readings over the budget hold the reader; the first within it lets it go."""
    budget = pacing.MIN_PIPE
    pipe = Pipe([3 * budget, 2 * budget, budget + 1, budget, 0], submitted=10 * budget)
    await pacer(pipe, 1 * MB, 0.0).wait(asyncio.Event())
    assert pipe.calls == 4
    assert pipe.readings == [0]


async def test_a_stop_releases_a_waiting_reader() -> None:
    """A reader held by a pipe that never drains returns once the readers are stopped."""
    pipe = Pipe([100 * MB], submitted=200 * MB)
    stop = asyncio.Event()
    waiter = asyncio.create_task(pacer(pipe, 1 * MB, 0.0).wait(stop))
    await pipe.read_again.wait()  # held: it read the queue, waited, and read it again
    stop.set()
    await asyncio.wait_for(waiter, 1.0)
    assert waiter.done()

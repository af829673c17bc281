"""Pre-copy pacing: what waits to be sent holds a few milliseconds of link."""

from __future__ import annotations

import asyncio

from orchestrator.engine import pacing
from orchestrator.engine.pacing import Pacer

MB = 1_000_000


class Pipe:
    """A fake session: our buffers, drained by the link one reading at a time, and the
    kernel bounds set on it."""

    def __init__(self, backlog: list[int]) -> None:
        self.readings = list(backlog)
        self.calls = 0
        self.read_again = asyncio.Event()
        self.kernel_bounds: list[int] = []

    def backlog(self) -> int:
        self.calls += 1
        if self.calls >= 2:
            self.read_again.set()
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def pacer(pipe: Pipe, rate: float | None = 100 * MB) -> Pacer:
    return Pacer(lambda: rate, pipe.backlog, pipe.kernel_bounds.append)


def test_budget_is_link_time_with_a_floor() -> None:
    """The budget follows the measured rate, never below MIN_PIPE; INITIAL_PIPE before."""
    pipe = Pipe([0])
    assert pacer(pipe, 100 * MB).budget() == 100 * MB * pacing.PIPE_S
    assert pacer(pipe, 1 * MB).budget() == pacing.MIN_PIPE
    assert pacer(pipe, None).budget() == pacing.INITIAL_PIPE


async def test_the_kernel_bound_follows_the_budget_when_it_moves() -> None:
    """The kernel's unsent bound is set at once, again when the rate moves by a lot,
    and not for every small change (a system call per channel each time)."""
    rate: list[float | None] = [None]
    pipe = Pipe([0])
    gate = Pacer(lambda: rate[0], pipe.backlog, pipe.kernel_bounds.append)
    stop = asyncio.Event()
    await gate.wait(stop)
    rate[0] = 50 * MB
    await gate.wait(stop)
    rate[0] = 55 * MB
    await gate.wait(stop)
    assert pipe.kernel_bounds == [pacing.INITIAL_PIPE, 50 * MB * pacing.PIPE_S]


async def test_over_budget_it_waits_until_our_buffers_drained_below_it() -> None:
    """Readings over the budget hold the reader; the first within it lets it go."""
    budget = pacing.MIN_PIPE
    pipe = Pipe([3 * budget, 2 * budget, budget + 1, budget, 0])
    await pacer(pipe, 1 * MB).wait(asyncio.Event())
    assert pipe.calls == 4
    assert pipe.readings == [0]


async def test_a_stop_releases_a_waiting_reader() -> None:
    """A reader held by buffers that never drain returns once the readers are stopped."""
    pipe = Pipe([100 * MB])
    stop = asyncio.Event()
    waiter = asyncio.create_task(pacer(pipe, 1 * MB).wait(stop))
    await pipe.read_again.wait()  # held: it read the backlog, waited, and read it again
    stop.set()
    await asyncio.wait_for(waiter, 1.0)
    assert waiter.done()

"""Pre-copy pacing: keep what waits to be sent to a few milliseconds of the link.

Why it matters. The devices stop only once the destination has taken in everything
sent so far (the SYNC barrier), and while that barrier waits, the devices run and
dirty what the stop-copy will then carry. Unpaced, pre-copy fills every buffer on the
way: the transport's write buffer (8 MiB a channel) and the kernel's autotuned send
queue. On loopback that is a millisecond of link; at 100 Mbit/s it was 13 MB, over a
second: a device reported its initial data read long before it had crossed, the
switchover was decided with the pipe full, and the barrier's wait left 20-35 ms of
dirt for the window against an estimate of 2 ms. A cancel or a failure also waited
behind that backlog.

So what waits to be sent is bounded twice by the budget (``PIPE_S`` of the link's
rate, at least ``MIN_PIPE``): in the kernel by TCP_NOTSENT_LOWAT, and in our own
buffers by :meth:`Pacer.wait`, which a reader calls before each read and which sleeps
about the time the excess takes to leave. What is in flight is not bounded: TCP's
congestion window governs it. A first version bounded the unacknowledged bytes
instead; that held TCP application-limited, so neither its window nor its send buffer
grew (the kernel grows the buffer only for a writer that fills it), and on a 30 ms
RTT link and a lossy one it halved the throughput. With the kernel's own bound the
socket still reports itself full, so the buffer autotunes, and a few milliseconds
always queue behind the window, so the link stays saturated. On loopback the budget
is tens of MB and never binds. Until the link's rate is known (it is measured only
while the link is saturated), the budget is ``INITIAL_PIPE``: a rate of bytes handed
to the socket would be memory speed and bound nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from transport.limits import KiB, MiB

#: Link time pre-copy may keep queued behind TCP's window, in each of the two places.
PIPE_S = 0.02
#: The budget until the link's rate is measured.
INITIAL_PIPE = 2 * MiB
#: The least the budget allows whatever the rate: a model's chunk.
MIN_PIPE = 256 * KiB
#: Bounds of one sleep while over budget: short enough to refill before TCP runs dry.
MIN_WAIT_S = 0.0005
MAX_WAIT_S = 0.01
#: The kernel's bound is set again when the budget moved by more than this fraction.
RESET_FRACTION = 0.25


class Pacer:
    """The pre-copy readers' shared gate on what waits to be sent."""

    def __init__(
        self,
        rate: Callable[[], float | None],
        backlog: Callable[[], int],
        limit_unsent: Callable[[int], None],
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        """``rate``: the link's bytes/s (None until measured); ``backlog``: bytes in our
        buffers; ``limit_unsent``: sets the kernel's bound on unsent bytes; ``alive``:
        whether the session can still send (a failed one's buffers may never drain:
        a CANCEL lingers up to 2 s for a peer that reads nothing)."""
        self._rate = rate
        self._backlog = backlog
        self._limit_unsent = limit_unsent
        self._alive = alive
        self._kernel_budget = 0

    def budget(self) -> int:
        """How many bytes may wait to be sent now, in the kernel and in our buffers each."""
        rate = self._rate()
        if rate is None:
            return INITIAL_PIPE
        return max(MIN_PIPE, round(rate * PIPE_S))

    async def wait(self, stop: asyncio.Event) -> None:
        """Return once our buffers are within budget, ``stop`` is set, or the session
        failed (the reader's next send then raises its error)."""
        budget = self.budget()
        if abs(budget - self._kernel_budget) > RESET_FRACTION * self._kernel_budget:
            self._limit_unsent(budget)
            self._kernel_budget = budget
        while not stop.is_set() and self._alive() and (backlog := self._backlog()) > budget:
            rate = self._rate()
            delay = (backlog - budget) / rate if rate else MIN_WAIT_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(MAX_WAIT_S, max(MIN_WAIT_S, delay)))

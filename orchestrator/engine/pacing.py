"""Pre-copy pacing: keep what waits to cross the link to a few milliseconds of it.

Why it matters. The devices stop only once the destination has taken in everything
sent so far (the SYNC barrier), and while that barrier waits, the devices run and
dirty what the stop-copy will then carry. Unpaced, pre-copy fills every buffer on the
way: the transport's write buffer (8 MiB a channel) and the kernel's autotuned send
queue. On loopback that is a millisecond of link; at 100 Mbit/s it was 13 MB, over a
second: a device reported its initial data read long before it had crossed, the
switchover was decided with the pipe full, and the barrier's wait left 20-35 ms of
dirt for the window against an estimate of 2 ms. A cancel or a failure also waited
behind that backlog.

So a reader asks :meth:`Pacer.wait` before each read: while more than the budget
(``PIPE_S`` of the link's rate plus two round trips, at least ``MIN_PIPE``) waits
unacknowledged, it sleeps for about the time the excess takes to cross. Two round
trips of data in flight keep TCP's window full even if the rate is underestimated by
half, so pacing never holds the link below its rate and the measured rate stays true;
on loopback the budget is tens of MB and never binds. Until the link's rate is known
(it is measured only while the link is saturated), the budget is ``INITIAL_PIPE``: a
rate of bytes handed to the socket would be memory speed and bound nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from transport.limits import KiB, MiB

#: Link time pre-copy may keep queued beyond two round trips.
PIPE_S = 0.02
#: The budget until the link's rate is measured.
INITIAL_PIPE = 2 * MiB
#: The least the budget allows whatever the rate: a model's chunk, and enough waiting
#: for the link meter to see a saturated link (LinkMeter.SATURATED).
MIN_PIPE = 256 * KiB
#: Bounds of one sleep while over budget: short enough to refill before the link idles.
MIN_WAIT_S = 0.0005
MAX_WAIT_S = 0.01


class Pacer:
    """The pre-copy readers' shared gate on the depth of the pipe."""

    def __init__(
        self,
        rate: Callable[[], float | None],
        rtt_s: Callable[[], float],
        submitted: Callable[[], int],
        waiting: Callable[[], int],
    ) -> None:
        """``rate``: the link's bytes/s (None until measured); ``submitted``: bytes handed to
        the session so far (cheap); ``waiting``: bytes not yet acknowledged by the peer
        (reads the kernel's queues, so called only when the cheap bound is over)."""
        self._rate = rate
        self._rtt_s = rtt_s
        self._submitted = submitted
        self._waiting = waiting
        #: Bytes submitted minus waiting at the last reading: acknowledged by then.
        self._acknowledged = 0

    def budget(self) -> int:
        """How many bytes may wait unacknowledged now."""
        rate = self._rate()
        if rate is None:
            return INITIAL_PIPE
        return max(MIN_PIPE, round(rate * (PIPE_S + 2 * self._rtt_s())))

    async def wait(self, stop: asyncio.Event) -> None:
        """Return once the pipe is within budget, or ``stop`` is set."""
        while not stop.is_set():
            budget = self.budget()
            submitted = self._submitted()
            if submitted - self._acknowledged <= budget:
                return  # even if nothing more was acknowledged, it fits
            waiting = self._waiting()
            self._acknowledged = submitted - waiting
            if waiting <= budget:
                return
            rate = self._rate()
            delay = (waiting - budget) / rate if rate else MIN_WAIT_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(MAX_WAIT_S, max(MIN_WAIT_S, delay)))

"""Bandwidth: a cap on what a session writes per second (pure).

The rate a migration achieves is measured by the orchestrator
(``orchestrator/engine/stats.py``), which knows what the stream had to carry.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A cap lets at most this many seconds' worth of bytes through at once after idling.
WINDOW = 0.1


class TokenBucket:
    """A byte-rate cap like QEMU's max-bandwidth, changeable at any time.

    ``take(n)`` debits ``n`` bytes and says how long to wait before sending more, so a
    chunk larger than the burst still goes out whole (then the sender waits it off).
    """

    def __init__(
        self, rate: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._rate: float | None = None
        self._tokens = 0.0
        self._stamp = clock()
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        """The cap in bytes per second, None when unlimited."""
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """Change the cap; None removes it. Debt already owed is kept at the new rate."""
        if rate is not None and rate <= 0:
            raise ValueError(f"max bandwidth must be positive, got {rate}")
        self._refill()
        self._rate = rate
        self._tokens = min(self._tokens, self._burst())

    def _burst(self) -> float:
        return 0.0 if self._rate is None else self._rate * WINDOW

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(self._burst(), self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def take(self, nbytes: int) -> None:
        """Debit ``nbytes`` sent (no-op when unlimited)."""
        if self._rate is None:
            return
        self._refill()
        self._tokens -= nbytes

    def delay(self) -> float:
        """Seconds to wait until the debt is paid; 0.0 when sending may go on."""
        if self._rate is None:
            return 0.0
        self._refill()
        return max(0.0, -self._tokens / self._rate)

"""Bandwidth: what a session really writes per second, and a cap on it (pure)."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Shortest window a rate sample covers; shorter ones would be scheduler noise.
WINDOW = 0.1


class BandwidthEstimator:
    """Bytes actually written per second, smoothed over windows of at least 100 ms.

    ``counter`` returns the bytes written so far (handed to the kernel, not merely
    queued). Each closed window's rate enters an exponential moving average, so the
    convergence policy sees a steady number that still follows the link within a second.
    """

    def __init__(
        self,
        counter: Callable[[], int],
        *,
        clock: Callable[[], float] = time.monotonic,
        smoothing: float = 0.3,
    ) -> None:
        self._counter = counter
        self._clock = clock
        self._smoothing = smoothing
        self._window_start = clock()
        self._window_bytes = counter()
        self._rate: float | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes written since the session started."""
        return self._counter()

    def sample(self) -> None:
        """Close the current window if it is at least 100 ms old."""
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < WINDOW:
            return
        total = self._counter()
        current = (total - self._window_bytes) / elapsed
        if self._rate is None:
            self._rate = current
        else:
            self._rate += self._smoothing * (current - self._rate)
        self._window_start, self._window_bytes = now, total

    def rate(self) -> float:
        """Smoothed bytes per second; 0.0 until the first window closed."""
        self.sample()
        return self._rate or 0.0


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

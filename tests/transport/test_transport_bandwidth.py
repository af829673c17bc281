"""The token bucket, driven by a fake clock (no timing)."""

from __future__ import annotations

import pytest

from transport import TokenBucket


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_without_rate_never_waits() -> None:
    """Unlimited bandwidth never asks the sender to wait."""
    bucket = TokenBucket(None, clock=Clock())
    bucket.take(10**12)
    assert bucket.delay() == 0.0


def test_bucket_debt_is_paid_at_the_rate() -> None:
    """Sending 2 MB at 1 MB/s asks for a wait that ends once the debt is paid."""
    clock = Clock()
    bucket = TokenBucket(1_000_000, clock=clock)
    bucket.take(2_000_000)
    assert bucket.delay() == pytest.approx(2.0)
    clock.now += 1.5
    assert bucket.delay() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.delay() == 0.0


def test_bucket_rate_change_applies_to_the_debt() -> None:
    """Raising the cap mid-migration shortens the wait; removing it ends it."""
    clock = Clock()
    bucket = TokenBucket(1_000_000, clock=clock)
    bucket.take(1_000_000)
    bucket.set_rate(4_000_000)
    assert bucket.delay() == pytest.approx(0.25)
    bucket.set_rate(None)
    assert bucket.delay() == 0.0
    with pytest.raises(ValueError, match="positive"):
        bucket.set_rate(0)


def test_bucket_burst_is_bounded_after_idle() -> None:
    """A long idle period earns at most 100 ms worth of burst."""
    clock = Clock()
    bucket = TokenBucket(1_000_000, clock=clock)
    clock.now += 60
    bucket.take(300_000)
    assert bucket.delay() == pytest.approx(0.2)

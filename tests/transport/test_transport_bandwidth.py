"""Bandwidth estimator and token bucket, driven by a fake clock (no timing)."""

from __future__ import annotations

import pytest

from transport import BandwidthEstimator, TokenBucket


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_estimator_reports_bytes_written_per_second() -> None:
    """Steady writing of 1.25 MB per 125 ms reads as 10 MB/s."""
    clock, written = Clock(), [0]
    estimator = BandwidthEstimator(lambda: written[0], clock=clock)
    assert estimator.rate() == 0.0
    for _ in range(20):
        written[0] += 1_250_000
        clock.now += 0.125
        estimator.sample()
    assert estimator.rate() == pytest.approx(10_000_000)
    assert estimator.total_bytes == 25_000_000


def test_estimator_ignores_windows_shorter_than_100ms() -> None:
    """Samples closer than 100 ms apart do not close a window."""
    clock, written = Clock(), [0]
    estimator = BandwidthEstimator(lambda: written[0], clock=clock)
    written[0] = 5_000
    clock.now += 0.001
    assert estimator.rate() == 0.0


def test_estimator_smooths_and_decays_when_idle() -> None:
    """After writing stops the estimate falls towards zero window by window."""
    clock, written = Clock(), [0]
    estimator = BandwidthEstimator(lambda: written[0], clock=clock)
    written[0], clock.now = 1_000_000, clock.now + 0.125
    high = estimator.rate()
    clock.now += 0.125
    lower = estimator.rate()
    clock.now += 0.125
    assert 0 < estimator.rate() < lower < high


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

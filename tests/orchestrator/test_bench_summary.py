"""The bench's summary over repeated runs: what the estimate promised against what came."""

from __future__ import annotations

import pytest

from orchestrator.bench.inprocess import summarize


def run(downtime: float | None, expected: float | None) -> dict[str, object]:
    return {
        "status": "completed",
        "verified": True,
        "downtime_ms": downtime,
        "expected_downtime_ms": expected,
        "total_ms": 100.0,
    }


def test_the_summary_puts_the_measured_downtime_against_the_expected() -> None:
    """Each run's measured over expected downtime is summarised; runs lacking one are skipped."""
    summary = summarize([run(2.0, 1.0), run(1.0, 2.0), run(None, 1.0), run(1.0, None)])
    ratio = summary["downtime_over_expected"]
    assert ratio["min"] == pytest.approx(0.5)
    assert ratio["max"] == pytest.approx(2.0)
    assert summary["expected_downtime_ms"]["max"] == 2.0

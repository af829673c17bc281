"""Fixtures for every test directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``livemig``'s ``main`` configures structlog for the process (level filter
    included); put the defaults back, or later tests' ``capture_logs`` miss info events."""
    yield
    structlog.reset_defaults()

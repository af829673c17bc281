"""Fixtures for every test directory."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import structlog
import uvloop

#: Runs a test's coroutine to its end on a fresh event loop (see the ``run`` fixture).
Runner = Callable[[Coroutine[Any, Any, None]], None]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``livemig``'s ``main`` configures structlog for the process (level filter
    included); put the defaults back, or later tests' ``capture_logs`` miss info events."""
    yield
    structlog.reset_defaults()


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a test's coroutine on a fresh event loop of each kind: the daemons run
    uvloop, the rest of the suite asyncio, and what a test checks must hold on both."""

    def run(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(coro)

    return run

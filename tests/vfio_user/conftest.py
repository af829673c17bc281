"""Fixtures shared by the vfio-user tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.vfio_user.servers import Server


@pytest.fixture
def started() -> Iterator[list[Server]]:
    """Server processes a test started, stopped after it."""
    made: list[Server] = []
    yield made
    for server in made:
        server.stop()

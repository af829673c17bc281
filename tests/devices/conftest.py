"""Per-backend skips and cleanup for the device contract suite (tests/devices/contract.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.devices.contract import HARNESSES, Harness


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip, with its reason, each contract test a backend lacks by construction."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        harness = callspec.params.get("harness") if callspec else None
        if not isinstance(harness, Harness):
            continue
        name = item.name if item.name in harness.lacks else item.originalname  # type: ignore[attr-defined]
        if name in harness.lacks:
            item.add_marker(pytest.mark.skip(reason=f"{harness}: {harness.lacks[name]}"))


@pytest.fixture(autouse=True)
async def _backend_cleanup() -> AsyncIterator[None]:
    """Let backends with processes and connections release them after each test."""
    yield
    for harness in HARNESSES:
        if harness.cleanup is not None:
            await harness.cleanup()

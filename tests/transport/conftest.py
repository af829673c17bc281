"""Fixtures of the transport tests: a PSK-authenticated destination that records."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from transport_helpers import PSK, Recorder

from transport import AuthConfig, Server, serve


@pytest.fixture
def recorder() -> Recorder:
    """A fresh recording handler."""
    return Recorder()


@pytest.fixture
async def server(recorder: Recorder) -> AsyncIterator[Server]:
    """A PSK-authenticated destination on a free loopback port running ``recorder``."""
    async with await serve("127.0.0.1:0", recorder, name="dest", auth=AuthConfig(psk=PSK)) as srv:
        yield srv

"""A COMMIT that provably never left this host is withdrawn, and the source runs again.

COMMIT is the point of no return once a byte of it may reach the destination. A link
that stops taking our data after the destination said "loaded" (the destination or a
box on the way reads no more) can leave COMMIT whole in our own write buffer, behind
data the kernel would not take: not one byte of it reached the kernel. The connection
is then shut for writing at once, so nothing queued can follow, and the source rolls
back instead of reporting an unknown outcome.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

import transport
from orchestrator.engine.errors import MigrationError, OutcomeUnknown
from tests.orchestrator.conftest import MIB, Spec
from transport import Tag
from transport.channel import WRITE_HIGH_WATER
from transport.limits import KiB

#: Bound of every wait (the migration ends in about a second).
DEADLINE_S = 30.0


def fill_behind(session: transport.Session, over: int) -> None:
    """Write frames on the channel COMMIT goes on until more than ``over`` bytes wait in
    our own buffer, with no await between: the link stopped taking data, so the kernel
    fills. The frames never reach the destination (the link holds them). Our socket's
    send buffer is made small first, so the kernel takes little of them later on."""
    channel = session._chans[0]
    assert channel.transport is not None
    sock = channel.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
    filler = os.urandom(256 * KiB)
    while channel.backlog() <= over:
        channel.send(Tag.PRECOPY_DATA, 0, (filler,), len(filler))


@pytest.mark.parametrize(
    ("over", "stuck"),
    [
        # Past the high-water mark: COMMIT's send waits for the buffer and times out.
        (WRITE_HIGH_WATER, "COMMIT was not taken by the link"),
        # Below it: the send returns, and the wait for "resumed" times out.
        (4 * MIB, "no word from the destination"),
    ],
    ids=["send-times-out", "verdict-times-out"],
)
async def test_a_commit_that_never_left_is_withdrawn_and_the_source_runs(
    make_ends: Callable[..., Any], proxy_to: Callable[..., Any], over: int, stuck: str
) -> None:
    """With COMMIT whole in our write buffer when its send or the wait for "resumed"
    times out, the source rolls back: its devices run intact, the destination never
    resumed, and the error says COMMIT never left."""
    ends = await make_ends([Spec("a", size=MIB)], hold_verdicts="loaded", link_timeout_s=30.0)
    proxy, address = await proxy_to(ends.address)
    proxy.receive_buffer = 128 * KiB
    migration = ends.migration(address, verdict_timeout_s=0.5, max_stop_ms=20e3, link_timeout_s=30)
    run = asyncio.create_task(migration.run())
    gate = await asyncio.wait_for(ends.held_verdict(), DEADLINE_S)
    proxy.freeze_upstream()
    assert migration._session is not None
    fill_behind(migration._session, over)
    gate.open.set()
    with pytest.raises(MigrationError) as failed:
        await asyncio.wait_for(run, DEADLINE_S)
    assert not isinstance(failed.value, OutcomeUnknown), failed.value
    assert stuck in str(failed.value)
    assert "COMMIT never left this host" in str(failed.value)
    assert migration.stats.outcome == "source"
    assert not ends.resumed_on_destination()
    await ends.assert_source_intact()

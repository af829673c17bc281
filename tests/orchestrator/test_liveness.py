"""A link that dies or lies, in process: the source learns why, and in bounded time."""

from __future__ import annotations

import asyncio
import time

import pytest

from devices.fsm import Feature, State
from orchestrator.engine.errors import MigrationError
from orchestrator.engine.stats import Status
from tests.orchestrator.conftest import MIB, Spec, wait_status

LINK = 0.5
#: The timeout, one keep-alive interval, and slack for a loaded machine (a bound).
BOUND = LINK * 1.25 + 3.0
#: Pre-copy that never converges, so the migration is still iterating when the link dies.
NEVER = {"downtime_limit_ms": 0.001, "timeout_s": 120.0, "link_timeout_s": LINK}


def left_resuming(targets: list) -> asyncio.Event:  # type: ignore[type-arg]
    """An event set once every destination device has left RESUMING after entering it."""
    left = asyncio.Event()
    pending = {d.name for d in targets}

    def watch(device, old: State, new: State) -> None:  # type: ignore[no-untyped-def]
        if old == State.RESUMING and new != State.RESUMING:
            pending.discard(device.name)
            if not pending:
                left.set()

    for device in targets:
        device.add_state_listener(watch)
    return left


async def test_a_stall_in_precopy_is_a_lost_link_and_both_ends_recover(make_ends, proxy_to) -> None:
    """A link that stops forwarding fails the migration naming link_timeout_s, not
    convergence; the source runs intact and the destination devices leave RESUMING."""
    ends = await make_ends([Spec("a"), Spec("b", seed=9)], link_timeout_s=LINK)
    left = left_resuming(ends.targets)
    proxy, address = await proxy_to(ends.address)
    migration = ends.migration(address, **NEVER)
    run = asyncio.create_task(migration.run())
    await wait_status(migration, Status.ACTIVE)
    proxy.stall()
    started = time.monotonic()
    with pytest.raises(MigrationError, match=r"no frame from test-dst for 0\.5 s") as caught:
        await asyncio.wait_for(run, BOUND)
    assert time.monotonic() - started < BOUND
    assert "converge" not in str(caught.value)
    assert migration.stats.status == Status.FAILED
    await ends.assert_source_intact()
    await asyncio.wait_for(left.wait(), BOUND)
    assert [d.state for d in ends.targets] == [State.RUNNING, State.RUNNING]


async def test_a_corrupt_frame_fails_the_source_with_the_destinations_reason(
    make_ends, proxy_to
) -> None:
    """A checksum failure found by the destination is the source's error, word for word."""
    ends = await make_ends([Spec("a", size=4 * MIB, features=Feature.STOP_COPY | Feature.PRE_COPY)])
    proxy, address = await proxy_to(ends.address)
    proxy.corrupt_at = 2 * MIB  # well inside the device's data: a payload byte
    migration = ends.migration(address, channels=1, p2p=False)
    with pytest.raises(MigrationError) as caught:
        await asyncio.wait_for(migration.run(), 30)
    assert str(caught.value).startswith("destination refused: checksum: mismatch on ")
    assert str(caught.value).endswith(" of device 0")
    assert "destination refused: checksum" in (migration.stats.error or "")
    await ends.assert_source_intact()

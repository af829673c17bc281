"""A destination whose ``max_payload`` is below the devices' chunks takes them in pieces.

The source splits a chunk over several data frames of at most the peer's announced
``max_payload`` (slices of its buffers, no copy); every resume channel takes its stream
in pieces of any size, so the destination's state is the source's, byte for byte.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

import transport
from tests.orchestrator.conftest import Spec
from transport import Tag
from transport.limits import KiB

#: Bound of a migration of a few MiB (it ends in well under a second).
DEADLINE_S = 30.0


@pytest.mark.parametrize(
    ("max_payload", "specs"),
    [
        # 256 KiB (simulated) and 1 MiB (guest RAM) chunks, each split in several frames.
        (64 * KiB, [Spec("sim0", seed=1), Spec("ram0", kind="ram", seed=2)]),
        # Exactly the chunk size: only a chunk carrying more (the END record) is split.
        (256 * KiB, [Spec("sim0", seed=3, dirty_rate=0.0)]),
    ],
    ids=["64KiB", "256KiB"],
)
async def test_a_migration_to_a_small_max_payload_completes_byte_exact(
    make_ends: Callable[..., Any], max_payload: int, specs: list[Spec]
) -> None:
    """Models with chunks above the destination's ``max_payload`` migrate, and each
    destination device holds exactly its source's state."""
    ends = await make_ends(specs, limits=transport.Limits(max_payload=max_payload))
    migration = ends.migration()
    await asyncio.wait_for(migration.run(), DEADLINE_S)
    assert migration.stats.outcome == "destination"
    await ends.assert_migrated()


async def test_a_chunk_over_the_peer_limit_arrives_as_frames_within_it() -> None:
    """A chunk of three buffers larger than the peer's ``max_payload`` leaves as frames of
    at most that size, in order, whose payloads put together are the chunk; the size
    returned is the whole chunk's."""
    limit = 48 * KiB
    parts = (os.urandom(100 * KiB), os.urandom(10), os.urandom(60 * KiB))
    frames: list[bytes] = []
    done = asyncio.Event()

    async def handler(session: transport.Session) -> None:
        session.set_device_count(1)
        while (frame := await session.recv()).tag == Tag.PRECOPY_DATA:
            frames.append(bytes(frame.payload))
        done.set()

    limits = transport.Limits(max_payload=limit)
    auth = transport.AuthConfig()
    async with await transport.serve(
        "127.0.0.1:0", handler, name="dst", auth=auth, limits=limits
    ) as server:
        session = await transport.connect(server.address, name="src", auth=auth)
        session.set_device_count(1)
        assert await session.send_chunk(Tag.PRECOPY_DATA, 0, parts) == sum(map(len, parts))
        await session.send_control(Tag.END_OF_DEVICE, device=0)
        await asyncio.wait_for(done.wait(), DEADLINE_S)
        await session.close()
    assert all(0 < len(f) <= limit for f in frames)
    assert len(frames) == 4  # 160 KiB + 10 bytes over 48 KiB frames
    assert b"".join(frames) == b"".join(parts)

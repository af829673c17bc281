"""A link cut, or a byte flipped, anywhere in the source's stream: never two copies,
never a lost or corrupted one.

The safety matrix (test_safety_matrix.py) cuts the link once per phase, at moments its
gates choose. This sweep cuts it by byte count instead, at points spread over a whole
migration's upstream stream and packed in its last kilobytes, where the switchover's
frames go (SYNC, the last chunks, END_OF_DEVICE, END_OF_STREAM, COMMIT). The devices
have no workload, so every run sends the same stream and a point lands in the same
frame each time. Each run must end in one of three ways, and a monitor checks at every
state change of both hosts that no device ever runs on both:

* completed: every device runs on the destination with the source's state;
* failed: every source device runs with its state, no destination device was resumed;
* outcome unknown (COMMIT may have left): the source devices are stopped with their
  state, and the destination runs them or not.

A flipped byte is caught (a checksum, the header's checks, the stream's own) before the
destination runs anything, or is harmless: a completed run carries the source's state.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from devices.fsm import State
from orchestrator.engine.errors import MigrationError, OutcomeUnknown
from tests.orchestrator.conftest import MIB, Ends, Spec
from tests.orchestrator.test_safety_matrix import Monitor

#: Two devices, no workload: the same stream, byte for byte, every run.
SPECS = [Spec("sim0", size=MIB, dirty_rate=0, seed=1), Spec("sim1", size=MIB, dirty_rate=0, seed=2)]
#: Short bounds: a cut that leaves a side waiting costs a second, not a minute.
PARAMS: dict[str, Any] = {
    "connect_timeout_s": 1.0,
    "verdict_timeout_s": 1.0,
    "max_stop_ms": 1000,
    "timeout_s": 5,
}
#: Where the sweep cuts: fractions of the whole stream, then bytes before its end.
FRACTIONS = (0.0, 0.001, 0.01, 0.25, 0.5, 0.75, 0.99)
FROM_END = (4096, 1024, 512, 256, 160, 128, 96, 64, 48, 32, 24, 16, 8, 4, 1)


async def _run(
    make_ends: Any, proxy_to: Any, cut_after: int | None, corrupt_at: int | None = None
) -> tuple[Ends, Any, str]:
    """One migration through a proxy cutting after ``cut_after`` upstream bytes (or
    flipping the one at ``corrupt_at``); the ends, the proxy and how it ended, once both
    hosts are done."""
    ends = await make_ends(SPECS, idle_timeout_s=5.0)
    monitor = Monitor(ends.sources, ends.targets, lambda: any(m.committed for m in ends.incoming))
    proxy, address = await proxy_to(ends.address)
    proxy.cut_after, proxy.corrupt_at = cut_after, corrupt_at
    try:
        await ends.migration(address, **PARAMS).run()
        ending = "completed"
    except OutcomeUnknown:
        ending = "unknown"
    except MigrationError:
        ending = "failed"
    async with asyncio.timeout(10):
        await asyncio.gather(*ends.tasks, return_exceptions=True)
    assert monitor.violations == [], cut_after
    return ends, proxy, ending


async def _assert_ended_safely(ends: Ends, ending: str, point: int) -> None:
    """Each device in exactly one place with its state, or stopped with it (unknown)."""
    if ending == "completed":
        await ends.assert_migrated()
    elif ending == "failed":
        assert not ends.resumed_on_destination(), point
        await ends.assert_source_intact()
    else:
        for spec, source in zip(SPECS, ends.sources, strict=True):
            assert source.state == State.STOP, (point, source.name)
            assert await source.digest() == await spec.build(source=True).digest(), point


async def test_a_cut_at_any_byte_keeps_each_device_in_one_place_with_its_state(
    make_ends: Any, proxy_to: Any
) -> None:
    """Cut points over the whole stream and in its last 4 KiB: every run ends completed,
    failed or unknown with the devices where that ending says, never on both hosts."""
    ends, proxy, ending = await _run(make_ends, proxy_to, None)
    assert ending == "completed"
    total = proxy.upstream_bytes
    points = sorted({int(total * f) for f in FRACTIONS} | {total - n for n in FROM_END})
    endings: dict[int, str] = {}
    for point in points:
        ends, proxy, ending = await _run(make_ends, proxy_to, point)
        await _assert_ended_safely(ends, ending, point)
        endings[point] = ending
    # Every cut before COMMIT's first byte rolls back; a cut inside COMMIT (its bytes
    # were the kernel's, so they may have left) is the unknown outcome, and the sweep
    # reaches it.
    unknown = [p for p, e in endings.items() if e == "unknown"]
    assert unknown, endings
    assert all(e == "failed" for p, e in endings.items() if p < min(unknown)), endings
    assert total - min(unknown) <= 64, endings  # a COMMIT frame is a few dozen bytes


@pytest.mark.parametrize("offset", [1, 8, 24, 64])
async def test_a_cut_just_before_the_end_never_runs_both_copies(
    make_ends: Any, proxy_to: Any, offset: int
) -> None:
    """Cuts in the stream's last bytes, each on its own (the region where COMMIT goes):
    the same three endings, whatever the timing of the destination's answers."""
    ends, proxy, ending = await _run(make_ends, proxy_to, None)
    total = proxy.upstream_bytes
    ends, proxy, ending = await _run(make_ends, proxy_to, total - offset)
    await _assert_ended_safely(ends, ending, total - offset)


async def test_a_flipped_byte_anywhere_is_caught_or_harmless(make_ends: Any, proxy_to: Any) -> None:
    """A byte flipped at points over the whole stream and in its last 4 KiB: the run
    fails with the source intact, or ends unknown (COMMIT's own bytes), or completes
    with the source's exact state; never a destination running what was corrupted."""
    ends, proxy, ending = await _run(make_ends, proxy_to, None)
    total = proxy.upstream_bytes
    points = sorted({int(total * f) for f in FRACTIONS} | {total - n for n in FROM_END})
    caught = 0
    for point in points:
        ends, proxy, ending = await _run(make_ends, proxy_to, None, corrupt_at=point)
        await _assert_ended_safely(ends, ending, point)
        caught += ending != "completed"
    assert caught >= len(points) - 2, "flipped bytes went through unnoticed"

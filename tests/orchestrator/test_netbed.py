"""The network test bed: two hosts in namespaces joined by a shaped veth link."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from orchestrator.bench.inprocess import BenchOptions
from orchestrator.bench.netbed import PREFIX, LinkSpec, NetBed, NetBedUnavailable, check_available
from orchestrator.service.client import ControlClient

MB = 1_000_000


def bed_or_skip(link: LinkSpec) -> None:
    """Skip, saying why, where this machine cannot build the bed; CI (root) must."""
    try:
        check_available(link)
    except NetBedUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


def namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listing.stdout.splitlines() if line.startswith(PREFIX)]


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("rate=1gbit", LinkSpec(rate_bps=1e9)),
        ("rate=100mbit,delay=15ms,loss=0.1%", LinkSpec(1e8, 15.0, 0.1)),
        ("rate=12.5mbps", LinkSpec(rate_bps=1e8)),
        ("delay=2", LinkSpec(delay_ms=2.0)),
        ("", LinkSpec()),
    ],
)
def test_link_specs_parse(text: str, spec: LinkSpec) -> None:
    """The --net syntax maps onto rates in bit/s, delays in ms and loss in percent."""
    assert LinkSpec.parse(text) == spec


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rate=fast", "rate 'fast': use a number and kbit, mbit or gbit"),
        ("delay=-1ms", "must be a finite number >= 0"),
        ("loss=100%", "must be under 100%"),
        ("jitter=1ms", "unknown link setting 'jitter'"),
    ],
)
def test_bad_link_specs_name_the_problem(text: str, problem: str) -> None:
    """A bad --net value is refused with the part that is wrong."""
    with pytest.raises(ValueError, match=problem):
        LinkSpec.parse(text)


async def test_a_capped_link_migration_is_byte_exact_and_the_bed_is_removed() -> None:
    """Two daemons in two namespaces over a 100 Mbit/s link: byte-exact, the average and
    the switchover's bandwidth estimate within 15% of the cap, a small stop-copy, no
    namespace left behind."""
    link = LinkSpec.parse("rate=100mbit")
    bed_or_skip(link)
    from orchestrator.bench import netbench

    options = BenchOptions(devices=2, state_mib=8, dirty_mbps=1, downtime_limit_ms=300)
    stats = await netbench.run_over(link, options)
    assert stats["status"] == "completed", stats["error"]
    assert stats["verified"]
    cap = link.rate_bps / 8  # type: ignore[operator]
    assert 0.85 * cap <= stats["bandwidth_bps"] <= 1.15 * cap, stats["bandwidth_bps"]
    # The estimate the switchover decision used, not only the whole-run average.
    estimate = stats["switchover_bandwidth_bps"]
    assert 0.85 * cap <= estimate <= 1.15 * cap, estimate
    # Paced pre-copy: the switchover came with a shallow pipe, so the devices dirtied
    # little while the SYNC barrier waited. Unpaced, the pipe held 13 MB at the decision
    # and the stop-copy carried 260-430 KB (20-35 ms here); paced, 12-25 KB.
    stop_copy = sum(device["stopcopy_bytes"] for device in stats["devices"])
    assert stop_copy <= 128 * 1024, stop_copy
    # The dirty rate the estimate charges is the workload's (2 x 1 MB/s).
    assert 1e6 <= stats["dirty_rate_bps"] <= 4e6, stats["dirty_rate_bps"]
    assert namespaces() == []


async def test_the_bed_is_removed_when_the_block_fails() -> None:
    """An error inside the block still removes both namespaces."""
    link = LinkSpec.parse("rate=1gbit")
    bed_or_skip(link)
    seen: list[str] = []

    async def fail_inside() -> None:
        async with NetBed(link) as bed:
            seen.extend(n for n in namespaces() if n in bed.namespaces.values())
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        await fail_inside()
    assert len(seen) == 2
    assert namespaces() == []


async def test_a_link_flap_in_precopy_recovers_or_fails_cleanly() -> None:
    """The link goes down for 2 s in pre-copy: the migration completes, or it fails with
    the source devices RUNNING (never stuck, never split)."""
    link = LinkSpec.parse("rate=100mbit")
    bed_or_skip(link)
    from orchestrator.bench import netbench

    async def flap(bed: NetBed, src: ControlClient) -> None:
        await src.next_event(lambda m: m["event"] == "MIGRATION_PASS", 30)
        await bed.set_link(up=False)
        await asyncio.sleep(2.0)  # the outage itself, not a synchronisation
        await bed.set_link(up=True)

    options = BenchOptions(devices=2, state_mib=16, dirty_mbps=2, downtime_limit_ms=300)
    async with asyncio.timeout(90):
        stats = await netbench.run_over(link, options, during=flap)
    if stats["status"] == "completed":
        assert stats["verified"]
        assert stats["outcome"] == "destination"
    else:
        assert stats["outcome"] == "source", stats
        assert set(stats["placement"].values()) == {"source"}
    assert namespaces() == []


def test_bench_net_refuses_a_bad_link_spec() -> None:
    """``livemig bench --net`` validates its spec (in the bench room: the command line's
    parser does not load the benchmark) and exits with the usage code."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "--net", "rate=fast"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "rate 'fast': use a number and kbit, mbit or gbit" in result.stderr

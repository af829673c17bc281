"""The real-network table: rate x RTT x channels -> downtime, total, round trips, bandwidth.

Each row is one migration between two daemons in two network namespaces joined by a
shaped veth link (orchestrator.bench.netbed). Rate caps run on any kernel here; delay and
loss need netem, which this project's host lacks and the VFIO lab's guest has, so the
whole table is made in the guest by the lab's test session (tests/vm/guest/test_netem.py
writes it to the results folder and tests/vm/test_mtty.py prints it):

    python examples/net_table.py                 # the rows this kernel can shape
    LIVEMIG_LAB_CACHE=~/.cache/livemig-lab pytest tests/vm -k netem -s   # all, in the guest

Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.bench import netbench
from orchestrator.bench.inprocess import BenchOptions
from orchestrator.bench.netbed import LinkSpec, NetBedUnavailable, check_available

#: (link, channels): rates on every kernel, RTTs 0/2/10/30 ms, one long fat pipe with
#: 1 and 4 channels, and two lossy links, the lossier with 1 and 4 channels (loss caps
#: each TCP flow, so that is where more channels could pay). Lossy links run a lighter
#: workload (LOSSY_MBPS): TCP over 1% loss and a 10 ms RTT carries about 1.8 MB/s
#: (Mathis: MSS / RTT x 1.22 / sqrt(loss)), below the 2 MB/s the others dirty, and no
#: migration converges then.
ROWS: tuple[tuple[str, int], ...] = (
    ("rate=1gbit", 1),
    ("rate=1gbit", 4),
    ("rate=100mbit", 1),
    ("rate=100mbit,delay=1ms", 1),
    ("rate=100mbit,delay=5ms", 1),
    ("rate=100mbit,delay=15ms", 1),
    ("rate=100mbit,delay=15ms", 4),
    ("rate=100mbit,delay=5ms,loss=0.1%", 1),
    ("rate=100mbit,delay=5ms,loss=1%", 1),
    ("rate=100mbit,delay=5ms,loss=1%", 4),
)
HEADER = (
    "| link | channels | RTT ms | expected downtime ms | downtime ms | total ms "
    "| round trips in window | estimate MB/s | whole-run MB/s | cap MB/s | byte-exact |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


#: Dirty rate per device on lossy links (MB/s).
LOSSY_MBPS = 0.2


def options(link: str, channels: int) -> BenchOptions:
    """Two small simulated devices with a light workload: the link, not the devices, rules."""
    dirty = LOSSY_MBPS if LinkSpec.parse(link).loss_pct else 1.0
    return BenchOptions(
        devices=2, state_mib=8, dirty_mbps=dirty, downtime_limit_ms=300, channels=channels
    )


def row(link: str, channels: int, stats: dict[str, Any]) -> str:
    """One markdown row of the table."""

    def mbs(value: float | None) -> str:
        return "-" if value is None else f"{value / 1e6:.1f}"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    return (
        f"| {link} | {channels} | {stats.get('rtt_ms', 0.0):.2f} | "
        f"{ms(stats.get('expected_downtime_ms'))} | {ms(stats.get('downtime_ms'))} | "
        f"{stats['total_ms']:.0f} | "
        f"{stats.get('window_round_trips') or '-'} | {mbs(stats.get('switchover_bandwidth_bps'))}"
        f" | {mbs(stats.get('bandwidth_bps'))} | {mbs(stats.get('link_cap_bps'))} | "
        f"{'yes' if stats.get('verified') else stats['status']} |"
    )


async def measure(rows: Sequence[tuple[str, int]]) -> list[tuple[str, int, dict[str, Any]]]:
    """Run the rows this kernel can shape; skip the others, saying so on stderr."""
    results = []
    for link, channels in rows:
        spec = LinkSpec.parse(link)
        try:
            check_available(spec)
        except NetBedUnavailable as exc:
            print(f"skipped {link}: {exc}", file=sys.stderr)
            continue
        stats = await netbench.run_over(spec, options(link, channels))
        results.append((link, channels, stats))
    return results


def table(results: Sequence[tuple[str, int, dict[str, Any]]]) -> str:
    """The results as the README's markdown table."""
    return "\n".join([HEADER, *(row(link, ch, stats) for link, ch, stats in results)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", action="append", help="only this link (repeatable)")
    parser.add_argument("--channels", type=int, default=1, help="with --link (default 1)")
    args = parser.parse_args(argv)
    rows = [(link, args.channels) for link in args.link] if args.link else list(ROWS)
    results = asyncio.run(measure(rows))
    print(table(results))
    return 0 if all(stats["status"] == "completed" for _, _, stats in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

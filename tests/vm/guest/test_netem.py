"""Real networks in the lab guest: delay and loss with netem between two namespaces.

The host kernel has no netem; the guest's Debian kernel does. Each row of
examples/net_table.py migrates two simulated devices between two daemons in two
namespaces joined by a shaped veth link. The table goes to ``/results/net_table.md``
for the host to print (tests/vm/test_mtty.py), and the tests here assert that lossy
links complete byte-exact and that the measured round trip follows the added delay.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.bench import netbench
from orchestrator.bench.netbed import LinkSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import net_table

pytestmark = pytest.mark.timeout(900)

RESULTS = Path(os.environ.get("LIVEMIG_LAB_RESULTS", "/results"))


async def test_the_net_table_rows_complete_and_the_round_trip_follows_the_delay() -> None:
    """Every row (rates, RTT 0-30 ms, 1 and 4 channels, 0.1% and 1% loss) completes
    byte-exact with 1.5 round trips in the window, and the measured RTT is about
    twice the one-way delay."""
    results: list[tuple[str, int, dict[str, Any]]] = []
    for link, channels in net_table.ROWS:
        stats = await netbench.run_over(LinkSpec.parse(link), net_table.options(link, channels))
        results.append((link, channels, stats))
    (RESULTS / "net_table.md").write_text(net_table.table(results) + "\n")
    for link, channels, stats in results:
        assert stats["status"] == "completed", (link, channels, stats["error"])
        assert stats["verified"], (link, channels)
        assert stats["window_round_trips"] == 1.5
        delay = LinkSpec.parse(link).delay_ms
        if delay:
            # The upper margin is the TCG guest's own: its scheduling under a busy host
            # added up to 11 ms to a 2 ms round trip (9.7 and 12.8 ms measured).
            assert 1.5 * delay <= stats["rtt_ms"] <= 4 * delay + 20, (link, stats["rtt_ms"])

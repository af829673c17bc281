"""A whole migration between two daemons on two hosts of the network test bed.

The source daemon runs in the source namespace, the destination daemon in the other,
and the migration crosses the shaped veth link over TCP with pre-shared-key
authentication (the destination listens off loopback, so it must authenticate). The
stats come back with the link's description and its cap next to the bandwidth the
source estimated, so a reader sees how well the estimate tracks the link.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from orchestrator.bench.daemons import arm, daemon_pair, write_configs
from orchestrator.bench.inprocess import BenchOptions
from orchestrator.bench.netbed import DESTINATION_ADDRESS, MIGRATION_PORT, LinkSpec, NetBed
from orchestrator.cli.follow import migrate
from orchestrator.service.client import ControlClient

#: Called once pre-copy is under way, with the bed and the source's control client.
During = Callable[[NetBed, ControlClient], Awaitable[None]]


async def run_over(
    link: LinkSpec, options: BenchOptions, *, during: During | None = None
) -> dict[str, Any]:
    """One migration across a link shaped as ``link``; the stats plus ``verified``, ``link``."""
    with tempfile.TemporaryDirectory(prefix="livemig-netbench-") as tmp:
        folder = Path(tmp)
        address = f"{DESTINATION_ADDRESS}:{MIGRATION_PORT}"
        configs = write_configs(folder, options, prefix="net", destination_listen=address)
        async with (
            NetBed(link) as bed,
            daemon_pair(
                folder, *configs, prefixes=(bed.prefix("source"), bed.prefix("destination"))
            ) as (source, destination),
            await source.client() as src,
            await destination.client() as dst,
        ):
            names = [d["name"] for d in await src.execute("query-devices")]
            await arm(dst, names, "net-source")
            follower = asyncio.create_task(migrate(src, address, options.migration_parameters()))
            if during is not None:
                await during(bed, src)
            stats = await follower
            if stats["status"] == "completed":
                before = await src.execute("query-digests")
                after = await dst.execute("query-digests")
                stats["verified"] = before == after
            stats["link"] = link.describe()
            stats["link_cap_bps"] = None if link.rate_bps is None else link.rate_bps / 8
            return stats

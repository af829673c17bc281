"""A whole migration between two daemons on two hosts of the network test bed.

The source daemon runs in the source namespace, the destination daemon in the other,
and the migration crosses the shaped veth link over TCP with pre-shared-key
authentication (the destination listens off loopback, so it must authenticate). The
stats come back with the link's description and its cap next to the bandwidth the
source estimated, so a reader sees how well the estimate tracks the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from orchestrator.bench.daemons import DaemonProcess, arm, device_tables
from orchestrator.bench.inprocess import BenchOptions
from orchestrator.bench.netbed import DESTINATION_ADDRESS, MIGRATION_PORT, LinkSpec, NetBed
from orchestrator.cli.follow import migrate
from orchestrator.service.client import ControlClient

#: Called once pre-copy is under way, with the bed and the source's control client.
During = Callable[[NetBed, ControlClient], Awaitable[None]]


def write_configs(folder: Path, options: BenchOptions) -> tuple[Path, Path]:
    """The PSK and both daemons' configs; the destination listens on its veth address."""
    psk = folder / "psk"
    psk.write_text(secrets.token_hex(32) + "\n")
    psk.chmod(0o600)
    paths = []
    for role, listen in (
        ("source", ""),
        ("destination", f'"{DESTINATION_ADDRESS}:{MIGRATION_PORT}"'),
    ):
        path = folder / f"{role}.toml"
        path.write_text(
            f'name = "net-{role}"\ncontrol_socket = "{role}.sock"\nlisten = [{listen}]\n\n'
            '[auth]\npsk_file = "psk"\n\n' + device_tables(options, workload=role == "source")
        )
        paths.append(path)
    return paths[0], paths[1]


@contextlib.asynccontextmanager
async def daemons_on(
    bed: NetBed, folder: Path, options: BenchOptions
) -> AsyncIterator[tuple[ControlClient, ControlClient]]:
    """Both daemons started on their hosts; control clients to each (unix sockets)."""
    source_config, destination_config = write_configs(folder, options)
    source = DaemonProcess(source_config, name="source", prefix=bed.prefix("source"))
    destination = DaemonProcess(
        destination_config, name="destination", prefix=bed.prefix("destination")
    )
    try:
        await asyncio.gather(
            source.start(folder / "source.sock"), destination.start(folder / "destination.sock")
        )
        async with await source.client() as src, await destination.client() as dst:
            yield src, dst
    finally:
        await asyncio.gather(source.stop(), destination.stop(), return_exceptions=True)


async def run_over(
    link: LinkSpec, options: BenchOptions, *, during: During | None = None
) -> dict[str, Any]:
    """One migration across a link shaped as ``link``; the stats plus ``verified``, ``link``."""
    with tempfile.TemporaryDirectory(prefix="livemig-netbench-") as tmp:
        folder = Path(tmp)
        async with NetBed(link) as bed, daemons_on(bed, folder, options) as (src, dst):
            names = [d["name"] for d in await src.execute("query-devices")]
            await arm(dst, names, "net-source")
            address = f"{DESTINATION_ADDRESS}:{MIGRATION_PORT}"
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

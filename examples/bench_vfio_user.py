"""Throughput of the vfio-user socket path and downtime of a vfio-user migration.

Usage: ``python examples/bench_vfio_user.py [--size-mib 256] [--dirty-pages 2000] [--repeat 3]``

Builds the test device from the vendored libvfio-user (tests/vfio_user/build.py; set
``LIVEMIG_LIBVFIO_USER_TARBALL`` if the tarball is not in ``../shared/vendor/``), then:

1. Socket path, in-process: a STOP_COPY drain of the whole state through
   MIG_DATA_READ (replies of up to ``max_data_xfer_size``), then a load of that
   stream into a second server through MIG_DATA_WRITE (messages capped at 24 KiB,
   so the server receives each whole). MB/s of the device's stream.
2. Two daemons: a migration of the device while its writer dirties ``--dirty-pages``
   pages/s, through the CLI's control API; downtime with its breakdown, total time,
   pre-copy passes, and whether the digests of both ends match.

Each figure is the median of ``--repeat`` runs, with min and max.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices.fsm import State  # noqa: E402 - after the path set-up above
from devices.vfio_user import VfioUserDevice  # noqa: E402
from orchestrator.bench.daemons import daemon_pair  # noqa: E402
from orchestrator.cli.follow import migrate  # noqa: E402
from tests.vfio_user import servers  # noqa: E402

MIB = 1 << 20
MB = 1e6


async def socket_path(folder: Path, size: int) -> tuple[float, float]:
    """MB/s of a STOP_COPY drain and of loading that stream into another server."""
    source_server = servers.start_testdev(folder / "s.sock", size=size, seed=1)
    dest_server = servers.start_testdev(folder / "d.sock", size=size, seed=2)
    source = VfioUserDevice("src", socket=str(source_server.socket))
    dest = VfioUserDevice("dst", socket=str(dest_server.socket))
    try:
        await source.set_state(State.STOP_COPY)
        channel = source.save_channel()
        chunks = []
        started = time.perf_counter()
        while chunk := await channel.read():
            chunks.extend(bytes(part) for part in chunk)
        read_s = time.perf_counter() - started
        total = sum(map(len, chunks))
        await dest.set_state(State.RESUMING)
        sink = dest.resume_channel()
        started = time.perf_counter()
        for piece in chunks:
            await sink.write(piece)
        await dest.set_state(State.STOP)
        write_s = time.perf_counter() - started
        return total / read_s / MB, total / write_s / MB
    finally:
        await source.close()
        await dest.close()
        source_server.stop()
        dest_server.stop()


async def daemons(folder: Path, size: int, dirty_pages: int) -> dict[str, Any]:
    """One migration between two daemons; the final stats plus ``verified``."""
    source_server = servers.start_testdev(folder / "s.sock", size=size, rate=dirty_pages, seed=1)
    dest_server = servers.start_testdev(folder / "d.sock", size=size, seed=2)
    (folder / "psk").write_text("b" * 32 + "\n")
    (folder / "psk").chmod(0o600)
    configs = []
    for role, listen, socket in (
        ("source", "", source_server.socket),
        ("destination", '"127.0.0.1:0"', dest_server.socket),
    ):
        path = folder / f"{role}.toml"
        path.write_text(
            f'name = "{role}"\ncontrol_socket = "{role}.sock"\nlisten = [{listen}]\n'
            f'[auth]\npsk_file = "psk"\n[[device]]\nkind = "vfio-user"\nname = "vu0"\n'
            f'socket = "{socket}"\n'
        )
        configs.append(path)
    try:
        async with (
            daemon_pair(folder, configs[0], configs[1]) as (source, dest),
            await source.client() as src,
            await dest.client() as dst,
        ):
            address = (await dst.execute("query-daemon"))["listen"][0]
            stats = await migrate(src, address, {}, timeout=300)
            stats["verified"] = await src.execute("query-digests") == await dst.execute(
                "query-digests"
            )
            return stats
    finally:
        source_server.stop()
        dest_server.stop()


def spread(values: list[float]) -> str:
    """``median (min..max)``."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}..{max(values):.1f})"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="state size (power of two)")
    parser.add_argument("--dirty-pages", type=int, default=2000, help="pages/s dirtied")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    reads, writes, downtimes, totals, passes, rates = [], [], [], [], [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="livemig-vu-bench-") as tmp:
            read_mbps, write_mbps = await socket_path(Path(tmp), size)
        reads.append(read_mbps)
        writes.append(write_mbps)
        with tempfile.TemporaryDirectory(prefix="livemig-vu-bench-") as tmp:
            stats = await daemons(Path(tmp), size, args.dirty_pages)
        if stats["status"] != "completed" or not stats["verified"]:
            print(f"migration {stats['status']}, verified={stats.get('verified')}: {stats}")
            return 1
        downtimes.append(stats["downtime_ms"])
        totals.append(stats["total_ms"])
        passes.append(stats["iterations"])
        rates.append(stats["transferred_bytes"] / stats["total_ms"] / 1e3)
        breakdown = ", ".join(f"{k} {v:.1f}" for k, v in stats["downtime_breakdown_ms"].items())
        print(f"run: downtime {stats['downtime_ms']:.1f} ms ({breakdown})", flush=True)
    print(f"vfio-user device of {args.size_mib} MiB, {args.repeat} runs, median (min..max):")
    print(f"  socket path, STOP_COPY drain (MIG_DATA_READ):  {spread(reads)} MB/s")
    print(f"  socket path, load (MIG_DATA_WRITE, 24 KiB):    {spread(writes)} MB/s")
    print(f"  migration with {args.dirty_pages} pages/s dirtied: downtime {spread(downtimes)} ms,")
    print(f"    total {spread(totals)} ms, iterations {spread([float(p) for p in passes])},")
    print(f"    moved/total time {spread(rates)} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

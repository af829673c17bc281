"""Read throughput of each device model, and the process's peak RSS.

Usage: ``python examples/bench_devices.py [--size MiB] [--migrate]``

For each model it times a whole PRE_COPY pass (chunks carry copies, the device could be
running) and a whole STOP_COPY drain (chunks carry views of the stopped state), reading
and dropping every chunk, and reports state MB/s and wire MB/s. One device exists at a
time, so the peak RSS should stay near one state size. ``--migrate`` then runs the QEMU
comparison in-process: a guest of ``--size`` MiB with half of it as working set dirtied
at 50 MB/s, the rest zero pages (QEMU moved ~434 MB for 512 MiB); it holds both ends,
so it runs last and its RSS is reported apart.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from collections.abc import Callable

import uvloop

from devices.fsm import State
from devices.paged import PagedDevice
from devices.ram import RamDevice
from devices.simulated import SimulatedDevice
from devices.testing import copy_device, opened

MIB = 1 << 20
MB = 1e6


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def drain(device: PagedDevice, state: State) -> tuple[float, int]:
    """Seconds to read a whole session in ``state`` and the bytes it put on the wire."""
    await device.set_state(state)
    channel = device.save_channel()
    wire = 0
    start = time.perf_counter()
    while chunk := await channel.read():
        wire += sum(len(buffer) for buffer in chunk)
    elapsed = time.perf_counter() - start
    await device.set_state(State.RUNNING)
    return elapsed, wire


async def bench_reads(name: str, make: Callable[[], PagedDevice]) -> None:
    device = make()
    for state, label in (
        (State.PRE_COPY, "pre-copy (copies)"),
        (State.STOP_COPY, "stop-copy (views)"),
    ):
        elapsed, wire = await drain(device, state)
        print(
            f"{name:<10} {label:<18} {device.state_size / MB / elapsed:8.0f} MB/s state"
            f" {wire / MB / elapsed:8.0f} MB/s wire  ({wire / MB:6.1f} MB in {elapsed:.3f} s)"
        )
    del device
    gc.collect()


async def bench_migration(size: int) -> None:
    source = RamDevice("src", size=size, working_set=size // 2, dirty_rate=50 * MB, seed=1)
    dest = RamDevice("dst", size=size, working_set=size // 2, seed=2)
    async with opened(source, dest):
        start = time.perf_counter()
        report = await copy_device(source, dest, switchover_bytes=4 * MIB)
        elapsed = time.perf_counter() - start
        same = await source.digest() == await dest.digest()
    wire = report.precopy_bytes + report.stop_copy_bytes
    print(
        f"migration  {size // MIB} MiB guest, {size // 2 // MIB} MiB working set at 50 MB/s:"
        f" {wire / MB:.1f} MB on the wire ({report.stop_copy_bytes / MB:.2f} MB in stop-copy),"
        f" {report.passes} passes, {elapsed:.2f} s, converged={report.converged},"
        f" digests equal={same}"
    )


async def main(size_mib: int, migrate: bool) -> None:
    size = size_mib * MIB
    print(f"state size {size_mib} MiB")
    await bench_reads("simulated", lambda: SimulatedDevice("sim", state_size=size))
    await bench_reads("ram", lambda: RamDevice("ram", size=size, working_set=size // 2))
    print(f"peak RSS after the read benchmarks: {peak_rss_mib():.0f} MiB")
    if migrate:
        await bench_migration(size)
        print(f"peak RSS with both ends of the migration: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="state size in MiB")
    parser.add_argument("--migrate", action="store_true", help="also run the QEMU comparison")
    args = parser.parse_args()
    uvloop.run(main(args.size, args.migrate))

"""Do the switchover arcs of N VFIO devices overlap? A whole migration, 1 device against N.

Usage (from the checkout's root): ``python -m examples.bench_arcs [--devices 8]
[--delay-ms 50] [--repeat 5]``

Each device is a VfioDevice on the fake kernel of ``tests/devices/vfio_harness.py``,
which answers at the ioctl boundary and sleeps ``--delay-ms`` in every state change,
as a NIC or GPU saving or loading its state would. Source and destination run in this
process over loopback TCP. A switchover moves every device through five such arcs:
quiesce and stop on the source, load (RESUMING -> STOP) and the two resume arcs on the
destination, so one device's arcs cost about 5 x delay. If the arcs of N devices ran one
after the other they would cost N times that; overlapped, about the same as one.

Runs of 1 and N devices alternate (``--repeat`` pairs) and the medians are printed:
the downtime, its arc phases (quiesce + stop + load + resume) and their ratio, N / 1.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import structlog
import uvloop

import transport
from orchestrator.engine.destination import DestinationMigration
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.source import SourceMigration
from tests.devices.vfio_harness import FakeKernel

#: The downtime phases that are device arcs (the rest is data on the wire).
ARC_PHASES = ("quiesce", "stop", "load", "resume")


async def migrate(
    kernel: FakeKernel, count: int, delay_s: float, **faults: object
) -> dict[str, float]:
    """Migrate ``count`` fake VFIO devices once; the downtime breakdown in ms.

    ``faults`` are FakeVfio fields for the source devices (tests use them).
    """
    sources = [kernel.device(f"vfio{i}", set_delay=delay_s, **faults)[0] for i in range(count)]
    targets = {
        f"vfio{i}": kernel.device(f"vfio{i}", set_delay=delay_s, content=b"idle")[0]
        for i in range(count)
    }

    async def accept(session: transport.Session) -> None:
        await DestinationMigration(session, targets).run()

    auth = transport.AuthConfig()
    server = await transport.serve("127.0.0.1:0", accept, name="bench-dst", auth=auth)
    try:
        params = MigrationParams(downtime_limit_ms=10_000)
        stats = await SourceMigration(sources, server.address, params, auth=auth).run()
    finally:
        server.close()
        await server.wait_closed()
        for device in [*sources, *targets.values()]:
            device.abort()
    breakdown = dict(stats.downtime_breakdown_ms)
    breakdown["downtime"] = stats.downtime_ms
    breakdown["arcs"] = sum(breakdown.get(phase, 0.0) for phase in ARC_PHASES)
    return breakdown


async def bench(count: int, delay_s: float, repeat: int) -> dict[int, list[dict[str, float]]]:
    """Alternate runs of 1 and ``count`` devices, ``repeat`` of each."""
    runs: dict[int, list[dict[str, float]]] = {1: [], count: []}
    with tempfile.TemporaryDirectory() as folder, FakeKernel(Path(folder)).installed() as kernel:
        for _ in range(repeat):
            for size in (1, count):
                runs[size].append(await migrate(kernel, size, delay_s))
    return runs


def median(runs: list[dict[str, float]], key: str) -> float:
    """The median of one figure over runs."""
    return statistics.median(run.get(key, 0.0) for run in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.devices < 2 or args.repeat < 1 or args.delay_ms < 0:
        parser.error("--devices must be at least 2, --repeat at least 1, --delay-ms >= 0")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    runs = uvloop.run(bench(args.devices, args.delay_ms / 1000, args.repeat))
    keys = ["downtime", "arcs", *ARC_PHASES]
    print(f"medians of {args.repeat} runs, {args.delay_ms:g} ms per state change (ms)")
    print(f"{'devices':>8} " + " ".join(f"{k:>9}" for k in keys))
    for size, results in runs.items():
        print(f"{size:>8} " + " ".join(f"{median(results, k):9.1f}" for k in keys))
    ratio = median(runs[args.devices], "arcs") / median(runs[1], "arcs")
    print(f"arc phases, {args.devices} devices / 1 device: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

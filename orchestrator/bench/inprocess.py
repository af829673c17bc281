"""A whole migration in one process over loopback TCP: the quick benchmark.

Both ends run on one event loop (uvloop when the caller installed it), so this measures
the orchestrator and the wire format, not process scheduling. ``livemig bench`` runs
the benchmark of record between two daemon processes; this one is for profiling and for
the tests.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any

import transport
from devices.base import MigratableDevice
from devices.ram import RamDevice
from devices.simulated import SimulatedDevice
from orchestrator.engine.destination import DestinationMigration
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.source import SourceMigration

MIB = 1 << 20
MB = 1_000_000


@dataclasses.dataclass(slots=True)
class BenchOptions:
    """What a benchmark migrates and how: the ``livemig bench`` options, for both modes."""

    devices: int = 4
    state_mib: float = 16
    dirty_mbps: float = 10
    ram_mib: float = 0
    ram_dirty_mbps: float = 0
    ram_working_set_mib: float | None = None
    downtime_limit_ms: float = 100
    max_bandwidth_mbps: float | None = None
    #: None: the MigrationParams default.
    channels: int | None = None
    #: Any other MigrationParams field.
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def working_set_mib(self) -> float:
        """The RAM device's working set: half of it unless set."""
        working = self.ram_working_set_mib
        return self.ram_mib / 2 if working is None else working

    def migration_parameters(self) -> dict[str, Any]:
        """The migration's parameters, as the ``migrate`` command takes them."""
        parameters: dict[str, Any] = {"downtime_limit_ms": self.downtime_limit_ms}
        if self.channels is not None:
            parameters["channels"] = self.channels
        if self.max_bandwidth_mbps is not None:
            parameters["max_bandwidth"] = self.max_bandwidth_mbps * MB
        return parameters | self.parameters

    def build(self, *, source: bool) -> list[MigratableDevice]:
        """The device set of one end; only the source runs a workload."""
        devices: list[MigratableDevice] = [
            SimulatedDevice(
                f"sim{i}",
                state_size=int(self.state_mib * MIB),
                dirty_rate=self.dirty_mbps * MB if source else 0,
                seed=i + 1,
            )
            for i in range(self.devices)
        ]
        if self.ram_mib:
            devices.append(
                RamDevice(
                    "ram0",
                    size=int(self.ram_mib * MIB),
                    dirty_rate=self.ram_dirty_mbps * MB if source else 0,
                    working_set=int(self.working_set_mib * MIB),
                )
            )
        return devices


async def run_once(options: BenchOptions) -> dict[str, Any]:
    """One migration between in-process ends; the stats dict plus ``verified``."""
    sources = options.build(source=True)
    targets = options.build(source=False)
    for device in (*sources, *targets):
        await device.open()
    by_name = {d.name: d for d in targets}
    outcome: list[bool] = []

    async def accept(session: transport.Session) -> None:
        outcome.append(await DestinationMigration(session, by_name).run())

    auth = transport.AuthConfig()
    server = await transport.serve("127.0.0.1:0", accept, name="bench-destination", auth=auth)
    try:
        params = MigrationParams().updated(options.migration_parameters())
        migration = SourceMigration(sources, server.address, params, auth=auth, name="bench-source")
        stats = await migration.run()
        result = stats.as_dict(history=True)
        source_digests = [await d.digest() for d in sources]
        target_digests = [await d.digest() for d in targets]
        result["verified"] = source_digests == target_digests
    finally:
        server.close()
        await server.wait_closed()
        for device in (*sources, *targets):
            await device.close()
    return result


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with ``fraction`` of them at or below.

    With 10 runs the p90 is the 9th smallest: one run in ten may be worse.
    """
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """min / median / p90 / max of the headline numbers over repeated runs."""
    summary: dict[str, Any] = {"runs": len(runs)}
    runs = [_with_ratio(r) for r in runs]
    keys = (
        "downtime_ms",
        "expected_downtime_ms",
        "downtime_over_expected",
        "total_ms",
        "iterations",
        "transferred_bytes",
        "bandwidth_bps",
        "cpu_s_per_gb",
    )
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            summary[key] = {
                "min": min(values),
                "median": statistics.median(values),
                "p90": percentile(values, 0.9),
                "max": max(values),
            }
    summary["completed"] = sum(r["status"] == "completed" for r in runs)
    summary["verified"] = all(r.get("verified") for r in runs)
    return summary


def _with_ratio(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` with ``downtime_over_expected``, the measured downtime over the one the
    switchover was decided on: above 1, the estimate promised less than it delivered."""
    measured, expected = run.get("downtime_ms"), run.get("expected_downtime_ms")
    if measured is None or not expected:
        return run
    return run | {"downtime_over_expected": measured / expected}


async def run_repeated(options: BenchOptions, repeat: int) -> list[dict[str, Any]]:
    """``repeat`` migrations one after the other, each with fresh devices."""
    return [await run_once(options) for _ in range(repeat)]

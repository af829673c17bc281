"""Eight mtty mdevs migrate at once and their arcs overlap in the kernel (guest only).

The single-port mdevs ``perf_src0..7`` migrate into ``perf_dst0..7`` in this process.
:class:`KernelView` times every SET|MIG_DEVICE_STATE in the worker thread that issued
it; for each switchover step (the sources' quiesce and stop, the targets' load and two
resume arcs) the figures are the sum of the SETs' durations, the step's span from the
first start to the last end, and how many SETs were in the kernel at once. Arcs run
inline on the event loop would show one at a time; the figures go to
``/results/arcs_overlap.json`` for the host to report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devices.fsm import State
from orchestrator.engine.params import MigrationParams
from tests.devices.vfio_harness import open_fresh
from tests.vm.guest.kernel_view import KernelView, SetCall, concurrency, migrate
from tests.vm.lab import PERF_DEVICES

pytestmark = pytest.mark.timeout(600)

RESULTS = Path(os.environ.get("LIVEMIG_LAB_RESULTS", "/results"))
#: Switchover steps: (side, the SET's target).
STEPS = {
    "quiesce": ("src", State.PRE_COPY_P2P),
    "stop": ("src", State.STOP_COPY),
    "load": ("dst", State.STOP),
    "resume_p2p": ("dst", State.RUNNING_P2P),
    "resume": ("dst", State.RUNNING),
}


def figures(calls: list[SetCall]) -> dict[str, float]:
    """Sum of durations, span and concurrency of one step's SETs, in ms."""
    return {
        "sets": len(calls),
        "sum_ms": round(sum(c.ended - c.started for c in calls) * 1e3, 3),
        "span_ms": round((max(c.ended for c in calls) - min(c.started for c in calls)) * 1e3, 3),
        "concurrency": concurrency(calls),
    }


async def test_eight_mdevs_migrate_with_their_arcs_overlapping() -> None:
    """Eight devices' switchover SETs overlap in the kernel, and every device arrives."""
    env = os.environ
    sources = [
        open_fresh(env[f"LIVEMIG_MDEV_PERF_SRC{i}"], name=f"tty{i}") for i in range(PERF_DEVICES)
    ]
    targets = {
        f"tty{i}": open_fresh(env[f"LIVEMIG_MDEV_PERF_DST{i}"], name=f"tty{i}")
        for i in range(PERF_DEVICES)
    }
    view = KernelView()
    for device in sources:
        view.watch(f"src:{device.name}", device)
    for name, device in targets.items():
        view.watch(f"dst:{name}", device)
    try:
        before = [await device.digest() for device in sources]
        with view.installed():
            outcome = await migrate(sources, targets, MigrationParams(downtime_limit_ms=20_000))
        assert outcome.error is None, outcome.error
        steps = {}
        for step, (side, target) in STEPS.items():
            calls = [c for c in view.sets if c.device.startswith(side) and c.target == target]
            assert len(calls) == PERF_DEVICES, (step, calls)
            steps[step] = figures(calls)
        report = {
            "devices": PERF_DEVICES,
            "downtime_ms": outcome.stats.downtime_ms,
            "breakdown_ms": outcome.stats.downtime_breakdown_ms,
            "steps": steps,
        }
        (RESULTS / "arcs_overlap.json").write_text(json.dumps(report, indent=2))
        assert [await targets[d.name].digest() for d in sources] == before
        assert max(s["concurrency"] for s in steps.values()) >= 2, steps
    finally:
        for device in [*sources, *targets.values()]:
            device.abort()

"""P2P order as mtty saw it: two devices migrate, forward and rolled back (guest only).

The source mdevs ``src`` and ``src2`` migrate as ``tty0`` and ``tty1`` into ``dst`` and
``dst2``, both ends in this process. :class:`KernelView` reads every device's state back
from the kernel after every state change, so the order is the driver's, not livemig's
own account. The rule, in both directions: a device that can initiate P2P DMA (RUNNING,
PRE_COPY) never runs while a peer is stopped (STOP, STOP_COPY, RESUMING), and every
move between the two passes through a P2P state (PRE_COPY_P2P, RUNNING_P2P). Each
scenario records what the kernel showed in ``/results/p2p_order.json``.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devices.fsm import State
from orchestrator.engine.errors import MigrationCancelled, MigrationError
from orchestrator.engine.params import MigrationParams
from tests.devices.vfio_harness import open_fresh, uart_clear, uart_drain, uart_write
from tests.vm.guest.kernel_view import (
    KernelView,
    Outcome,
    first,
    migrate,
    p2p_violations,
    passes_through_p2p,
)

pytestmark = pytest.mark.timeout(600)

RESULTS = Path(os.environ.get("LIVEMIG_LAB_RESULTS", "/results"))
SOURCES = ("src:tty0", "src:tty1")
TARGETS = ("dst:tty0", "dst:tty1")
#: TCG is slow: a generous limit, the order is what is under test here.
PARAMS = MigrationParams(downtime_limit_ms=20_000)


class Pair:
    """Two source and two destination mdevs, opened, with the kernel view over them."""

    def __init__(self) -> None:
        env = os.environ
        # Reset on open: a scenario that migrated left its sources stopped.
        self.sources = [
            open_fresh(env["LIVEMIG_MDEV_SRC"], name="tty0"),
            open_fresh(env["LIVEMIG_MDEV_SRC2"], name="tty1"),
        ]
        self.targets = {
            "tty0": open_fresh(env["LIVEMIG_MDEV_DST"], name="tty0"),
            "tty1": open_fresh(env["LIVEMIG_MDEV_DST2"], name="tty1"),
        }
        self.view = KernelView()
        for device in self.sources:
            self.view.watch(f"src:{device.name}", device)
        for name, device in self.targets.items():
            self.view.watch(f"dst:{name}", device)

    def close(self) -> None:
        for device in [*self.sources, *self.targets.values()]:
            device.abort()

    def record(self, scenario: str, outcome: Outcome) -> None:
        """Add what the kernel showed to the JSON report."""
        report = RESULTS / "p2p_order.json"
        facts = json.loads(report.read_text()) if report.is_file() else {}
        facts[scenario] = {
            "error": None if outcome.error is None else str(outcome.error),
            "histories": {
                label: [s.name for s in self.view.history(label)] for label in SOURCES + TARGETS
            },
            "snapshots": len(self.view.snapshots),
        }
        report.write_text(json.dumps(facts, indent=2))


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """Both ends, RUNNING, source FIFOs holding known bytes; every device closed after."""
    devices = Pair()
    try:
        for index, device in enumerate(devices.sources):
            for port in (0, 1):
                uart_clear(device, port)
                uart_write(device, port, f"tty{index}p{port}".encode())
        yield devices
    finally:
        devices.close()


def assert_source_order(pair: Pair) -> None:
    """The sources kept the P2P rule in every snapshot and every move."""
    assert p2p_violations(pair.view, SOURCES) == []
    for label in SOURCES:
        history = pair.view.history(label)
        assert passes_through_p2p(history), f"{label}: {[s.name for s in history]}"


async def test_p2p_order_forward_as_the_kernel_saw_it(pair: Pair) -> None:
    """Both sources quiesced before either stopped; both targets in RUNNING_P2P before RUNNING."""
    before = [await device.digest() for device in pair.sources]
    with pair.view.installed():
        outcome = await migrate(pair.sources, pair.targets, PARAMS)
    pair.record("forward", outcome)
    assert outcome.error is None, outcome.error
    assert_source_order(pair)
    loaded = first(pair.view, TARGETS, frozenset({State.RESUMING}))
    assert loaded < len(pair.view.snapshots), "the kernel never showed both targets RESUMING"
    assert p2p_violations(pair.view, TARGETS, start=loaded) == []
    for label in TARGETS:
        history = pair.view.history(label)
        resumed = history[history.index(State.RESUMING) :]
        assert resumed[-3:] == [State.STOP, State.RUNNING_P2P, State.RUNNING], resumed
    assert [await pair.targets[d.name].digest() for d in pair.sources] == before
    tty1 = pair.targets["tty1"]
    assert (uart_drain(tty1, 0), uart_drain(tty1, 1)) == (b"tty1p0", b"tty1p1")


async def test_p2p_order_on_rollback_after_an_arc_failure(pair: Pair) -> None:
    """tty1's STOP_COPY fails (EIO): both back in RUNNING_P2P before either runs, intact."""
    pair.view.fail_once[("src:tty1", State.STOP_COPY)] = errno.EIO
    with pair.view.installed():
        outcome = await migrate(pair.sources, pair.targets, PARAMS)
    pair.record("rollback_arc_failure", outcome)
    assert isinstance(outcome.error, MigrationError)
    assert "EIO" in str(outcome.error)
    assert [d.state for d in pair.sources] == [State.RUNNING, State.RUNNING]
    assert State.STOP_COPY in pair.view.history("src:tty0")  # the rollback left STOP_COPY
    assert_source_order(pair)
    tty0 = pair.sources[0]
    assert (uart_drain(tty0, 0), uart_drain(tty0, 1)) == (b"tty0p0", b"tty0p1")


async def test_p2p_order_on_rollback_after_a_cancel(pair: Pair) -> None:
    """A cancel while the destination holds its verdict: both sources back in P2P order."""
    with pair.view.installed():
        outcome = await migrate(
            pair.sources, pair.targets, PARAMS, hold_loaded=True, cancel_at_hold=True
        )
    pair.record("rollback_cancel", outcome)
    assert isinstance(outcome.error, MigrationCancelled)
    assert [d.state for d in pair.sources] == [State.RUNNING, State.RUNNING]
    for label in SOURCES:
        assert State.STOP_COPY in pair.view.history(label), pair.view.history(label)
    assert_source_order(pair)
    tty1 = pair.sources[1]
    assert (uart_drain(tty1, 0), uart_drain(tty1, 1)) == (b"tty1p0", b"tty1p1")

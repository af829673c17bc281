"""A destination that gives up after loading resets the devices it loaded; when a reset
fails, the device keeps a stopped copy of the workload, which runs on the source again.
Its record must keep that copy from running here unasked (``resume`` without --force), or
the workload would run in two places."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devices.errors import DeviceError
from devices.fsm import State
from orchestrator.engine.destination import Offer
from orchestrator.engine.errors import MigrationError
from orchestrator.service.commands import Commands
from orchestrator.service.config import parse
from orchestrator.service.ownership import FENCED_OWNERS
from orchestrator.service.protocol import ControlError
from orchestrator.service.service import Incoming, Service, _IncomingGate
from tests.orchestrator.conftest import Spec

#: Bound of every wait.
DEADLINE_S = 30.0


class LateGate:
    """The destination daemon's gate, made once the destination devices exist."""

    inner: _IncomingGate | None = None

    def admit(self, offer: Offer) -> None:
        assert self.inner is not None
        self.inner.admit(offer)

    def prepare(self, offer: Offer) -> None:
        assert self.inner is not None
        self.inner.prepare(offer)

    def committed(self, offer: Offer) -> None:
        assert self.inner is not None
        self.inner.committed(offer)

    def finished(self, offer: Offer, results: Any) -> None:
        assert self.inner is not None
        self.inner.finished(offer, results)


async def test_a_loaded_device_whose_reset_failed_is_not_resumed_without_force(
    make_ends: Callable[..., Any], tmp_path: Path
) -> None:
    """The source rolls back after the destination loaded (its stop bound passes while
    "loaded" is held), the destination's reset of the loaded device fails: the device
    holds the workload's copy in STOP, and ``resume`` without --force is refused while
    the source runs the workload."""
    late = LateGate()
    ends = await make_ends([Spec("sim0", seed=1)], hold_verdicts="loaded", gate=late)
    target = ends.targets[0]
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), ends.targets)
    service.book.arm(["sim0"], None, None)
    late.inner = _IncomingGate(service, Incoming("claim", "source", None))

    async def failing_reset() -> None:
        raise DeviceError("sim0", "reset failed (injected)")

    target.reset = failing_reset  # type: ignore[method-assign]
    try:
        migration = ends.migration(max_stop_ms=100)
        run = asyncio.create_task(migration.run())
        gate = await asyncio.wait_for(ends.held_verdict(), DEADLINE_S)
        with pytest.raises(MigrationError):
            await asyncio.wait_for(run, DEADLINE_S)
        gate.open.set()
        await asyncio.wait_for(ends.tasks[0], DEADLINE_S)
        assert migration.stats.outcome == "source"
        assert ends.sources[0].state == State.RUNNING
        assert target.state == State.STOP  # loaded, and not reset
        assert service.book.get("sim0").owner in FENCED_OWNERS
        with pytest.raises(ControlError, match="--force"):
            await Commands(service).device_resume(["sim0"])
        assert target.state == State.STOP
    finally:
        service.book.close()

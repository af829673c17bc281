"""An operator's resume that can only reset a device says the device's state is lost.

``device-resume`` (``livemig resume``) brings stopped devices back to RUNNING; a device
the FSM cannot bring back is reset (``resume_in_order``), which drops its state: for a
device kept stopped, or one whose outcome was unknown, perhaps the workload's only copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devices.fsm import State
from devices.paged import Faults
from orchestrator.service.commands import Commands
from orchestrator.service.config import parse
from orchestrator.service.ownership import Owner
from orchestrator.service.protocol import ControlError
from orchestrator.service.service import Service
from tests.orchestrator.conftest import Spec


@contextlib.asynccontextmanager
async def serviced(tmp_path: Path, faults: Faults | None) -> AsyncIterator[tuple[Any, Service]]:
    """An opened source device "sim0" with ``faults`` and a daemon's service owning it."""
    device = Spec("sim0", seed=1, source_faults=faults).build(source=True)
    await device.open()
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [device])
    try:
        yield device, service
    finally:
        service.book.close()
        await device.close()


def assert_recorded_lost(service: Service) -> None:
    """sim0's record says no workload runs here, and why: its state is lost."""
    record = service.book.get("sim0")
    assert record.owner == Owner.IDLE
    assert record.reason is not None
    assert "state is lost" in record.reason


#: Every arc out of STOP towards running fails: only a reset brings the device back.
STUCK = Faults(fail_arcs=frozenset({(State.STOP, State.RUNNING_P2P), (State.STOP, State.RUNNING)}))


@pytest.mark.parametrize("owner", [Owner.STOPPED, Owner.OUTCOME_UNKNOWN], ids=lambda o: o.name)
async def test_a_resume_that_resets_the_device_says_its_state_is_lost(
    tmp_path: Path, owner: Owner
) -> None:
    """The reply is an error naming the device and its lost state, not its new RUNNING;
    its record no longer says the workload runs here: a reset device holds none."""
    async with serviced(tmp_path, STUCK) as (device, service):
        await device.set_state(State.STOP)
        service.book.set(["sim0"], owner, peer="b", migration_id="m1", reason="test")
        with pytest.raises(
            ControlError, match=r"the state of sim0 is lost: .*sim0: reset"
        ) as caught:
            await Commands(service).device_resume(["sim0"], force=True)
        assert caught.value.error_class == "GenericError"
        assert device.state == State.RUNNING
        assert_recorded_lost(service)


async def test_a_resume_that_works_keeps_the_workload_here(tmp_path: Path) -> None:
    """The same resume without the fault: RUNNING, recorded as the workload here."""
    async with serviced(tmp_path, None) as (device, service):
        await device.set_state(State.STOP)
        service.book.set(["sim0"], Owner.STOPPED, reason="test")
        assert await Commands(service).device_resume(["sim0"]) == {"sim0": "RUNNING"}
        assert service.book.get("sim0").owner == Owner.RUNNING_HERE


async def test_a_rollback_that_resets_a_device_records_its_state_lost(
    tmp_path: Path, make_ends: Any
) -> None:
    """A failed migration whose rollback can only reset a source device (its arcs back to
    running fail): the daemon's record no longer says the workload runs here."""
    ends = await make_ends([Spec("sim0", seed=1, target_faults=Faults(corrupt_validation=True))])
    async with serviced(tmp_path, STUCK) as (_, service):
        outgoing = service.start_migration(ends.address, None, {})
        assert outgoing.task is not None
        await outgoing.task
        assert outgoing.migration.stats.placement["sim0"].startswith("reset (state lost)")
        assert_recorded_lost(service)

"""A destination daemon that dies while it receives, over a vfio-user server that outlives it."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.fsm import State
from devices.vfio_user import VfioUserDevice
from orchestrator.engine.destination import Offer
from orchestrator.service.config import parse
from orchestrator.service.ownership import ARMABLE_BY_DEFAULT, Owner
from orchestrator.service.service import Incoming, Service, _IncomingGate
from tests.vfio_user import servers
from tests.vfio_user.servers import Server

S = State


@pytest.mark.parametrize(
    ("prior", "walked", "owner", "found"),
    [
        pytest.param(Owner.RUNNING_HERE, (), Owner.RUNNING_HERE, S.RUNNING, id="before-any-arc"),
        pytest.param(Owner.RUNNING_HERE, (S.STOP,), Owner.STOPPED, S.STOP, id="after-first-arc"),
        pytest.param(Owner.STOPPED, (), Owner.STOPPED, S.STOP, id="kept-stopped-untouched"),
        pytest.param(Owner.RUNNING_HERE, (S.STOP, S.RESUMING), Owner.IDLE, S.STOP, id="loading"),
        pytest.param(Owner.MIGRATED_AWAY, (), Owner.MIGRATED_AWAY, S.STOP, id="away-untouched"),
        pytest.param(
            Owner.OUTCOME_UNKNOWN, (), Owner.OUTCOME_UNKNOWN, S.STOP, id="unknown-untouched"
        ),
        pytest.param(
            Owner.OUTCOME_UNKNOWN, (S.RESUMING,), Owner.IDLE, S.STOP, id="unknown-loading"
        ),
    ],
)
async def test_a_daemon_dead_between_admission_and_load_records_what_the_device_may_hold(
    tmp_path: Path,
    started: list[Server],
    prior: Owner,
    walked: tuple[State, ...],
    owner: Owner,
    found: State,
) -> None:
    """A device armed by name while it holds a workload (``prior``), admitted into an
    incoming migration, whose daemon dies after ``walked`` arcs: the restarted daemon
    finds the server's device where the dead one left it and records ``owner``. Before
    RESUMING the device still holds its workload (running, or stopped with its state),
    so ``idle`` would let a bare ``migrate-incoming`` arm it and a migration replace it;
    once RESUMING was entered its state was being replaced, and ``idle`` is the truth."""
    server = servers.start_testdev(tmp_path / "dev.sock", seed=1)
    started.append(server)
    config = parse(f'control_socket = "{tmp_path}/c.sock"\n')
    device = VfioUserDevice("vu0", socket=str(server.socket))
    await device.open()
    service = Service(config, [device])
    if prior != Owner.RUNNING_HERE:
        await device.set_state(S.STOP)
        service.book.set(["vu0"], prior, reason="kept here (test)")
    service.book.arm(["vu0"], "source", None)
    # The engine's first step with an offer, before any arc: the gate's admission.
    _IncomingGate(service, Incoming("claim", "source", None)).admit(Offer("m1", "source", ("vu0",)))
    assert service.book.get("vu0").owner == Owner.IDLE
    for state in walked:
        await device.set_state(state)
    # SIGKILL: the kernel drops the state file's lock and the connection; the server
    # keeps its device as it was.
    service.book.close()
    await device.close()
    again = VfioUserDevice("vu0", socket=str(server.socket))
    await again.open()
    try:
        restarted = Service(config, [again])
        await restarted.fence()
        assert again.state == found
        assert restarted.book.get("vu0").owner == owner
        assert ("vu0" in restarted.book.default_armable()) == (owner in ARMABLE_BY_DEFAULT)
        restarted.book.close()
    finally:
        await again.close()

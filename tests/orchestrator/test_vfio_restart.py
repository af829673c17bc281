"""A daemon's stop and start over a kernel VFIO device the kernel keeps: nothing is reset.

The device is a VfioDevice on the fake kernel (tests/devices/vfio_harness.py), which keeps
a device's migration state across close and open as mtty does; the daemon is the real
Runner (setup, then the cleanup SIGTERM runs), with its state file.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from devices.fsm import State
from devices.vfio import VfioDevice
from orchestrator.service.config import parse
from orchestrator.service.ownership import Owner
from orchestrator.service.runner import Runner
from orchestrator.service.service import StartupError
from tests.devices.vfio_harness import FakeKernel, FakeVfio

S = State


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    """A fake kernel whose one device, ``tty0``, every daemon's config opens."""
    with FakeKernel(tmp_path).installed() as fake:
        kept: dict[str, FakeVfio] = {}

        def from_config(cls: type[VfioDevice], spec: str, **_: Any) -> VfioDevice:
            if spec not in kept:
                device, kept[spec] = fake.device(spec)
                return device
            return fake.reopen(kept[spec])

        monkeypatch.setattr(VfioDevice, "from_config", classmethod(from_config))
        yield fake


def _config(folder: Path, listen: str = "") -> Runner:
    return Runner(
        parse(
            f'control_socket = "{folder}/c.sock"\n'
            f"listen = [{listen}]\n"
            '[[device]]\nkind = "vfio"\nname = "tty0"\ndevice = "tty0"\n'
        )
    )


def _resets(kernel: FakeKernel) -> int:
    return sum(1 for _, call in kernel.calls if call == "RESET")


@pytest.mark.parametrize(
    "owner", [Owner.OUTCOME_UNKNOWN, Owner.MIGRATED_AWAY, Owner.STOPPED], ids=lambda o: o.name
)
async def test_a_graceful_restart_keeps_a_stopped_device_and_its_record(
    tmp_path: Path, kernel: FakeKernel, owner: Owner
) -> None:
    """A device in STOP recorded ``owner`` (the workload maybe only here, elsewhere, or
    kept stopped here) goes through the daemon's cleanup (what SIGTERM runs) and a new
    daemon's setup: still STOP, same state, same record, never reset."""
    first = _config(tmp_path)
    await first.setup()
    device = first.devices[0]
    await device.set_state(S.STOP)
    assert first.book is not None
    first.book.set(["tty0"], owner, peer="b", migration_id="m1", reason="test")
    fake = next(iter(kernel.devices.values()))
    content = fake.content
    await first.cleanup()
    assert fake.state == S.STOP
    second = _config(tmp_path)
    await second.setup()
    try:
        assert second.devices[0].found_at_open == S.STOP
        assert second.devices[0].state == S.STOP
        assert second.book is not None
        assert (second.book.get("tty0").owner, second.book.get("tty0").migration_id) == (
            owner,
            "m1",
        )
    finally:
        await second.cleanup()
    assert (fake.state, fake.content) == (S.STOP, content)
    assert _resets(kernel) == 0


async def test_a_daemon_that_fails_to_start_leaves_a_stopped_device_stopped(
    tmp_path: Path, kernel: FakeKernel
) -> None:
    """A daemon whose listener cannot start undoes its setup, closing the devices: a
    device found in STOP (an unknown outcome, by its record) stays STOP with its state."""
    first = _config(tmp_path)
    await first.setup()
    await first.devices[0].set_state(S.STOP)
    assert first.book is not None
    first.book.set(["tty0"], Owner.OUTCOME_UNKNOWN, peer="b", migration_id="m1")
    await first.cleanup()
    fake = next(iter(kernel.devices.values()))
    content = fake.content
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            await _config(tmp_path, f'"127.0.0.1:{port}"').setup()
    assert (fake.state, fake.content) == (S.STOP, content)
    assert _resets(kernel) == 0


@pytest.mark.parametrize("owner", [Owner.OUTCOME_UNKNOWN, Owner.STOPPED], ids=lambda o: o.name)
async def test_a_kept_device_found_running_at_start_is_flagged_on_its_record(
    tmp_path: Path, kernel: FakeKernel, owner: Owner
) -> None:
    """A device recorded ``owner`` (stopped here, its state maybe the workload's only
    copy) that the next daemon finds RUNNING was reset or run between the daemons: the
    record keeps its owner and fence but says so, with a critical log, so an operator
    does not resume it as the workload."""
    first = _config(tmp_path)
    await first.setup()
    await first.devices[0].set_state(S.STOP)
    assert first.book is not None
    first.book.set(["tty0"], owner, peer="b", migration_id="m1", reason="test")
    await first.cleanup()
    fake = next(iter(kernel.devices.values()))
    fake.state = S.RUNNING  # a reset between the daemons (vfio-pci on open, or a VMM)
    second = _config(tmp_path)
    with capture_logs() as logs:
        await second.setup()
    try:
        assert second.book is not None
        record = second.book.get("tty0")
        assert (record.owner, record.migration_id) == (owner, "m1")
        assert record.reason is not None
        assert "found RUNNING" in record.reason
        assert "may be gone" in record.reason
        assert [e["found"] for e in logs if e["event"] == "kept_state_found_gone"] == ["RUNNING"]
    finally:
        await second.cleanup()

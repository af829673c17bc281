"""What opening and closing leave a kernel VFIO device in: sessions end, kept state stays.

The fake kernel keeps a device's migration state across close and open, as mtty does, and
its reset empties the device's content, as a real device's reset loses its state.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.errors import DeviceError
from devices.fsm import State
from tests.devices.vfio_harness import FakeKernel

S = State


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[FakeKernel]:
    """A fake kernel answering devices.vfio's ioctls; its devices are closed afterwards."""
    with FakeKernel(tmp_path).installed() as fake:
        yield fake


def _resets(kernel: FakeKernel) -> int:
    return sum(1 for _, call in kernel.calls if call == "RESET")


@pytest.mark.parametrize(
    ("walk", "left", "resets"),
    [
        pytest.param((), S.RUNNING, 0, id="running"),
        pytest.param((S.RUNNING_P2P,), S.RUNNING_P2P, 0, id="running-p2p"),
        pytest.param((S.PRE_COPY,), S.RUNNING, 0, id="pre-copy"),
        pytest.param((S.PRE_COPY_P2P,), S.RUNNING_P2P, 0, id="pre-copy-p2p"),
        pytest.param((S.STOP_COPY,), S.STOP, 0, id="stop-copy"),
        pytest.param((S.STOP, S.RESUMING), S.RUNNING, 1, id="resuming"),
    ],
)
async def test_closing_ends_a_session_by_its_arc_and_resets_only_a_half_loaded_device(
    kernel: FakeKernel, walk: tuple[State, ...], left: State, resets: int
) -> None:
    """Close ends a saving session by the arc out of it (the device runs on, or stays
    stopped, with its state) and leaves the running states alone; only RESUMING, half a
    stream and no workload, is reset."""
    device, fake = kernel.device("dev")
    content = fake.content
    for state in walk:
        await device.set_state(state)
    await device.close()
    assert (fake.state, device.state) == (left, left)
    assert _resets(kernel) == resets
    assert fake.content == (content if resets == 0 else b"")
    assert device.fds.device == -1


async def test_a_device_stopped_at_close_is_found_stopped_and_still_migrates(
    kernel: FakeKernel,
) -> None:
    """A device left in STOP_COPY by its daemon (an unknown outcome after COMMIT) is
    closed into STOP; the next daemon finds it there and saves the very same state."""
    device, fake = kernel.device("dev")
    content = fake.content
    await device.set_state(S.STOP_COPY)
    await device.close()
    again = kernel.reopen(fake)
    assert (again.found_at_open, again.state) == (S.STOP, S.STOP)
    await again.set_state(S.STOP_COPY)
    stream = b"".join(bytes(b) for b in await again.save_channel().read() or ())
    assert stream == fake.header + content
    assert _resets(kernel) == 0


async def test_closing_a_device_in_error_resets_it(kernel: FakeKernel) -> None:
    """A device whose driver broke (ERROR) has no state left to keep: close resets it, the
    uAPI's only way out, so the next owner gets a usable device."""
    device, fake = kernel.device("dev")
    fake.state = device.state = S.ERROR
    await device.close()
    assert fake.state == S.RUNNING
    assert _resets(kernel) == 1


@pytest.mark.parametrize(
    ("found", "left", "resets"),
    [
        pytest.param(S.RUNNING_P2P, S.RUNNING_P2P, 0, id="running-p2p"),
        pytest.param(S.STOP, S.STOP, 0, id="stop"),
        pytest.param(S.PRE_COPY, S.RUNNING, 0, id="pre-copy"),
        pytest.param(S.PRE_COPY_P2P, S.RUNNING_P2P, 0, id="pre-copy-p2p"),
        pytest.param(S.STOP_COPY, S.STOP, 0, id="stop-copy"),
        pytest.param(S.RESUMING, S.RUNNING, 1, id="resuming"),
        pytest.param(S.ERROR, S.RUNNING, 1, id="error"),
    ],
)
def test_opening_ends_the_session_a_dead_owner_left_and_keeps_the_state(
    kernel: FakeKernel, found: State, left: State, resets: int
) -> None:
    """A device whose previous owner died (SIGKILL) in ``found`` opens with that state
    recorded in ``found_at_open``; a session is ended by its arc, keeping the state (in
    STOP_COPY it may be a workload's only copy), and only RESUMING and ERROR are reset."""
    device, fake = kernel.device("dev", state=found)
    content = fake.content
    assert device.found_at_open == found
    assert (fake.state, device.state) == (left, left)
    assert _resets(kernel) == resets
    assert fake.content == (content if resets == 0 else b"")


async def test_a_session_end_failing_at_close_resets_nothing_and_the_next_open_ends_it(
    kernel: FakeKernel,
) -> None:
    """STOP_COPY -> STOP failing at close (EIO) leaves the device in STOP_COPY with its
    state and closes the fds anyway; the next open ends the session."""
    device, fake = kernel.device("dev", failing={(S.STOP_COPY, S.STOP): [errno.EIO]})
    await device.set_state(S.STOP_COPY)
    await device.close()
    assert fake.state == S.STOP_COPY
    assert device.fds.device == -1
    again = kernel.reopen(fake)
    assert (again.found_at_open, fake.state) == (S.STOP_COPY, S.STOP)
    assert _resets(kernel) == 0
    assert fake.content


def test_a_session_end_failing_at_open_refuses_the_device_and_resets_nothing(
    kernel: FakeKernel,
) -> None:
    """A device found in STOP_COPY whose session cannot be ended is not opened (the error
    names the call and the errno) and is not reset: its state may be the only copy."""
    with pytest.raises(DeviceError, match=r"dev: .*SET\|MIG_DEVICE_STATE=STOP.*EIO"):
        kernel.device("dev", state=S.STOP_COPY, failing={(S.STOP_COPY, S.STOP): [errno.EIO]})
    fake = next(iter(kernel.devices.values()))
    assert fake.state == S.STOP_COPY
    assert _resets(kernel) == 0


async def test_close_waits_for_an_arc_in_flight(kernel: FakeKernel) -> None:
    """Close decides on the state an arc in flight ends in, never on the one it left: a
    daemon's cleanup after a timed-out rollback closes a device whose arc still runs."""
    device, fake = kernel.device("dev", set_delay=0.05)
    move = asyncio.create_task(device.set_state(S.STOP_COPY))
    assert await asyncio.to_thread(fake.set_entered.wait, 5.0)
    await device.close()
    # Decided before the arc landed, close would have left it to land in STOP_COPY.
    assert (fake.state, device.state) == (S.STOP, S.STOP)
    assert _resets(kernel) == 0
    await move


async def test_a_digest_whose_walk_back_fails_keeps_a_stopped_device_state(
    kernel: FakeKernel,
) -> None:
    """query-digests on a stopped device (an operator checking an unknown outcome's copy)
    whose walk back from the snapshot's STOP_COPY fails: an error naming the step, the
    device left in STOP_COPY with its state, never reset; it can then be moved on."""
    device, fake = kernel.device("dev", failing={(S.STOP_COPY, S.STOP): [errno.EIO]})
    await device.set_state(S.STOP)
    content = fake.content
    with pytest.raises(DeviceError, match=r"dev: returning to STOP in digest\(\).*EIO"):
        await device.digest()
    assert (fake.state, device.state, fake.content) == (S.STOP_COPY, S.STOP_COPY, content)
    assert _resets(kernel) == 0
    await device.set_state(S.STOP)
    assert (fake.state, fake.content) == (S.STOP, content)

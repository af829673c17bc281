"""Fixtures of the in-guest tests: the lab's two mtty mdevs opened as VfioDevices."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devices.vfio import VfioDevice
from tests.devices import vfio_harness


@pytest.fixture
async def src() -> AsyncIterator[VfioDevice]:
    """The source mdev, RUNNING, port 0 FIFO = HELLO!, port 1 = WORLD!."""
    device = vfio_harness.make("src")
    assert isinstance(device, VfioDevice)
    for port, text in enumerate((b"HELLO!", b"WORLD!")):
        vfio_harness.uart_clear(device, port)
        vfio_harness.uart_write(device, port, text)
    yield device
    await device.close()


@pytest.fixture
async def dst() -> AsyncIterator[VfioDevice]:
    """The destination mdev, RUNNING, with other bytes in its FIFOs."""
    device = vfio_harness.make("dst", seed=7)
    assert isinstance(device, VfioDevice)
    yield device
    await device.close()

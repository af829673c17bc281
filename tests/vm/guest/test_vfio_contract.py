"""The device contract suite (tests/devices/test_contract.py) against VfioDevice on mtty.

The suite's tests are collected here a second time with the ``harness`` fixture
replaced by the VFIO one, so the suite needs no knowledge of the lab. Tests that
inject faults skip themselves (the kernel driver takes no injected faults). Two tests
assume dirty tracking in pre-copy, which mtty does not do (dirty_bytes stays 0 while
the device changes, and its changes travel in STOP_COPY): they are left out, by name.
"""

from __future__ import annotations

import pytest

from tests.devices import test_contract as suite
from tests.devices.contract import Harness
from tests.devices.vfio_harness import VFIO_HARNESS

#: Contract tests that cannot hold for mtty, with the reason.
NOT_APPLICABLE = {
    "test_wait_readable_returns_when_the_device_dirties": "mtty never dirties in pre-copy",
    "test_precopy_accounting_follows_a_model": "needs dirty tracking; mtty has none",
}

globals().update(
    {
        name: test
        for name, test in vars(suite).items()
        if name.startswith("test_") and name not in NOT_APPLICABLE
    }
)


@pytest.fixture
def harness() -> Harness:
    """The VFIO harness only: the other backends run on the host."""
    return VFIO_HARNESS

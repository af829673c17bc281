"""tests/vm: the lab's host-side tests; tests/vm/guest runs only inside the lab guest."""

from __future__ import annotations

import os

import pytest

from tests.vm import lab as lab_module

#: The guest tests need /dev/vfio and the mtty mdevs, which only the lab guest has; the
#: host runs them through tests/vm/test_mtty.py, which boots that guest.
collect_ignore = [] if os.environ.get("LIVEMIG_IN_GUEST") else ["guest"]


@pytest.fixture(scope="session")
def lab() -> lab_module.Lab:
    """The built lab, shared by every VM test (a cold build takes minutes, a warm one none).

    Fails, never skips, when it cannot be built: the lab installs what it needs itself.
    """
    try:
        return lab_module.build()
    except lab_module.LabError as exc:
        pytest.fail(f"the VFIO lab cannot be built: {exc}")

"""The daemon config's vfio-user entries: what they accept, and errors naming key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.fsm import Feature
from devices.vfio_user import VfioUserDevice
from orchestrator.service import config
from orchestrator.service.config import ConfigError

BASE = """\
control_socket = "ctl.sock"

[[device]]
kind = "vfio-user"
name = "nvme0"
socket = "/run/spdk/nvme0.sock"
features = ["STOP_COPY"]
faults = { corrupt_stream = true }
"""


def test_a_vfio_user_entry_builds_its_device() -> None:
    """socket, features and faults reach the device; nothing connects before open()."""
    device = config.parse(BASE).devices[0].build()
    assert isinstance(device, VfioUserDevice)
    assert device.socket == "/run/spdk/nvme0.sock"
    assert device.features == Feature.STOP_COPY
    assert device.faults.corrupt_stream


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ('socket = "/run/spdk/nvme0.sock"\n', "", 3, "missing required key 'socket'"),
        ('"/run/spdk/nvme0.sock"', '"nvme0.sock"', 6, "must be an absolute path"),
        ('["STOP_COPY"]', '["WARP"]', 7, "unknown feature 'WARP'"),
        ("corrupt_stream = true", "explode = true", 8, "unknown fault(s) explode"),
        ("corrupt_stream = true", 'corrupt_stream = "yes"', 8, "must be true or false"),
        ("faults = {", 'sockte = "x"\nfaults = {', 8, "did you mean 'socket'?"),
        ("faults = {", "timeout_s = 0\nfaults = {", 8, "must be > 0 seconds"),
    ],
)
def test_each_vfio_user_mistake_is_named(old: str, new: str, line: int, message: str) -> None:
    """The error names the file, the line and the key, and says what is wrong."""
    assert old in BASE
    with pytest.raises(ConfigError) as caught:
        config.parse(BASE.replace(old, new, 1), file="dev.toml")
    assert str(caught.value).startswith(f"dev.toml:{line}: ")
    assert message in str(caught.value)


def test_an_undefined_feature_set_is_refused_at_the_table(tmp_path: Path) -> None:
    """PRE_COPY without STOP_COPY is no set the uAPI defines: refused when built."""
    loaded = config.parse(BASE.replace('["STOP_COPY"]', '["PRE_COPY"]'), file="dev.toml")
    with pytest.raises(ConfigError, match=r"dev.toml:3: device 'nvme0': \(vfio-user\) undefined"):
        loaded.devices[0].build()

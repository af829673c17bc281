"""The contract suite's harness for VfioUserDevice on livemig's libvfio-user test device.

Each device name gets its own server process (making a name again replaces it) with
256 KiB of state in 4 KiB pages, the suite's geometry. ``touch`` rewrites a page
through the device's BAR0 touch register; a register write is a message, so it is
sent by a task the harness keeps, ordered before any later command of the device by
the connection's lock. Chunks never split a record (testdev.c), so ``blocks_of``
parses a chunk on its own. :func:`cleanup` closes the devices and stops the servers
(the suite's conftest calls it after each test).
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from devices.base import Chunk, MigratableDevice
from devices.fsm import Feature
from devices.vfio_user import VfioUserDevice
from tests.vfio_user import servers

STATE_SIZE = 256 << 10
BLOCK_SIZE = servers.PAGE
REC = struct.Struct("<IIQ")
REC_PAGE = 2

#: Contract tests vfio-user cannot pass by construction, with the reason.
LACKS = {
    "test_temporary_end_of_stream_in_precopy": "no precopy info to read (0, 0) from",
    "test_precopy_info_only_in_precopy_states": "no precopy info",
    "test_precopy_accounting_follows_a_model": "no precopy info",
    "test_a_new_session_starts_from_scratch": "no precopy info",
    "test_permanent_end_of_stream_in_stop_copy": "no MIG_DATA_SIZE (stop_copy_size)",
    "test_channel_survives_moves_inside_the_saving_group": "no P2P states",
    "test_copy_of_a_running_device_ends_byte_identical": "its trace has P2P states "
    "(tests/vfio_user/test_vfio_user_device.py copies a running device without them)",
    "test_copy_without_precopy[vfio-user-3]": "no P2P states",
}

_devices: dict[str, VfioUserDevice] = {}
_servers: dict[str, servers.Server] = {}
_touches: set[asyncio.Task[None]] = set()
_folder: Path | None = None


def make(
    name: str,
    *,
    seed: int = 0,
    features: Feature | None = None,
    dirty_rate: float = 0.0,
    clock: object = None,
) -> MigratableDevice:
    """A device on a fresh server; ``dirty_rate`` (bytes/s) runs its writer thread.

    ``clock`` has no meaning here: the server's writer runs on real time.
    """
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="livemig-vfio-user-"))
        atexit.register(shutil.rmtree, _folder, True)
    previous = _servers.pop(name, None)
    if previous is not None:
        previous.stop()
    rate = round(dirty_rate / BLOCK_SIZE)
    server = servers.start_testdev(
        _folder / f"{name}.sock", size=STATE_SIZE, rate=rate, seed=seed + 1
    )
    _servers[name] = server
    device = VfioUserDevice(name, socket=str(server.socket), features=features)
    _devices[name] = device
    return device


def touch(device: MigratableDevice, block: int) -> None:
    """Rewrite one page, as the device's workload would (sent by a kept task)."""
    assert isinstance(device, VfioUserDevice)
    write = servers.control_write(device, servers.REG_TOUCH, block % (STATE_SIZE // BLOCK_SIZE))
    task = asyncio.get_running_loop().create_task(write)
    _touches.add(task)
    task.add_done_callback(_touches.discard)


def blocks_of(chunk: Chunk) -> list[int]:
    """The pages a chunk's PAGE records carry, in order."""
    data = b"".join(bytes(part) for part in chunk)
    blocks, at = [], 0
    while at + REC.size <= len(data):
        kind, length, arg = REC.unpack_from(data, at)
        if kind == REC_PAGE:
            blocks.append(arg)
        at += REC.size + length
    return blocks


async def cleanup(**_: Any) -> None:
    """Close every device the harness made and stop its servers."""
    if _touches:
        await asyncio.gather(*_touches, return_exceptions=True)
    for device in _devices.values():
        await device.close()
    _devices.clear()
    for server in _servers.values():
        server.stop()
    _servers.clear()

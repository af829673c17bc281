"""The host-testable parts of devices/vfio.py: uAPI numbers, packing, errors, fds, sysfs."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from devices import vfio
from devices.errors import ChannelClosedError, ChannelIOError, DeviceError
from devices.fsm import State

S = State


def test_ioctl_numbers_are_the_uapi_ones() -> None:
    """_IO(';', 100 + n) gives the numbers the uAPI documents (no size, no direction)."""
    assert vfio.VFIO_DEVICE_FEATURE == 0x3B75
    assert vfio.VFIO_MIG_GET_PRECOPY_INFO == 0x3B79
    assert vfio.VFIO_DEVICE_RESET == 0x3B6F
    assert vfio.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert vfio.VFIO_GET_API_VERSION == 0x3B64


def test_struct_layouts_have_the_uapi_sizes() -> None:
    """The payloads are packed without padding at the sizes the kernel copies."""
    sizes = {
        vfio.FEATURE_HEADER: 8,
        vfio.MIGRATION_PAYLOAD: 8,
        vfio.MIG_STATE_PAYLOAD: 8,
        vfio.MIG_DATA_SIZE_PAYLOAD: 8,
        vfio.PRECOPY_INFO: 24,
        vfio.GROUP_STATUS: 8,
        vfio.REGION_INFO: 32,
    }
    assert {layout.format: layout.size for layout in sizes} == {
        layout.format: size for layout, size in sizes.items()
    }


def test_feature_request_packs_header_and_payload() -> None:
    """SET|MIG_DEVICE_STATE carries argsz 16, the flags, the state and data_fd -1."""
    flags = vfio.VFIO_DEVICE_FEATURE_SET | vfio.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    request = vfio.feature_request(flags, vfio.MIG_STATE_PAYLOAD.pack(S.PRE_COPY, -1))
    assert vfio.FEATURE_HEADER.unpack_from(request) == (16, 0x20002)
    assert vfio.MIG_STATE_PAYLOAD.unpack_from(request, 8) == (6, -1)
    answer = vfio.feature_request(vfio.VFIO_DEVICE_FEATURE_GET | 1, payload_size=8)
    assert bytes(answer) == bytes.fromhex("10000000 01000100 0000000000000000")


@pytest.mark.parametrize(
    ("code", "kind", "expected"),
    [
        (errno.ENODEV, ChannelIOError, ChannelClosedError),
        (errno.EFAULT, ChannelIOError, ChannelIOError),
        (errno.ENODEV, DeviceError, DeviceError),
        (errno.EINVAL, DeviceError, DeviceError),
    ],
)
def test_errno_becomes_a_device_error_naming_call_device_state(
    code: int, kind: type[DeviceError], expected: type[DeviceError]
) -> None:
    """An OSError maps to the contract's error, naming the call, the device and the state."""
    error = vfio.os_error("dev", "read(data_fd)", S.PRE_COPY, OSError(code, "x"), kind)
    assert type(error) is expected
    name = errno.errorcode[code]
    assert str(error) == (
        f"dev: read(data_fd) failed in state PRE_COPY: {name} ({os.strerror(code)})"
    )


MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def _fake_sysfs(root: Path) -> Path:
    """A sysfs with one mdev and one PCI function, each in an IOMMU group."""
    groups = root / "kernel/iommu_groups"
    for group in ("3", "7"):
        (groups / group).mkdir(parents=True)
    parent = root / "devices/virtual/mtty/mtty"
    mdev = parent / MDEV
    (parent / "mdev_supported_types/mtty-2").mkdir(parents=True)
    mdev.mkdir()
    (mdev / "iommu_group").symlink_to(groups / "3")
    (mdev / "mdev_type").symlink_to(parent / "mdev_supported_types/mtty-2")
    pci = root / "devices/pci0000:00/0000:01:00.0"
    pci.mkdir(parents=True)
    (pci / "iommu_group").symlink_to(groups / "7")
    (pci / "vendor").write_text("0x15b3\n")
    (pci / "device").write_text("0x101e\n")
    for bus, dev in (("mdev", mdev), ("pci", pci)):
        (root / "bus" / bus / "devices").mkdir(parents=True)
        (root / "bus" / bus / "devices" / dev.name).symlink_to(dev)
    return root


@pytest.mark.parametrize(
    ("spec", "name", "group", "model"),
    [
        (MDEV, MDEV, 3, "mtty-2"),
        ("0000:01:00.0", "0000:01:00.0", 7, "15b3:101e"),
        ("01:00.0", "0000:01:00.0", 7, "15b3:101e"),
        ("SYSFS/devices/pci0000:00/0000:01:00.0", "0000:01:00.0", 7, "15b3:101e"),
    ],
)
def test_device_is_found_by_uuid_pci_address_or_path(
    tmp_path: Path, spec: str, name: str, group: int, model: str
) -> None:
    """A config may name the device by mdev UUID, PCI address or sysfs path."""
    root = _fake_sysfs(tmp_path)
    path = vfio.VfioPath.resolve(spec.replace("SYSFS", str(root)), sysfs_root=root)
    assert (path.name, path.group, path.model()) == (name, group, model)


def test_unknown_device_is_a_device_error(tmp_path: Path) -> None:
    """A device without sysfs entry or IOMMU group is refused, naming what was looked for."""
    with pytest.raises(DeviceError, match="no VFIO device with an IOMMU group"):
        vfio.VfioPath.resolve("0000:99:00.0", sysfs_root=_fake_sysfs(tmp_path))


class FakeDevice:
    """What a channel needs of its device: a name, a state, and where failures go."""

    def __init__(self, state: State) -> None:
        self.name = "dev"
        self.state = state
        self.failures: list[tuple[int, int | None]] = []

    def write_failed(self, offset: int, exc: OSError) -> None:
        self.failures.append((offset, exc.errno))


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Run a coroutine under each event loop livemig supports."""
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe, closed after the test (tests close only dups of its ends)."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def _save_channel(device: FakeDevice, fd: int) -> vfio.VfioSaveChannel:
    return vfio.VfioSaveChannel(cast(vfio.VfioDevice, device), fd)


def test_save_channel_end_of_stream_depends_on_the_state(
    run: Callable[[Coroutine[Any, Any, None]], None], tmp_path: Path
) -> None:
    """read() == 0 is 'nothing now' (None) in PRE_COPY and the end (()) in STOP_COPY."""
    (tmp_path / "stream").write_bytes(b"header")
    device = FakeDevice(S.PRE_COPY)
    channel = _save_channel(device, os.open(tmp_path / "stream", os.O_RDONLY))

    async def check() -> None:
        assert await channel.read() == (b"header",)
        assert await channel.read() is None
        device.state = S.STOP_COPY
        await channel.wait_readable()
        assert await channel.read() == ()
        assert channel.ended
        channel.close()
        with pytest.raises(ChannelClosedError, match=r"dev: .*STOP_COPY"):
            await channel.read()

    run(check())


def test_wait_readable_watches_a_pipe_and_wakes_on_data(
    run: Callable[[Coroutine[Any, Any, None]], None], pipe: tuple[int, int]
) -> None:
    """On a pollable fd, wait_readable blocks until data arrives, without blocking the loop."""
    read_end, write_end = pipe
    channel = _save_channel(FakeDevice(S.PRE_COPY), os.dup(read_end))

    async def check() -> None:
        waiter = asyncio.create_task(channel.wait_readable())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        os.write(write_end, b"x")
        await waiter
        assert await channel.read() == (b"x",)
        channel.close()

    run(check())


def test_wait_on_an_unpollable_fd_counts_it_ready(
    run: Callable[[Coroutine[Any, Any, None]], None], tmp_path: Path
) -> None:
    """epoll refuses regular files (EPERM), as it refuses mtty's data fds: ready, no error."""
    file = tmp_path / "stream"
    file.write_bytes(b"")
    device = FakeDevice(S.PRE_COPY)
    channel = _save_channel(device, os.open(file, os.O_RDONLY))

    async def check() -> None:
        assert await channel.read() is None
        loop = asyncio.get_running_loop()
        started = loop.time()
        await channel.wait_readable()  # idle: waits idle_wait instead of spinning
        assert loop.time() - started >= channel.idle_wait * 0.9
        channel.close()

    run(check())


def test_closing_the_channel_wakes_its_waiter(
    run: Callable[[Coroutine[Any, Any, None]], None], pipe: tuple[int, int]
) -> None:
    """A wait in progress ends with ChannelClosedError naming the state when the fd closes."""
    read_end, _ = pipe
    device = FakeDevice(S.PRE_COPY)
    channel = _save_channel(device, os.dup(read_end))

    async def check() -> None:
        waiter = asyncio.create_task(channel.wait_readable())
        await asyncio.sleep(0)
        device.state = S.RUNNING
        channel.close()
        with pytest.raises(ChannelClosedError, match=r"dev: .*RUNNING"):
            await waiter

    run(check())


def test_resume_write_survives_partial_writes_and_backpressure(
    run: Callable[[Coroutine[Any, Any, None]], None], pipe: tuple[int, int]
) -> None:
    """A write bigger than the pipe completes across partial writes while a reader drains."""
    read_end, write_end = pipe
    device = FakeDevice(S.RESUMING)
    channel = vfio.VfioResumeChannel(cast(vfio.VfioDevice, device), os.dup(write_end))
    payload = bytes(range(256)) * 1024  # 256 KiB, four times a default pipe

    async def check() -> None:
        loop = asyncio.get_running_loop()
        received = bytearray()
        done = asyncio.Event()

        def drain() -> None:
            received.extend(os.read(read_end, 1 << 16))
            if len(received) == len(payload):
                loop.remove_reader(read_end)
                done.set()

        loop.add_reader(read_end, drain)
        await channel.write(memoryview(payload))
        await done.wait()
        assert received == payload
        assert channel.written == len(payload)
        channel.close()

    run(check())


def test_failed_resume_write_is_remembered_by_the_device(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """A write error raises ChannelIOError naming the errno and offset, and is recorded."""
    read_end, write_end = os.pipe()
    device = FakeDevice(S.RESUMING)
    channel = vfio.VfioResumeChannel(cast(vfio.VfioDevice, device), write_end)
    broken = r"dev: write\(data_fd\) at stream offset 3 .*EPIPE"

    async def check() -> None:
        await channel.write(b"abc")
        os.close(read_end)
        with pytest.raises(ChannelIOError, match=broken):
            await channel.write(b"def")
        assert device.failures == [(3, errno.EPIPE)]
        channel.close()

    run(check())

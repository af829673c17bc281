"""The host-testable parts of devices/vfio/: uAPI numbers, packing, errors, fds, sysfs."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from devices import vfio
from devices.errors import (
    ChannelClosedError,
    ChannelIOError,
    DeviceError,
    TransitionError,
    Unsupported,
)
from devices.fsm import State
from examples import bench_arcs
from tests.devices.vfio_harness import FakeKernel

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


# -- the backend against a fake kernel at the ioctl boundary ----------------------------------


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[FakeKernel]:
    """A fake kernel answering devices.vfio's ioctls; its devices are closed afterwards."""
    with FakeKernel(tmp_path).installed() as fake:
        yield fake


def _count(kernel: FakeKernel, what: str) -> int:
    return sum(1 for _, call in kernel.calls if call == what)


async def test_precopy_info_enotty_is_unsupported_and_not_asked_again(
    kernel: FakeKernel,
) -> None:
    """A driver without VFIO_MIG_GET_PRECOPY_INFO: Unsupported, and the ioctl runs once."""
    device, _ = kernel.device("dev", precopy_info_errno=errno.ENOTTY)
    await device.set_state(S.PRE_COPY)
    for _ in range(3):
        with pytest.raises(Unsupported, match=r"dev: VFIO_MIG_GET_PRECOPY_INFO .*ENOTTY"):
            device.precopy_info()
    assert _count(kernel, "PRECOPY_INFO") == 1
    await device.set_state(S.RUNNING)


async def test_precopy_info_other_errors_stay_errors(kernel: FakeKernel) -> None:
    """EIO from the precopy ioctl is a channel error, not a missing feature, and is re-asked."""
    device, fake = kernel.device("dev", precopy_info_errno=errno.EIO)
    await device.set_state(S.PRE_COPY)
    with pytest.raises(ChannelIOError, match="EIO"):
        device.precopy_info()
    fake.precopy_info_errno = None
    assert device.precopy_info() == (len(fake.header), 0)
    await device.set_state(S.RUNNING)


@pytest.mark.parametrize(("code", "asked"), [(errno.ENOTTY, 1), (errno.EIO, 3)])
async def test_failing_data_size_is_unsupported(kernel: FakeKernel, code: int, asked: int) -> None:
    """MIG_DATA_SIZE failing raises Unsupported naming the errno; ENOTTY is not asked again."""
    device, _ = kernel.device("dev", data_size_errno=code)
    for _ in range(3):
        with pytest.raises(Unsupported, match=rf"dev: .*MIG_DATA_SIZE.*{errno.errorcode[code]}"):
            device.stop_copy_size()
    assert _count(kernel, "GET_DATA_SIZE") == asked


async def test_failed_set_retries_from_the_reported_state_before_any_reset(
    kernel: FakeKernel,
) -> None:
    """STOP -> STOP_COPY fails, the walk back from STOP fails once: retried, never reset."""
    device, fake = kernel.device(
        "dev", failing={(S.STOP, S.STOP_COPY): [errno.EIO], (S.STOP, S.RUNNING_P2P): [errno.EIO]}
    )
    content = fake.content
    with pytest.raises(TransitionError, match="kernel walked to STOP") as info:
        await device.set_state(S.STOP_COPY)
    assert (info.value.state, device.state, fake.state) == (S.RUNNING, S.RUNNING, S.RUNNING)
    assert _count(kernel, "RESET") == 0
    assert fake.content == content
    assert "requested RUNNING from STOP: EIO" in str(info.value)


async def test_device_that_cannot_get_back_is_reset_after_the_retries(
    kernel: FakeKernel,
) -> None:
    """A walk back that keeps failing is tried RECOVERY_ATTEMPTS times, then reset."""
    stuck = [errno.EIO] * (vfio.RECOVERY_ATTEMPTS + 1)
    device, _ = kernel.device(
        "dev", failing={(S.STOP, S.STOP_COPY): [errno.EIO], (S.STOP, S.RUNNING_P2P): stuck}
    )
    with pytest.raises(TransitionError, match="VFIO_DEVICE_RESET") as info:
        await device.set_state(S.STOP_COPY)
    assert _count(kernel, "SET_RUNNING") == vfio.RECOVERY_ATTEMPTS
    assert _count(kernel, "RESET") == 1
    assert info.value.state == device.state == S.RUNNING


async def test_arcs_of_many_devices_overlap_off_the_loop(kernel: FakeKernel) -> None:
    """Eight devices whose SET blocks 50 ms move together in well under 8 x 50 ms."""
    devices = [kernel.device(f"d{i}", set_delay=0.05)[0] for i in range(8)]
    loop_thread = threading.get_ident()
    listened: list[int] = []
    for device in devices:
        device.add_state_listener(lambda *_: listened.append(threading.get_ident()))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await devices[0].set_state(S.PRE_COPY)
    one = loop.time() - started
    started = loop.time()
    await asyncio.gather(*(d.set_state(S.STOP_COPY) for d in devices))
    eight = loop.time() - started
    ticker.cancel()
    assert eight <= 3 * one, f"8 devices took {eight * 1e3:.0f} ms, one {one * 1e3:.0f} ms"
    assert ticks >= 5  # the loop kept running while the ioctls blocked
    assert set(listened) == {loop_thread}
    assert all(d.state == S.STOP_COPY for d in devices)


async def test_cancel_during_an_arc_still_records_its_outcome(kernel: FakeKernel) -> None:
    """A caller cancelled while its SET blocks gets CancelledError; the arc still lands."""
    device, fake = kernel.device("dev", set_delay=0.05)
    move = asyncio.create_task(device.set_state(S.PRE_COPY))
    await asyncio.sleep(0.01)
    move.cancel()
    with pytest.raises(asyncio.CancelledError):
        await move
    await device.set_state(S.PRE_COPY)  # waits for the arc in flight, then has nothing to do
    assert device.state == fake.state == S.PRE_COPY
    assert await device.save_channel().read() == (fake.header,)
    await device.set_state(S.RUNNING)


async def test_switchover_arcs_of_eight_devices_overlap(kernel: FakeKernel) -> None:
    """A whole migration of 8 devices whose SET blocks 50 ms: its arc phases < 3x one device's."""
    one = await bench_arcs.migrate(kernel, 1, 0.05)
    eight = await bench_arcs.migrate(kernel, 8, 0.05)
    assert eight["arcs"] <= 3 * one["arcs"], f"8 devices: {eight}, 1 device: {one}"


async def test_vfio_devices_without_optional_queries_migrate(kernel: FakeKernel) -> None:
    """Drivers without precopy info and MIG_DATA_SIZE (ENOTTY) migrate; targets get the state."""
    await bench_arcs.migrate(
        kernel, 2, 0.0, precopy_info_errno=errno.ENOTTY, data_size_errno=errno.ENOTTY
    )
    fakes = list(kernel.devices.values())
    sources = [f for f in fakes if f.precopy_info_errno == errno.ENOTTY]
    targets = [f for f in fakes if f.precopy_info_errno is None]
    assert (
        [f.content for f in targets] == [f.content for f in sources] == [b"vfio0" * 8, b"vfio1" * 8]
    )
    assert ("vfio0", "PRECOPY_INFO") in kernel.calls


async def test_a_fast_state_change_runs_inline_next_time_a_slow_one_stays_off(
    kernel: FakeKernel,
) -> None:
    """A change measured under INLINE_ARC_S runs on the loop thread the next time; one
    measured slower keeps going to a worker (the loop never blocks on it)."""
    loop_thread = threading.get_ident()
    fast, _ = kernel.device("fast")
    slow, _ = kernel.device("slow", set_delay=0.01)
    for _ in range(2):
        for device in (fast, slow):
            await device.set_state(S.PRE_COPY)
            await device.set_state(S.RUNNING)
    threads = {name: [t for n, t in kernel.set_threads if n == name] for name in ("fast", "slow")}
    assert threads["fast"][0] != loop_thread, "an unmeasured change goes to a worker"
    assert threads["fast"][2:] == [loop_thread, loop_thread]
    assert loop_thread not in threads["slow"]


async def test_closing_leaves_a_stopped_device_stopped_with_its_state(kernel: FakeKernel) -> None:
    """A device in STOP when its daemon closes it (a workload kept stopped here, or one
    whose migration's outcome is unknown: maybe its only copy) stays in STOP, never reset:
    the kernel keeps its state for the next daemon, whose records say what it is."""
    device, fake = kernel.device("dev")
    await device.set_state(S.STOP)
    await device.close()
    assert fake.state == S.STOP
    assert _count(kernel, "RESET") == 0

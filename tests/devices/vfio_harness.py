"""Test doubles for VfioDevice: the mtty harness (lab guest) and a fake kernel (any host).

:class:`FakeKernel` answers VfioDevice's ioctls in place of ``devices.vfio.uapi.ioctl``, with
real files as data fds, so the backend's host-testable logic (optional queries,
recovery after a failed SET, arcs off the event loop) runs without /dev/vfio.

The rest is the contract suite's harness for VfioDevice on the kernel's mtty driver
(lab guest only).

mtty is a two-port 16550-like UART; its migration stream is a 24-byte header, sent in
pre-copy, plus both ports' registers and FIFOs (2 x 36 bytes), sent in STOP_COPY. Its
pre-copy tracks no dirty state, so for the suite the pre-copy-tracked state is one
24-byte block (the header), and ``touch`` changes the device (a byte into port 0's
FIFO) without dirtying anything pre-copy would resend.

Devices are the two mdevs the lab creates (``$LIVEMIG_MDEV_SRC`` / ``_DST``): names
starting with "dst" get the second, every other name the first. A group can be open
only once, so making a device closes the one made before on the same mdev.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from devices import fsm, vfio
from devices.base import Chunk, MigratableDevice
from devices.fsm import CHANNEL_STATES, SAVING_GROUP, Feature, State
from devices.vfio import VfioDevice, VfioFds, VfioPath, open_fds
from tests.devices.contract import Harness

ALL = Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY
#: The feature request flags the fake kernel answers (GET/SET | feature number).
_GET_MIGRATION = vfio.VFIO_DEVICE_FEATURE_GET | vfio.VFIO_DEVICE_FEATURE_MIGRATION
_GET_STATE = vfio.VFIO_DEVICE_FEATURE_GET | vfio.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
_SET_STATE = vfio.VFIO_DEVICE_FEATURE_SET | vfio.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
_GET_DATA_SIZE = vfio.VFIO_DEVICE_FEATURE_GET | vfio.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE


@dataclass
class FakeVfio:
    """One device of the fake kernel: its state, its saved content and its faults."""

    name: str
    #: The device fd VfioDevice holds (a /dev/null fd, so closing it is real).
    fd: int
    features: Feature
    #: Carried in pre-copy (like mtty's header), then ``content`` in STOP_COPY.
    header: bytes
    content: bytes
    state: State = State.RUNNING
    #: errno of VFIO_MIG_GET_PRECOPY_INFO / MIG_DATA_SIZE, None when they answer.
    precopy_info_errno: int | None = None
    data_size_errno: int | None = None
    #: Arcs that fail, with the errnos of their next failures (one used per crossing).
    failing: dict[tuple[State, State], list[int]] = field(default_factory=dict)
    #: Seconds every SET|MIG_DEVICE_STATE sleeps, as a device saving or loading would.
    set_delay: float = 0.0
    #: Set when a SET|MIG_DEVICE_STATE enters the fake kernel (from the worker thread).
    set_entered: threading.Event = field(default_factory=threading.Event)
    #: The file behind the current data fd, and that fd.
    session: Path | None = None
    data_fd: int = -1


class FakeKernel:
    """The kernel's side of VfioDevice's ioctls, for host tests (see the module docstring).

    A saving session is a file the kernel appends to (the header on entering the saving
    group, the content on reaching STOP_COPY); reading it to its end returns 0, which
    VfioDevice reads as "nothing now" in PRE_COPY and as the end in STOP_COPY, like mtty.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.devices: dict[int, FakeVfio] = {}
        #: (device name, request name) of every ioctl, in order (from any thread).
        self.calls: list[tuple[str, str]] = []
        #: (device, monotonic start, monotonic end) of every SET|MIG_DEVICE_STATE.
        self.sets: list[tuple[str, float, float]] = []
        #: (device, thread id) of every SET|MIG_DEVICE_STATE, in order.
        self.set_threads: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._sessions = 0
        self._made: list[VfioDevice] = []

    @contextmanager
    def installed(self) -> Iterator[FakeKernel]:
        """Answer devices.vfio's ioctls for the block; close every device after it."""
        real = vfio.uapi.ioctl
        vfio.uapi.ioctl = self.ioctl
        try:
            yield self
        finally:
            for device in self._made:
                device.abort()
            vfio.uapi.ioctl = real

    def device(
        self,
        name: str,
        *,
        features: Feature = ALL,
        header: bytes = b"HEAD",
        content: bytes = b"",
        **faults: object,
    ) -> tuple[VfioDevice, FakeVfio]:
        """A VfioDevice on a new fake device; ``faults`` set FakeVfio fields (``state``
        too: the state a previous owner left the device in, RUNNING by default)."""
        fake = FakeVfio(name, -1, features, header, content or name.encode() * 8)
        for key, value in faults.items():
            setattr(fake, key, value)
        return self.reopen(fake), fake

    def reopen(self, fake: FakeVfio) -> VfioDevice:
        """A new VfioDevice on ``fake`` as it is, as the next daemon opens a device the
        kernel kept (its state, its content)."""
        if self.devices.get(fake.fd) is fake:
            del self.devices[fake.fd]
        fake.fd = os.open(os.devnull, os.O_RDONLY)
        self.devices[fake.fd] = fake
        sysfs = self.folder / fake.name
        sysfs.mkdir(exist_ok=True)
        path = VfioPath(sysfs, fake.name, len(self.devices))
        try:
            device = VfioDevice(fake.name, path, VfioFds(-1, -1, fake.fd))
        except BaseException:
            os.close(fake.fd)
            raise
        self._made.append(device)
        return device

    # -- the ioctl boundary ------------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        """Stand-in for devices.vfio.uapi.ioctl."""
        if request == vfio.VFIO_MIG_GET_PRECOPY_INFO:
            fake = next(d for d in self.devices.values() if d.data_fd == fd)
            self._record(fake, "PRECOPY_INFO")
            return self._precopy_info(fake, fd, arg)
        fake = self.devices[fd]
        if request == vfio.VFIO_DEVICE_RESET:
            self._record(fake, "RESET")
            self._end_session(fake)
            fake.state = State.RUNNING
            fake.content = b""  # as a real device's reset loses its state (mtty's does not)
            return 0
        assert request == vfio.VFIO_DEVICE_FEATURE
        assert isinstance(arg, bytearray)
        flags = vfio.FEATURE_HEADER.unpack_from(arg)[1]
        at = vfio.FEATURE_HEADER.size
        if flags == _GET_MIGRATION:
            self._record(fake, "GET_MIGRATION")
            vfio.MIGRATION_PAYLOAD.pack_into(arg, at, fake.features)
        elif flags == _GET_STATE:
            self._record(fake, "GET_STATE")
            vfio.MIG_STATE_PAYLOAD.pack_into(arg, at, fake.state, -1)
        elif flags == _GET_DATA_SIZE:
            self._record(fake, "GET_DATA_SIZE")
            if fake.data_size_errno is not None:
                raise OSError(fake.data_size_errno, os.strerror(fake.data_size_errno))
            vfio.MIG_DATA_SIZE_PAYLOAD.pack_into(arg, at, len(fake.header + fake.content))
        elif flags == _SET_STATE:
            target = State(vfio.MIG_STATE_PAYLOAD.unpack_from(arg, at)[0])
            self._record(fake, f"SET_{target.name}")
            fake.set_entered.set()
            started = time.monotonic()
            if fake.set_delay:
                time.sleep(fake.set_delay)
            try:
                data_fd = self._walk(fake, target)
            finally:
                with self._lock:
                    self.sets.append((fake.name, started, time.monotonic()))
                    self.set_threads.append((fake.name, threading.get_ident()))
            vfio.MIG_STATE_PAYLOAD.pack_into(arg, at, target, data_fd)
        else:
            raise OSError(errno.ENOTTY, f"fake kernel: feature flags {flags:#x}")
        return 0

    def _record(self, fake: FakeVfio, what: str) -> None:
        with self._lock:
            self.calls.append((fake.name, what))

    def _precopy_info(self, fake: FakeVfio, fd: int, arg: int | bytearray) -> int:
        if fake.precopy_info_errno is not None:
            raise OSError(fake.precopy_info_errno, os.strerror(fake.precopy_info_errno))
        if fake.state not in (State.PRE_COPY, State.PRE_COPY_P2P):
            raise OSError(errno.EINVAL, "not in a PRE_COPY state")
        assert isinstance(arg, bytearray)
        initial = max(0, len(fake.header) - os.lseek(fd, 0, os.SEEK_CUR))
        vfio.PRECOPY_INFO.pack_into(arg, 0, vfio.PRECOPY_INFO.size, 0, initial, 0)
        return 0

    def _walk(self, fake: FakeVfio, target: State) -> int:
        """Walk the arcs to ``target``; a failing arc leaves the device at the arc's start."""
        if fsm.next_state(fake.state, target, fake.features) == State.ERROR:
            raise OSError(errno.EINVAL, f"{fake.state.name} -> {target.name}")
        steps = fsm.path(fake.state, target, fake.features)
        opened = -1
        for arc in itertools.pairwise(steps):
            errnos = fake.failing.get(arc)
            if errnos:
                if opened >= 0:  # the session this walk opened is not handed out
                    os.close(opened)
                code = errnos.pop(0)
                raise OSError(code, f"arc {arc[0].name} -> {arc[1].name}: {os.strerror(code)}")
            opened = self._step(fake, *arc, opened)
        return opened

    def _step(self, fake: FakeVfio, old: State, new: State, opened: int) -> int:
        if old in CHANNEL_STATES and not (old in SAVING_GROUP and new in SAVING_GROUP):
            if old == State.RESUMING:
                self._load(fake)
            self._end_session(fake)
            opened = -1
        if new in SAVING_GROUP and old not in SAVING_GROUP:
            opened = self._open_session(fake, fake.header)
        elif new == State.RESUMING:
            opened = self._open_session(fake, b"", write=True)
        if new == State.STOP_COPY:
            assert fake.session is not None
            with fake.session.open("ab") as stream:
                stream.write(fake.content)
        fake.state = new
        return opened

    def _open_session(self, fake: FakeVfio, data: bytes, *, write: bool = False) -> int:
        self._sessions += 1
        fake.session = self.folder / f"{fake.name}.session{self._sessions}"
        fake.session.write_bytes(data)
        fake.data_fd = os.open(fake.session, os.O_WRONLY if write else os.O_RDONLY)
        return fake.data_fd

    def _end_session(self, fake: FakeVfio) -> None:
        fake.session, fake.data_fd = None, -1

    def _load(self, fake: FakeVfio) -> None:
        assert fake.session is not None
        stream = fake.session.read_bytes()
        if not stream.startswith(fake.header):
            raise OSError(errno.EINVAL, "foreign stream")
        fake.content = stream[len(fake.header) :]


#: UART registers (offsets in a port's 8-byte I/O BAR) and bits mtty implements.
UART_RX_TX = 0
UART_FCR = 2
UART_LSR = 5
UART_FCR_RESET = 0x07  # enable the FIFO (else it holds 1 byte) and clear it
UART_LSR_DR = 0x01  # data ready
#: mtty's FIFO depth (MAX_FIFO_SIZE).
FIFO_SIZE = 16
#: The first 8 bytes of every mtty stream (MTTY_MAGIC, little-endian).
MTTY_MAGIC = struct.pack("<Q", 0x7E9D09898C3E2C4E)
#: The stream's header: magic, major, minor, nr_ports, flags.
HEADER_SIZE = 24

_open: dict[str, VfioDevice] = {}


def mdev_uuid(name: str) -> str:
    """The lab mdev a device name maps to."""
    return os.environ["LIVEMIG_MDEV_DST" if name.startswith("dst") else "LIVEMIG_MDEV_SRC"]


def uart_clear(device: VfioDevice, port: int) -> None:
    """Empty a port's FIFO (FCR write); BAR ``port`` is port ``port``."""
    device.region_write(port, UART_FCR, bytes([UART_FCR_RESET]))


def uart_write(device: VfioDevice, port: int, data: bytes) -> None:
    """Transmit ``data`` on a port: mtty loops it back into the port's receive FIFO."""
    for byte in data:
        device.region_write(port, UART_RX_TX, bytes([byte]))


def uart_drain(device: VfioDevice, port: int) -> bytes:
    """Read a port's FIFO until LSR says no data is ready (this empties it)."""
    received = bytearray()
    while device.region_read(port, UART_LSR, 1)[0] & UART_LSR_DR:
        received += device.region_read(port, UART_RX_TX, 1)
        if len(received) > FIFO_SIZE:
            raise AssertionError(f"{device.name}: port {port} FIFO never empties")
    return bytes(received)


def open_fresh(spec: str, *, name: str, features: Feature | None = None) -> VfioDevice:
    """Open an mdev RUNNING, whatever an earlier test or daemon left it in.

    The backend keeps a stopped device stopped across close and open (it may hold a
    workload's only copy), so a test that wants a fresh device resets it here. mtty's
    reset only ends any session and sets RUNNING: the FIFOs keep their bytes.
    """
    path = VfioPath.resolve(spec)
    fds = open_fds(path)
    try:
        vfio.uapi.ioctl(fds.device, vfio.VFIO_DEVICE_RESET)
        return VfioDevice(name, path, fds, features)
    except BaseException:
        fds.close()
        raise


def make(
    name: str,
    *,
    seed: int = 0,
    features: Feature | None = None,
    dirty_rate: float = 0.0,
    clock: object = None,
) -> MigratableDevice:
    """Open the mdev for ``name`` with both FIFOs holding bytes derived from ``seed``.

    ``dirty_rate`` and ``clock`` have no meaning for mtty (no workload runs on it).
    """
    uuid = mdev_uuid(name)
    previous = _open.pop(uuid, None)
    if previous is not None:
        previous.abort()
    device = open_fresh(uuid, name=name, features=features)
    _open[uuid] = device
    for port in (0, 1):
        uart_clear(device, port)
        uart_write(device, port, f"s{seed}p{port}".encode())
    return device


def touch(device: MigratableDevice, block: int) -> None:
    """Change the device as a workload would: one byte into port 0's FIFO."""
    assert isinstance(device, VfioDevice)
    uart_write(device, 0, bytes([block & 0xFF]))  # a full FIFO sets overrun: still a change


def blocks_of(chunk: Chunk) -> list[int]:
    """Block 0 when the chunk starts the stream (the header pre-copy carries), else none."""
    head = bytes(chunk[0][:8]) if chunk else b""
    return [0] if head == MTTY_MAGIC else []


VFIO_HARNESS = Harness(
    "vfio-mtty",
    make,
    block_size=HEADER_SIZE,
    n_blocks=1,
    touch=touch,
    blocks_of=blocks_of,
    faults=False,
)

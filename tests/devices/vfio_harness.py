"""The contract suite's harness for VfioDevice on the kernel's mtty driver (lab guest only).

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

import os
import struct

from devices.base import Chunk, MigratableDevice
from devices.fsm import Feature
from devices.vfio import VfioDevice
from tests.devices.contract import Harness

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
    device = VfioDevice.from_config(uuid, name=name, features=features)
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

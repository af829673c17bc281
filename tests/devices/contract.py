"""Harnesses that let the device contract suite drive each backend the same way.

A backend joins the suite by adding a :class:`Harness` to ``HARNESSES`` (the kernel
VFIO backend's runs in the lab guest, tests/vm): how to make a small source or
destination device, how to make a running source change its state, and how to tell
which blocks a chunk carried.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devices import stream
from devices.base import Chunk, MigratableDevice
from devices.paged import PagedDevice
from devices.ram import RamDevice
from devices.simulated import SimulatedDevice
from tests.vfio_user import harness as vfio_user

STATE_SIZE = 256 << 10
BLOCK_SIZE = 4 << 10
CHUNK_SIZE = 16 << 10


@dataclass(frozen=True)
class Harness:
    """How the contract suite makes and drives one backend."""

    name: str
    #: ``make(name, **options)``; options: dirty_rate, features, faults, clock, seed.
    make: Callable[..., MigratableDevice]
    #: Granularity of state changes and of the precopy accounting, in bytes.
    block_size: int
    #: Blocks in the state of a device made by ``make``.
    n_blocks: int
    #: Make a running device change one block of its state (as its workload would).
    touch: Callable[[MigratableDevice, int], None]
    #: The blocks a saving chunk carried, in order.
    blocks_of: Callable[[Chunk], list[int]]
    #: Whether ``make`` accepts ``faults`` (devices.paged.Faults).
    faults: bool = True
    #: Contract tests the backend cannot pass by construction (test id -> reason);
    #: tests/devices/conftest.py skips them with the reason.
    lacks: Mapping[str, str] = field(default_factory=dict)
    #: Called after each test (closes connections, stops server processes).
    cleanup: Callable[[], Awaitable[None]] | None = None

    def __str__(self) -> str:
        return self.name


def _touch(device: MigratableDevice, block: int) -> None:
    assert isinstance(device, PagedDevice)
    device.touch(block)


_COUNT = struct.Struct("<I")


def paged_blocks_of(chunk: Chunk) -> list[int]:
    """The blocks a BLOCKS record of devices.stream carries (none for other records)."""
    head = bytes(chunk[0]) if chunk else b""
    if len(head) < stream.HEADER.size or stream.HEADER.unpack_from(head)[0] != stream.BLOCKS:
        return []
    (n_runs,) = _COUNT.unpack_from(head, stream.HEADER.size)
    runs = array("I")
    start = stream.HEADER.size + _COUNT.size
    runs.frombytes(head[start : start + 8 * n_runs])
    blocks: list[int] = []
    for first, count in zip(runs[::2], runs[1::2], strict=True):
        blocks.extend(range(first, first + (count & ~stream.ZERO_RUN)))
    return blocks


def _simulated(name: str, **options: Any) -> MigratableDevice:
    return SimulatedDevice(
        name, state_size=STATE_SIZE, block_size=BLOCK_SIZE, chunk_size=CHUNK_SIZE, **options
    )


def _ram(name: str, **options: Any) -> MigratableDevice:
    return RamDevice(
        name,
        size=STATE_SIZE,
        page_size=BLOCK_SIZE,
        working_set=STATE_SIZE // 2,
        chunk_size=CHUNK_SIZE,
        **options,
    )


HARNESSES = [
    Harness("simulated", _simulated, BLOCK_SIZE, STATE_SIZE // BLOCK_SIZE, _touch, paged_blocks_of),
    Harness("ram", _ram, BLOCK_SIZE, STATE_SIZE // BLOCK_SIZE, _touch, paged_blocks_of),
    Harness(
        "vfio-user",
        vfio_user.make,
        vfio_user.BLOCK_SIZE,
        vfio_user.STATE_SIZE // vfio_user.BLOCK_SIZE,
        vfio_user.touch,
        vfio_user.blocks_of,
        faults=False,
        lacks=vfio_user.LACKS,
        cleanup=vfio_user.cleanup,
    ),
]

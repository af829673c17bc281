"""The kernel's VFIO uAPI: ioctl numbers, structs (include/uapi/linux/vfio.h), the call.

Every ioctl goes through :func:`ioctl`, looked up on this module, so the tests' fake
kernel stands in for the kernel by replacing it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from devices.errors import (
    ChannelClosedError,
    ChannelIOError,
    DeviceError,
)
from devices.fsm import State

# --- uAPI constants (include/uapi/linux/vfio.h; checked against 6.12's by the VM tests) ---

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + nr)``: VFIO ioctls encode no size or direction."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_RESET = _io(11)
VFIO_DEVICE_FEATURE = _io(17)
VFIO_MIG_GET_PRECOPY_INFO = _io(21)

VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1

#: struct vfio_device_feature: {u32 argsz, u32 flags, u8 data[]}
FEATURE_HEADER = struct.Struct("=II")
#: struct vfio_device_feature_migration: {aligned u64 flags}
MIGRATION_PAYLOAD = struct.Struct("=Q")
#: struct vfio_device_feature_mig_state: {u32 device_state, s32 data_fd}
MIG_STATE_PAYLOAD = struct.Struct("=Ii")
#: struct vfio_device_feature_mig_data_size: {aligned u64 stop_copy_length}
MIG_DATA_SIZE_PAYLOAD = struct.Struct("=Q")
#: struct vfio_precopy_info: {u32 argsz, u32 flags, aligned u64 initial_bytes, dirty_bytes}
PRECOPY_INFO = struct.Struct("=IIQQ")
#: struct vfio_group_status: {u32 argsz, u32 flags}
GROUP_STATUS = struct.Struct("=II")
#: struct vfio_region_info: {u32 argsz, flags, index, cap_offset; aligned u64 size, offset}
REGION_INFO = struct.Struct("=IIIIQQ")


def feature_request(flags: int, payload: bytes = b"", payload_size: int = 0) -> bytearray:
    """A struct vfio_device_feature with room for ``payload_size`` bytes of answer."""
    size = FEATURE_HEADER.size + max(len(payload), payload_size)
    buffer = bytearray(size)
    FEATURE_HEADER.pack_into(buffer, 0, size, flags)
    buffer[FEATURE_HEADER.size : FEATURE_HEADER.size + len(payload)] = payload
    return buffer


def errno_name(code: int | None) -> str:
    """``ENOMSG (No message of desired type)`` for an errno, for error messages."""
    if code is None:
        return "unknown error"
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


def os_error(
    device: str, call: str, state: State, exc: OSError, kind: type[DeviceError] = DeviceError
) -> DeviceError:
    """The DeviceError for an OSError of ``call``: names the call, device, state and errno.

    On a data fd ENODEV means the kernel ended the session (the device left its state
    underneath), which the contract calls ChannelClosedError.
    """
    if kind is ChannelIOError and exc.errno == errno.ENODEV:
        kind = ChannelClosedError
    return kind(device, f"{call} failed in state {state.name}: {errno_name(exc.errno)}")


def ioctl(fd: int, request: int, arg: int | bytearray = 0) -> int:
    """ioctl returning the kernel's return value (an fd, a flag) and filling ``arg`` in."""
    if isinstance(arg, bytearray):
        return int(fcntl.ioctl(fd, request, arg, True))
    return fcntl.ioctl(fd, request, arg)

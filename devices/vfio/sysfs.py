"""Finding a VFIO device: its sysfs path and IOMMU group, and opening its fds."""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from devices.errors import (
    DeviceError,
)
from devices.vfio import uapi
from devices.vfio.uapi import (
    GROUP_STATUS,
    VFIO_API_VERSION,
    VFIO_CHECK_EXTENSION,
    VFIO_GET_API_VERSION,
    VFIO_GROUP_FLAGS_VIABLE,
    VFIO_GROUP_GET_DEVICE_FD,
    VFIO_GROUP_GET_STATUS,
    VFIO_GROUP_SET_CONTAINER,
    VFIO_SET_IOMMU,
    VFIO_TYPE1v2_IOMMU,
    errno_name,
)

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_PCI = re.compile(r"^(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$", re.I)


@dataclass(frozen=True)
class VfioPath:
    """A VFIO device found in sysfs: its name for GET_DEVICE_FD and its IOMMU group."""

    sysfs: Path
    name: str
    group: int

    @classmethod
    def resolve(cls, spec: str, sysfs_root: Path = Path("/sys")) -> VfioPath:
        """Find a device by mdev UUID, PCI address (``0000:01:00.0``) or sysfs path."""
        if _UUID.match(spec):
            path = sysfs_root / "bus/mdev/devices" / spec
        elif _PCI.match(spec):
            path = (
                sysfs_root / "bus/pci/devices" / (spec if spec.count(":") == 2 else f"0000:{spec}")
            )
        else:
            path = Path(spec)
        try:
            path = path.resolve(strict=True)
            group = int((path / "iommu_group").resolve(strict=True).name)
        except (OSError, ValueError) as exc:
            raise DeviceError(spec, f"no VFIO device with an IOMMU group at {path}: {exc}") from exc
        return cls(path, path.name, group)

    def model(self) -> str:
        """What must match on both sides: the mdev type, or the PCI vendor:device."""
        mdev_type = self.sysfs / "mdev_type"
        if mdev_type.exists():
            return mdev_type.resolve().name
        try:
            vendor = (self.sysfs / "vendor").read_text().strip().removeprefix("0x")
            device = (self.sysfs / "device").read_text().strip().removeprefix("0x")
        except OSError:
            return "unknown"
        return f"{vendor}:{device}"


@dataclass
class VfioFds:
    """The three fds of an opened device; the container and group keep it attached."""

    container: int
    group: int
    device: int

    def close(self) -> None:
        """Close device, group and container, in that order."""
        for fd in (self.device, self.group, self.container):
            if fd >= 0:
                os.close(fd)
        self.device = self.group = self.container = -1


def open_fds(path: VfioPath, dev_root: Path = Path("/dev/vfio")) -> VfioFds:
    """Open the device through its group and a fresh type1v2 container.

    Every fd opened so far is closed again if a later step fails.
    """
    fds = VfioFds(-1, -1, -1)
    step = "open /dev/vfio/vfio"
    try:
        fds.container = os.open(dev_root / "vfio", os.O_RDWR | os.O_CLOEXEC)
        step = "VFIO_GET_API_VERSION"
        version = uapi.ioctl(fds.container, VFIO_GET_API_VERSION)
        if version != VFIO_API_VERSION:
            raise DeviceError(path.name, f"VFIO API version {version}, expected 0")
        step = "VFIO_CHECK_EXTENSION(TYPE1v2)"
        if not uapi.ioctl(fds.container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU):
            raise DeviceError(path.name, "the kernel's VFIO lacks the type1v2 IOMMU backend")
        step = f"open /dev/vfio/{path.group}"
        fds.group = os.open(dev_root / str(path.group), os.O_RDWR | os.O_CLOEXEC)
        step = "VFIO_GROUP_GET_STATUS"
        status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
        uapi.ioctl(fds.group, VFIO_GROUP_GET_STATUS, status)
        if not GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
            raise DeviceError(
                path.name, f"IOMMU group {path.group} is not viable: bind all its devices to vfio"
            )
        step = "VFIO_GROUP_SET_CONTAINER"
        uapi.ioctl(fds.group, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", fds.container)))
        step = "VFIO_SET_IOMMU(TYPE1v2)"
        uapi.ioctl(fds.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        step = f"VFIO_GROUP_GET_DEVICE_FD({path.name})"
        fds.device = uapi.ioctl(
            fds.group, VFIO_GROUP_GET_DEVICE_FD, bytearray(path.name.encode() + b"\0")
        )
    except OSError as exc:
        fds.close()
        raise DeviceError(path.name, f"{step} failed: {errno_name(exc.errno)}") from exc
    except BaseException:
        fds.close()
        raise
    return fds

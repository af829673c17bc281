"""vfio-user devices: a client of the vfio-user protocol (see :mod:`.device`)."""

from devices.vfio_user.device import VfioUserDevice, VfioUserFaults

__all__ = ["VfioUserDevice", "VfioUserFaults"]

"""A simulated device: seeded content, a tunable workload, and fault injection for tests.

Its state is ``state_size`` bytes of content derived from ``seed``, changed only by its
workload, which rewrites blocks of the first ``hot_set`` fraction of the state at
``dirty_rate`` bytes per second of event-loop time while the device runs. Both ends of a
migration can therefore prove byte equality with ``digest()``.

Either optional query of the uAPI can be withdrawn (``offers_precopy_info``,
``offers_stop_copy_size``): the device then raises Unsupported as a driver without
VFIO_MIG_GET_PRECOPY_INFO or MIG_DATA_SIZE would, and still streams pre-copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from devices.base import PrecopyInfo
from devices.errors import Unsupported
from devices.fsm import Feature
from devices.paged import ALL_FEATURES, Faults, PagedDevice


class SimulatedDevice(PagedDevice):
    """A migratable device with configurable size, chunking, features, dirty rate and faults."""

    kind: ClassVar[str] = "simulated"

    def __init__(
        self,
        name: str,
        *,
        state_size: int,
        chunk_size: int = 256 << 10,
        block_size: int = 4 << 10,
        features: Feature = ALL_FEATURES,
        dirty_rate: float = 0.0,
        hot_set: float = 1.0,
        seed: int = 0,
        faults: Faults | None = None,
        clock: Callable[[], float] | None = None,
        offers_precopy_info: bool = True,
        offers_stop_copy_size: bool = True,
    ) -> None:
        if not 0.0 < hot_set <= 1.0:
            raise ValueError(f"{name}: hot set {hot_set} is not a fraction in (0, 1]")
        super().__init__(
            name,
            state_size=state_size,
            block_size=block_size,
            chunk_size=chunk_size,
            features=features,
            dirty_rate=dirty_rate,
            hot_blocks=round(hot_set * (state_size // max(block_size, 1))),
            seed=seed,
            faults=faults,
            clock=clock,
        )
        self.fill_seeded(0, self.n_blocks)
        #: Whether precopy_info / stop_copy_size answer (False: they raise Unsupported).
        self.offers_precopy_info = offers_precopy_info
        self.offers_stop_copy_size = offers_stop_copy_size

    def precopy_info(self) -> PrecopyInfo:
        info = super().precopy_info()  # the state check first, as the uAPI's EINVAL
        if not self.offers_precopy_info:
            raise Unsupported(self.name, "precopy info is not offered (simulated ENOTTY)")
        return info

    def stop_copy_size(self) -> int:
        if not self.offers_stop_copy_size:
            raise Unsupported(self.name, "the stop-copy size is not offered (simulated ENOTTY)")
        return super().stop_copy_size()

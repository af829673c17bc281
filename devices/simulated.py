"""A simulated device: seeded content, a tunable workload, and fault injection for tests.

Its state is ``state_size`` bytes of content derived from ``seed``, changed only by its
workload, which rewrites blocks of the first ``hot_set`` fraction of the state at
``dirty_rate`` bytes per second of event-loop time while the device runs. Both ends of a
migration can therefore prove byte equality with ``digest()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

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

"""Guest memory as a migratable device, QEMU-style: pages, a dirty map, zero pages.

The workload writes pages of the working set (the first ``working_set`` bytes) at
``dirty_rate`` bytes per second while the guest runs; pages outside it keep their initial
content, zero pages unless ``zero_outside`` is False. Zero pages cost a run entry on the
wire, not a page of zeros. ``set_throttle`` slows the workload (auto-converge).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from devices.fsm import RUNNING_STATES, Feature
from devices.paged import ALL_FEATURES, Faults, PagedDevice


class RamDevice(PagedDevice):
    """A guest-RAM region of ``size`` bytes in ``page_size`` pages."""

    kind: ClassVar[str] = "ram"

    def __init__(
        self,
        name: str,
        *,
        size: int,
        page_size: int = 4 << 10,
        working_set: int | None = None,
        dirty_rate: float = 0.0,
        zero_outside: bool = True,
        chunk_size: int = 1 << 20,
        features: Feature = ALL_FEATURES,
        seed: int = 0,
        faults: Faults | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        working_set = size if working_set is None else working_set
        if not 0 < working_set <= size:
            raise ValueError(f"{name}: working set {working_set} is not within 1..{size} bytes")
        super().__init__(
            name,
            state_size=size,
            block_size=page_size,
            chunk_size=chunk_size,
            features=features,
            dirty_rate=dirty_rate,
            hot_blocks=-(-working_set // max(page_size, 1)),
            seed=seed,
            faults=faults,
            clock=clock,
        )
        self.working_set_pages = self._hot_blocks
        self.fill_seeded(0, self.n_blocks if not zero_outside else self.working_set_pages)

    def can_throttle(self) -> bool:
        return True

    def set_throttle(self, fraction: float) -> None:
        """Run the workload at ``1 - fraction`` of its rate, from now on."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{self.name}: throttle {fraction} is not a fraction in [0, 1]")
        self._catch_up(self.state in RUNNING_STATES)
        self._throttle = fraction

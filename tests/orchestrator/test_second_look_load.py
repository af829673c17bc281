"""A second look at model stream format 2 end to end: bytes spoiled after the transport's
own check (as a buggy driver or memory error would) are caught by the record checks at
load, the destination runs nothing and the source keeps its state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from devices.base import Buffer, ResumeChannel
from devices.paged import PagedDevice, PagedResumeChannel
from devices.simulated import SimulatedDevice
from orchestrator.engine.errors import DestinationFailed
from tests.orchestrator.conftest import Spec


class SpoilingChannel(PagedResumeChannel):
    """A resuming session that flips the last byte of the ``nth`` write it is given."""

    def __init__(self, device: PagedDevice, nth: int) -> None:
        super().__init__(device)
        self.nth = nth

    async def write(self, data: Buffer) -> None:
        self.nth -= 1
        if self.nth == 0:
            spoiled = bytearray(data)
            spoiled[-1] ^= 0x01
            data = spoiled
        await super().write(data)


class SpoilingDevice(SimulatedDevice):
    """A destination device whose resuming sessions spoil their ``nth`` write."""

    nth = 1

    def new_resume_channel(self) -> ResumeChannel:
        return SpoilingChannel(self, self.nth)


@dataclasses.dataclass
class SpoilingSpec(Spec):
    """A device whose destination end is a :class:`SpoilingDevice`."""

    nth: int = 1

    def build(self, *, source: bool) -> PagedDevice:
        if source:
            return super().build(source=True)
        device = SpoilingDevice(self.name, state_size=self.size, dirty_rate=0.0, seed=self.seed)
        device.nth = self.nth
        return device


@pytest.mark.parametrize("nth", [1, 2, 5])
async def test_a_byte_spoiled_after_the_transport_fails_the_load_and_keeps_the_source(
    make_ends: Callable[..., Any], nth: int
) -> None:
    """One flipped bit in the HELLO or a BLOCKS record reaching the device is refused by
    name at RESUMING -> STOP; no destination device resumes, the source runs its own state."""
    ends = await make_ends([SpoilingSpec("sim0", seed=1, size=1 << 20, nth=nth)])
    with pytest.raises(DestinationFailed, match="corrupt stream: checksum mismatch in record"):
        await ends.migration(downtime_limit_ms=200).run()
    assert not ends.resumed_on_destination()
    await ends.assert_source_intact()

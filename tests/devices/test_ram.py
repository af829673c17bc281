"""RamDevice: zero pages, the working set, throttling, and the 256 MiB acceptance copy."""

from __future__ import annotations

from devices.fsm import State
from devices.ram import RamDevice
from devices.testing import ManualClock, copy_device, opened, read_until_pause

MIB = 1 << 20


async def test_zero_pages_cost_almost_nothing_on_the_wire() -> None:
    """An 8 MiB guest with a 1 MiB working set sends little more than that 1 MiB."""
    device = RamDevice("ram", size=8 * MIB, working_set=MIB)
    await device.set_state(State.STOP_COPY)
    chunks = await read_until_pause(device.save_channel())
    wire = sum(len(b) for chunk in chunks for b in chunk)
    assert MIB < wire < MIB + 4096


def test_pages_outside_the_working_set_stay_zero() -> None:
    """The workload writes the working set only; the rest stays zero pages."""
    device = RamDevice("ram", size=4 * MIB, working_set=MIB, dirty_rate=100 * MIB)
    device.run_workload(1.0)
    assert device.writes == 100 * MIB // 4096
    assert device.memory[MIB:] == bytes(3 * MIB)


def test_zero_outside_false_fills_every_page() -> None:
    """With zero_outside False no page starts as a zero page."""
    device = RamDevice("ram", size=MIB, working_set=4096, zero_outside=False)
    assert all(device.memory[p : p + 4096] != bytes(4096) for p in range(0, MIB, 4096))


async def test_throttle_slows_the_dirty_rate() -> None:
    """set_throttle(0.75) leaves a quarter of the dirtying, from the moment it is set."""
    clock = ManualClock()
    device = RamDevice("ram", size=4 * MIB, dirty_rate=MIB, clock=clock)
    assert device.can_throttle()
    async with opened(device):
        await device.set_state(State.PRE_COPY)
        clock.advance(1.0)
        device.precopy_info()
        assert device.writes == 256
        device.set_throttle(0.75)
        clock.advance(1.0)
        device.precopy_info()
        assert device.writes == 256 + 64


async def test_256_mib_guest_dirtying_50_mb_s_converges_byte_identical() -> None:
    """Pre-copy of a 256 MiB guest dirtying 50 MB/s converges and ends byte-identical."""
    source = RamDevice("src", size=256 * MIB, dirty_rate=50e6, seed=1)
    dest = RamDevice("dst", size=256 * MIB, working_set=4096, seed=2)
    async with opened(source, dest):
        report = await copy_device(source, dest, switchover_bytes=4 * MIB, min_passes=2)
        assert report.converged
        assert source.writes > 0
        assert report.stop_copy_bytes <= 4 * MIB + 64 * 1024
        assert await source.digest() == await dest.digest()

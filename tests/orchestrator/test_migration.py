"""End-to-end migrations over loopback: success, every failure, and the ordering rules."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

import transport
from devices.base import DeviceDescriptor
from devices.fsm import Feature, State
from devices.paged import Faults, PagedDevice
from devices.simulated import SimulatedDevice
from orchestrator.engine.destination import Offer, Refused, match_devices
from orchestrator.engine.errors import (
    ConvergenceFailed,
    DestinationFailed,
    DowntimeExceeded,
    MigrationBlocked,
    MigrationCancelled,
    MigrationError,
    OutcomeUnknown,
)
from orchestrator.engine.params import Policy
from orchestrator.engine.phases import PhaseError
from orchestrator.engine.stats import Status
from tests.orchestrator.conftest import MB, MIB, SessionView, Spec, wait_status

ROOT = Path(__file__).resolve().parents[2]


def sims(count: int, **kw: object) -> list[Spec]:
    return [Spec(f"sim{i}", seed=i + 1, **kw) for i in range(count)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("count", "channels"), [(1, 1), (4, 1), (4, 4), (16, 4)])
async def test_migration_is_byte_exact(make_ends, count: int, channels: int) -> None:
    """N simulated devices and a RAM device, all dirtying, arrive byte-identical over
    one channel or several (devices spread over them)."""
    ends = await make_ends([*sims(count, size=MIB), Spec("ram0", kind="ram", size=4 * MIB)])
    stats = await ends.migration(downtime_limit_ms=200, channels=channels).run()
    assert stats.status == Status.COMPLETED
    await ends.assert_migrated()
    assert ends.outcomes == [True]
    report = stats.as_dict()
    assert report["downtime_ms"] == pytest.approx(
        sum(report["downtime_breakdown_ms"].values()), abs=0.01
    )
    assert set(report["downtime_breakdown_ms"]) == {
        "quiesce", "stop", "drain", "wire", "load", "commit", "resume"
    }  # fmt: skip
    assert report["transferred_bytes"] >= (count + 2) * MIB  # RAM: half its pages are zero
    assert report["cpu_s_per_gb"] > 0


async def test_a_completed_migration_warns_about_nothing(make_ends) -> None:
    """Neither end logs a warning or an error when all went well: the destination hanging
    up after its last verdict ends the conversation; it is no lost peer."""
    ends = await make_ends(sims(2, size=MIB))
    with structlog.testing.capture_logs() as logs:
        stats = await ends.migration(downtime_limit_ms=200).run()
        await ends.assert_migrated()
    assert stats.status == Status.COMPLETED
    assert [e for e in logs if e["log_level"] in ("warning", "error", "critical")] == []


async def test_device_without_precopy_joins_at_stop_copy(make_ends) -> None:
    """A STOP_COPY|P2P device among PRE_COPY devices sends everything during stop-copy."""
    specs = [*sims(2), Spec("plain", features=Feature.STOP_COPY | Feature.P2P, seed=9)]
    ends = await make_ends(specs)
    stats = await ends.migration().run()
    await ends.assert_migrated()
    plain = stats.devices[2]
    assert plain.precopy_bytes == 0
    assert plain.stopcopy_bytes >= 2 * MIB
    assert ("plain", State.PRE_COPY) not in ends.trace.steps()


async def test_the_dirty_rate_counts_what_the_readers_carried_away(make_ends) -> None:
    """Readers that keep up leave the dirty figures near zero; the measured dirty rate
    still finds the workload's rate (pending growth + bytes read), not that near-zero."""
    ends = await make_ends(sims(2, size=4 * MIB, dirty_rate=2 * MB))
    stats = await ends.migration(downtime_limit_ms=200, max_bandwidth=20 * MB).run()
    await ends.assert_migrated()
    assert stats.iterations >= 3
    assert 0.5 * 4 * MB <= stats.dirty_rate <= 2 * 4 * MB, stats.dirty_rate


class CountingGate:
    """A destination gate that consents to everything and counts its fence writes."""

    def __init__(self) -> None:
        self.prepared = 0
        self.committed_ids: list[str] = []

    def admit(self, offer: Offer) -> None:
        pass

    def prepare(self, offer: Offer) -> None:
        self.prepared += 1

    def committed(self, offer: Offer) -> None:
        self.committed_ids.append(offer.migration_id)

    def finished(self, offer: Offer, results: object) -> None:
        pass


async def test_two_barriers_one_fence_and_the_stream_between_them_loads(make_ends) -> None:
    """The source sends a barrier before its readers stop and one after; the destination
    writes its fence once, and what the readers sent between the barriers (they stream
    on through the first) arrives with the rest, byte-exact."""
    gate = CountingGate()
    ends = await make_ends(sims(2, size=4 * MIB, dirty_rate=20 * MB), gate=gate)
    migration = ends.migration(downtime_limit_ms=200)
    stats = await migration.run()
    await ends.assert_migrated()
    assert gate.prepared == 1
    assert gate.committed_ids == [stats.migration_id]


async def test_wait_policy_fails_after_timeout_and_source_runs(make_ends) -> None:
    """Dirtying faster than the capped bandwidth never converges: fail, source intact."""
    ends = await make_ends(sims(1, size=4 * MIB, dirty_rate=8 * MB))
    migration = ends.migration(
        max_bandwidth=1 * MB, downtime_limit_ms=10, timeout_s=0.6, policy=Policy.WAIT
    )
    with pytest.raises(ConvergenceFailed, match="did not converge"):
        await migration.run()
    assert migration.stats.status == Status.FAILED
    await ends.assert_source_intact()


async def test_force_policy_switches_over_anyway(make_ends) -> None:
    """The force policy gives up waiting after N iterations and completes byte-exact."""
    ends = await make_ends(sims(1, size=4 * MIB, dirty_rate=20 * MB))
    migration = ends.migration(
        max_bandwidth=4 * MB, downtime_limit_ms=1, policy=Policy.FORCE, force_after_iterations=3
    )
    stats = await migration.run()
    assert stats.forced
    await ends.assert_migrated()


async def test_throttle_policy_slows_the_workload(make_ends) -> None:
    """Auto-converge throttles the RAM device until the rest fits, then completes."""
    ends = await make_ends([Spec("ram0", kind="ram", size=8 * MIB, dirty_rate=40 * MB)])
    migration = ends.migration(
        max_bandwidth=8 * MB, downtime_limit_ms=50, policy=Policy.THROTTLE,
        throttle_after_iterations=1, throttle_initial=0.5, throttle_increment=0.2,
    )  # fmt: skip
    stats = await migration.run()
    assert stats.throttle >= 0.5
    await ends.assert_migrated()


@pytest.mark.parametrize("phase", [Status.SETUP, Status.ACTIVE, Status.PRE_SWITCHOVER])
async def test_cancel_before_switchover(make_ends, phase: Status) -> None:
    """A cancel in setup, pre-copy or the pre-switchover pause rolls the source back."""
    ends = await make_ends(sims(2))
    migration = ends.migration(pause_before_switchover=True)
    run = asyncio.create_task(migration.run())
    await wait_status(migration, phase)
    migration.cancel("test cancel")
    with pytest.raises(MigrationCancelled, match="test cancel"):
        await run
    assert migration.stats.status == Status.CANCELLED
    await ends.assert_source_intact()


async def test_cancel_during_stop_copy_drain(make_ends) -> None:
    """A cancel while a stop-copy read is stalled rolls every device back from STOP_COPY."""
    stall = Faults(stall_read_after=MIB // 2)
    spec = Spec("slow", features=Feature.STOP_COPY | Feature.P2P, source_faults=stall)
    ends = await make_ends([*sims(1), spec])
    migration = ends.migration()
    run = asyncio.create_task(migration.run())
    await ends.sources[1].read_stalled.wait()
    assert ends.sources[1].state == State.STOP_COPY
    migration.cancel("cancel mid drain")
    with pytest.raises(MigrationCancelled):
        await run
    await ends.assert_source_intact()


async def test_cancel_while_waiting_for_the_verdict(make_ends) -> None:
    """A cancel while the destination holds its verdict rolls back both ends."""
    ends = await make_ends(sims(2), hold_verdicts=True)
    migration = ends.migration()
    run = asyncio.create_task(migration.run())
    gate = await ends.held_verdict()
    migration.cancel("cancel at verdict")
    with pytest.raises(MigrationCancelled):
        await run
    gate.open.set()
    await ends.assert_source_intact()
    assert not ends.resumed_on_destination()


async def test_destination_validation_failure_names_device(make_ends) -> None:
    """A destination that rejects the loaded state fails the migration; the source runs."""
    bad = Spec("sim1", seed=2, target_faults=Faults(corrupt_validation=True))
    ends = await make_ends([Spec("sim0", seed=1), bad])
    with pytest.raises(DestinationFailed, match=r"sim1.*validation failure injected"):
        await ends.migration().run()
    await ends.assert_source_intact()
    assert ends.outcomes == [False]
    assert all(t.state == State.RUNNING for t in ends.targets)


@pytest.mark.parametrize("stop_copy", [False, True], ids=["mid-precopy", "mid-stopcopy"])
async def test_connection_dropped(make_ends, proxy_to, stop_copy: bool) -> None:
    """A link cut in pre-copy or in stop-copy fails cleanly and the source runs on."""
    features = Feature.STOP_COPY | Feature.P2P
    if not stop_copy:
        features |= Feature.PRE_COPY
    ends = await make_ends([Spec("big", size=8 * MIB, features=features)])
    proxy, address = await proxy_to(ends.address)
    proxy.cut_after = 3 * MIB
    migration = ends.migration(address)
    with pytest.raises(MigrationError, match=r"lost|closed|reset|cancel"):
        await migration.run()
    await ends.assert_source_intact()
    assert (State.STOP_COPY in {e.new for e in ends.trace.entries if e.device == "big"}) == (
        stop_copy
    )


async def test_destination_that_never_answers_times_out(make_ends, proxy_to) -> None:
    """With the return path frozen the verdict never comes: time out and roll back."""
    ends = await make_ends(sims(1))
    proxy, address = await proxy_to(ends.address)
    migration = ends.migration(address, switchover_ack=False, verdict_timeout_s=0.5)
    run = asyncio.create_task(migration.run())
    await wait_status(migration, Status.ACTIVE)
    proxy.freeze_return()
    with pytest.raises(MigrationError, match=r"did not catch up within 0.5 s"):
        await run
    await ends.assert_source_intact()


async def test_unreachable_destination(make_ends, unused_tcp_port: int) -> None:
    """Nobody listening: a clear error and nothing touched."""
    ends = await make_ends(sims(1))
    with pytest.raises(MigrationError, match="cannot reach destination"):
        await ends.migration(f"127.0.0.1:{unused_tcp_port}", connect_timeout_s=2).run()
    await ends.assert_source_intact()
    assert ends.trace.entries == []


async def test_retry_after_cancel_to_fresh_destination(make_ends) -> None:
    """After a cancelled migration the same source devices migrate to a new destination."""
    first = await make_ends(sims(2))
    migration = first.migration()
    run = asyncio.create_task(migration.run())
    await wait_status(migration, Status.ACTIVE)
    migration.cancel()
    with pytest.raises(MigrationCancelled):
        await run
    second = await make_ends(sims(2))
    second.sources = first.sources  # the same source devices, a fresh destination
    await second.migration().run()
    await second.assert_migrated()


async def test_hard_limit_refuses_predicted_overrun(make_ends) -> None:
    """A forced switchover predicted to overrun the hard limit is refused before quiesce."""
    ends = await make_ends([Spec("plain", size=8 * MIB, features=Feature.STOP_COPY | Feature.P2P)])
    migration = ends.migration(
        downtime_limit_ms=5, hard_downtime_limit=True, switchover_bandwidth=1 * MB,
        policy=Policy.FORCE, force_after_iterations=1,
    )  # fmt: skip
    with pytest.raises(DowntimeExceeded, match="over the hard limit of 5 ms"):
        await migration.run()
    await ends.assert_source_intact()
    assert State.RUNNING_P2P not in {e.new for e in ends.trace.entries if e.device == "plain"}


async def test_hard_limit_aborts_overrunning_switchover(make_ends) -> None:
    """When the destination is too slow to load, the hard limit rolls everything back."""
    ends = await make_ends(sims(2), hold_verdicts=True)
    migration = ends.migration(downtime_limit_ms=300, hard_downtime_limit=True)
    with pytest.raises(DowntimeExceeded, match="before the destination had loaded"):
        await migration.run()
    (await ends.held_verdict()).open.set()
    await ends.assert_source_intact()
    assert not ends.resumed_on_destination()


async def test_p2p_ordering_in_the_arc_trace(make_ends) -> None:
    """No source device stops while one still fully runs; no target runs while one loads."""
    ends = await make_ends(sims(4))
    await ends.migration().run()
    for trace, forbidden_at, moment in (
        (ends.trace, (State.PRE_COPY, State.RUNNING), State.STOP_COPY),
        (ends.target_trace, (State.RESUMING, State.STOP), State.RUNNING),
    ):
        states = dict.fromkeys((d.name for d in ends.sources), State.RUNNING)
        for entry in trace.entries:
            states[entry.device] = entry.new
            if entry.new == moment:
                assert not set(states.values()) & set(forbidden_at), (entry, states)
    assert ends.trace.steps().count(("sim0", State.PRE_COPY_P2P)) == 1


async def test_models_load_as_their_streams_end(make_ends) -> None:
    """A destination model loads (RESUMING -> STOP) when its END_OF_DEVICE arrives, not
    after the whole stream: its load overlaps the source's drain of the others."""
    targets: list[PagedDevice] = []
    at_end: dict[str, State] = {}

    class Watch(SessionView):
        async def recv(self) -> transport.Frame:
            frame = await self._session.recv()
            if frame.tag == transport.Tag.END_OF_STREAM:
                at_end.update((d.name, d.state) for d in targets)
            return frame

    ends = await make_ends(sims(4), wrap=Watch)
    targets.extend(ends.targets)
    await ends.migration().run()
    assert at_end == {d.name: State.STOP for d in ends.targets}
    await ends.assert_migrated()


async def test_multi_device_blocker_and_p2p_off(make_ends) -> None:
    """Devices lacking P2P block a multi-device migration unless P2P is turned off."""
    no_p2p = Feature.STOP_COPY | Feature.PRE_COPY
    ends = await make_ends([Spec("a", features=no_p2p, seed=1), Spec("b", seed=2)])
    with pytest.raises(MigrationBlocked, match=r"devices a cannot quiesce P2P.*set p2p off"):
        await ends.migration().run()
    assert ends.trace.entries == []
    stats = await ends.migration(p2p=False).run()
    assert stats.status == Status.COMPLETED
    await ends.assert_migrated()
    assert all(e.new not in (State.PRE_COPY_P2P, State.RUNNING_P2P) for e in ends.trace.entries
               if e.device == "a")  # fmt: skip


DESTINATION_SCRIPT = """
import asyncio, json, sys
import structlog
import transport
from devices.simulated import SimulatedDevice
from orchestrator.engine.destination import DestinationMigration

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

async def main():
    devices = {f"sim{i}": SimulatedDevice(f"sim{i}", state_size=1 << 20, seed=i + 1)
               for i in range(2)}
    for d in devices.values():
        await d.open()
    done = asyncio.Event()
    async def accept(session):
        ok = await DestinationMigration(session, devices).run()
        print(json.dumps({"ok": ok, "digests": {n: (await d.digest()).hex()
                                                 for n, d in devices.items()}}), flush=True)
        done.set()
    server = await transport.serve("127.0.0.1:0", accept, name="dst", auth=transport.AuthConfig())
    print(server.address, flush=True)
    await done.wait()

asyncio.run(main())
"""


async def test_two_processes(make_ends) -> None:
    """The destination in its own process receives a byte-exact copy."""
    ends = await make_ends(sims(2, size=MIB))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DESTINATION_SCRIPT, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    address = (await proc.stdout.readline()).decode().strip()
    try:
        stats = await ends.migration(address).run()
        result = json.loads(await proc.stdout.readline())
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert stats.status == Status.COMPLETED
    assert result["ok"] is True
    for device in ends.sources:
        assert result["digests"][device.name] == (await device.digest()).hex()


async def test_incompatible_destination_device_is_refused(make_ends) -> None:
    """A destination device of another kind refuses the stream; nothing moved."""
    ends = await make_ends([Spec("dev0", seed=1)])
    ends.targets[0].kind = "ram"  # type: ignore[misc]  # this instance claims another kind
    with pytest.raises(DestinationFailed, match="dev0: kind 'simulated' offered, 'ram' here"):
        await ends.migration().run()
    await ends.assert_source_intact()
    assert ends.target_trace.entries == []


async def test_pause_before_switchover_waits_for_continue(make_ends) -> None:
    """Paused before the switchover, the devices keep running until continue is asked."""
    ends = await make_ends(sims(2))
    migration = ends.migration(pause_before_switchover=True)
    run = asyncio.create_task(migration.run())
    await wait_status(migration, Status.PRE_SWITCHOVER)
    assert all(d.state == State.PRE_COPY for d in ends.sources)
    migration.continue_switchover()
    stats = await run
    assert stats.status == Status.COMPLETED
    await ends.assert_migrated()
    with pytest.raises(PhaseError, match="cannot continue: the migration is completed"):
        migration.continue_switchover()


async def test_clock_offset_from_round_trips(make_ends, monkeypatch) -> None:
    """Ends on different boots place the destination's marks by ping round trips."""
    monkeypatch.setattr("orchestrator.engine.destination.boot_id", lambda: "another-host")
    ends = await make_ends(sims(1))
    stats = await ends.migration().run()
    assert stats.clock_offset_uncertainty_ms > 0
    assert stats.downtime_ms is not None
    assert stats.downtime_ms == pytest.approx(sum(stats.downtime_breakdown_ms.values()))


async def test_destination_failure_during_precopy_keeps_its_reason(make_ends) -> None:
    """A destination that fails while pre-copy runs reports its own reason to the source."""
    ends = await make_ends(sims(1, size=4 * MIB))
    migration = ends.migration(pause_before_switchover=True)
    run = asyncio.create_task(migration.run())
    await wait_status(migration, Status.PRE_SWITCHOVER)
    await ends.targets[0].close()
    ends.targets[0].state = State.ERROR  # the destination device breaks under the stream
    ends.sources[0].replay(1)  # a workload write: more data for the broken device
    with pytest.raises(DestinationFailed, match="destination failed"):
        await run
    await ends.assert_source_intact()


async def test_verdict_timeout_rolls_back(make_ends) -> None:
    """A destination that loads but never gives its verdict times out; the source runs."""
    ends = await make_ends(sims(1), hold_verdicts=True)
    with pytest.raises(MigrationError, match=r"no verdict within 0\.5 s"):
        await ends.migration(verdict_timeout_s=0.5).run()
    (await ends.held_verdict()).open.set()
    await ends.assert_source_intact()
    assert not ends.resumed_on_destination()


async def test_link_lost_after_commit_keeps_both_sides_safe(make_ends) -> None:
    """With the link gone after COMMIT the destination runs and the source stays stopped."""
    ends = await make_ends(sims(2), hold_verdicts="resumed")
    run = asyncio.create_task(ends.migration().run())
    gate = await ends.held_verdict()  # the destination runs the devices and would say so
    gate.abort()
    gate.open.set()
    with pytest.raises(OutcomeUnknown, match="may be running the devices"):
        await run
    assert ends.outcomes == [True]
    for source, target in zip(ends.sources, ends.targets, strict=True):
        assert source.state == State.STOP
        assert target.state == State.RUNNING
        assert await source.digest() == await target.digest()


def test_devices_match_by_descriptor_not_class_kind() -> None:
    """A device whose descriptor names its model (VFIO: vfio:mtty-2) matches the same model."""

    class Model(SimulatedDevice):
        def descriptor(self) -> DeviceDescriptor:
            return dataclasses.replace(super().descriptor(), kind="vfio:mtty-2")

    here = Model("tty0", state_size=4096)
    offered = [dataclasses.replace(here.descriptor())]
    assert match_devices(offered, {"tty0": here}, p2p=True) == [here]
    other = [dataclasses.replace(here.descriptor(), kind="vfio:mtty-1")]
    with pytest.raises(Refused, match="kind 'vfio:mtty-1' offered, 'vfio:mtty-2' here"):
        match_devices(other, {"tty0": here}, p2p=True)

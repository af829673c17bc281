"""The convergence rule, the policies, the parameters and the downtime clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from devices.fsm import Feature, State
from devices.simulated import SimulatedDevice
from orchestrator.engine import convergence, window
from orchestrator.engine.convergence import Action, DeviceProgress
from orchestrator.engine.errors import DowntimeExceeded, MigrationBlocked
from orchestrator.engine.params import MigrationParams, Policy
from orchestrator.engine.source import SourceMigration
from orchestrator.engine.stats import DeviceStats, DowntimeClock, MigrationStats, RateMeter, Status
from tests.orchestrator.conftest import MIB, Spec

MB = 1_000_000


def progress(initial: int, dirty: int, stop_copy: int | None = None) -> DeviceProgress:
    return DeviceProgress("d", initial, dirty, dirty if stop_copy is None else stop_copy)


def test_threshold_is_bandwidth_times_limit() -> None:
    """With no fixed cost, what fits is exactly bandwidth x downtime limit."""
    params = MigrationParams(downtime_limit_ms=100)
    fits = convergence.estimate([progress(0, 10 * MB)], 100 * MB, 0.0)
    over = convergence.estimate([progress(0, 10 * MB + 1)], 100 * MB, 0.0)
    assert convergence.decide(fits, params, iteration=1, elapsed_s=0, ack_pending=False) is (
        Action.SWITCHOVER
    )
    assert convergence.decide(over, params, iteration=1, elapsed_s=0, ack_pending=False) is (
        Action.CONTINUE
    )


def test_initial_data_must_be_sent_first() -> None:
    """A device with initial bytes left blocks the switchover even if little is pending."""
    est = convergence.estimate([progress(0, 0), progress(1, 0)], 100 * MB, 0.0)
    assert not est.initial_done
    params = MigrationParams()
    assert convergence.decide(est, params, iteration=1, elapsed_s=0, ack_pending=False) is (
        Action.CONTINUE
    )


def test_switchover_waits_for_ack() -> None:
    """A fitting estimate still waits while the destination's switchover-ack is pending."""
    est = convergence.estimate([progress(0, 0)], 100 * MB, 0.0)
    params = MigrationParams()
    assert convergence.decide(est, params, iteration=1, elapsed_s=0, ack_pending=True) is (
        Action.CONTINUE
    )


def test_stop_copy_estimate_counts() -> None:
    """A device's stop-copy estimate counts when it exceeds its dirty bytes."""
    est = convergence.estimate([progress(0, 1, stop_copy=5 * MB)], 100 * MB, 0.01)
    assert est.remaining_bytes == 5 * MB
    assert est.expected_downtime_s == pytest.approx(0.06)


def test_fixed_overhead_counts_against_the_limit() -> None:
    """The measured arc overhead is part of the expected downtime."""
    est = convergence.estimate([progress(0, 0)], 100 * MB, 0.2)
    assert not est.fits(0.1)
    assert est.fits(0.3)


def test_what_the_sync_wait_lets_the_devices_dirty_is_charged() -> None:
    """The pipe's drain plus a round trip, times the dirty rate, joins the stop-copy:
    1.5 MB in the pipe at 12.5 MB/s and 2 MB/s of dirtying is 240 KB more."""
    syncing = convergence.dirtied_while_syncing(2 * MB, 1_500_000, 12.5 * MB, 0.0)
    assert syncing == 240_000
    assert convergence.dirtied_while_syncing(2 * MB, 0, 12.5 * MB, 0.01) == 20_000
    assert convergence.dirtied_while_syncing(2 * MB, 1_500_000, 0.0, 0.01) == 0
    est = convergence.estimate([progress(0, 10_000)], 12.5 * MB, 0.0, syncing)
    assert est.remaining_bytes == 250_000
    assert est.expected_downtime_s == pytest.approx(0.02)


def test_zero_bandwidth_never_fits_with_data_pending() -> None:
    """Without any measured bandwidth pending bytes cannot be promised to fit."""
    assert convergence.estimate([progress(0, 1)], 0.0, 0.0).expected_downtime_s == float("inf")
    assert convergence.estimate([progress(0, 0)], 0.0, 0.0).fits(0.1)


def test_wait_policy_fails_after_timeout() -> None:
    """The wait policy keeps going until the timeout, then fails."""
    params = MigrationParams(timeout_s=10)
    est = convergence.estimate([progress(0, 100 * MB)], MB, 0.0)
    assert convergence.decide(est, params, iteration=99, elapsed_s=9.9, ack_pending=False) is (
        Action.CONTINUE
    )
    assert convergence.decide(est, params, iteration=100, elapsed_s=10, ack_pending=False) is (
        Action.FAIL
    )


def test_force_policy_by_iterations_and_time() -> None:
    """The force policy switches over after N iterations or T seconds, whichever first."""
    est = convergence.estimate([progress(0, 100 * MB)], MB, 0.0)
    by_count = MigrationParams(policy=Policy.FORCE, force_after_iterations=5)
    by_time = MigrationParams(policy=Policy.FORCE, force_after_s=2.0)
    decide = convergence.decide
    assert decide(est, by_count, iteration=4, elapsed_s=0, ack_pending=True) is Action.CONTINUE
    assert decide(est, by_count, iteration=5, elapsed_s=0, ack_pending=True) is Action.FORCE
    assert decide(est, by_time, iteration=99, elapsed_s=1.9, ack_pending=False) is (Action.CONTINUE)
    assert decide(est, by_time, iteration=1, elapsed_s=2.0, ack_pending=False) is Action.FORCE


def test_throttle_policy_steps_up_to_cap() -> None:
    """Auto-converge starts at the initial throttle and climbs by the increment to the cap."""
    params = MigrationParams(
        policy=Policy.THROTTLE, throttle_initial=0.3, throttle_increment=0.25, throttle_max=0.9
    )
    est = convergence.estimate([progress(0, 100 * MB)], MB, 0.0)
    assert convergence.decide(est, params, iteration=3, elapsed_s=0, ack_pending=False) is (
        Action.THROTTLE
    )
    levels = [0.0]
    for _ in range(4):
        levels.append(convergence.next_throttle(levels[-1], params))
    assert levels == pytest.approx([0.0, 0.3, 0.55, 0.8, 0.9])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"downtime_limit_ms": 0}, "downtime_limit_ms must be > 0"),
        ({"channels": 17}, "channels must be <= 16"),
        ({"max_bandwidth": -1}, "max_bandwidth must be > 0"),
        ({"p2p": "yes"}, "p2p must be bool"),
        ({"policy": "maybe"}, "policy must be one of wait, force, throttle"),
        ({"policy": "force"}, "needs force_after_iterations or force_after_s"),
        ({"throttle_max": 1.5}, r"throttle_max must be in \(0, 1\)"),
        ({"bogus": 1}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_named(changes: dict[str, object], message: str) -> None:
    """Each nonsensical parameter is refused with a message naming it."""
    with pytest.raises(MigrationBlocked, match=message):
        MigrationParams().updated(changes)


def test_rate_meter_uses_full_windows() -> None:
    """The rate is computed over at least one full window."""
    meter = RateMeter(window_s=0.1)
    assert meter.sample(0, now=0.0) == 0.0
    assert meter.sample(50, now=0.05) == 0.0  # window not full yet
    assert meter.sample(100, now=0.1) == pytest.approx(1000.0)
    assert meter.sample(110, now=0.3) == pytest.approx(50.0)


def test_downtime_breakdown_sums_to_total() -> None:
    """The breakdown phases partition the window; a negative step from clock error is 0."""
    clock = DowntimeClock()
    start = clock.begin()
    for phase, at in [("quiesce", 0.001), ("stop", 0.003), ("drain", 0.010), ("wire", 0.0095),
                      ("load", 0.012), ("commit", 0.0125), ("resume", 0.015)]:  # fmt: skip
        clock.mark(phase, start + at)
    breakdown = clock.breakdown_ms()
    assert list(breakdown) == ["quiesce", "stop", "drain", "wire", "load", "commit", "resume"]
    assert breakdown["wire"] == 0.0
    assert clock.total_ms() == pytest.approx(15.0)
    with pytest.raises(ValueError, match="unknown downtime phase"):
        clock.mark("nap")


# -- the fallback rule for devices without precopy info or stop-copy size ---------------------


def test_without_precopy_info_initial_data_is_sent_at_the_first_pause() -> None:
    """Until the stream first says "nothing now" the initial data is outstanding, then sent."""
    passes = convergence.StreamPasses()
    passes.read(10 * MB)
    before = convergence.device_progress("d", passes, None, 0)
    assert not convergence.initial_sent(passes, None)
    assert not convergence.estimate([before], 100 * MB, 0.0).initial_done
    passes.pause()
    after = convergence.device_progress("d", passes, None, 0)
    assert convergence.initial_sent(passes, None)
    assert (after.initial_bytes, after.dirty_bytes) == (0, 0)  # initial data is not dirty


def test_without_precopy_info_dirty_bytes_are_the_last_pass() -> None:
    """The dirty estimate is the last pass, or the pass in progress once it is bigger."""
    passes = convergence.StreamPasses()
    passes.read(10 * MB)
    passes.pause()
    passes.read(3 * MB)
    passes.pause()
    assert convergence.device_progress("d", passes, None, 0).dirty_bytes == 3 * MB
    passes.read(1 * MB)
    assert convergence.device_progress("d", passes, None, 0).dirty_bytes == 3 * MB
    passes.read(4 * MB)
    assert convergence.device_progress("d", passes, None, 0).dirty_bytes == 5 * MB
    passes.pause()
    passes.pause()  # an empty pass: nothing was pending
    assert convergence.device_progress("d", passes, None, 0).dirty_bytes == 0


def test_without_stop_copy_size_remaining_is_the_stream_estimate() -> None:
    """No stop-copy size: the remaining estimate is the last pass, not the largest one."""
    passes = convergence.StreamPasses()
    for size in (50 * MB, 20 * MB, 2 * MB):
        passes.read(size)
        passes.pause()
    blind = convergence.device_progress("d", passes, None, None)
    assert blind.stop_copy_bytes == 2 * MB
    assert convergence.estimate([blind], 100 * MB, 0.0).remaining_bytes == 2 * MB
    reported = convergence.device_progress("d", passes, (0, 1 * MB), None)
    assert (reported.dirty_bytes, reported.stop_copy_bytes) == (1 * MB, 2 * MB)


def test_devices_that_report_keep_their_figures() -> None:
    """A device with precopy info and a stop-copy size is taken at its word."""
    passes = convergence.StreamPasses()
    passes.read(7 * MB)
    figures = convergence.device_progress("d", passes, (1 * MB, 2 * MB), 3 * MB)
    assert figures == DeviceProgress("d", 1 * MB, 2 * MB, 3 * MB)
    assert convergence.initial_sent(passes, (0, 2 * MB))
    assert not convergence.initial_sent(passes, (1, 0))


@pytest.mark.parametrize("stop_copy_size", [True, False], ids=["data-size", "no-data-size"])
async def test_device_without_precopy_info_migrates_and_converges(
    make_ends: Callable[..., Any], stop_copy_size: bool
) -> None:
    """A device whose optional queries raise Unsupported pre-copies, converges, arrives exact."""
    ends = await make_ends(
        [Spec("blind", size=4 * MIB, dirty_rate=1 * MB), Spec("sim", seed=3, dirty_rate=1 * MB)]
    )
    blind = ends.sources[0]
    assert isinstance(blind, SimulatedDevice)
    blind.offers_precopy_info = False
    blind.offers_stop_copy_size = stop_copy_size
    migration = ends.migration(downtime_limit_ms=200, switchover_ack=True, timeout_s=30)
    stats = await migration.run()
    assert stats.status == Status.COMPLETED
    assert not stats.forced
    await ends.assert_migrated()
    assert stats.devices[0].precopy_bytes >= 4 * MIB  # its initial data went in pre-copy
    assert stats.devices[0].stopcopy_bytes < 4 * MIB
    assert ("blind", State.PRE_COPY) in ends.trace.steps()


async def test_stop_copy_only_device_without_data_size_migrates(
    make_ends: Callable[..., Any],
) -> None:
    """A STOP_COPY-only device without a stop-copy size still migrates byte-exact."""
    ends = await make_ends([Spec("plain", features=Feature.STOP_COPY | Feature.P2P)])
    plain = ends.sources[0]
    assert isinstance(plain, SimulatedDevice)
    plain.offers_stop_copy_size = False
    stats = await ends.migration().run()
    assert stats.status == Status.COMPLETED
    await ends.assert_migrated()


async def test_idle_device_without_precopy_info_announces_its_initial_data(
    make_ends: Callable[..., Any],
) -> None:
    """A device that dirties nothing announces at its first pause, not at a next readable."""
    ends = await make_ends([Spec("idle", dirty_rate=0.0)])
    idle = ends.sources[0]
    assert isinstance(idle, SimulatedDevice)
    idle.offers_precopy_info = False
    stats = await ends.migration(switchover_ack=True, timeout_s=5).run()
    assert stats.status == Status.COMPLETED
    assert stats.devices[0].stopcopy_bytes < stats.devices[0].precopy_bytes
    await ends.assert_migrated()


def series(
    *pending_mb: float, bandwidth: float = 1000 * MB, overhead_s: float = 0.002
) -> list[convergence.Estimate]:
    """Estimates of successive iterations with these pending MB (all initial data sent)."""
    return [
        convergence.estimate([progress(0, int(p * MB))], bandwidth, overhead_s) for p in pending_mb
    ]


def test_a_fitting_estimate_still_falling_waits_for_the_floor() -> None:
    """Straight out of the initial copy, 30 ms of transfer fits 50 ms but is not the floor."""
    history = series(400, 30)
    assert history[-1].fits(0.05)
    assert not convergence.at_floor(history, 0.05)
    assert not convergence.at_floor(history[-1:], 0.05)


def test_the_floor_is_where_the_expected_downtime_stops_falling() -> None:
    """A fitting estimate that fell less than the tolerance since the last one is the floor."""
    assert convergence.at_floor(series(400, 30, 8, 7.5), 0.05)
    assert not convergence.at_floor(series(400, 30, 8), 0.05)


def test_a_negligible_transfer_switches_at_once() -> None:
    """When the pending bytes would take under a millisecond, no iteration can gain more."""
    assert convergence.at_floor(series(400, 0.5), 0.05)
    assert convergence.at_floor(series(0.2), 0.05)


def test_within_twice_the_fixed_cost_is_as_good_as_the_floor() -> None:
    """A falling estimate within 2x the arcs' fixed cost (+1 ms) switches: little is left."""
    assert convergence.at_floor(series(400, 4, overhead_s=0.005), 0.05)
    assert not convergence.at_floor(series(400, 7, overhead_s=0.005), 0.05)


def test_a_bump_above_the_floor_is_waited_out() -> None:
    """A fitting estimate well above the best one seen is a bump: the next may be lower."""
    assert not convergence.at_floor(series(400, 8, 20), 0.05)
    assert convergence.at_floor(series(400, 8, 20, 8.5), 0.05)


def test_patience_bounds_the_wait_for_a_floor() -> None:
    """After FLOOR_PATIENCE fitting iterations the switchover goes ahead even if still falling."""
    falling = [40 * 0.7**i for i in range(convergence.FLOOR_PATIENCE)]
    assert not convergence.at_floor(series(400, *falling[:-1]), 0.05)
    assert convergence.at_floor(series(400, *falling), 0.05)


def test_iterations_over_the_limit_do_not_count_towards_patience() -> None:
    """Only the trailing run of fitting estimates counts: one over the limit restarts it."""
    history = series(30, 20, 14, 100, 30, 20, 14)
    assert not convergence.at_floor(history, 0.05)


def test_cpu_cost_is_per_gb_moved_and_only_once_the_migration_ended() -> None:
    """cpu_s_per_gb divides the CPU seconds spent since the start by the GB put on the wire."""
    stats = MigrationStats("m", "dest", [DeviceStats("d", "ram", precopy_bytes=2 * 10**9)])
    assert stats.as_dict()["cpu_s_per_gb"] is None
    stats.started_cpu -= 1.0  # as if the migration had already cost a CPU second
    stats.end_cpu()
    assert stats.cpu_s is not None
    assert stats.cpu_s >= 1.0
    assert stats.as_dict()["cpu_s_per_gb"] == pytest.approx(stats.cpu_s / 2, abs=1e-3)


def test_the_link_meter_counts_only_saturated_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Acknowledged bytes count while the queue stayed full; otherwise the fallback rules."""
    from orchestrator.engine import stats as stats_module

    now = [0.0]
    monkeypatch.setattr(stats_module.time, "monotonic", lambda: now[0])
    busy = stats_module.BusyMeter()
    meter = stats_module.LinkMeter(busy)
    busy.start()
    busy.add(50 * MB)
    now[0] = 0.1  # the sender handed 50 MB to the socket in 0.1 s: 500 MB/s "sent"
    assert meter.rate() == pytest.approx(500 * MB)
    full = 4 * MB
    for step in range(1, 11):  # the peer acknowledges 12.5 MB/s while 4 MB wait
        meter.sample(int(step * 1.25 * MB), full)
        now[0] += 0.1
    assert meter.rate() == pytest.approx(12.5 * MB)
    meter.sample(20 * MB, 0)  # drained: this interval is not the link's pace
    now[0] += 10
    meter.sample(21 * MB, 0)
    assert meter.rate() == pytest.approx(12.5 * MB)


# -- the window's fixed work ------------------------------------------------------------


def test_the_window_cost_grows_with_the_device_count() -> None:
    """Each device adds DEVICE_WORK_S of frames and bookkeeping to the window."""
    one = window.window_cost(1, 0.0001, 5, 0.0003)
    many = window.window_cost(64, 0.0001, 5, 0.0003)
    assert many.total_s - one.total_s == pytest.approx(63 * window.DEVICE_WORK_S)
    assert one.total_s > window.WINDOW_BASE_S + 0.0003


def test_a_slow_measured_arc_raises_the_window_cost() -> None:
    """An arc into PRE_COPY measured at 50 ms is charged once per round of the window."""
    quick = window.window_cost(8, 0.0001, 5, 0.0003)
    slow = window.window_cost(8, 0.05, 5, 0.0003)
    assert slow.total_s - quick.total_s == pytest.approx(5 * (0.05 - 0.0001))


def test_the_per_device_term_keeps_a_tight_limit_from_switching_over() -> None:
    """What fits a 5 ms ceiling with one device does not with 64: the decision continues."""
    params = MigrationParams(downtime_limit_ms=5)
    pending = [progress(0, 1 * MB)]

    def action(devices: int) -> Action:
        cost = window.window_cost(devices, 0.00001, 5, 0.0003)
        est = convergence.estimate(pending, 1000 * MB, cost.total_s)
        return convergence.decide(est, params, iteration=1, elapsed_s=0, ack_pending=False)

    assert action(1) is Action.SWITCHOVER
    assert action(64) is Action.CONTINUE


def test_a_window_slower_than_predicted_scales_the_next_prediction_up() -> None:
    """A window whose fixed part took twice the prediction doubles the next work estimate."""
    history = window.WindowHistory()
    cost = window.window_cost(64, 0.00001, 5, 0.0003, history)
    work = cost.total_s - cost.round_trips_s
    # 1 MB of stop-copy at 1000 MB/s is 1 ms of transfer; the rest took 2 x the work.
    history.observe(cost, 0.001 + cost.round_trips_s + 2 * work, 1 * MB, 1000 * MB)
    assert history.scale() == pytest.approx(2.0)
    again = window.window_cost(64, 0.00001, 5, 0.0003, history)
    assert again.total_s == pytest.approx(cost.round_trips_s + 2 * work)
    assert again.parts_ms()["scale"] == 2.0


def test_a_fast_window_never_lowers_the_prediction_below_the_defaults() -> None:
    """Learning only raises: a window quicker than predicted leaves the scale at 1."""
    history = window.WindowHistory()
    cost = window.window_cost(8, 0.00001, 5, 0.0003)
    history.observe(cost, 0.0001, 0, 1000 * MB)
    assert history.scale() == 1.0
    assert window.window_cost(8, 0.00001, 5, 0.0003, history).total_s == cost.total_s


def test_one_slow_window_among_several_does_not_stick() -> None:
    """The smallest recent ratio counts: a burst of load passes; a bandwidth of 0 is ignored."""
    history = window.WindowHistory()
    cost = window.window_cost(1, 0.00001, 5, 0.0)
    work = cost.total_s
    for ratio in (1.5, 10.0, 2.0):
        history.observe(cost, ratio * work, 0, 1000 * MB)
    history.observe(cost, 0.0, 0, 0.0)
    assert history.windows() == 3
    assert history.scale() == pytest.approx(1.5)


def test_the_history_forgets_old_windows() -> None:
    """A slow stretch that ended holds back no migration past WINDOW_MEMORY_S."""
    history = window.WindowHistory()
    cost = window.window_cost(1, 0.00001, 5, 0.0)
    history.observe(cost, 10 * cost.total_s, 0, 1000 * MB, now=100.0)
    assert history.scale(now=100.0 + window.WINDOW_MEMORY_S) == pytest.approx(10.0)
    assert history.scale(now=101.0 + window.WINDOW_MEMORY_S) == 1.0
    assert history.windows(now=101.0 + window.WINDOW_MEMORY_S) == 0


def test_the_expected_parts_add_up_to_the_expected_downtime() -> None:
    """transfer + round trips + arcs + base + devices is the expected downtime, in ms."""
    cost = window.window_cost(8, 0.0001, 5, 0.0003)
    est = convergence.estimate([progress(0, 2 * MB)], 1000 * MB, cost.total_s)
    parts = convergence.expected_parts_ms(est, cost)
    summed = sum(parts[k] or 0.0 for k in ("transfer", "round_trips", "arcs", "base", "devices"))
    assert summed == pytest.approx(est.expected_downtime_s * 1e3, abs=0.01)
    assert parts["transfer"] == pytest.approx(2.0, abs=0.01)
    unknown = convergence.estimate([progress(0, 2 * MB)], 0.0, cost.total_s)
    assert convergence.expected_parts_ms(unknown, cost)["transfer"] is None


async def test_a_migration_reports_its_window_cost_and_teaches_the_history(
    make_ends: Callable[..., Any],
) -> None:
    """The stats show the per-device part for its 3 devices; the window is then learned."""
    ends = await make_ends([Spec(f"sim{i}", seed=i + 1) for i in range(3)])
    history = window.WindowHistory()
    migration = SourceMigration(
        ends.sources, ends.address, MigrationParams(), auth=ends.auth, window_history=history
    )
    stats = await migration.run()
    assert stats.status == Status.COMPLETED
    parts = stats.expected_downtime_parts_ms
    assert parts["devices"] == pytest.approx(3 * window.DEVICE_WORK_S * 1e3, abs=0.001)
    assert stats.as_dict()["expected_downtime_parts_ms"] == parts
    assert history.windows() == 1


def test_the_floor_rule_counts_only_the_measured_fixed_cost() -> None:
    """64 devices' default work does not make 4 ms of transfer look like the floor."""
    cost = window.window_cost(64, 0.0001, 5, 0.0003)
    history = [
        convergence.estimate([progress(0, int(mb * MB))], 1000 * MB, cost) for mb in (400, 4)
    ]
    assert history[-1].expected_downtime_s <= convergence.FLOOR_FACTOR * cost.total_s
    assert not convergence.at_floor(history, 0.05)
    assert history[-1].floor_downtime_s == pytest.approx(0.004 + cost.measured_s)


async def test_a_window_cut_short_by_the_hard_limit_teaches_the_history(
    make_ends: Callable[..., Any],
) -> None:
    """A switchover rolled back at the hard limit raises the next window's estimate."""
    ends = await make_ends([Spec("sim0"), Spec("sim1", seed=2)], hold_verdicts=True)
    history = window.WindowHistory()
    migration = SourceMigration(
        ends.sources,
        ends.address,
        MigrationParams(downtime_limit_ms=100, hard_downtime_limit=True),
        auth=ends.auth,
        window_history=history,
    )
    with pytest.raises(DowntimeExceeded):
        await migration.run()
    (await ends.held_verdict()).open.set()
    await ends.assert_source_intact()
    assert history.windows() == 1
    assert history.scale() > 1.0

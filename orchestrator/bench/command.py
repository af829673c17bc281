"""``livemig bench`` and ``livemig demo``: the command line's benchmark commands.

The command line loads this module by name when one of them runs (see
``orchestrator.cli.commands._BENCH_COMMANDS``), so production code never imports it.
"""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.bench import daemons, netbench
from orchestrator.bench import inprocess as bench
from orchestrator.bench.inprocess import BenchOptions
from orchestrator.bench.netbed import LinkSpec, NetBedUnavailable
from orchestrator.cli import commands as cli
from orchestrator.cli import exits, parser, progress


def bench_options(args: argparse.Namespace) -> BenchOptions:

    return BenchOptions(
        devices=args.devices,
        state_mib=args.state_mib,
        dirty_mbps=args.dirty_mbps,
        ram_mib=args.ram_mib,
        ram_dirty_mbps=args.ram_dirty_mbps,
        ram_working_set_mib=args.ram_working_set_mib,
        downtime_limit_ms=args.downtime_limit_ms,
        max_bandwidth_mbps=(
            None if args.max_bandwidth in (None, parser.Clear.NONE) else args.max_bandwidth / 1e6
        ),
        channels=args.channels,
    )


async def cmd_bench(args: argparse.Namespace) -> int:

    if args.repeat < 1:
        return cli._fail(args, exits.EXIT_USAGE, "InvalidParameter", "--repeat must be at least 1")
    if args.devices < 0 or (args.devices == 0 and not args.ram_mib):
        return cli._fail(
            args,
            exits.EXIT_USAGE,
            "InvalidParameter",
            "--devices must be at least 1 (or 0 with --ram-mib)",
        )
    if args.net is not None:
        try:
            args.net = LinkSpec.parse(args.net)
        except ValueError as exc:
            return cli._fail(args, exits.EXIT_USAGE, "InvalidParameter", f"--net: {exc}")
    if args.in_process:
        return await _bench_in_process(args)
    options = bench_options(args)
    try:
        runs = []
        for index in range(args.repeat):
            stats = await _bench_once(args, options)
            runs.append(stats)
            if not args.json:
                print(f"run {index + 1}/{args.repeat}:")
                for line in progress.summary_lines(stats):
                    print(f"  {line}")
    except daemons.DaemonFailed as exc:
        return cli._fail(args, exits.EXIT_UNREACHABLE, "DaemonFailed", str(exc))
    except NetBedUnavailable as exc:
        return cli._fail(args, exits.EXIT_USAGE, "NetBedUnavailable", str(exc))
    if args.plot is not None:
        daemons.plot(runs[-1], args.plot, limit_ms=args.downtime_limit_ms)
    return _bench_report(args, runs, bench.summarize(runs))


async def _bench_once(args: argparse.Namespace, options: BenchOptions) -> dict[str, Any]:
    """One bench migration: two local daemons, or two hosts of the network bed (--net)."""
    if args.net is None:
        return await daemons.run_once(options)
    return await netbench.run_over(args.net, options)


_PERCENTILES = ("min", "median", "p90", "max")


def _bench_report(
    args: argparse.Namespace, runs: list[dict[str, Any]], summary: dict[str, Any]
) -> int:
    if not (args.json and args.history):
        for stats in runs:
            stats.pop("history", None)
    if args.json:
        cli._print_json(runs[0] if len(runs) == 1 else {"summary": summary, "runs": runs})
    elif len(runs) > 1:
        print(f"over {len(runs)} runs (min / median / p90 / max):")
        for key, values in summary.items():
            if isinstance(values, dict):
                print(f"  {key}: " + " / ".join(f"{values[k]:.6g}" for k in _PERCENTILES))
    if any(r["status"] != "completed" for r in runs):
        return exits.EXIT_FAILED
    return exits.EXIT_OK if summary["verified"] else exits.EXIT_UNVERIFIED


async def _bench_in_process(args: argparse.Namespace) -> int:

    options = bench_options(args)
    runs = await bench.run_repeated(options, args.repeat)
    if args.plot is not None:
        daemons.plot(runs[-1], args.plot, limit_ms=args.downtime_limit_ms)
    if not args.json:
        for index, stats in enumerate(runs):
            print(f"run {index + 1}/{args.repeat} (in process):")
            for line in progress.summary_lines(stats):
                print(f"  {line}")
    return _bench_report(args, runs, bench.summarize(runs))


async def cmd_demo(args: argparse.Namespace) -> int:

    options = BenchOptions(devices=3, state_mib=16, dirty_mbps=20, ram_mib=64, ram_dirty_mbps=40)
    print(
        "livemig demo: two daemons on localhost; migrating 3 simulated devices (16 MiB, "
        "20 MB/s dirtied each) and a 64 MiB RAM device (40 MB/s dirtied) while they run..."
    )
    try:
        stats = await daemons.run_once(options)
    except daemons.DaemonFailed as exc:
        return cli._fail(args, exits.EXIT_UNREACHABLE, "DaemonFailed", str(exc))
    stats.pop("history", None)
    if args.json:
        cli._print_json(stats)
    else:
        print("\n".join(progress.summary_lines(stats)))
    if stats["status"] != "completed":
        return exits.STATUS_EXIT.get(stats["status"], exits.EXIT_FAILED)
    return exits.EXIT_OK if stats.get("verified") else exits.EXIT_UNVERIFIED

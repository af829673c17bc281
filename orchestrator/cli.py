"""The ``livemig`` command line.

Exit codes (every command):

    0  done (for migrate: completed)     4  cannot reach the daemon
    1  the migration failed              5  the daemon refused the command
    2  usage error                       6  bench: a migration was not byte-exact
    3  the migration was cancelled     130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar, cast

import structlog

from devices.fsm import Feature, describe
from orchestrator.params import MigrationParams, Policy

if TYPE_CHECKING:  # the bench modules load devices and transport: only when benchmarking
    from orchestrator.bench import BenchOptions

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_UNVERIFIED = 6
EXIT_INTERRUPTED = 130

_STATUS_EXIT = {"completed": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}

T = TypeVar("T")


def _features(text: str) -> Feature:
    """Parse ``STOP_COPY,P2P,PRE_COPY`` into feature flags, naming a bad flag."""
    flags = Feature(0)
    for name in filter(None, (part.strip().upper() for part in text.split(","))):
        try:
            flags |= Feature[name]
        except KeyError:
            known = ", ".join(f.name for f in Feature if f.name)
            raise argparse.ArgumentTypeError(f"unknown feature {name!r} (known: {known})") from None
    return flags


# -- migration parameters as options ----------------------------------------------------------


def _add_parameter_options(parser: argparse.ArgumentParser) -> None:
    """One option per MigrationParams field (``--downtime-limit-ms``), plus MB/s helpers."""
    group = parser.add_argument_group("migration parameters (default: the daemon's config)")
    defaults = MigrationParams()
    for field in dataclasses.fields(MigrationParams):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = f"(default {default.value if isinstance(default, Policy) else default})"
        kind = str(field.type)
        dest = f"param_{field.name}"
        if kind == "bool":
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif kind == "Policy":
            group.add_argument(flag, dest=dest, choices=[p.value for p in Policy], help=help_text)
        else:
            number = int if kind.startswith("int") else float
            group.add_argument(flag, dest=dest, type=number, metavar="N", help=help_text)
    group.add_argument(
        "--max-bandwidth-mbps",
        dest="max_bandwidth_mbps",
        type=float,
        metavar="MB/s",
        help="bandwidth cap in MB/s (10^6 bytes/s); sets max_bandwidth",
    )


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parameter options the user gave, by MigrationParams name."""
    given = {
        key.removeprefix("param_"): value
        for key, value in vars(args).items()
        if key.startswith("param_") and value is not None
    }
    if getattr(args, "max_bandwidth_mbps", None) is not None:
        given["max_bandwidth"] = args.max_bandwidth_mbps * 1e6
    return given


# -- the parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="livemig",
        description="Live migration of VFIO-style devices.",
        epilog=__doc__.split("\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, control: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if control:
            sub.add_argument(
                "--control",
                default=os.environ.get("LIVEMIG_CONTROL"),
                required="LIVEMIG_CONTROL" not in os.environ,
                metavar="SOCKET",
                help="the daemon's control socket (default: $LIVEMIG_CONTROL)",
            )
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sub

    table = command("fsm-table", "print the FSM's combination-transition paths", control=False)
    table.add_argument(
        "--features",
        type=_features,
        default=Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY,
        help="comma-separated feature flags (default: STOP_COPY,P2P,PRE_COPY)",
    )

    daemon = command("daemon", "run the daemon of this host", control=False)
    daemon.add_argument("--config", required=True, metavar="FILE", help="the TOML config")
    daemon.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: console on a terminal, JSON otherwise",
    )
    daemon.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")

    migrate = command("migrate", "migrate devices to another daemon, showing progress")
    migrate.add_argument("--to", required=True, metavar="ADDRESS", help="HOST:PORT or unix:PATH")
    migrate.add_argument(
        "--device",
        action="append",
        dest="devices",
        metavar="NAME",
        help="a device to migrate (repeatable; default: all)",
    )
    migrate.add_argument(
        "--detach", action="store_true", help="print the migration id and return at once"
    )
    _add_parameter_options(migrate)

    status = command("status", "the daemon, its devices and its newest migration")
    status.add_argument("--id", help="a migration id (default: the newest)")

    cancel = command("cancel", "cancel a migration; waits until the source devices run again")
    cancel.add_argument("--id", help="a migration id (default: the newest)")

    setp = command("set", "change parameters of the running migration (or the defaults)")
    setp.add_argument("--id", help="a migration id (default: the running one)")
    _add_parameter_options(setp)

    cont = command("continue", "let a migration paused before the switchover go on")
    cont.add_argument("--id", help="a migration id (default: the newest)")

    command("devices", "each device: name, kind, state, feature flags")
    command("digests", "SHA-256 of each device's state (compare two hosts after a migration)")
    resume = command(
        "resume", "run stopped devices again (after a migration whose outcome is unknown)"
    )
    resume.add_argument("devices", nargs="+", metavar="DEVICE")

    events = command("events", "print the daemon's events as they come")
    events.add_argument(
        "--event", action="append", dest="events", metavar="NAME", help="only these (repeatable)"
    )
    events.add_argument("--count", type=int, help="stop after this many events")

    bench = command("bench", "a whole migration between two local daemons", control=False)
    bench.add_argument("--devices", type=int, default=4, help="simulated devices (default 4)")
    bench.add_argument("--state-mib", type=float, default=16, help="state per device (MiB)")
    bench.add_argument("--dirty-mbps", type=float, default=10, help="dirty rate per device")
    bench.add_argument("--ram-mib", type=float, default=0, help="add a RAM device this big")
    bench.add_argument("--ram-dirty-mbps", type=float, default=0)
    bench.add_argument("--ram-working-set-mib", type=float, help="default: half the RAM")
    bench.add_argument("--downtime-limit-ms", type=float, default=100)
    bench.add_argument("--max-bandwidth-mbps", type=float, help="bandwidth cap (MB/s)")
    bench.add_argument("--channels", type=int, help="connections (default: 4, one per device)")
    bench.add_argument(
        "--repeat", type=int, default=1, metavar="K", help="runs (min/median/p90/max)"
    )
    bench.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the convergence")
    bench.add_argument(
        "--in-process", action="store_true", help="both ends in this process (orchestrator.bench)"
    )

    command("demo", "two daemons, one migration, the stats: nothing to set up", control=False)
    return parser


# -- running ------------------------------------------------------------------------------------


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at each write (tests swap it), not the one at configure."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _configure_logging(fmt: str = "auto", level: str = "warning") -> None:
    """structlog to stderr: console on a terminal, JSON lines otherwise."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop: the one place the event loop is chosen."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=None, separators=(",", ":")), flush=True)


async def _with_client(args: argparse.Namespace, body: Callable[[Any], Awaitable[int]]) -> int:
    """Connect to the daemon, run ``body``, map control errors onto exit codes."""
    from orchestrator.control import ControlClient, ControlError, DaemonUnreachable

    try:
        async with await ControlClient.connect(args.control) as client:
            return await body(client)
    except DaemonUnreachable as exc:
        return _fail(args, EXIT_UNREACHABLE, "DaemonUnreachable", exc.desc)
    except ControlError as exc:
        return _fail(args, EXIT_REFUSED, exc.error_class, exc.desc)


def _fail(args: argparse.Namespace, code: int, error_class: str, desc: str) -> int:
    if getattr(args, "json", False):
        _print_json({"error": {"class": error_class, "desc": desc}})
    print(f"livemig {args.command}: {desc}", file=sys.stderr)
    return code


async def _cmd_migrate(args: argparse.Namespace) -> int:
    from orchestrator import daemonbench, progress

    async def body(client: Any) -> int:
        parameters = _parameters(args)
        if args.detach:
            arguments: dict[str, Any] = {"destination": args.to, "parameters": parameters}
            if args.devices:
                arguments["devices"] = args.devices
            started = await client.execute("migrate", **arguments)
            _print_json(started) if args.json else print(started["id"])
            return EXIT_OK
        view = None if args.json else progress.view_for(sys.stdout)

        def on_event(message: dict[str, Any]) -> None:
            if view is None:
                return
            if message["event"] == "MIGRATION_PASS":
                view.update(message["data"])
            elif message["event"] == "MIGRATION" and "stats" not in message["data"]:
                view.status(message["data"]["status"])  # the summary tells the end

        try:
            stats = await daemonbench.migrate(
                client, args.to, parameters, devices=args.devices, on_event=on_event
            )
        finally:
            if view is not None:
                view.close()
        stats.pop("history", None)
        stats.pop("switchover_at_s", None)
        if args.json:
            _print_json(stats)
        else:
            print("\n".join(progress.summary_lines(stats)))
        if stats["status"] != "completed":
            print(f"livemig migrate: {stats['status']}: {stats['error']}", file=sys.stderr)
        return _STATUS_EXIT.get(stats["status"], EXIT_FAILED)

    return await _with_client(args, body)


async def _cmd_status(args: argparse.Namespace) -> int:
    from orchestrator import progress
    from orchestrator.control import ControlError

    async def body(client: Any) -> int:
        daemon = await client.execute("query-daemon")
        devices = await client.execute("query-devices")
        try:
            arguments = {} if args.id is None else {"id": args.id}
            migration = await client.execute("query-migrate", **arguments)
        except ControlError as exc:
            if exc.error_class != "MigrationNotFound" or args.id is not None:
                raise
            migration = None
        if args.json:
            _print_json({"daemon": daemon, "devices": devices, "migration": migration})
            return EXIT_OK
        print(
            f"daemon {daemon['name']} (pid {daemon['pid']}), listening on "
            f"{', '.join(daemon['listen'])}"
        )
        _print_devices(devices)
        if migration is None:
            print("no migration yet")
        else:
            print(f"migration {migration['migration_id']} to {migration['destination']}:")
            for line in progress.summary_lines(migration):
                print(f"  {line}")
        return EXIT_OK

    return await _with_client(args, body)


def _print_devices(devices: list[dict[str, Any]]) -> None:
    for device in devices:
        busy = f"  (migration {device['migration']})" if device["migration"] else ""
        print(
            f"{device['name']:<16} {device['kind']:<10} {device['state']:<13} "
            f"{','.join(device['features'])}{busy}"
        )


async def _cmd_cancel(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        await client.subscribe(["MIGRATION"])
        arguments = {} if args.id is None else {"id": args.id}
        migration_id = (await client.execute("migrate-cancel", **arguments))["id"]
        final = await client.next_event(
            lambda m: m["data"].get("id") == migration_id and "stats" in m["data"], timeout=60
        )
        devices = await client.execute("query-devices")
        result = {"id": migration_id, "status": final["data"]["status"], "devices": devices}
        if args.json:
            _print_json(result)
        else:
            print(f"migration {migration_id}: {result['status']}")
            _print_devices(devices)
        return EXIT_OK

    return await _with_client(args, body)


async def _cmd_set(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        parameters = _parameters(args)
        if not parameters:
            return _fail(args, EXIT_USAGE, "InvalidParameter", "no parameter given")
        arguments: dict[str, Any] = {"parameters": parameters}
        if args.id is not None:
            arguments["id"] = args.id
        result = await client.execute("migrate-set-parameters", **arguments)
        if args.json:
            _print_json(result)
        else:
            for key in parameters:
                print(f"{key} = {result[key]}")
        return EXIT_OK

    return await _with_client(args, body)


async def _cmd_continue(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        arguments = {} if args.id is None else {"id": args.id}
        result = await client.execute("migrate-continue", **arguments)
        _print_json(result) if args.json else print(f"migration {result['id']} continues")
        return EXIT_OK

    return await _with_client(args, body)


async def _cmd_devices(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        devices = await client.execute("query-devices")
        _print_json(devices) if args.json else _print_devices(devices)
        return EXIT_OK

    return await _with_client(args, body)


async def _cmd_digests(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        digests = await client.execute("query-digests")
        if args.json:
            _print_json(digests)
        else:
            for name, digest in digests.items():
                print(f"{name:<16} {digest}")
        return EXIT_OK

    return await _with_client(args, body)


async def _cmd_resume(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        states = await client.execute("device-resume", devices=args.devices)
        if args.json:
            _print_json(states)
        else:
            for name, state in states.items():
                print(f"{name:<16} {state}")
        return EXIT_OK

    return await _with_client(args, body)


async def _cmd_events(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        await client.subscribe(args.events)
        seen = 0
        async for message in client.events():
            if args.json:
                _print_json(message)
            else:
                data = {k: v for k, v in message["data"].items() if k != "devices"}
                print(f"{message['event']}: {json.dumps(data)}", flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                return EXIT_OK
        return _fail(args, EXIT_UNREACHABLE, "DaemonUnreachable", "the daemon went away")

    return await _with_client(args, body)


def _bench_options(args: argparse.Namespace) -> BenchOptions:
    from orchestrator.bench import BenchOptions

    return BenchOptions(
        devices=args.devices,
        state_mib=args.state_mib,
        dirty_mbps=args.dirty_mbps,
        ram_mib=args.ram_mib,
        ram_dirty_mbps=args.ram_dirty_mbps,
        ram_working_set_mib=args.ram_working_set_mib,
        downtime_limit_ms=args.downtime_limit_ms,
        max_bandwidth_mbps=args.max_bandwidth_mbps,
        channels=args.channels,
    )


async def _cmd_bench(args: argparse.Namespace) -> int:
    from orchestrator import bench, daemonbench, progress

    if args.repeat < 1:
        return _fail(args, EXIT_USAGE, "InvalidParameter", "--repeat must be at least 1")
    if args.in_process:
        return await _bench_in_process(args)
    options = _bench_options(args)
    try:
        runs = []
        for index in range(args.repeat):
            stats = await daemonbench.run_once(options)
            runs.append(stats)
            if not args.json:
                print(f"run {index + 1}/{args.repeat}:")
                for line in progress.summary_lines(stats):
                    print(f"  {line}")
    except daemonbench.DaemonFailed as exc:
        return _fail(args, EXIT_UNREACHABLE, "DaemonFailed", str(exc))
    if args.plot is not None:
        daemonbench.plot(runs[-1], args.plot, limit_ms=args.downtime_limit_ms)
    return _bench_report(args, runs, bench.summarize(runs))


_PERCENTILES = ("min", "median", "p90", "max")


def _bench_report(
    args: argparse.Namespace, runs: list[dict[str, Any]], summary: dict[str, Any]
) -> int:
    for stats in runs:
        stats.pop("history", None)
    if args.json:
        _print_json(runs[0] if len(runs) == 1 else {"summary": summary, "runs": runs})
    elif len(runs) > 1:
        print(f"over {len(runs)} runs (min / median / p90 / max):")
        for key, values in summary.items():
            if isinstance(values, dict):
                print(f"  {key}: " + " / ".join(f"{values[k]:.6g}" for k in _PERCENTILES))
    if any(r["status"] != "completed" for r in runs):
        return EXIT_FAILED
    return EXIT_OK if summary["verified"] else EXIT_UNVERIFIED


async def _bench_in_process(args: argparse.Namespace) -> int:
    from orchestrator import bench, daemonbench, progress

    options = _bench_options(args)
    runs = await bench.run_repeated(options, args.repeat)
    if args.plot is not None:
        daemonbench.plot(runs[-1], args.plot, limit_ms=args.downtime_limit_ms)
    if not args.json:
        for index, stats in enumerate(runs):
            print(f"run {index + 1}/{args.repeat} (in process):")
            for line in progress.summary_lines(stats):
                print(f"  {line}")
    return _bench_report(args, runs, bench.summarize(runs))


async def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator import daemonbench, progress
    from orchestrator.bench import BenchOptions

    options = BenchOptions(devices=3, state_mib=16, dirty_mbps=20, ram_mib=64, ram_dirty_mbps=40)
    print(
        "livemig demo: two daemons on localhost; migrating 3 simulated devices (16 MiB, "
        "20 MB/s dirtied each) and a 64 MiB RAM device (40 MB/s dirtied) while they run..."
    )
    try:
        stats = await daemonbench.run_once(options)
    except daemonbench.DaemonFailed as exc:
        return _fail(args, EXIT_UNREACHABLE, "DaemonFailed", str(exc))
    stats.pop("history", None)
    if args.json:
        _print_json(stats)
    else:
        print("\n".join(progress.summary_lines(stats)))
    if stats["status"] != "completed":
        return _STATUS_EXIT.get(stats["status"], EXIT_FAILED)
    return EXIT_OK if stats.get("verified") else EXIT_UNVERIFIED


_COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "migrate": _cmd_migrate,
    "status": _cmd_status,
    "cancel": _cmd_cancel,
    "set": _cmd_set,
    "continue": _cmd_continue,
    "devices": _cmd_devices,
    "digests": _cmd_digests,
    "resume": _cmd_resume,
    "events": _cmd_events,
    "bench": _cmd_bench,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``livemig`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "transport"]:
        from transport import bench as transport_bench

        return transport_bench.main(argv[2:])
    args = build_parser().parse_args(argv)
    if args.command == "fsm-table":
        print(describe(args.features))
        return EXIT_OK
    try:
        if args.command == "daemon":
            from orchestrator import daemon

            _configure_logging(args.log_format, args.log_level)
            return _run(daemon.serve(args.config))
        _configure_logging()
        return _run(_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        if args.command == "migrate":
            print(
                "\nlivemig migrate: stopped watching; the migration goes on "
                "(livemig status / livemig cancel)",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

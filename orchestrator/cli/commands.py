"""The ``livemig`` command line.

Exit codes (every command):

    0  done (for migrate: completed)     5  the daemon refused the command
    1  the migration failed; the source  6  bench: a migration was not byte-exact
       devices run again                 7  outcome unknown: the link died after
    2  usage error                          COMMIT; the source devices stay stopped
    3  the migration was cancelled       8  split outcome: after COMMIT some devices
    4  cannot reach the daemon              did not resume on the destination
                                       130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import functools
import importlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

import structlog

from devices.fsm import Feature, describe
from orchestrator.engine.params import MigrationParams, Policy, field_types
from orchestrator.service.protocol import DEFAULT_SOCKET, VERSION
from transport.checks import kinds_of

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_UNVERIFIED = 6
EXIT_OUTCOME_UNKNOWN = 7
EXIT_SPLIT = 8
EXIT_INTERRUPTED = 130

_STATUS_EXIT = {"completed": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
_OUTCOME_EXIT = {"unknown": EXIT_OUTCOME_UNKNOWN, "split": EXIT_SPLIT}

T = TypeVar("T")


def _names(text: str) -> list[str]:
    """Parse ``A,B`` into device names, refusing an empty one."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty device name in {text!r}")
    return names


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


class _Clear(enum.Enum):
    """``none`` on the command line: unset an optional parameter (send null)."""

    NONE = "none"


#: Bandwidth units the CLI reads; a bare number is MB/s, as the progress shows.
_UNITS = {
    "B/s": 1.0,
    "kB/s": 1e3,
    "KB/s": 1e3,
    "MB/s": 1e6,
    "GB/s": 1e9,
    "KiB/s": float(1 << 10),
    "MiB/s": float(1 << 20),
    "GiB/s": float(1 << 30),
}
_BANDWIDTH = re.compile(r"(?P<number>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>\S+)?")


def _bandwidth(text: str) -> float | _Clear:
    """``100`` (MB/s), ``100MB/s``, ``1GiB/s`` or ``none`` (no value) -> bytes/s."""
    if text.strip().lower() == "none":
        return _Clear.NONE
    match = _BANDWIDTH.fullmatch(text.strip())
    unit = match.group("unit") or "MB/s" if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is no bandwidth: give MB/s (100), a unit ({', '.join(_UNITS)}) or none"
        )
    value = float(match.group("number")) * _UNITS[unit]
    if not value > 0:
        raise argparse.ArgumentTypeError(f"bandwidth must be > 0, got {text!r} (none: no limit)")
    return value


def _number(kind: type[int] | type[float], optional: bool) -> Callable[[str], Any]:
    """An argparse type: a finite int or float, or ``none`` when the parameter is optional."""

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return _Clear.NONE
        try:
            value = kind(text)
        except ValueError:
            name = "an integer" if kind is int else "a number"
            extra = " or none" if optional else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}{extra}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        return value

    return parse


def _unit(name: str) -> str:
    if "bandwidth" in name:
        return "MB/s, or 500MB/s, 1GiB/s, ...; "
    if name.endswith("_ms"):
        return "ms; "
    if name.endswith("_s"):
        return "seconds; "
    return ""


def _shown(name: str, value: Any) -> str:
    """A built-in default as the option takes it."""
    if value is None:
        return "none"
    if isinstance(value, Policy):
        return value.value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if "bandwidth" in name:
        return f"{value / 1e6:g}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _param_line(name: str, value: Any) -> str:
    """``max_bandwidth  100 MB/s``: a parameter for people, in the units the options take."""
    unit = _unit(name).split(",")[0].removesuffix("; ") if value is not None else ""
    return f"{name:<26} {_shown(name, value)} {unit}".rstrip()


def _add_parameter_options(parser: argparse.ArgumentParser) -> None:
    """One option per MigrationParams field (``--downtime-limit-ms``), defaults from it."""
    group = parser.add_argument_group(
        "migration parameters",
        "Options not given take the daemon's [migration] config, which may differ from the "
        "built-in defaults shown here (`livemig params` prints the daemon's). Optional ones "
        "take `none` to unset a value.",
    )
    defaults = MigrationParams()
    for field in dataclasses.fields(MigrationParams):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        hint = field_types()[field.name]
        help_text = f"({_unit(field.name)}built-in default {_shown(field.name, default)})"
        dest = f"param_{field.name}"
        if hint is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif hint is Policy:
            group.add_argument(flag, dest=dest, choices=[p.value for p in Policy], help=help_text)
        elif "bandwidth" in field.name:
            group.add_argument(flag, dest=dest, type=_bandwidth, metavar="RATE", help=help_text)
        else:
            number = float if float in kinds_of(hint) else int
            group.add_argument(
                flag,
                dest=dest,
                type=_number(number, type(None) in kinds_of(hint)),
                metavar="N",
                help=help_text,
            )


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parameter options the user gave, by MigrationParams name (``none`` as None)."""
    return {
        key.removeprefix("param_"): None if value is _Clear.NONE else value
        for key, value in vars(args).items()
        if key.startswith("param_") and value is not None
    }


# -- the parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="livemig",
        description="Live migration of VFIO-style devices.",
        epilog=__doc__.split("\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"livemig {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, control: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if control:
            sub.add_argument(
                "--control",
                default=os.environ.get("LIVEMIG_CONTROL", str(DEFAULT_SOCKET)),
                metavar="SOCKET",
                help=f"the daemon's control socket, or tcp:HOST:PORT for its TLS control "
                f"listener (default: $LIVEMIG_CONTROL, else {DEFAULT_SOCKET}, where a daemon "
                "listens unless its config says otherwise)",
            )
            for option, what in (
                ("cert", "this client's certificate"),
                ("key", "its private key (default: in the certificate file)"),
                ("ca", "the CA that signed the daemon's certificate"),
            ):
                variable = f"LIVEMIG_{option.upper()}"
                sub.add_argument(
                    f"--{option}",
                    default=os.environ.get(variable),
                    metavar="FILE",
                    help=f"for tcp:HOST:PORT: {what} (default: ${variable})",
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

    params = command("params", "the parameters in force: a migration's, else the daemon's defaults")
    params.add_argument("--id", help="a migration id (default: the running one)")

    command("devices", "each device: name, kind, state, feature flags")
    command("digests", "SHA-256 of each device's state (compare two hosts after a migration)")
    resume = command("resume", "run stopped devices again, in P2P order")
    resume.add_argument("devices", nargs="+", metavar="DEVICE")
    resume.add_argument(
        "--force",
        action="store_true",
        help="also devices that migrated away or whose outcome is unknown: only after "
        "checking that the other host does not run them",
    )

    incoming = command("incoming", "arm devices to receive one migration each")
    incoming.add_argument(
        "--devices",
        type=_names,
        metavar="A,B",
        help="devices to arm (default: every idle or migrated-away device)",
    )
    incoming.add_argument("--from", dest="peer", metavar="NAME", help="only this source daemon")
    incoming.add_argument("--timeout-s", type=float, metavar="S", help="the arm lapses after S")

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
    bench.add_argument(
        "--max-bandwidth", type=_bandwidth, metavar="RATE", help="bandwidth cap (MB/s, or a unit)"
    )
    bench.add_argument("--channels", type=int, help="connections (default: 4, one per device)")
    bench.add_argument(
        "--repeat", type=int, default=1, metavar="K", help="runs (min/median/p90/max)"
    )
    bench.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the convergence")
    bench.add_argument(
        "--in-process",
        action="store_true",
        help="both ends in this process (bench/inprocess.py)",
    )
    bench.add_argument(
        "--net",
        metavar="SPEC",
        help="the daemons on two hosts (network namespaces) joined by a link shaped as SPEC, "
        "e.g. rate=1gbit or rate=100mbit,delay=15ms,loss=0.1%% (delay and loss need netem; "
        "root)",
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
    from orchestrator.service.client import ControlClient
    from orchestrator.service.protocol import ControlError, DaemonUnreachable

    context = None
    if args.control.startswith("tcp:"):
        from transport.auth import client_tls_context

        if args.ca is None or args.cert is None:
            return _fail(
                args,
                EXIT_USAGE,
                "InvalidParameter",
                "a tcp: control address needs --ca and --cert (and --key unless the "
                "certificate file holds it): the daemon accepts only mutual TLS",
            )
        try:
            context = client_tls_context(args.ca, args.cert, args.key)
        except (OSError, ValueError) as exc:
            return _fail(args, EXIT_USAGE, "InvalidParameter", f"cannot load the TLS files: {exc}")
    try:
        async with await ControlClient.connect(args.control, ssl_context=context) as client:
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


async def _cmd_migrate(args: argparse.Namespace, client: Any) -> int:
    from orchestrator.cli import follow, progress

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
        stats = await follow.migrate(
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
        for name, where in (stats.get("placement") or {}).items():
            print(f"  {name}: {where}", file=sys.stderr)
    outcome_code = _OUTCOME_EXIT.get(stats.get("outcome") or "")
    if outcome_code is not None:
        return outcome_code
    return _STATUS_EXIT.get(stats["status"], EXIT_FAILED)


async def _cmd_status(args: argparse.Namespace, client: Any) -> int:
    from orchestrator.cli import progress
    from orchestrator.service.protocol import ControlError

    daemon = await client.execute("query-daemon")
    devices = await client.execute("query-devices")
    running = [
        m["id"]
        for m in await client.execute("query-migrations")
        if m["direction"] == "outgoing" and m["status"] not in _STATUS_EXIT
    ]
    migrations: list[dict[str, Any]] = []
    if args.id is None and len(running) > 1:  # each of them: no guessing
        migrations = [await client.execute("query-migrate", id=i) for i in running]
    else:
        try:
            arguments = {} if args.id is None else {"id": args.id}
            migrations = [await client.execute("query-migrate", **arguments)]
        except ControlError as exc:
            if exc.error_class != "MigrationNotFound" or args.id is not None:
                raise
    if args.json:
        single = migrations[0] if len(migrations) == 1 else None
        _print_json(
            {"daemon": daemon, "devices": devices, "migration": single}
            | ({"migrations": migrations} if len(migrations) > 1 else {})
        )
        return EXIT_OK
    print(
        f"daemon {daemon['name']} (pid {daemon['pid']}), listening on {', '.join(daemon['listen'])}"
    )
    _print_devices(devices)
    if not migrations:
        print("no migration yet")
    for migration in migrations:
        if migration.get("direction") == "incoming":
            print(
                f"incoming migration {migration['id']} from {migration['peer']}: "
                f"{migration['status']}, {migration['received_bytes']} bytes received"
            )
            if migration.get("error"):
                print(f"  {migration['error']}")
            continue
        print(f"migration {migration['migration_id']} to {migration['destination']}:")
        for line in progress.summary_lines(migration):
            print(f"  {line}")
    return EXIT_OK


def _print_devices(devices: list[dict[str, Any]]) -> None:
    for device in devices:
        busy = f"  (migration {device['migration']})" if device["migration"] else ""
        owner = device.get("owner", "")
        if device.get("peer"):
            owner += f" ({device['peer']}, {device.get('migration_id')}, {device.get('at')})"
        armed = "  armed" if device.get("armed") else ""
        print(
            f"{device['name']:<16} {device['kind']:<10} {device['state']:<13} "
            f"{','.join(device['features']):<23} {owner}{armed}{busy}"
        )


def _print_by_name(args: argparse.Namespace, values: dict[str, str]) -> int:
    """A device name -> text reply: as JSON, or a line per device."""
    if args.json:
        _print_json(values)
    else:
        for name, value in values.items():
            print(f"{name:<16} {value}")
    return EXIT_OK


async def _cmd_cancel(args: argparse.Namespace, client: Any) -> int:
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


async def _cmd_set(args: argparse.Namespace, client: Any) -> int:
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
            print(_param_line(key, result[key]))
    return EXIT_OK


async def _cmd_params(args: argparse.Namespace, client: Any) -> int:
    arguments = {} if args.id is None else {"id": args.id}
    result = await client.execute("query-migrate-parameters", **arguments)
    if args.json:
        _print_json(result)
    else:
        for field in dataclasses.fields(MigrationParams):
            print(_param_line(field.name, result[field.name]))
    return EXIT_OK


async def _cmd_continue(args: argparse.Namespace, client: Any) -> int:
    arguments = {} if args.id is None else {"id": args.id}
    result = await client.execute("migrate-continue", **arguments)
    _print_json(result) if args.json else print(f"migration {result['id']} continues")
    return EXIT_OK


async def _cmd_devices(args: argparse.Namespace, client: Any) -> int:
    devices = await client.execute("query-devices")
    _print_json(devices) if args.json else _print_devices(devices)
    return EXIT_OK


async def _cmd_digests(args: argparse.Namespace, client: Any) -> int:
    return _print_by_name(args, await client.execute("query-digests"))


async def _cmd_resume(args: argparse.Namespace, client: Any) -> int:
    states = await client.execute("device-resume", devices=args.devices, force=args.force)
    return _print_by_name(args, states)


async def _cmd_incoming(args: argparse.Namespace, client: Any) -> int:
    arguments: dict[str, Any] = {}
    if args.devices is not None:
        arguments["devices"] = args.devices
    if args.peer is not None:
        arguments["from"] = args.peer
    if args.timeout_s is not None:
        arguments["timeout-s"] = args.timeout_s
    result = await client.execute("migrate-incoming", **arguments)
    if args.json:
        _print_json(result)
    else:
        sender = f" from {result['from']}" if result["from"] else ""
        print(f"armed {', '.join(result['armed'])} to receive one migration{sender}")
    return EXIT_OK


async def _cmd_events(args: argparse.Namespace, client: Any) -> int:
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


#: The commands that talk to a daemon, by name: each gets the parsed arguments and a
#: connected client; _with_client connects (TLS for tcp:) and maps errors to exit codes.
_COMMANDS: dict[str, Callable[[argparse.Namespace, Any], Coroutine[Any, Any, int]]] = {
    "migrate": _cmd_migrate,
    "status": _cmd_status,
    "cancel": _cmd_cancel,
    "set": _cmd_set,
    "continue": _cmd_continue,
    "params": _cmd_params,
    "devices": _cmd_devices,
    "digests": _cmd_digests,
    "resume": _cmd_resume,
    "incoming": _cmd_incoming,
    "events": _cmd_events,
}


#: Commands the benchmark room provides (orchestrator/bench/command.py): loaded by name
#: when run, so no production module imports a benchmark.
_BENCH_COMMANDS = {"bench": "cmd_bench", "demo": "cmd_demo"}


def _benchmark(module: str) -> Any:
    """A module of orchestrator.bench, imported only when a benchmark command runs."""
    return importlib.import_module(f"orchestrator.bench.{module}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``livemig`` console script."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (``livemig devices | head -1``): stop quietly, and keep
        # the interpreter's final flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "transport"]:
        return int(_benchmark("transportbench").main(argv[2:]))
    args = build_parser().parse_args(argv)
    if args.command == "fsm-table":
        print(describe(args.features))
        return EXIT_OK
    try:
        if args.command == "daemon":
            from orchestrator.service import runner

            _configure_logging(args.log_format, args.log_level)
            return _run(runner.serve(args.config))
        _configure_logging()
        if args.command in _BENCH_COMMANDS:
            run = getattr(_benchmark("command"), _BENCH_COMMANDS[args.command])(args)
        else:
            run = _with_client(args, functools.partial(_COMMANDS[args.command], args))
        code = int(_run(run))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (livemig devices | head -1): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        if args.command == "migrate":
            print(
                "\nlivemig migrate: stopped watching; the migration goes on "
                "(livemig status / livemig cancel)",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED

"""The ``livemig`` commands: a table of handlers, each run with a connected client.

The grammar is in :mod:`orchestrator.cli.parser`, the exit codes in :mod:`orchestrator.cli.exits`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from devices.fsm import describe
from orchestrator.cli import runtime
from orchestrator.cli.exits import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTCOME_UNKNOWN,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    STATUS_EXIT,
    cancel_exit,
    migrate_exit,
)
from orchestrator.cli.parser import build_parser, given_parameters, param_line
from orchestrator.engine.params import MigrationParams

#: Owners (query-devices) whose device runs a workload on the daemon's host.
_WORKLOAD_OWNERS = ("running here", "received")
#: How long ``livemig cancel`` waits for the migration to end (rolled back or not).
CANCEL_WAIT_S = 60.0


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

    parameters = given_parameters(args)
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
    return migrate_exit(stats)


async def _cmd_status(args: argparse.Namespace, client: Any) -> int:
    from orchestrator.cli import progress
    from orchestrator.service.protocol import ControlError

    daemon = await client.execute("query-daemon")
    devices = await client.execute("query-devices")
    listed = await client.execute("query-migrations")
    running = _still_sending(listed)
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
    if args.id is None:  # and whatever arrives now, which the newest outgoing one hides
        shown = {m.get("migration_id") or m.get("id") for m in migrations}
        migrations += [
            m
            for m in listed
            if m["direction"] == "incoming" and m["status"] == "active" and m["id"] not in shown
        ]
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
    from orchestrator.service.protocol import DaemonUnreachable

    await client.subscribe(["MIGRATION"])
    arguments = {} if args.id is None else {"id": args.id}
    migration_id = (await client.execute("migrate-cancel", **arguments))["id"]
    look = f"livemig status --id {migration_id} and livemig devices show where the devices are"

    def lost(exc: DaemonUnreachable) -> int:
        return _fail(
            args,
            EXIT_UNREACHABLE,
            "DaemonUnreachable",
            f"{exc.desc} before migration {migration_id} ended: how it ended is not known; "
            f"once the daemon is back, {look}",
        )

    try:
        final = await client.next_event(
            lambda m: m["data"].get("id") == migration_id and "stats" in m["data"],
            timeout=CANCEL_WAIT_S,
        )
    except TimeoutError:
        try:
            status = (await client.execute("query-migrate", id=migration_id))["status"]
        except DaemonUnreachable as exc:
            return lost(exc)
        return _fail(
            args,
            EXIT_OUTCOME_UNKNOWN,
            "OutcomeUnknown",
            f"migration {migration_id} took the cancel but had not ended {CANCEL_WAIT_S:g} s "
            f"after the cancel (status {status}): how it ends is not known yet; {look}",
        )
    except DaemonUnreachable as exc:
        return lost(exc)
    data = final["data"]
    stats = data["stats"]
    try:
        devices = await client.execute("query-devices")
    except DaemonUnreachable as exc:  # the ending is known all the same: its code stands
        print(f"livemig cancel: no device list ({exc.desc})", file=sys.stderr)
        devices = []
    result = {
        "id": migration_id,
        "status": data["status"],
        "outcome": stats.get("outcome"),
        "error": data.get("error"),
        "devices": devices,
    }
    if args.json:
        _print_json(result)
    else:
        print(f"migration {migration_id}: {result['status']}")
        _print_devices(devices)
    code, what = cancel_exit(migration_id, result)
    if what:
        print(f"livemig cancel: {what}", file=sys.stderr)
        for name, where in (stats.get("placement") or {}).items():
            print(f"  {name}: {where}", file=sys.stderr)
    return code


async def _cmd_set(args: argparse.Namespace, client: Any) -> int:
    parameters = given_parameters(args)
    if not parameters:
        return _fail(args, EXIT_USAGE, "InvalidParameter", "no parameter given")
    arguments: dict[str, Any] = {"parameters": parameters}
    if args.id is not None:
        arguments["id"] = args.id
    result = await client.execute("migrate-set-parameters", **arguments)
    if args.json:
        _print_json(result)
        return EXIT_OK
    # Without --id and with nothing going out the daemon changed its defaults: say so,
    # since the values alone read like a change to the migration one may be watching.
    if args.id is None and not await _sending(client):
        print("no migration runs from this daemon: these are the defaults of the next one")
    for key in parameters:
        print(param_line(key, result[key]))
    return EXIT_OK


async def _sending(client: Any) -> list[str]:
    """The ids of this daemon's outgoing migrations that still run."""
    return _still_sending(await client.execute("query-migrations"))


def _still_sending(migrations: list[dict[str, Any]]) -> list[str]:
    """The ids of the outgoing migrations that still run, of a query-migrations reply."""
    return [
        m["id"]
        for m in migrations
        if m["direction"] == "outgoing" and m["status"] not in STATUS_EXIT
    ]


async def _cmd_params(args: argparse.Namespace, client: Any) -> int:
    arguments = {} if args.id is None else {"id": args.id}
    result = await client.execute("query-migrate-parameters", **arguments)
    if args.json:
        _print_json(result)
    else:
        for field in dataclasses.fields(MigrationParams):
            print(param_line(field.name, result[field.name]))
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
    # Only named devices can be running a workload here: say what arming them risks.
    devices = await client.execute("query-devices")
    running = [
        d for d in devices if d["name"] in result["armed"] and d["owner"] in _WORKLOAD_OWNERS
    ]
    if running:
        owners = ", ".join(sorted({d["owner"] for d in running}))
        print(
            f"livemig incoming: warning: {', '.join(d['name'] for d in running)} run a "
            f"workload here (owner: {owners}); a migration into them replaces its state",
            file=sys.stderr,
        )
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

            runtime.configure_logging(args.log_format, args.log_level)
            return runtime.run(runner.serve(args.config))
        runtime.configure_logging()
        if args.command in _BENCH_COMMANDS:
            run = getattr(_benchmark("command"), _BENCH_COMMANDS[args.command])(args)
        else:
            run = _with_client(args, functools.partial(_COMMANDS[args.command], args))
        code = int(runtime.run(run))
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

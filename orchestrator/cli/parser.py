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
import dataclasses
import enum
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devices.fsm import Feature
from orchestrator.engine.params import MigrationParams, Policy, field_types
from orchestrator.service.protocol import DEFAULT_SOCKET, VERSION
from transport.address import parse_destination
from transport.checks import kinds_of


def _names(text: str) -> list[str]:
    """Parse ``A,B`` into device names, refusing an empty one."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty device name in {text!r}")
    return names


def _address(text: str) -> str:
    """A destination address once the transport can parse it (names the problem); a
    relative ``unix:`` path is made absolute here, since the daemon runs elsewhere."""
    try:
        kind, path, _ = parse_destination(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"unix:{os.path.abspath(path)}" if kind == "unix" else text


def _control(text: str) -> str:
    """A control socket path, or a ``tcp:HOST:PORT`` checked like a destination address."""
    return _address(text) if text.startswith("tcp:") else text


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


class Clear(enum.Enum):
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


def _bandwidth(text: str) -> float | Clear:
    """``100`` (MB/s), ``100MB/s``, ``1GiB/s`` or ``none`` (no value) -> bytes/s."""
    if text.strip().lower() == "none":
        return Clear.NONE
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
            return Clear.NONE
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


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """An argparse type: a finite number > 0 (a count, a size, a timeout)."""
    name = "a whole number" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be {name} > 0, got {text!r}")
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


def param_line(name: str, value: Any) -> str:
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


def given_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parameter options the user gave, by MigrationParams name (``none`` as None)."""
    return {
        key.removeprefix("param_"): None if value is Clear.NONE else value
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
                type=_control,
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
    migrate.add_argument(
        "--to", required=True, type=_address, metavar="ADDRESS", help="HOST:PORT or unix:PATH"
    )
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

    status = command(
        "status", "the daemon, its devices, its newest migration and any incoming one in flight"
    )
    status.add_argument("--id", help="a migration id (default: the newest)")

    cancel = command(
        "cancel",
        "cancel a migration and wait for its end: exit 0 once rolled back (the source runs "
        "it), else the code of how it ended (1 failed, 5 completed first, 7 unknown, 8 split)",
    )
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
    incoming.add_argument(
        "--timeout-s", type=_positive(float), metavar="S", help="the arm lapses after S"
    )

    events = command("events", "print the daemon's events as they come")
    events.add_argument(
        "--event", action="append", dest="events", metavar="NAME", help="only these (repeatable)"
    )
    events.add_argument("--count", type=_positive(int), help="stop after this many events")

    bench = command("bench", "a whole migration between two local daemons", control=False)
    bench.add_argument("--devices", type=int, default=4, help="simulated devices (default 4)")
    bench.add_argument(
        "--state-mib", type=_positive(float), default=16, help="state per device (MiB)"
    )
    bench.add_argument("--dirty-mbps", type=float, default=10, help="dirty rate per device")
    bench.add_argument("--ram-mib", type=float, default=0, help="add a RAM device this big")
    bench.add_argument("--ram-dirty-mbps", type=float, default=0)
    bench.add_argument("--ram-working-set-mib", type=float, help="default: half the RAM")
    bench.add_argument("--downtime-limit-ms", type=float, default=100)
    bench.add_argument(
        "--max-bandwidth", type=_bandwidth, metavar="RATE", help="bandwidth cap (MB/s, or a unit)"
    )
    bench.add_argument(
        "--channels", type=int, help="connections (default: 1, at most one per device)"
    )
    bench.add_argument(
        "--repeat", type=int, default=1, metavar="K", help="runs (min/median/p90/max)"
    )
    bench.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the convergence")
    bench.add_argument(
        "--history",
        action="store_true",
        help="with --json: keep each run's pre-copy iterations (what the switchover rule saw)",
    )
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

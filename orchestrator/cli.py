"""The ``livemig`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from devices.fsm import Feature, describe


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="livemig", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("fsm-table", help="print the FSM's combination-transition paths")
    table.add_argument(
        "--features",
        type=_features,
        default=Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY,
        help="comma-separated feature flags (default: STOP_COPY,P2P,PRE_COPY)",
    )
    commands.add_parser("demo", help="run the built-in demonstration")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``livemig`` console script."""
    args = build_parser().parse_args(argv)
    if args.command in ("fsm-table", "demo"):
        features = getattr(args, "features", Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY)
        print(describe(features))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

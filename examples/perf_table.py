"""Regenerate the README's performance table: run each benchmark of record, print markdown.

    python examples/perf_table.py [--repeat 10] [--transport-repeat 3] [--skip-transport]

Every row is one ``livemig bench`` command (shown in the table, so anyone can rerun it)
run ``--repeat`` times between two fresh daemon processes on this machine; the figures
are min / median / p90 / max over the runs. "fixed" is the downtime without the
transfer (quiesce + stop + load + commit + resume), "CPU" the source daemon's CPU
seconds per GB moved. The transport table is ``livemig bench transport`` (framed with
per-chunk checksums, framed without them as inside TLS, and a raw socket). Figures from
a machine other benchmarks share are wall-clock and noisy: say so next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.bench.inprocess import percentile

ROOT = Path(__file__).resolve().parent.parent

#: (what is migrated, the ``livemig`` arguments) for each row.
ROWS: list[tuple[str, str]] = [
    (
        "512 MiB RAM, 256 MiB working set dirtied at 50 MB/s, 50 ms limit",
        "bench --devices 0 --ram-mib 512 --ram-working-set-mib 256 --ram-dirty-mbps 50 "
        "--downtime-limit-ms 50",
    ),
    (
        "512 MiB RAM, 256 MiB working set dirtied at 200 MB/s, 50 ms limit",
        "bench --devices 0 --ram-mib 512 --ram-working-set-mib 256 --ram-dirty-mbps 200 "
        "--downtime-limit-ms 50",
    ),
    (
        "1 simulated device of 4 MiB dirtied at 1 MB/s, 300 ms limit",
        "bench --devices 1 --state-mib 4 --dirty-mbps 1 --downtime-limit-ms 300",
    ),
    (
        "64 simulated devices of 4 MiB dirtied at 1 MB/s each, 300 ms limit",
        "bench --devices 64 --state-mib 4 --dirty-mbps 1 --downtime-limit-ms 300",
    ),
]
#: The phases of the downtime that do not move data.
FIXED_PHASES = ("quiesce", "stop", "load", "commit", "resume")


def livemig(arguments: Sequence[str]) -> Any:
    """Run ``livemig ARGUMENTS --json`` from this checkout and parse what it prints."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *arguments, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if not done.stdout.strip():
        raise SystemExit(f"livemig {shlex.join(arguments)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def spread(values: Sequence[float]) -> str:
    """``min / median / p90 / max`` with one decimal."""
    figures = (min(values), statistics.median(values), percentile(values, 0.9), max(values))
    return " / ".join(f"{v:.1f}" for v in figures)


def migration_row(label: str, arguments: str, repeat: int) -> str:
    """One markdown row for a migration benchmark."""
    command = [*shlex.split(arguments), "--repeat", str(repeat)]
    answer = livemig(command)
    runs = answer.get("runs", [answer])
    done = [r for r in runs if r["status"] == "completed" and r.get("downtime_ms") is not None]
    if not done:
        return (
            f"| {label} | failed: {runs[0].get('error')} | | | | `livemig {shlex.join(command)}` |"
        )
    fixed = [sum(r["downtime_breakdown_ms"].get(p, 0.0) for p in FIXED_PHASES) for r in done]
    cpu = [r["cpu_s_per_gb"] for r in done if r.get("cpu_s_per_gb") is not None]
    verified = "" if all(r.get("verified") for r in done) else " (NOT verified)"
    cpu_text = f"{statistics.median(cpu):.2f}" if cpu else "-"
    failed = f" ({len(runs) - len(done)} of {len(runs)} failed)" if len(done) < len(runs) else ""
    return (
        f"| {label}{verified}{failed} | {spread([r['downtime_ms'] for r in done])} "
        f"| {statistics.median(fixed):.1f} | {spread([r['total_ms'] for r in done])} "
        f"| {cpu_text} | `livemig {shlex.join(command)}` |"
    )


def transport_rows(repeat: int) -> list[str]:
    """Markdown rows for ``livemig bench transport``."""
    command = ["bench", "transport", "--repeat", str(repeat)]
    answer = livemig(command)
    rows = [
        f"`livemig {shlex.join(command)}` ({answer['volume_bytes'] / 2**30:g} GiB per run, "
        f"median of {repeat}, interleaved; CPU seconds per GB on sender / receiver):",
        "",
        "| channels | framed MB/s | unchecked MB/s | raw MB/s | framed / raw | unchecked / raw "
        "| CPU s/GB framed | unchecked | raw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in answer["results"]:
        cpu = r["cpu_s_per_gb"]
        sides = [f"{cpu[k]['sender']:.3f} / {cpu[k]['receiver']:.3f}" for k in cpu]
        rows.append(
            f"| {r['channels']} | {r['framed_mbps']:.0f} | {r['unchecked_mbps']:.0f} "
            f"| {r['raw_mbps']:.0f} | {r['ratio']:.2f} | {r['unchecked_ratio']:.2f} | "
            + " | ".join(sides)
            + " |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=10, help="runs per migration row (10)")
    parser.add_argument("--transport-repeat", type=int, default=3, help="runs per figure (3)")
    parser.add_argument("--skip-transport", action="store_true", help="migration rows only")
    args = parser.parse_args(argv)
    if args.repeat < 2 or args.transport_repeat < 1:
        parser.error("--repeat must be at least 2 and --transport-repeat at least 1")
    print(
        "| workload | downtime ms (min / median / p90 / max) | fixed ms (median) "
        "| total ms (min / median / p90 / max) | source CPU s/GB (median) | command |"
    )
    print("|---|---|---|---|---|---|")
    for label, arguments in ROWS:
        print(migration_row(label, arguments, args.repeat), flush=True)
    if not args.skip_transport:
        print()
        print("\n".join(transport_rows(args.transport_repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

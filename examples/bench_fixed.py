"""The switchover's fixed cost with N devices against one: what issue 13's "64 devices cost
little more than 1" is measured with.

Usage (from the checkout's root): ``python examples/bench_fixed.py [--devices 64]
[--rounds 4] [--runs 5] [--base PATH]``

Each round runs ``livemig bench --devices N --state-mib 4 --dirty-mbps 1
--downtime-limit-ms 300 --repeat RUNS --json`` for N devices and then for one, so load
drifts hit both alike. "Fixed" is each run's quiesce + stop + load + commit + resume: the
downtime without the drain and the wire, whose cost grows with the bytes moved. It prints
the per-phase medians of every run and the ratio of the fixed medians, N / 1.
``--base PATH`` also runs another tree (a ``git archive`` export of an older commit) in
the same rounds, interleaved, through ``PYTHONPATH``: a before and after taken at the
same moment of the machine's day.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("quiesce", "stop", "drain", "wire", "load", "commit", "resume")
FIXED = ("quiesce", "stop", "load", "commit", "resume")


def _runs(tree: Path, devices: int, repeat: int) -> list[dict[str, float]]:
    """The downtime breakdowns (and downtime) of ``repeat`` runs of the bench in ``tree``."""
    command = [sys.executable, "-m", "orchestrator.cli", "bench", "--devices", str(devices)]
    command += ["--state-mib", "4", "--dirty-mbps", "1", "--downtime-limit-ms", "300"]
    command += ["--repeat", str(repeat), "--json"]
    env = dict(os.environ, PYTHONPATH=str(tree))
    answer = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tree, env=env)
    return [
        {**run["downtime_breakdown_ms"], "downtime": run["downtime_ms"]}
        for run in json.loads(answer.stdout)["runs"]
    ]


def _report(name: str, devices: int, runs: dict[int, list[dict[str, float]]]) -> None:
    fixed = {}
    for count in (devices, 1):
        breakdowns = runs[count]
        medians = {p: statistics.median(b[p] for b in breakdowns) for p in PHASES}
        fixed[count] = statistics.median(sum(b[p] for p in FIXED) for b in breakdowns)
        downtime = statistics.median(b["downtime"] for b in breakdowns)
        phases = " ".join(f"{p} {medians[p]:.3f}" for p in PHASES)
        print(f"{name} {count:3d} device(s): {phases}  fixed {fixed[count]:.3f}  "
              f"downtime {downtime:.3f} ms")  # fmt: skip
    print(f"{name}: fixed cost, {devices} devices / 1 device: {fixed[devices] / fixed[1]:.2f} x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5, help="runs per bench command")
    parser.add_argument("--base", type=Path, help="another tree to run in the same rounds")
    args = parser.parse_args()
    trees = {"this tree": ROOT} | ({"base": args.base.resolve()} if args.base else {})
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        t: {args.devices: [], 1: []} for t in trees
    }
    for _ in range(args.rounds):
        for name, tree in trees.items():
            for count in (args.devices, 1):
                runs[name][count] += _runs(tree, count, args.runs)
    for name in trees:
        _report(name, args.devices, runs[name])


if __name__ == "__main__":
    main()

"""Soak: K back-and-forth migrations between two daemons, watching fds and RSS.

Usage: ``python examples/soak.py [--round-trips K] [--every N] [--state-kib S]``

Two ``livemig daemon`` processes on localhost, each listening, own the same small
simulated devices. One round trip migrates them A -> B, then B -> A, through the
control sockets as a user would. Every N round trips it samples each daemon's open
descriptors (``/proc/PID/fd``) and resident memory (``VmRSS`` of ``/proc/PID/status``),
then prints the table and the RSS slope past the first 100 round trips.

Acceptance (issue 11): 0 failures, descriptors flat, RSS growth under 5 MB after the
first 100 round trips. The exit code is 0 when all three hold (growth is judged only
when K > 100).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.bench.daemons import DaemonProcess
from orchestrator.service.client import ControlClient

#: Round trips after which RSS growth is judged (start-up and caches settle first).
WARMUP = 100
FINAL = ("completed", "failed", "cancelled")
NAMES = ("s0", "s1")


def config(folder: Path, role: str, state_kib: int) -> Path:
    """A listening daemon owning the soak devices (each runs a light workload here)."""
    devices = "".join(
        f'\n[[device]]\nkind = "simulated"\nname = "{name}"\n'
        f"state_mib = {state_kib / 1024}\ndirty_mbps = 1\nseed = {index}\n"
        for index, name in enumerate(NAMES)
    )
    path = folder / f"{role}.toml"
    path.write_text(
        f'name = "{role}"\ncontrol_socket = "{role}.sock"\nlisten = ["127.0.0.1:0"]\n'
        f'[auth]\npsk_file = "psk"\n{devices}'
    )
    return path


async def arm(destination: ControlClient, devices: list[str], sender: str) -> None:
    """Consent, on ``destination``, to one migration of ``devices`` from daemon ``sender``."""
    await destination.execute("migrate-incoming", devices=devices, **{"from": sender})


async def migrate(source: ControlClient, destination: ControlClient, address: str) -> str:
    """One migration of every device; its final status (and error, if any)."""
    await arm(destination, list(NAMES), (await source.execute("query-daemon"))["name"])
    started = await source.execute("migrate", destination=address)
    event = await source.next_event(
        lambda m: (
            m["event"] == "MIGRATION"
            and m["data"].get("id") == started["id"]
            and m["data"]["status"] in FINAL
        ),
        120,
    )
    data: dict[str, Any] = event["data"]
    if data["status"] != "completed":
        return f"{data['status']}: {data['error']}"
    # The destination holds the devices until its side has ended too.
    ended = await destination.next_event(
        lambda m: m["event"] == "INCOMING_MIGRATION" and m["data"]["status"] != "active", 120
    )
    return str(ended["data"]["status"])


def sample(pid: int) -> tuple[int, float]:
    """(open descriptors, RSS in MB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return fds, int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two points)."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


async def soak(round_trips: int, every: int, state_kib: int) -> int:
    """Run the soak; print the table and verdict; the exit code."""
    with tempfile.TemporaryDirectory(prefix="livemig-soak-") as tmp:
        folder = Path(tmp)
        (folder / "psk").write_text(secrets.token_hex(32) + "\n")
        (folder / "psk").chmod(0o600)
        a = DaemonProcess(config(folder, "a", state_kib), name="a")
        b = DaemonProcess(config(folder, "b", state_kib), name="b")
        try:
            await asyncio.gather(a.start(folder / "a.sock"), b.start(folder / "b.sock"))
            client_a, client_b = await a.client(), await b.client()
            for client in (client_a, client_b):
                await client.subscribe(["MIGRATION", "INCOMING_MIGRATION"])
            address_a = (await client_a.execute("query-daemon"))["listen"][0]
            address_b = (await client_b.execute("query-daemon"))["listen"][0]
            assert a.process is not None
            assert b.process is not None
            pids = (a.process.pid, b.process.pid)
            rows: list[tuple[int, int, int, float, float]] = []
            failures: list[str] = []
            started = time.monotonic()
            for trip in range(round_trips + 1):
                if trip % every == 0 or trip == round_trips:
                    (fds_a, rss_a), (fds_b, rss_b) = (sample(pid) for pid in pids)
                    rows.append((trip, fds_a, fds_b, rss_a, rss_b))
                    print(
                        f"{trip:>6} {fds_a:>6} {fds_b:>6} {rss_a:>9.1f} {rss_b:>9.1f}", flush=True
                    )
                if trip == round_trips:
                    break
                for source, destination, address in (
                    (client_a, client_b, address_b),
                    (client_b, client_a, address_a),
                ):
                    status = await migrate(source, destination, address)
                    if status != "completed":
                        failures.append(f"round trip {trip}: {status}")
            elapsed = time.monotonic() - started
            await client_a.close()
            await client_b.close()
        finally:
            await a.stop()
            await b.stop()
    return report(rows, failures, round_trips, elapsed)


def report(
    rows: list[tuple[int, int, int, float, float]],
    failures: list[str],
    round_trips: int,
    elapsed: float,
) -> int:
    """Print the verdict under the table; 0 when the acceptance holds."""
    late = [r for r in rows if r[0] >= min(WARMUP, round_trips)]
    fds_flat = all(
        max(r[column] for r in rows[1:] or rows) - min(r[column] for r in rows[1:] or rows) <= 2
        for column in (1, 2)
    )
    growth = [late[-1][column] - late[0][column] for column in (3, 4)]
    slopes = [slope([(r[0], r[column]) for r in late]) * 1000 for column in (3, 4)]
    print(f"{round_trips} round trips ({2 * round_trips} migrations) in {elapsed:.0f} s")
    print(f"failures: {len(failures)}", *failures[:5], sep="\n  ")
    print(f"descriptors flat (range <= 2 after the first sample): {fds_flat}")
    print(
        f"RSS growth after round trip {late[0][0]}: a {growth[0]:+.1f} MB, b {growth[1]:+.1f} MB; "
        f"slope a {slopes[0]:+.2f}, b {slopes[1]:+.2f} MB per 1000 round trips"
    )
    judged = round_trips > WARMUP
    ok = not failures and fds_flat and (not judged or max(growth) < 5.0)
    print("acceptance:", "met" if ok else "NOT met", "" if judged else "(growth not judged)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=1000, metavar="K")
    parser.add_argument("--every", type=int, default=50, metavar="N", help="sample period")
    parser.add_argument("--state-kib", type=int, default=256, help="state per device")
    args = parser.parse_args(argv)
    if args.round_trips < 1 or args.every < 1 or args.state_kib < 4:
        parser.error("--round-trips and --every must be >= 1, --state-kib >= 4")
    print(f"{'trip':>6} {'fds a':>6} {'fds b':>6} {'rss a MB':>9} {'rss b MB':>9}")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(soak(args.round_trips, args.every, args.state_kib))


if __name__ == "__main__":
    sys.exit(main())

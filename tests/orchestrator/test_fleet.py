"""Many migrations at once: one daemon evacuating to two others under a host-wide budget.

Real daemon processes; every wait is on an event, bounded by a deadline. The rates come
from the migrations' own stats, and the bound on their sum has a wide margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.bench.daemons import DaemonProcess
from orchestrator.engine.params import MigrationParams
from orchestrator.engine.source import SourceMigration
from orchestrator.engine.stats import Status
from orchestrator.service.client import ControlClient
from orchestrator.service.config import ConfigError, parse
from orchestrator.service.service import Outgoing, Service
from tests.orchestrator.test_daemon import DEADLINE, ROOT, write_psk
from transport.auth import AuthConfig

MB = 1_000_000
#: The source's host-wide budget: slow enough that the cap, not the loopback, sets the pace.
BUDGET = 24 * MB
#: Four migrations of two devices each; the first two go to ``east``, the others to ``west``.
GROUPS = [[f"sim{2 * i}", f"sim{2 * i + 1}"] for i in range(4)]


def device(name: str, *, seed: int, rate: float) -> str:
    return (
        f'[[device]]\nkind = "simulated"\nname = "{name}"\nstate_mib = 3\n'
        f"dirty_mbps = {rate}\nseed = {seed}\n"
    )


def write(folder: Path, role: str, names: list[str], *, top: str = "", rate: float = 0) -> Path:
    """A daemon config owning ``names`` (seeded by their number, so both ends agree)."""
    path = folder / f"{role}.toml"
    listen = "" if role == "source" else '"127.0.0.1:0"'
    path.write_text(
        f'name = "{role}"\ncontrol_socket = "{role}.sock"\nlisten = [{listen}]\n{top}\n'
        '[auth]\npsk_file = "psk"\n\n'
        + "\n".join(device(n, seed=int(n[3:]) + 1, rate=rate) for n in names)
    )
    return path


@contextlib.asynccontextmanager
async def daemons(folder: Path) -> AsyncIterator[dict[str, ControlClient]]:
    """A source owning eight devices, and east and west each owning the four it will take."""
    write_psk(folder / "psk", "k" * 32)
    configs = {
        "source": write(
            folder,
            "source",
            [n for group in GROUPS for n in group],
            top=f"max_total_bandwidth = {BUDGET}",
            rate=0.1,
        ),
        "east": write(folder, "east", GROUPS[0] + GROUPS[1]),
        "west": write(folder, "west", GROUPS[2] + GROUPS[3]),
    }
    processes = {role: DaemonProcess(path, name=role) for role, path in configs.items()}
    clients: dict[str, ControlClient] = {}
    try:
        await asyncio.gather(*(p.start(folder / f"{r}.sock") for r, p in processes.items()))
        for role, process in processes.items():
            clients[role] = await process.client()
        for role in ("east", "west"):  # consent: each takes its groups from the source
            names = [d["name"] for d in await clients[role].execute("query-devices")]
            await clients[role].execute("migrate-incoming", devices=names, **{"from": "source"})
        yield clients
        for client in clients.values():
            await client.close()
        for process in processes.values():
            assert await process.stop() == 0, process.output()
    finally:
        for process in processes.values():
            await process.kill()


async def test_four_migrations_to_two_daemons_share_the_host_budget(tmp_path: Path) -> None:
    """All four complete byte-exact, each gets a fair part, and together they keep the budget."""
    async with daemons(tmp_path) as clients:
        source = clients["source"]
        assert (await source.execute("query-daemon"))["max_total_bandwidth"] == BUDGET
        address = {
            role: (await clients[role].execute("query-daemon"))["listen"][0]
            for role in ("east", "west")
        }
        started = [
            await source.execute(
                "migrate",
                destination=address["east" if index < 2 else "west"],
                devices=group,
                parameters={"downtime_limit_ms": 300},
            )
            for index, group in enumerate(GROUPS)
        ]
        finals: dict[str, dict[str, Any]] = {}
        ids = {s["id"] for s in started}
        while set(finals) != ids:
            event = await source.next_event(
                lambda m: m["event"] == "MIGRATION" and "stats" in m["data"], DEADLINE
            )
            finals[event["data"]["id"]] = event["data"]["stats"]
        assert {s["status"] for s in finals.values()} == {"completed"}, finals
        rates = [s["transferred_bytes"] / (s["total_ms"] / 1e3) for s in finals.values()]
        # Each moved its 6 MiB and more; together they ran at the budget, not the loopback.
        assert all(s["transferred_bytes"] >= 6 << 20 for s in finals.values())
        assert sum(rates) < 1.5 * BUDGET, rates
        assert min(rates) > 0.3 * BUDGET / len(GROUPS), rates
        digests = await source.execute("query-digests")
        for role in ("east", "west"):
            for name, digest in (await clients[role].execute("query-digests")).items():
                assert digest == digests[name], name


def test_the_host_budget_must_be_a_positive_finite_rate() -> None:
    """``max_total_bandwidth`` is refused at zero, negative or infinite, naming the key."""
    for value in ("0", "-1", "inf"):
        with pytest.raises(ConfigError, match="max_total_bandwidth"):
            parse(f"max_total_bandwidth = {value}\n")


async def test_the_evacuation_example_empties_a_host_byte_exact() -> None:
    """``examples/evacuate.py`` drives three daemons through an evacuation and exits 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "evacuate.py"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    out, err = await asyncio.wait_for(process.communicate(), 3 * DEADLINE)
    assert process.returncode == 0, out.decode() + err.decode()
    results = [line for line in out.decode().splitlines() if not line.startswith(" ")]
    finals = [line for line in results if ": completed" in line]
    assert len(finals) == 2, results
    assert all(line.endswith("byte-exact") for line in finals)


def test_the_budget_is_split_max_min_fair(tmp_path: Path) -> None:
    """Equal parts, except that a migration capped lower leaves its unused part to the rest."""
    config = parse(f'control_socket = "{tmp_path}/c.sock"\nmax_total_bandwidth = {30 * MB}\n')
    service = Service(config, [])
    caps = {"a": None, "b": 2 * MB, "c": None}
    for name, cap in caps.items():
        migration = SourceMigration(
            [],
            "127.0.0.1:1",
            MigrationParams(max_bandwidth=cap),
            auth=AuthConfig(),
            migration_id=name,
        )
        service.outgoing[name] = Outgoing(migration)
    service._share_bandwidth()
    effective = {name: r.migration._cap() for name, r in service.outgoing.items()}
    assert effective == {"a": 14 * MB, "b": 2 * MB, "c": 14 * MB}
    service.outgoing["b"].migration.stats.status = Status.COMPLETED
    service._share_bandwidth()
    assert service.outgoing["a"].migration._cap() == 15 * MB

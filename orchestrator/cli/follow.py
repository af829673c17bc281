"""Following one migration from the command line: start it, watch its events, its stats.

``livemig migrate`` (without ``--detach``) is this loop; the benchmarks drive the
daemons with it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.engine.stats import FINAL_STATUSES
from orchestrator.service.client import ControlClient
from orchestrator.service.protocol import DaemonUnreachable


async def migrate(
    client: ControlClient,
    destination: str,
    parameters: dict[str, Any],
    *,
    devices: Sequence[str] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - bounded wait for the whole migration
) -> dict[str, Any]:
    """Start a migration through the control API and follow it to its end; its final stats."""
    await client.subscribe(["MIGRATION", "MIGRATION_PASS"])
    arguments: dict[str, Any] = {"destination": destination, "parameters": parameters}
    if devices is not None:
        arguments["devices"] = list(devices)
    started = await client.execute("migrate", **arguments)
    migration_id = started["id"]
    async with asyncio.timeout(timeout):
        async for message in client.events():
            data = message["data"]
            if data.get("id") != migration_id:
                continue
            if on_event is not None:
                on_event(message)
            if message["event"] == "MIGRATION" and data["status"] in FINAL_STATUSES:
                stats: dict[str, Any] = await client.execute(
                    "query-migrate", id=migration_id, history=True
                )
                return stats
    raise DaemonUnreachable(
        f"the source daemon closed the connection during migration {migration_id}: how it "
        "ended is not known here; once that daemon runs again, livemig devices there shows "
        "where each device is ('outcome unknown': check the destination before any "
        "resume --force)"
    )

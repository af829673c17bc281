"""Golden control replies: the shape of every command's reply and of every event.

Pinned before any code moved, from two real daemons: the keys of every object and the
kind of every value (``number`` for int and float, ``null``, ``str``, ``bool``, a list
by the shape of its first element). Values that are sometimes null and sometimes not
are pinned as ``any``. A change here changes the control API users script against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.orchestrator.test_daemon import (
    DEADLINE,
    NEVER_CONVERGES,
    Pair,
    running_pair,
    write_config,
    write_psk,
)

GOLDEN = Path(__file__).with_name("golden_control.json")
#: Values whose kind depends on timing (an estimate not made yet is null, its parts {}).
ANY = frozenset(
    {
        "expected_downtime_ms",
        "expected_downtime_parts_ms",
        "downtime_ms",
        "setup_ms",
        "remaining_ms",
        "t_ms",
    }
)


def shape(value: Any, key: str = "") -> Any:
    """The keys and value kinds of a JSON value, without the values."""
    if key in ANY:
        return "any"
    if isinstance(value, dict):
        return {k: shape(v, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0], key)] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


class Recorder:
    """The shapes seen: one per command reply, one per event name."""

    def __init__(self) -> None:
        self.replies: dict[str, Any] = {}
        self.events: dict[str, Any] = {}

    async def call(self, pair: Pair, side: str, command: str, **arguments: Any) -> Any:
        """Run ``command`` on ``side`` ("src" or "dst") and record its reply's shape."""
        client = pair.src if side == "src" else pair.dst
        reply = await client.execute(command, **arguments)
        self.replies.setdefault(f"{side} {command}", shape(reply))
        return reply

    async def until(self, pair: Pair, event: str, status: str | None = None) -> None:
        """Record the source's events up to ``event`` (with ``status``, if given)."""

        def match(message: Any) -> bool:
            self.events.setdefault(message["event"], shape(message))
            return bool(
                message["event"] == event
                and (status is None or message["data"].get("status") == status)
            )

        await pair.src.next_event(match, DEADLINE)


async def record(folder: Path) -> Recorder:
    """Every command once (some on both daemons) and every event, in one session."""
    seen = Recorder()
    write_psk(folder / "psk", "a" * 32)
    source = write_config(folder, "source")
    destination = write_config(folder, "destination", listen='"127.0.0.1:0"')
    async with running_pair(folder, source, destination, arm=False) as pair:
        await pair.dst.subscribe(["INCOMING_MIGRATION"])
        for command in ("query-commands", "query-daemon", "query-devices", "query-digests"):
            await seen.call(pair, "src", command)
        await seen.call(pair, "src", "migrate-set-parameters", parameters={"iteration_s": 0.1})
        await seen.call(pair, "src", "query-migrate-parameters")
        names = [d["name"] for d in await pair.dst.execute("query-devices")]
        await seen.call(pair, "dst", "migrate-incoming", devices=names, **{"from": "source"})
        # Pre-copy that would not converge, forced to switch over: it pauses before the
        # switchover (a force is refused once paused: only continue releases it).
        reply = await seen.call(
            pair,
            "src",
            "migrate",
            destination=pair.address,
            parameters={"pause_before_switchover": True, "downtime_limit_ms": 0.001},
        )
        await seen.until(pair, "MIGRATION_PASS")
        await seen.call(pair, "src", "migrate-switchover", id=reply["id"])
        await seen.until(pair, "MIGRATION", "pre-switchover")
        await seen.call(pair, "src", "migrate-continue", id=reply["id"])
        await seen.until(pair, "MIGRATION", "completed")
        await seen.call(pair, "src", "query-migrate", id=reply["id"], history=True)
        await seen.call(pair, "src", "query-migrations")
        await pair.dst.next_event(lambda m: m["event"] == "INCOMING_MIGRATION", DEADLINE)
        incoming = await pair.dst.next_event(
            lambda m: m["event"] == "INCOMING_MIGRATION" and m["data"].get("status") == "completed",
            DEADLINE,
        )
        seen.events.setdefault("INCOMING_MIGRATION", shape(incoming))
        await seen.call(pair, "dst", "query-migrate", id=reply["id"])
        await seen.call(pair, "dst", "query-migrations")
        await seen.call(pair, "src", "device-resume", devices=names, force=True)
        await pair.dst.execute("device-resume", devices=names, force=True)
        await pair.dst.execute("migrate-incoming", devices=names, **{"from": "source"})
        params = dict(zip(NEVER_CONVERGES[::2], NEVER_CONVERGES[1::2], strict=True))
        reply = await pair.src.execute(
            "migrate",
            destination=pair.address,
            parameters={k.strip("-").replace("-", "_"): float(v) for k, v in params.items()},
        )
        await seen.until(pair, "MIGRATION_PASS")
        await seen.call(pair, "src", "migrate-cancel", id=reply["id"])
        await seen.until(pair, "MIGRATION", "cancelled")
        await seen.call(pair, "src", "subscribe", events=["MIGRATION"])
        await pair.dst.subscribe()
        pair.destination.signal()
        shutdown = await pair.dst.next_event(lambda m: m["event"] == "SHUTDOWN", DEADLINE)
        seen.events.setdefault("SHUTDOWN", shape(shutdown))
        assert await pair.destination.wait() == 0
    return seen


async def test_every_reply_and_event_keeps_its_golden_shape(tmp_path: Path) -> None:
    """Each command's reply and each event have exactly the pinned keys and value kinds."""
    seen = await record(tmp_path)
    golden = json.loads(GOLDEN.read_text())
    assert seen.replies == golden["replies"]
    assert seen.events == golden["events"]

"""Hostile networks against real daemon processes: floods, stalls, corruption, records.

Every wait is on a reply or an event from the daemons, bounded by a deadline; the
only timing asserted is an upper bound with a wide margin. Set LIVEMIG_HOSTILE_LONG=1
for the full measure of the issue (500 hostile connections, 10 migrations); CI runs
200 and 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from orchestrator.service.client import ControlClient
from tests.faultproxy import FaultProxy
from tests.orchestrator.test_daemon import DEADLINE, DEVICES, ROOT, Pair, running_pair, write_psk
from tests.pki import make_pki
from transport import AuthConfig, Tag, connect, parse_address
from transport.frames import encode_fields, encode_frame

LONG = os.environ.get("LIVEMIG_HOSTILE_LONG") == "1"
HOSTILE = 500 if LONG else 200
MIGRATIONS = 10 if LONG else 3
#: Hostile clients bind these; 127.0.0.1 is also where the legitimate source comes from.
LOCALS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
NAMES = ("sim0", "idle0", "ram0")
FINAL = ("completed", "failed", "cancelled")
LINK = 1.0
KEY = "k" * 32


def write_config(
    folder: Path, role: str, *, auth: str = 'psk_file = "psk"', extra: str = ""
) -> Path:
    """A daemon config listening on a free port, with the test devices."""
    path = folder / f"{role}.toml"
    path.write_text(
        f'name = "{role}"\ncontrol_socket = "{role}.sock"\nlisten = ["127.0.0.1:0"]\n'
        f"[auth]\n{auth}\n{extra}\n" + DEVICES.format(rate=4 if role == "source" else 0)
    )
    return path


@contextlib.asynccontextmanager
async def hostile_pair(
    folder: Path, *, auth: str = 'psk_file = "psk"', extra: str = ""
) -> AsyncIterator[tuple[Pair, str]]:
    """Two listening daemons, both subscribed to events; yields the pair and the
    source's own migration address (for migrating back)."""
    write_psk(folder / "psk", KEY)
    source = write_config(folder, "source", auth=auth, extra=extra)
    destination = write_config(folder, "destination", auth=auth, extra=extra)
    async with running_pair(folder, source, destination) as pair:
        await pair.dst.subscribe()
        back = (await pair.src.execute("query-daemon"))["listen"][0]
        yield pair, back


async def migrate(
    client: ControlClient, peer: ControlClient, address: str, **parameters: Any
) -> dict[str, Any]:
    """Start a migration and return its final MIGRATION event's data, once the peer's
    side has ended too (until then the peer still holds the devices). The peer is
    armed first: it takes one migration of its devices from this daemon."""
    sender = (await client.execute("query-daemon"))["name"]
    names = [d["name"] for d in await peer.execute("query-devices")]
    await peer.execute("migrate-incoming", devices=names, **{"from": sender})
    started = await client.execute("migrate", destination=address, parameters=parameters)
    event = await client.next_event(
        lambda m: (
            m["event"] == "MIGRATION"
            and m["data"]["id"] == started["id"]
            and m["data"]["status"] in FINAL
        ),
        DEADLINE * 2,
    )
    data: dict[str, Any] = event["data"]
    if data["status"] == "completed":
        await peer.next_event(
            lambda m: m["event"] == "INCOMING_MIGRATION" and m["data"]["status"] != "active",
            DEADLINE,
        )
    return data


def hello_frame() -> bytes:
    """A well-formed HELLO of a one-channel source: the server answers and waits for AUTH."""
    fields = {
        "version": 1, "name": "squatter", "session": os.urandom(16), "channel": 0,
        "channels": 1, "nonce": os.urandom(32), "auth": "psk", "max_payload": 1 << 20,
    }  # fmt: skip
    return b"".join(encode_frame(Tag.HELLO, 0, 0, (encode_fields(fields),)))  # type: ignore[arg-type]


#: The start of a TLS ClientHello (record header and a few handshake bytes): the
#: server's TLS layer waits for the rest.
CLIENT_HELLO = bytes.fromhex("160301020001000200030309")

#: What a squatter sends after connecting: nothing (slowloris), the start of a HELLO
#: (half-open: a partial prefix, or a header with half its payload), or a whole valid
#: HELLO and then nothing (it stalls at AUTH).
OPENINGS = (b"", hello_frame()[:3], hello_frame()[:40], hello_frame())


async def squat(address: str, local: str, opening: bytes, counts: Counter[str]) -> None:
    """Hold a connection open doing nothing useful; reopen it whenever it is closed."""
    _, host, port = parse_address(address)
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(local, 0))
        except OSError:
            counts["refused"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["opened"] += 1
        try:
            if opening:
                writer.write(opening)
            with contextlib.suppress(OSError):
                while await reader.read(4096):
                    pass
        finally:
            writer.transport.abort()
        await asyncio.sleep(random.uniform(0.05, 0.25))  # reopen, as a slowloris does


@contextlib.asynccontextmanager
async def squatters(
    addresses: list[str], count: int, openings: tuple[bytes, ...] = OPENINGS
) -> AsyncIterator[Counter[str]]:
    """``count`` hostile connections spread over addresses, local addresses, openings."""
    counts: Counter[str] = Counter()
    plan = zip(
        range(count),
        itertools.cycle(addresses),
        itertools.cycle(LOCALS),
        itertools.cycle(openings),
        strict=False,
    )
    tasks = [
        asyncio.create_task(squat(addr, local, opening, counts)) for _, addr, local, opening in plan
    ]
    try:
        while counts["opened"] < count:  # noqa: ASYNC110 - wait for the flood to be in place
            await asyncio.sleep(0.05)
        yield counts
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_port_stays_usable_under_slowloris_and_half_open_flood(tmp_path: Path) -> None:
    """With hostile connections held and reopened on both migration ports (from the
    source's own address too), every legitimate migration completes, byte-exact."""
    async with (
        hostile_pair(tmp_path) as (pair, back),
        squatters([pair.address, back], HOSTILE) as counts,
    ):
        for index in range(MIGRATIONS):
            client, peer, target = (
                (pair.src, pair.dst, pair.address) if index % 2 == 0 else (pair.dst, pair.src, back)
            )
            result = await migrate(client, peer, target)
            assert result["status"] == "completed", result
            if client is pair.src:  # the devices run there without a workload: both frozen
                src_digests = await pair.src.execute("query-digests")
                assert src_digests == await pair.dst.execute("query-digests")
        assert counts["opened"] >= HOSTILE


async def test_stalled_tls_handshakes_do_not_keep_migrations_out(tmp_path: Path) -> None:
    """Connections that never start TLS or stop halfway through it, held and reopened on
    both ports, leave them usable: every migration completes."""
    pki = make_pki(tmp_path / "pki", ("host",))
    auth = (
        f'tls_cert = "{pki / "host.crt"}"\ntls_key = "{pki / "host.key"}"\n'
        f'tls_ca = "{pki / "ca.crt"}"\n'
    )
    async with (
        hostile_pair(tmp_path, auth=auth) as (pair, back),
        squatters([pair.address, back], HOSTILE // 2, openings=(b"", CLIENT_HELLO)),
    ):
        for index in range(MIGRATIONS):
            client, peer, target = (
                (pair.src, pair.dst, pair.address) if index % 2 == 0 else (pair.dst, pair.src, back)
            )
            result = await migrate(client, peer, target)
            assert result["status"] == "completed", result


async def wait_states(client: ControlClient, pair: Pair, state: str) -> None:
    """Until every device of the daemon behind ``client`` is in ``state`` (events say when)."""
    while set((await pair.states(client)).values()) != {state}:
        await client.next_event(lambda m: m["event"] == "DEVICE_STATE", DEADLINE)


async def test_a_stall_in_precopy_is_a_lost_link_between_daemons(tmp_path: Path) -> None:
    """A link that stops forwarding fails the migration within link_timeout_s plus a
    margin, naming the link; the source runs, the destination leaves RESUMING, and the
    next migration is byte-exact."""
    extra = f"[migration]\nlink_timeout_s = {LINK}\n"
    async with hostile_pair(tmp_path, extra=extra) as (pair, _):
        proxy = FaultProxy(pair.address)
        via = await proxy.start()
        try:
            started = await pair.src.execute(
                "migrate",
                destination=via,
                parameters={"downtime_limit_ms": 0.001, "timeout_s": 120.0},
            )
            await pair.src.next_event(
                lambda m: m["event"] == "MIGRATION" and m["data"]["status"] == "active", DEADLINE
            )
            await pair.dst.next_event(
                lambda m: m["event"] == "DEVICE_STATE" and m["data"]["new"] == "RESUMING",
                DEADLINE,
            )
            proxy.stall()
            stalled = time.monotonic()
            failed = await pair.migration_event("failed")
            assert time.monotonic() - stalled < LINK * 1.25 + 5.0
        finally:
            await proxy.close()
        assert failed["data"]["id"] == started["id"]
        assert "no frame from destination for 1.0 s (link_timeout_s)" in failed["data"]["error"]
        assert await pair.states(pair.src) == dict.fromkeys(NAMES, "RUNNING")
        await wait_states(pair.dst, pair, "RUNNING")
        result = await migrate(pair.src, pair.dst, pair.address)
        assert result["status"] == "completed", result
        assert await pair.src.execute("query-digests") == await pair.dst.execute("query-digests")


async def test_a_corrupt_frame_is_reported_by_livemig_migrate_with_the_reason(
    tmp_path: Path,
) -> None:
    """The destination's checksum failure is what ``livemig migrate`` prints."""
    async with hostile_pair(tmp_path) as (pair, _):
        proxy = FaultProxy(pair.address)
        via = await proxy.start()
        proxy.corrupt_at = 600_000  # inside the devices' data, past the handshakes
        try:
            code, _, err = await pair.cli("migrate", "--to", via, "--json")
        finally:
            await proxy.close()
        assert code == 1
        assert "destination refused: checksum: mismatch on" in err, err
        assert await pair.states(pair.src) == dict.fromkeys(NAMES, "RUNNING")


async def test_records_are_bounded_and_rejected_sessions_leave_none(tmp_path: Path) -> None:
    """A refused session leaves no record; only the last max_records finished stay."""
    async with hostile_pair(tmp_path, extra="[daemon]\nmax_records = 2\n") as (pair, back):
        session = await connect(pair.address, name="stranger", auth=AuthConfig(psk=KEY.encode()))
        offered = [{"name": "nope", "kind": "simulated", "format_version": 1, "features": 7}]
        await session.send_control(
            Tag.DEVICES,
            {"devices": offered, "p2p": True, "switchover_ack": False, "precopy_devices": 0},
        )
        verdict = await session.recv()
        assert verdict.fields()["stage"] == "failed"
        await session.close()
        await pair.dst.next_event(
            lambda m: m["event"] == "INCOMING_MIGRATION" and m["data"]["status"] == "rejected",
            DEADLINE,
        )
        assert await pair.dst.execute("query-migrations") == []
        ids = []
        for _ in range(3):
            ids.append((await migrate(pair.src, pair.dst, pair.address))["id"])
            assert (await migrate(pair.dst, pair.src, back))["status"] == "completed"
        records = await pair.src.execute("query-migrations")
        outgoing = [r["id"] for r in records if r["direction"] == "outgoing"]
        assert outgoing == ids[1:]
        assert len([r for r in records if r["direction"] == "incoming"]) == 2


async def test_the_cli_exits_quietly_on_a_closed_pipe(tmp_path: Path) -> None:
    """``livemig devices | head -0``: exit 0 and no BrokenPipeError traceback."""
    async with hostile_pair(tmp_path) as (pair, _):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "orchestrator.cli", "devices",
                "--control", str(pair.folder / "source.sock"),
                stdout=write, stderr=asyncio.subprocess.PIPE,
                env=os.environ | {"PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        finally:
            os.close(write)
        _, err = await asyncio.wait_for(process.communicate(), DEADLINE)
        assert process.returncode == 0, err
        assert b"Traceback" not in err

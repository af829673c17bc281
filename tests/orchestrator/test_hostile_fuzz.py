"""Thousands of malformed connections against live daemons, with and without a key.

Random bytes, truncated frames, oversized declarations and mutated valid prefixes,
before and after authentication. The daemon must stay alive, keep no record of them,
give back its descriptors, stay within a memory bound, and migrate afterwards.
LIVEMIG_FUZZ_CASES sets the number of cases per daemon (default 1500: two daemons,
3000 in all; the issue's measure is 10000).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from pathlib import Path

import pytest

from orchestrator.engine.messages import encode_devices
from orchestrator.service.client import ControlClient
from tests.orchestrator.test_daemon import DEADLINE
from tests.orchestrator.test_hostile import KEY, hostile_pair, migrate
from tests.transport.transport_helpers import RawPeer, hello_fields
from transport import Tag
from transport.frames import MAGIC, encode_fields, encode_frame, encode_header

CASES = int(os.environ.get("LIVEMIG_FUZZ_CASES", "1500"))
WORKERS = 32
#: RSS growth allowed over the whole run: the transport bounds each connection to a
#: few buffers, and nothing of a refused session may stay.
RSS_BOUND_MB = 64


def frame(tag: Tag, fields: dict[str, object], seq: int = 0) -> bytes:
    """One control frame's bytes."""
    return b"".join(encode_frame(tag, 0, seq, (encode_fields(fields),)))  # type: ignore[arg-type]


def hostile_bytes(rng: random.Random, seq: int, valid: bytes | None = None) -> bytes:
    """One malformed input, of a kind drawn at random; ``seq`` is the next frame's seq.

    Mutations start from ``valid``, by default a HELLO (seq 0) or a DEVICES frame.
    """
    if valid is None:
        fields = hello_fields(rng.randbytes(16), rng.randbytes(32))
        hello = frame(Tag.HELLO, fields, seq)
        devices = frame(Tag.DEVICES, {"devices": encode_devices([])}, seq)
        valid = hello if seq == 0 else devices
    kind = rng.randrange(6)
    if kind == 0:  # noise
        return rng.randbytes(rng.randrange(1, 2048))
    if kind == 1:  # a valid frame cut short
        return valid[: rng.randrange(1, len(valid))]
    if kind == 2:  # a header longer than allowed, or one that is not msgpack
        return MAGIC + bytes([rng.choice((0, 41, 255))]) + rng.randbytes(64)
    if kind == 3:  # a header declaring a huge payload
        tag = rng.choice(list(Tag))
        return encode_header(tag, rng.randrange(4), seq, rng.choice((1 << 31, 2**32 - 1)), 0)
    if kind == 4:  # a valid frame with a few bytes flipped
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 5)):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        return bytes(mutated)
    # msgpack that is well framed but not the map the tag needs
    body = rng.choice((b"\xc1", b"\x93\x01\x02\x03", b"\xdf\xff\xff\xff\xff", b"\xa3abc"))
    return encode_header(Tag.HELLO if seq == 0 else Tag.DEVICES, 0, seq, len(body), 0) + body


async def one_case(address: str, rng: random.Random, key: bytes) -> None:
    """Open a connection, optionally authenticate, send one malformed input, hang up."""
    try:
        peer = await RawPeer.open(address)
    except OSError:
        return  # the listen backlog overflowed: that connection never existed
    try:
        seq = 0
        if rng.random() < 0.3:
            answer = await peer.handshake(key)
            if answer is None or answer.tag is not Tag.AUTH:
                return
            seq = peer.seq
        peer.writer.write(hostile_bytes(rng, seq))
        with contextlib.suppress(ConnectionError):
            await peer.writer.drain()
    except (OSError, AssertionError):
        pass  # the daemon hung up first: the point is that it survives
    finally:
        peer.writer.transport.abort()


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    """Open descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int, at_most: int) -> int:
    """The descriptor count once it is back to ``at_most`` (closing takes a few turns)."""
    async with asyncio.timeout(DEADLINE):
        while (count := fds(pid)) > at_most:  # noqa: ASYNC110 - /proc has no event to wait on
            await asyncio.sleep(0.05)
    return count


async def no_hostile_records(client: ControlClient) -> None:
    """Until the hostile sessions still ending are gone from the records (none may stay)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            records = await client.execute("query-migrations")
            peers = {r["peer"] for r in records if r["direction"] == "incoming"}
            if peers <= {"source"}:
                return
            await asyncio.sleep(0.05)  # a rejected session ends without an event to wait on


@pytest.mark.parametrize("auth", ['psk_file = "psk"', ""], ids=["psk", "no-auth"])
async def test_malformed_connections_leave_the_daemon_whole(tmp_path: Path, auth: str) -> None:
    """After CASES malformed connections the daemon runs, holds no record of them, has
    its descriptors back, grew less than RSS_BOUND_MB, and migrates."""
    async with hostile_pair(tmp_path, auth=auth) as (pair, back):
        assert pair.destination.process is not None
        pid = pair.destination.process.pid
        # One real migration first, so lazily built state is not counted as growth.
        assert (await migrate(pair.src, pair.dst, pair.address))["status"] == "completed"
        assert (await migrate(pair.dst, pair.src, back))["status"] == "completed"
        before_fds, before_rss = fds(pid), rss_mb(pid)
        rng = random.Random(11)
        seeds = iter(range(CASES))

        async def worker() -> None:
            for seed in seeds:
                await one_case(pair.address, random.Random(rng.random() + seed), KEY.encode())

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        assert pair.destination.process.returncode is None
        await settled_fds(pid, before_fds + 4)
        grown = rss_mb(pid) - before_rss
        assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MB over {CASES} cases"
        await no_hostile_records(pair.dst)
        assert (await migrate(pair.src, pair.dst, pair.address))["status"] == "completed"
        assert await pair.src.execute("query-digests") == await pair.dst.execute("query-digests")

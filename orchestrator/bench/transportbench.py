"""Transport benchmark: framed sessions against a plain socket, over loopback TCP.

For each channel count it streams the volume three ways, interleaved: through the full
framing path (connect, send_chunk, the destination's decoder and recv) with per-chunk
checksums ("framed", the default outside TLS), the same without them ("unchecked", what
a session inside TLS agrees to, here without the encryption), and through plain asyncio
sockets with no framing at all ("raw"), whose receiver reads through its buffer as the
framed receiver reads through its segments (see ``_RawSink``). The receiver runs in its
own process, so sender and receiver each get a core, as on two hosts;
``--one-process`` runs both in one event loop instead. Throughput is in MB/s (10**6
bytes per second), measured from the first byte sent until the receiver confirmed the
last one. On a shared machine trust the CPU cost more than the throughput: each side's
CPU seconds (user + system, from getrusage) per GB moved. It is steadier, though not
fixed: on loopback the sender's writes also run the receiving TCP stack, so a slower
receiver makes the sender pay more per byte.

    python -m orchestrator.bench.transportbench [--volume 2GiB] [--channels 1,2,4] [--chunk 1MiB]
                              [--repeat 3] [--one-process] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

import structlog

from transport import Session, connect, serve
from transport.auth import AuthConfig
from transport.channel import WRITE_HIGH_WATER as HIGH_WATER
from transport.channel import WRITE_LOW_WATER as LOW_WATER
from transport.frames import MIN_READ, Tag
from transport.limits import Limits, MiB

GiB = 1024 * MiB
#: The raw receiver reads into a buffer as large as the framed receiver's segments.
RAW_READ_BUFFER = Limits().receive_segment_size
PSK = b"bench"
#: What is measured, in the order of each round.
KINDS = ("framed", "unchecked", "raw")


def _auth(kind: str) -> AuthConfig:
    """The framed kinds differ only in whether the channels agree on checksums."""
    return AuthConfig(PSK, checksums=kind != "unchecked")


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _setup_process() -> None:
    """uvloop if present, and warnings only, on stderr (stdout carries the results)."""
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# -- receivers (in the receiving process or task) ------------------------------------------


async def _framed_receiver(
    ready: Callable[[str], None], done: asyncio.Event, auth: AuthConfig
) -> None:
    async def handler(session: Session) -> None:
        while True:
            frame = await session.recv()
            if frame.tag is Tag.DEVICES:
                session.set_device_count(len(frame.fields()["devices"]))
                await session.send_control(Tag.DEVICES_ACCEPTED)
            elif frame.tag is Tag.END_OF_STREAM:
                await session.send_control(Tag.VERDICT, {"stage": "resumed", "reason": ""})
                break
        await session.close()
        done.set()

    async with await serve("127.0.0.1:0", handler, name="bench-dest", auth=auth) as s:
        ready(s.address)
        await done.wait()


class _RawSink(asyncio.BufferedProtocol):
    """Counts the bytes of one plain connection and acknowledges the last one.

    Each read lands where the last one ended, wrapping at the end of the buffer, as the
    framed receiver's reads walk its decoder's segments. Reading every time into the
    buffer's start would keep the kernel's copies in a few hundred KiB that never leave
    the cache, a saving no receiver that keeps the bytes it reads can have.
    """

    def __init__(self, expected: int, finished: Callable[[], None]) -> None:
        self.buffer = memoryview(bytearray(RAW_READ_BUFFER))
        self.offset = 0
        self.expected = expected
        self.finished = finished
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not derive from it

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.buffer) - self.offset < MIN_READ:
            self.offset = 0
        return self.buffer[self.offset :]

    def buffer_updated(self, nbytes: int) -> None:
        self.offset += nbytes
        self.expected -= nbytes
        if self.expected == 0 and self.transport is not None:
            self.transport.write(b"!")
            self.finished()


async def _raw_receiver(
    per_connection: int, connections: int, ready: Callable[[str], None], done: asyncio.Event
) -> None:
    remaining = connections

    def finished() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            done.set()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _RawSink(per_connection, finished), "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    ready(f"{host}:{port}")
    await done.wait()
    server.close()


def _receiver_process(kind: str, per_connection: int, connections: int, pipe: Connection) -> None:
    """Entry point of the receiving process: serve one run, report the address, then
    the CPU seconds the run cost this process."""
    _setup_process()

    async def main() -> float:
        done = asyncio.Event()
        started = _cpu_seconds()
        if kind == "raw":
            await _raw_receiver(per_connection, connections, pipe.send, done)
        else:
            await _framed_receiver(pipe.send, done, _auth(kind))
        return _cpu_seconds() - started

    pipe.send(asyncio.run(main()))


# -- senders ---------------------------------------------------------------------------


async def _send_framed(
    address: str, volume: int, channels: int, chunk: memoryview, auth: AuthConfig
) -> float:
    session = await connect(address, name="bench-source", auth=auth, channels=channels)
    # The transport carries DEVICES unread: only the count matters to it.
    session.set_device_count(channels)
    await session.send_control(Tag.DEVICES, {"devices": [f"bench{i}" for i in range(channels)]})
    accepted = await session.recv()
    assert accepted.tag is Tag.DEVICES_ACCEPTED, accepted
    start = time.perf_counter()

    async def stream(device: int, nbytes: int) -> None:
        while nbytes > 0:
            part = chunk[: min(nbytes, len(chunk))]
            nbytes -= await session.send_chunk(Tag.PRECOPY_DATA, device, (part,))
        await session.send_end_of_device(device)

    await asyncio.gather(*(stream(d, share) for d, share in _shares(volume, channels)))
    await session.send_control(Tag.END_OF_STREAM)
    verdict = await session.recv()
    elapsed = time.perf_counter() - start
    assert verdict.tag is Tag.VERDICT, verdict
    await session.close()
    return elapsed


class _RawSource(asyncio.Protocol):
    """The sending end of a plain connection: backpressure and the final ack."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.acked = loop.create_future()
        self.resumed: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self.resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.resumed is not None:
            self.resumed.set_result(None)
            self.resumed = None

    def data_received(self, data: bytes) -> None:
        if not self.acked.done():
            self.acked.set_result(None)


async def _send_raw(
    address: str, volume: int, channels: int, chunk: memoryview, auth: AuthConfig
) -> float:
    host, port = address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    links = [await loop.create_connection(_RawSource, host, int(port)) for _ in range(channels)]
    for transport, _ in links:
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
    start = time.perf_counter()

    async def stream(transport: asyncio.Transport, source: _RawSource, nbytes: int) -> None:
        while nbytes > 0:
            part = chunk[: min(nbytes, len(chunk))]
            transport.write(part)
            nbytes -= len(part)
            if source.resumed is not None:
                await source.resumed
        await source.acked

    await asyncio.gather(
        *(
            stream(t, p, share)
            for (t, p), (_, share) in zip(links, _shares(volume, channels), strict=True)
        )
    )
    elapsed = time.perf_counter() - start
    for transport, _ in links:
        transport.close()
    return elapsed


def _shares(volume: int, parts: int) -> list[tuple[int, int]]:
    """Split ``volume`` bytes over ``parts`` streams, as (index, bytes)."""
    return [(i, volume // parts + (1 if i < volume % parts else 0)) for i in range(parts)]


# -- orchestration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Run:
    """One streaming run: bytes per second and the CPU seconds each side spent."""

    rate: float
    sender_cpu_s: float
    #: 0 in one-process mode, where the sender's figure covers both sides.
    receiver_cpu_s: float


async def _measure(
    kind: str, volume: int, channels: int, chunk: memoryview, one_process: bool
) -> _Run:
    send = _send_raw if kind == "raw" else _send_framed
    per_connection = volume // channels
    volume = per_connection * channels
    started = _cpu_seconds()
    if one_process:
        done = asyncio.Event()
        address: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        receiver: Coroutine[Any, Any, None]
        if kind == "raw":
            receiver = _raw_receiver(per_connection, channels, address.set_result, done)
        else:
            receiver = _framed_receiver(address.set_result, done, _auth(kind))
        task = asyncio.create_task(receiver)
        elapsed = await send(await address, volume, channels, chunk, _auth(kind))
        await task
        return _Run(volume / elapsed, _cpu_seconds() - started, 0.0)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=_receiver_process, args=(kind, per_connection, channels, theirs), daemon=True
    )
    process.start()
    loop = asyncio.get_running_loop()
    try:
        address_text: str = await loop.run_in_executor(None, ours.recv)
        started = _cpu_seconds()
        elapsed = await send(address_text, volume, channels, chunk, _auth(kind))
        sender_cpu = _cpu_seconds() - started
        receiver_cpu: float = await loop.run_in_executor(None, ours.recv)
    finally:
        await loop.run_in_executor(None, process.join, 30)
        if process.is_alive():
            process.kill()
    return _Run(volume / elapsed, sender_cpu, receiver_cpu)


def _summary(runs: Sequence[_Run], volume: int) -> dict[str, float]:
    """Medians of the runs of one kind: MB/s and CPU seconds per GB (10**9 bytes)."""
    per_gb = 1e9 / volume
    return {
        "mbps": round(statistics.median(r.rate for r in runs) / 1e6, 1),
        "sender_cpu_s_per_gb": round(statistics.median(r.sender_cpu_s for r in runs) * per_gb, 3),
        "receiver_cpu_s_per_gb": round(
            statistics.median(r.receiver_cpu_s for r in runs) * per_gb, 3
        ),
    }


async def run(
    volume_bytes: int = 2 * GiB,
    channels: Sequence[int] = (1, 2, 4),
    chunk_size: int = MiB,
    *,
    one_process: bool = False,
    repeat: int = 3,
) -> dict[str, Any]:
    """Measure every kind for every channel count; the best framed count wins.

    Each figure is the median of ``repeat`` runs, the kinds interleaved so that drift in
    the machine's load hits them alike. Returns ``framed_mbps``, ``unchecked_mbps``,
    ``raw_mbps``, their ``ratio`` and ``unchecked_ratio`` to raw, and ``channels`` for
    the channel count with the highest framed throughput, and ``results`` with one entry
    per count, which also carries each kind's CPU seconds per GB on either side.
    """
    chunk = memoryview(os.urandom(chunk_size))
    results = []
    for count in channels:
        runs: dict[str, list[_Run]] = {kind: [] for kind in KINDS}
        for _ in range(repeat):
            for kind in KINDS:
                runs[kind].append(await _measure(kind, volume_bytes, count, chunk, one_process))
        volume = volume_bytes // count * count
        summaries = {kind: _summary(runs[kind], volume) for kind in KINDS}
        raw = summaries["raw"]["mbps"]
        entry: dict[str, Any] = {"channels": count}
        for kind in KINDS:
            entry[f"{kind}_mbps"] = summaries[kind]["mbps"]
        entry["ratio"] = round(summaries["framed"]["mbps"] / raw, 3)
        entry["unchecked_ratio"] = round(summaries["unchecked"]["mbps"] / raw, 3)
        entry["cpu_s_per_gb"] = {
            kind: {side: summaries[kind][f"{side}_cpu_s_per_gb"] for side in ("sender", "receiver")}
            for kind in KINDS
        }
        results.append(entry)
    best = max(results, key=lambda r: r["framed_mbps"])
    return {
        **best,
        "volume_bytes": volume_bytes,
        "chunk_size": chunk_size,
        "processes": 1 if one_process else 2,
        "repeat": repeat,
        "unit": "MB/s (10**6 bytes per second); CPU seconds per 10**9 bytes",
        "results": results,
    }


def _size(text: str) -> int:
    """``2GiB``, ``512MiB``, ``64KiB`` or a plain byte count."""
    for suffix, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's arguments (also used by ``livemig bench transport``)."""
    parser = argparse.ArgumentParser(prog="livemig bench transport", description=__doc__)
    parser.add_argument("--volume", type=_size, default=2 * GiB, help="bytes per run (2GiB)")
    parser.add_argument(
        "--channels",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, 2, 4],
        help="comma-separated channel counts (1,2,4)",
    )
    parser.add_argument("--chunk", type=_size, default=MiB, help="chunk size (1MiB)")
    parser.add_argument(
        "--one-process", action="store_true", help="sender and receiver in one loop"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _cpu_text(cpu: dict[str, float], *, one_process: bool) -> str:
    if one_process:
        return f"{cpu['sender']:.3f}"
    return f"{cpu['sender']:.3f} / {cpu['receiver']:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark under uvloop and print the results."""
    args = build_parser().parse_args(argv)
    _setup_process()
    result = asyncio.run(
        run(
            args.volume,
            args.channels,
            args.chunk,
            one_process=args.one_process,
            repeat=args.repeat,
        )
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"volume {args.volume / GiB:.2f} GiB, chunks of {args.chunk} bytes, "
        f"{result['processes']} process(es), MB/s = 10**6 bytes/s, median of {args.repeat}"
    )
    sides = "sender+receiver" if args.one_process else "sender / receiver"
    for r in result["results"]:
        print(
            f"  {r['channels']} channel(s): framed {r['framed_mbps']:7.1f}  "
            f"unchecked {r['unchecked_mbps']:7.1f}  raw {r['raw_mbps']:7.1f} MB/s   "
            f"ratio {r['ratio']:.3f}, unchecked {r['unchecked_ratio']:.3f}"
        )
        cpu = r["cpu_s_per_gb"]
        print(
            f"      CPU s/GB ({sides}): "
            + "   ".join(
                f"{kind} {_cpu_text(cpu[kind], one_process=args.one_process)}" for kind in KINDS
            )
        )
    print(
        f"best: {result['channels']} channel(s), ratio {result['ratio']:.3f}, "
        f"unchecked {result['unchecked_ratio']:.3f} (wall-clock: noisy on a shared machine)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

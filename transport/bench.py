"""Transport benchmark: framed sessions against a plain socket, over loopback TCP.

For each channel count it streams the volume twice: through the full framing path
(connect, send_chunk with checksums, the destination's decoder and recv) and through
plain asyncio sockets with no framing at all. The receiver runs in its own process, so
sender and receiver each get a core, as on two hosts; ``--one-process`` runs both in
one event loop instead. Throughput is in MB/s (10**6 bytes per second), measured from
the first byte sent until the receiver confirmed the last one.

    python -m transport.bench [--volume 2GiB] [--channels 1,2,4] [--chunk 1MiB]
                              [--repeat 3] [--one-process] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

import structlog

from transport.auth import AuthConfig
from transport.frames import Tag, encode_devices
from transport.limits import MiB
from transport.session import WRITE_HIGH_WATER as HIGH_WATER
from transport.session import WRITE_LOW_WATER as LOW_WATER
from transport.session import Session, connect, serve

GiB = 1024 * MiB
#: The raw receiver reads into a buffer as large as the framed receiver's segments.
RAW_READ_BUFFER = 4 * MiB
PSK = b"bench"


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


async def _framed_receiver(ready: Callable[[str], None], done: asyncio.Event) -> None:
    async def handler(session: Session) -> None:
        while True:
            frame = await session.recv()
            if frame.tag is Tag.DEVICES:
                await session.send_control(Tag.DEVICES_ACCEPTED)
            elif frame.tag is Tag.END_OF_STREAM:
                await session.send_control(Tag.VERDICT, {"stage": "resumed", "reason": ""})
                break
        await session.close()
        done.set()

    async with await serve("127.0.0.1:0", handler, name="bench-dest", auth=AuthConfig(PSK)) as s:
        ready(s.address)
        await done.wait()


class _RawSink(asyncio.BufferedProtocol):
    """Counts the bytes of one plain connection and acknowledges the last one."""

    def __init__(self, expected: int, finished: Callable[[], None]) -> None:
        self.buffer = memoryview(bytearray(RAW_READ_BUFFER))
        self.expected = expected
        self.finished = finished
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not derive from it

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
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
    """Entry point of the receiving process: serve one run, report the address."""
    _setup_process()

    async def main() -> None:
        done = asyncio.Event()
        if kind == "framed":
            await _framed_receiver(pipe.send, done)
        else:
            await _raw_receiver(per_connection, connections, pipe.send, done)

    asyncio.run(main())


# -- senders ---------------------------------------------------------------------------


async def _send_framed(address: str, volume: int, channels: int, chunk: memoryview) -> float:
    session = await connect(address, name="bench-source", auth=AuthConfig(PSK), channels=channels)
    await session.send_control(Tag.DEVICES, {"devices": encode_devices(_devices(channels))})
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


async def _send_raw(address: str, volume: int, channels: int, chunk: memoryview) -> float:
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


def _devices(count: int) -> list[Any]:
    from devices.base import DeviceDescriptor
    from devices.fsm import Feature

    return [DeviceDescriptor(f"bench{i}", "bench", 1, Feature.STOP_COPY) for i in range(count)]


def _shares(volume: int, parts: int) -> list[tuple[int, int]]:
    """Split ``volume`` bytes over ``parts`` streams, as (index, bytes)."""
    return [(i, volume // parts + (1 if i < volume % parts else 0)) for i in range(parts)]


# -- orchestration ---------------------------------------------------------------------


async def _measure(
    kind: str, volume: int, channels: int, chunk: memoryview, one_process: bool
) -> float:
    send = _send_framed if kind == "framed" else _send_raw
    per_connection = volume // channels
    volume = per_connection * channels
    if one_process:
        done = asyncio.Event()
        address: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        receiver: Coroutine[Any, Any, None]
        if kind == "framed":
            receiver = _framed_receiver(address.set_result, done)
        else:
            receiver = _raw_receiver(per_connection, channels, address.set_result, done)
        task = asyncio.create_task(receiver)
        elapsed = await send(await address, volume, channels, chunk)
        await task
        return volume / elapsed
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=_receiver_process, args=(kind, per_connection, channels, theirs), daemon=True
    )
    process.start()
    try:
        loop = asyncio.get_running_loop()
        address_text: str = await loop.run_in_executor(None, ours.recv)
        elapsed = await send(address_text, volume, channels, chunk)
    finally:
        await asyncio.get_running_loop().run_in_executor(None, process.join, 30)
        if process.is_alive():
            process.kill()
    return volume / elapsed


async def run(
    volume_bytes: int = 2 * GiB,
    channels: Sequence[int] = (1, 2, 4),
    chunk_size: int = MiB,
    *,
    one_process: bool = False,
    repeat: int = 3,
) -> dict[str, Any]:
    """Measure framed and raw throughput for every channel count; the best count wins.

    Each figure is the median of ``repeat`` runs, framed and raw interleaved so that
    drift in the machine's load hits both alike. Returns ``framed_mbps``, ``raw_mbps``,
    ``ratio`` and ``channels`` for the channel count with the highest framed
    throughput, and ``results`` with one entry per count.
    """
    chunk = memoryview(os.urandom(chunk_size))
    results = []
    for count in channels:
        framed_runs, raw_runs = [], []
        for _ in range(repeat):
            framed_runs.append(await _measure("framed", volume_bytes, count, chunk, one_process))
            raw_runs.append(await _measure("raw", volume_bytes, count, chunk, one_process))
        framed, raw = statistics.median(framed_runs), statistics.median(raw_runs)
        results.append(
            {
                "channels": count,
                "framed_mbps": round(framed / 1e6, 1),
                "raw_mbps": round(raw / 1e6, 1),
                "ratio": round(framed / raw, 3),
            }
        )
    best = max(results, key=lambda r: r["framed_mbps"])
    return {
        **best,
        "volume_bytes": volume_bytes,
        "chunk_size": chunk_size,
        "processes": 1 if one_process else 2,
        "repeat": repeat,
        "unit": "MB/s (10**6 bytes per second)",
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
        f"{result['processes']} process(es), MB/s = 10**6 bytes/s"
    )
    for r in result["results"]:
        print(
            f"  {r['channels']} channel(s): framed {r['framed_mbps']:8.1f} MB/s   "
            f"raw {r['raw_mbps']:8.1f} MB/s   ratio {r['ratio']:.3f}"
        )
    print(f"best: {result['channels']} channel(s), ratio {result['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

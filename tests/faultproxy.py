"""A TCP proxy that can cut, stall, corrupt or freeze a link, for tests of link loss.

(asyncpg's idea.) Everything is forwarded as it arrives unless the test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


class FaultProxy:
    """Forwards every connection to ``target`` and breaks them when told to.

    ``cut_after`` closes every connection once that many bytes went upstream (source
    to destination); ``corrupt_at`` flips the upstream byte at that offset (counted
    over all connections); ``freeze_return`` holds everything the destination sends,
    ``freeze_upstream`` everything the source sends (it reads no more: the source's
    buffers fill);
    ``stall`` holds both directions (a link that stops forwarding) until ``resume``;
    ``refuse_first`` resets that many connections at accept (a busy destination);
    ``rate`` caps upstream bytes per second (a slow link).
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("tcp:").rpartition(":")
        self.target = (host, int(port))
        self.upstream_bytes = 0
        self.cut_after: int | None = None
        self.corrupt_at: int | None = None
        self.refuse_first = 0
        self.refused = 0
        self.rate: float | None = None
        self.cut = asyncio.Event()
        #: Set once a stalled pump holds data it did not forward.
        self.holding = asyncio.Event()
        self._return_open = asyncio.Event()
        self._return_open.set()
        self._upstream_open = asyncio.Event()
        self._upstream_open.set()
        #: SO_RCVBUF of the connections it accepts (None: the kernel's autotuning), so a
        #: frozen upstream holds a known, small amount in the kernel.
        self.receive_buffer: int | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Listen on a free loopback port; return the address to give the source."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def freeze_return(self) -> None:
        """Stop forwarding what the destination sends (it is held, not lost)."""
        self._return_open.clear()

    def freeze_upstream(self) -> None:
        """Stop forwarding, and soon reading, what the source sends (held, not lost)."""
        self._upstream_open.clear()

    def stall(self) -> None:
        """Stop forwarding both ways (held, not lost): the link goes silent."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again what ``stall`` held, and everything after it."""
        self._flowing.set()

    def drop(self) -> None:
        """Close every connection now, both ways."""
        self.cut.set()
        for writer in self._writers:
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refused < self.refuse_first:
            self.refused += 1
            writer.transport.abort()
            return
        if self.receive_buffer is not None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        for pump in (self._pump(reader, up_writer, True), self._pump(up_reader, writer, False)):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(1 << 14 if self.rate else 1 << 16):
                if not self._flowing.is_set():
                    self.holding.set()
                    await self._flowing.wait()
                if upstream:
                    await self._upstream_open.wait()
                    data = self._corrupt(data)
                    if self.cut_after is not None:
                        room = self.cut_after - self.upstream_bytes
                        if room <= len(data):
                            writer.write(data[: max(room, 0)])
                            self.upstream_bytes += max(room, 0)
                            self.drop()
                            return
                    self.upstream_bytes += len(data)
                    if self.rate is not None:
                        # Pacing is what a slow link is; no test waits on it.
                        await asyncio.sleep(len(data) / self.rate)
                else:
                    await self._return_open.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    def _corrupt(self, data: bytes) -> bytes:
        """``data`` with the byte at ``corrupt_at`` flipped, if it falls in this block."""
        offset = None if self.corrupt_at is None else self.corrupt_at - self.upstream_bytes
        if offset is None or not 0 <= offset < len(data):
            return data
        self.corrupt_at = None
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        return bytes(flipped)

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        self.drop()
        self._flowing.set()
        self._upstream_open.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

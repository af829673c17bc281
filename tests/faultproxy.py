"""A TCP proxy that can cut or freeze a link, for tests of link loss (asyncpg's idea)."""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    """Forwards every connection to ``target`` and breaks them when told to.

    ``cut_after`` closes every connection once that many bytes went upstream (source
    to destination); ``freeze_return`` holds everything the destination sends, and
    ``freeze`` holds both directions (a link that stops forwarding but stays up).
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("tcp:").rpartition(":")
        self.target = (host, int(port))
        self.upstream_bytes = 0
        self.cut_after: int | None = None
        self.cut = asyncio.Event()
        self._return_open = asyncio.Event()
        self._return_open.set()
        self._upstream_open = asyncio.Event()
        self._upstream_open.set()
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

    def freeze(self) -> None:
        """Stop forwarding both ways; connections stay open, nothing is lost or delivered."""
        self._upstream_open.clear()
        self._return_open.clear()

    def drop(self) -> None:
        """Close every connection now, both ways."""
        self.cut.set()
        for writer in self._writers:
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            while data := await reader.read(1 << 16):
                if upstream:
                    await self._upstream_open.wait()
                    if self.cut_after is not None:
                        room = self.cut_after - self.upstream_bytes
                        if room <= len(data):
                            writer.write(data[: max(room, 0)])
                            self.upstream_bytes += max(room, 0)
                            self.drop()
                            return
                    self.upstream_bytes += len(data)
                else:
                    await self._return_open.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

"""The control client: what ``livemig`` and the tests use to talk to a daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable

import structlog

from orchestrator.service.protocol import (
    JSON,
    MAX_REPLY,
    ControlError,
    DaemonUnreachable,
    encode,
    tcp_address,
)

log = structlog.get_logger(__name__)


def _unreachable(path: str, exc: Exception) -> DaemonUnreachable:
    """Why a connection attempt failed, in the user's terms."""
    if isinstance(exc, FileNotFoundError):
        return DaemonUnreachable(f"no control socket at {path}: is the daemon running?")
    if isinstance(exc, ssl.SSLError):
        return DaemonUnreachable(f"TLS with {path} failed: {exc.reason or exc}")
    if isinstance(exc, ConnectionRefusedError):
        stale = "" if path.startswith("tcp:") else " (stale socket)"
        return DaemonUnreachable(f"nothing listens on {path}: the daemon is not running{stale}")
    if isinstance(exc, PermissionError):
        return DaemonUnreachable(f"permission denied on {path}: only the daemon's user may use it")
    return DaemonUnreachable(f"cannot talk to the daemon at {path}: {exc!r}")


class ControlClient:
    """A connection to a daemon's control socket, for the CLI, the bench and the tests.

    Replies and events share the line stream: a reader task routes replies to the
    waiting ``execute`` (in order: the daemon answers in order) and events to
    ``events()``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: list[asyncio.Future[dict[str, JSON]]] = []
        self._events: asyncio.Queue[dict[str, JSON] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._lost: str | None = None
        self._next_id = 0
        self.greeting: dict[str, JSON] = {}

    @classmethod
    async def connect(
        cls,
        address: str | os.PathLike[str],
        timeout: float = 5.0,  # noqa: ASYNC109 - one budget covers connect and greeting
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ControlClient:
        """Connect, read the greeting, negotiate; DaemonUnreachable saying why not.

        ``address`` is a socket path (or ``unix:PATH``), or ``tcp:HOST:PORT`` for a
        daemon's TLS listener, which needs ``ssl_context`` (client_tls_context with this
        client's certificate). A daemon that refuses this client raises ControlError.
        """
        where = os.fspath(address)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                if where.startswith("tcp:"):
                    if ssl_context is None:
                        raise DaemonUnreachable(
                            f"{where}: a TCP control listener needs TLS (a CA, a certificate "
                            "and its key)"
                        )
                    _, host, port = tcp_address(where)
                    reader, writer = await asyncio.open_connection(
                        host, port, ssl=ssl_context, limit=MAX_REPLY
                    )
                else:
                    reader, writer = await asyncio.open_unix_connection(
                        where.removeprefix("unix:"), limit=MAX_REPLY
                    )
                greeting = await cls._negotiate(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            if writer is not None:
                writer.close()
            raise _unreachable(where, exc) from None
        except ControlError:
            if writer is not None:
                writer.close()
            raise
        if greeting is None:
            writer.close()
            raise DaemonUnreachable(f"{where} did not greet like a livemig daemon")
        client = cls(reader, writer)
        client.greeting = greeting
        client._task = asyncio.create_task(client._read(), name="control-client-reader")
        return client

    @staticmethod
    async def _negotiate(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, JSON] | None:
        """The greeting's body after ``qmp_capabilities`` succeeded; None if not QMP.

        ControlError when the daemon answers the connection with an error (refused).
        """
        greeting = json.loads(await reader.readuntil(b"\n"))
        if isinstance(greeting, dict) and isinstance(greeting.get("error"), dict):
            error = greeting["error"]
            raise ControlError(str(error.get("class")), str(error.get("desc")))
        if not isinstance(greeting, dict) or not isinstance(greeting.get("QMP"), dict):
            return None
        writer.write(encode({"execute": "qmp_capabilities"}))
        answer = json.loads(await reader.readuntil(b"\n"))
        if not isinstance(answer, dict) or "return" not in answer:
            return None
        return dict(greeting["QMP"])

    async def execute(self, command: str, **arguments: JSON) -> JSON:
        """Run a command; its ``return`` value, or ControlError with the daemon's class."""
        if self._lost is not None:
            raise DaemonUnreachable(self._lost)
        self._next_id += 1
        future: asyncio.Future[dict[str, JSON]] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        request = {"execute": command, "arguments": arguments, "id": self._next_id}
        try:
            self._writer.write(encode(request))
            await self._writer.drain()
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon: {exc}") from None
        answer = await future
        if "error" in answer:
            error = answer["error"]
            raise ControlError(str(error.get("class")), str(error.get("desc")))
        return answer.get("return")

    async def subscribe(self, events: list[str] | None = None) -> None:
        """Start receiving events (all of them, or those named)."""
        if events is None:
            await self.execute("subscribe")
        else:
            await self.execute("subscribe", events=events)

    async def events(self) -> AsyncIterator[dict[str, JSON]]:
        """Events as they arrive; ends when the daemon closes the connection."""
        while True:
            message = await self._events.get()
            if message is None:
                self._events.put_nowait(None)  # later iterations end too
                return
            yield message

    async def next_event(
        self,
        match: Callable[[dict[str, JSON]], bool],
        timeout: float,  # noqa: ASYNC109 - the deadline is the point of the call
    ) -> dict[str, JSON]:
        """The first event ``match`` accepts; TimeoutError past ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            async for message in self.events():
                if match(message):
                    return message
        raise DaemonUnreachable(self._lost or "the daemon closed the connection")

    async def close(self) -> None:
        """Close the connection."""
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _read(self) -> None:
        reason = "the daemon closed the connection"
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if "event" in message:
                    self._events.put_nowait(message)
                elif self._pending:
                    self._pending.pop(0).set_result(message)
        except (OSError, ValueError) as exc:
            reason = f"lost the daemon: {exc!r}"
        finally:
            self._lost = reason
            for future in self._pending:
                if not future.done():
                    future.set_exception(DaemonUnreachable(reason))
            self._pending.clear()
            self._events.put_nowait(None)

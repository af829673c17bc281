"""The control protocol: QMP-shaped JSON lines over the daemon's Unix socket.

One JSON object per line, UTF-8, each way. On connect the daemon greets::

    {"QMP": {"version": {"livemig": "0.1.0"}, "name": "source", "capabilities": ["events"]}}

then answers requests in order, one reply each, echoing ``id`` when the request had one::

    -> {"execute": "query-migrate", "arguments": {"id": "3f2a..."}, "id": 7}
    <- {"return": {...}, "id": 7}
    <- {"error": {"class": "MigrationNotFound", "desc": "no migration 3f2a..."}, "id": 7}

After ``subscribe`` the connection also receives events, interleaved with replies::

    <- {"event": "MIGRATION", "data": {...}, "timestamp": {"seconds": 1, "microseconds": 2}}

Unlike QMP there is no capabilities negotiation: commands work straight after the
greeting. Bad input never ends the daemon: a line that is not a request gets an
``InvalidRequest`` error and the connection stays usable; a line over
``MAX_LINE`` bytes gets the error and the connection is closed (the rest of the line
cannot be framed).

The module is a pure core (:func:`decode_request`, :func:`encode`, :class:`Command`
argument checking) plus two thin asyncio shells: :class:`ControlServer` and
:class:`ControlClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

VERSION = "0.1.0"
#: Longest request line accepted, in bytes.
MAX_LINE = 1 << 20
#: Longest reply a client reads: replies come from our own daemon, and a migration's
#: stats with their full history (10 000 iterations) run past MAX_LINE.
MAX_REPLY = 64 << 20
#: Output a slow client may leave unread before the daemon drops it.
MAX_BACKLOG = 4 << 20

JSON = Any


class ControlError(Exception):
    """A request failed; ``error_class`` is the reply's ``class``, the message its ``desc``."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class DaemonUnreachable(ControlError):
    """The client could not reach the daemon's control socket (or lost it)."""

    def __init__(self, desc: str) -> None:
        super().__init__("DaemonUnreachable", desc)


# -- the pure core ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One decoded request."""

    execute: str
    arguments: dict[str, JSON]
    id: JSON = None


def decode_request(line: bytes) -> Request:
    """Parse one request line; ControlError ``InvalidRequest`` naming the problem."""
    try:
        message = json.loads(line)
    except UnicodeDecodeError as exc:
        raise ControlError("InvalidRequest", f"request is not UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise ControlError(
            "InvalidRequest", f"request is not JSON: {exc.msg} at column {exc.colno}"
        ) from None
    if not isinstance(message, dict):
        raise ControlError(
            "InvalidRequest", f"request must be a JSON object, got {type(message).__name__}"
        )
    unknown = sorted(set(message) - {"execute", "arguments", "id"})
    if unknown:
        raise ControlError("InvalidRequest", f"request has unknown member(s): {', '.join(unknown)}")
    execute = message.get("execute")
    if not isinstance(execute, str):
        raise ControlError("InvalidRequest", "request lacks 'execute' (the command name string)")
    arguments = message.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ControlError("InvalidRequest", "'arguments' must be a JSON object")
    return Request(execute, arguments, message.get("id"))


def encode(message: Mapping[str, JSON]) -> bytes:
    """One message as a line; infinities and NaNs (an estimate with no bandwidth yet) are null."""
    return json.dumps(_finite(message), separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _finite(value: JSON) -> JSON:
    """``value`` with every non-finite float replaced by None (strict JSON has no Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def reply(result: JSON, request_id: JSON = None) -> dict[str, JSON]:
    """A success reply."""
    message: dict[str, JSON] = {"return": result}
    if request_id is not None:
        message["id"] = request_id
    return message


def error_reply(error: ControlError, request_id: JSON = None) -> dict[str, JSON]:
    """An error reply."""
    message: dict[str, JSON] = {"error": {"class": error.error_class, "desc": error.desc}}
    if request_id is not None:
        message["id"] = request_id
    return message


def event(name: str, data: Mapping[str, JSON], now: float | None = None) -> dict[str, JSON]:
    """An asynchronous event, stamped like QMP's (wall clock, seconds + microseconds)."""
    now = time.time() if now is None else now
    seconds = int(now)
    return {
        "event": name,
        "data": dict(data),
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
    }


@dataclasses.dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a command: its JSON type(s) and whether it must be given."""

    kind: type | tuple[type, ...]
    required: bool = False
    help: str = ""


Handler = Callable[..., Awaitable[JSON]]


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A command: its handler (called with the checked arguments) and their schema."""

    name: str
    handler: Handler
    args: Mapping[str, Arg]
    help: str = ""

    def check(self, arguments: Mapping[str, JSON]) -> dict[str, JSON]:
        """The arguments, or ControlError ``InvalidParameter`` naming the first bad one."""
        unknown = sorted(set(arguments) - set(self.args))
        if unknown:
            known = ", ".join(sorted(self.args)) or "none"
            raise ControlError(
                "InvalidParameter",
                f"{self.name}: unknown argument(s) {', '.join(unknown)} (known: {known})",
            )
        for name, spec in self.args.items():
            if name not in arguments:
                if spec.required:
                    raise ControlError(
                        "InvalidParameter", f"{self.name}: missing argument {name!r}"
                    )
                continue
            value = arguments[name]
            kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                want = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
                raise ControlError(
                    "InvalidParameter",
                    f"{self.name}: argument {name!r} must be {want}, got {json.dumps(value)}",
                )
        return dict(arguments)


_JSON_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


# -- the server -------------------------------------------------------------------------------


class Connection:
    """One client of the control socket; events reach it once it subscribed."""

    def __init__(self, writer: asyncio.StreamWriter, number: int) -> None:
        self.writer = writer
        self.number = number
        #: Event names it wants; None is every event, an empty set none (the default).
        self.events: frozenset[str] | None = frozenset()

    def send(self, message: Mapping[str, JSON]) -> None:
        """Queue a message; a client that reads nothing is dropped past MAX_BACKLOG."""
        if self.writer.is_closing():
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_BACKLOG:
            log.warning("control_client_dropped", client=self.number, reason="not reading")
            transport.abort()
            return
        self.writer.write(encode(message))

    def wants(self, name: str) -> bool:
        """Whether this connection subscribed to ``name``."""
        return self.events is None or name in self.events


class ControlServer:
    """The Unix control socket (mode 0600): greets, reads requests, dispatches, broadcasts.

    Only the socket's owner (and root) can connect: the file is created under a 0177
    umask and checked afterwards. A live socket already at the path means another daemon
    owns it, and ``start`` refuses; a stale one is replaced.
    """

    name = "control"

    def __init__(
        self,
        path: Path,
        commands: Mapping[str, Command],
        *,
        greeting: Mapping[str, JSON],
    ) -> None:
        self.path = path
        self.commands = commands
        self.greeting = greeting
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = 0
        self._current: Connection | None = None

    @property
    def address(self) -> str:
        """Where clients connect."""
        return f"unix:{self.path}"

    async def start(self) -> None:
        """Bind the socket; OSError saying why not."""
        _remove_stale_socket(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.info("control_listening", path=str(self.path))

    async def stop(self) -> None:
        """Stop accepting, end every connection and remove the socket file."""
        if self._server is not None:
            self._server.close()
        for connection in self._connections:
            connection.writer.close()  # the reader sees EOF and the connection task ends
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=5)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def broadcast(self, name: str, data: Mapping[str, JSON]) -> None:
        """Send an event to every connection that subscribed to it."""
        message = event(name, data)
        for connection in list(self._connections):
            if connection.wants(name):
                connection.send(message)

    @property
    def current(self) -> Connection:
        """The connection whose request is being handled (for ``subscribe``)."""
        assert self._current is not None
        return self._current

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._count += 1
        connection = Connection(writer, self._count)
        self._connections.add(connection)
        client_log = log.bind(client=connection.number)
        client_log.debug("control_client_connected")
        try:
            connection.send({"QMP": dict(self.greeting)})
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await self._handle(connection, exc.partial)
                    break
                except asyncio.LimitOverrunError:
                    connection.send(
                        error_reply(
                            ControlError(
                                "InvalidRequest", f"request line longer than {MAX_LINE} bytes"
                            )
                        )
                    )
                    break
                if line.strip():
                    await self._handle(connection, line)
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            client_log.debug("control_client_lost", error=str(exc))
        finally:
            self._connections.discard(connection)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            client_log.debug("control_client_disconnected")

    async def _handle(self, connection: Connection, line: bytes) -> None:
        request_id: JSON = None
        try:
            request = decode_request(line)
            request_id = request.id
            command = self.commands.get(request.execute)
            if command is None:
                raise ControlError(
                    "CommandNotFound",
                    f"unknown command {request.execute!r}; query-commands lists them",
                )
            arguments = command.check(request.arguments)
            self._current = connection
            try:
                result = await command.handler(**arguments)
            finally:
                self._current = None
            connection.send(reply(result, request_id))
        except ControlError as exc:
            log.info("control_request_refused", error_class=exc.error_class, desc=exc.desc)
            connection.send(error_reply(exc, request_id))
        except Exception as exc:  # a bug in a handler answers its client; the daemon goes on
            log.exception("control_command_crashed")
            connection.send(
                error_reply(ControlError("GenericError", f"internal error: {exc!r}"), request_id)
            )


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket nobody listens on; OSError if a daemon is there or it is no socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink()
    else:
        raise OSError(f"control socket {path} is in use by another daemon")
    finally:
        probe.close()


def _unreachable(path: str, exc: Exception) -> DaemonUnreachable:
    """Why a connection attempt failed, in the user's terms."""
    if isinstance(exc, FileNotFoundError):
        return DaemonUnreachable(f"no control socket at {path}: is the daemon running?")
    if isinstance(exc, ConnectionRefusedError):
        return DaemonUnreachable(
            f"nothing listens on {path}: the daemon is not running (stale socket)"
        )
    if isinstance(exc, PermissionError):
        return DaemonUnreachable(f"permission denied on {path}: only the daemon's user may use it")
    return DaemonUnreachable(f"cannot talk to the daemon at {path}: {exc!r}")


# -- the client -------------------------------------------------------------------------------


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
        path: str | os.PathLike[str],
        timeout: float = 5.0,  # noqa: ASYNC109 - one budget covers connect and greeting
    ) -> ControlClient:
        """Connect and read the greeting; DaemonUnreachable saying why not."""
        path = os.fspath(path)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REPLY)
                greeting = json.loads(await reader.readuntil(b"\n"))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            if writer is not None:
                writer.close()
            raise _unreachable(path, exc) from None
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            writer.close()
            raise DaemonUnreachable(f"{path} did not greet like a livemig daemon")
        client = cls(reader, writer)
        client.greeting = greeting["QMP"]
        client._task = asyncio.create_task(client._read(), name="control-client-reader")
        return client

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

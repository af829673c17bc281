"""The control protocol: QMP over the daemon's Unix socket (and an optional TLS listener).

The wire is QMP's (QEMU's machine protocol), so QMP tools (the ``qemu.qmp`` library,
``qmp-shell``) drive a daemon as they drive QEMU. JSON objects each way, UTF-8; the
daemon ends each of its messages with a newline, clients need not (requests are framed
by their braces, so several may come in one write or one may come in pieces). On
connect the daemon greets in QMP's shape::

    {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0},
                         "package": "livemig 0.1.0"}, "name": "source", "capabilities": []}}

``version`` has QMP's VersionInfo shape because QMP tools read the triple there; the
``package`` says it is livemig. Then, as in QMP, the client must negotiate::

    -> {"execute": "qmp_capabilities"}
    <- {"return": {}}

and every other command before that gets ``CommandNotFound``. After it the daemon answers
requests in order, one reply each, echoing ``id`` when the request had one::

    -> {"execute": "query-migrate", "arguments": {"id": "3f2a..."}, "id": 7}
    <- {"return": {...}, "id": 7}
    <- {"error": {"class": "MigrationNotFound", "desc": "no migration 3f2a..."}, "id": 7}

and sends every event, interleaved with replies (``subscribe`` narrows them)::

    <- {"event": "MIGRATION", "data": {...}, "timestamp": {"seconds": 1, "microseconds": 2}}

QEMU's names are accepted where QEMU has the command (:func:`from_qemu`): ``migrate``
with ``uri``, ``migrate_cancel``, ``migrate-set-parameters`` with QEMU's flat parameter
names and units (orchestrator.engine.params.QEMU_PARAMETERS), ``migrate-continue`` with
``state``.

Bad input never ends the daemon: a request that is not one gets an ``InvalidRequest``
error and the connection stays usable; a request over ``MAX_REQUEST`` bytes or nested
deeper than ``MAX_DEPTH`` gets the error and the connection is closed (the rest of it
cannot be framed). Non-finite numbers (``Infinity``, ``NaN``: Python's JSON reads them)
are refused as ``InvalidParameter`` naming the argument.

The module is a pure core (:class:`RequestParser`, :func:`decode_request`,
:func:`encode`, :class:`Command` argument checking) plus thin asyncio shells:
:class:`ControlServer` and :class:`ControlClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import pwd
import re
import socket
import ssl
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog

from orchestrator.engine.errors import MigrationBlocked
from orchestrator.engine.params import from_qemu_parameters
from transport.checks import has_type

log = structlog.get_logger(__name__)


def _version() -> str:
    try:
        return metadata.version("livemig")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _version()
#: Where a daemon puts its control socket unless its config says otherwise, and where
#: the CLI looks for it (systemd's RuntimeDirectory=livemig creates the folder).
DEFAULT_SOCKET = Path("/run/livemig/control.sock")
#: Longest request accepted, in bytes.
MAX_REQUEST = 1 << 20
#: Deepest nesting of arrays and objects accepted in a request (ours nest 3 deep).
MAX_DEPTH = 32
#: Longest reply a client reads: replies come from our own daemon, and a migration's
#: stats with their full history (10 000 iterations) run past MAX_REQUEST.
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


#: Bytes that matter outside strings once inside an object or array.
_STRUCTURE = re.compile(rb'[{}\[\]"]')
#: Bytes that matter inside a string: its end, or an escape.
_IN_STRING = re.compile(rb'["\\]')
_SPACE = frozenset(b" \t\r\n")


class RequestParser:
    """Splits a byte stream into requests by their brackets, not by lines (QMP framing).

    A pure core: ``feed(bytes)`` returns what completed, each a :class:`Request` or the
    ControlError (``InvalidRequest``) answering a malformed one. Outside brackets a bare
    token (``42``, ``hello``) ends at white space and is answered as not an object. A
    request over ``max_size`` bytes or nested deeper than ``max_depth`` cannot be framed
    further: its error is the last item and ``failed`` is set (the server hangs up).
    """

    def __init__(self, max_size: int = MAX_REQUEST, max_depth: int = MAX_DEPTH) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        #: Set once framing is lost; feed() returns nothing more.
        self.failed = False
        self._buffer = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        #: Whether a request (or bare token) has begun.
        self._started = False

    def feed(self, data: bytes) -> list[Request | ControlError]:
        """The requests ``data`` completes, in order."""
        out: list[Request | ControlError] = []
        if self.failed:
            return out
        begin = 0  # where the bytes of the current request start in ``data``
        pos, end = 0, len(data)
        while pos < end:
            if self._escape:
                self._escape = False
                pos += 1
            elif self._in_string:
                found = _IN_STRING.search(data, pos)
                if found is None:
                    pos = end
                    break
                pos = found.end()
                if data[found.start()] == 0x5C:  # a backslash: the next byte is escaped
                    self._escape = True
                else:
                    self._in_string = False
                    if self._depth == 0:  # a bare string at top level
                        out.append(self._finish(data, begin, pos))
                        begin = pos
            elif self._depth > 0:
                found = _STRUCTURE.search(data, pos)
                if found is None:
                    pos = end
                    break
                pos = found.end()
                byte = data[found.start()]
                if byte == 0x22:  # "
                    self._in_string = True
                elif byte in b"{[":
                    self._depth += 1
                    if self._depth > self.max_depth:
                        return [*out, self._fail(f"request nested deeper than {self.max_depth}")]
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        out.append(self._finish(data, begin, pos))
                        begin = pos
            else:
                byte = data[pos]
                if byte in _SPACE:
                    if self._started:  # the end of a bare token
                        out.append(self._finish(data, begin, pos))
                    pos += 1
                    begin = pos
                    continue
                if byte in b"{[" and self._started:  # a bare token ends where a request starts
                    out.append(self._finish(data, begin, pos))
                    begin = pos
                self._started = True
                if byte in b"{[":
                    self._depth = 1
                elif byte == 0x22:
                    self._in_string = True
                pos += 1
            if self._size(begin, pos) > self.max_size:
                return [*out, self._fail(f"request longer than {self.max_size} bytes")]
        if self._started:
            if self._size(begin, end) > self.max_size:
                return [*out, self._fail(f"request longer than {self.max_size} bytes")]
            self._buffer += data[begin:end]
        return out

    def close(self) -> list[Request | ControlError]:
        """At end of input: a bare token still open is complete; a partial request is not."""
        if self._started and self._depth == 0 and not self._in_string and not self.failed:
            return [self._finish(b"", 0, 0)]
        return []

    def _size(self, begin: int, pos: int) -> int:
        return len(self._buffer) + pos - begin if self._started else 0

    def _finish(self, data: bytes, begin: int, pos: int) -> Request | ControlError:
        self._buffer += data[begin:pos]
        text = bytes(self._buffer)
        self._buffer.clear()
        self._started = False
        try:
            return decode_request(text)
        except ControlError as exc:
            return exc

    def _fail(self, desc: str) -> ControlError:
        self.failed = True
        self._buffer.clear()
        return ControlError("InvalidRequest", desc)


def decode_request(data: bytes) -> Request:
    """Parse one request; ControlError ``InvalidRequest`` naming the problem."""
    try:
        message = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ControlError("InvalidRequest", f"request is not UTF-8: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise ControlError(
            "InvalidRequest", f"request is not JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except RecursionError:  # only when called without RequestParser's depth limit
        raise ControlError("InvalidRequest", "request nested too deep") from None
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


#: QEMU's spellings of livemig commands.
QEMU_COMMANDS = {"migrate_cancel": "migrate-cancel"}


def from_qemu(request: Request) -> Request:
    """``request`` with QEMU's command and argument names put in livemig's terms.

    ``migrate {"uri": ...}`` is ``destination``; ``migrate-set-parameters`` takes QEMU's
    flat parameters (``downtime-limit`` in ms, ``max-bandwidth`` in bytes/s, ...) beside
    or instead of ``parameters``; ``migrate-continue {"state": "pre-switchover"}``.
    InvalidParameter when a QEMU argument has no meaning here.
    """
    execute = QEMU_COMMANDS.get(request.execute, request.execute)
    arguments = dict(request.arguments)
    if execute == "migrate" and "uri" in arguments:
        if "destination" in arguments:
            raise ControlError("InvalidParameter", "migrate: give 'uri' or 'destination', not both")
        arguments["destination"] = arguments.pop("uri")
    elif execute == "migrate-set-parameters":
        flat = {k: v for k, v in arguments.items() if k not in ("id", "parameters")}
        if flat:
            try:
                mapped = from_qemu_parameters(flat)
            except MigrationBlocked as exc:
                raise ControlError("InvalidParameter", f"{execute}: {exc}") from None
            given = arguments.get("parameters", {})
            if not isinstance(given, dict):
                given = {}  # Command.check names the type error
            arguments = {k: v for k, v in arguments.items() if k not in flat}
            arguments["parameters"] = given | mapped
    elif execute == "migrate-continue" and "state" in arguments:
        state = arguments.pop("state")
        if state != "pre-switchover":
            raise ControlError(
                "InvalidParameter",
                f"migrate-continue: state must be 'pre-switchover', got {state!r}",
            )
    return Request(execute, arguments, request.id)


def qemu_migration_info(stats: Mapping[str, JSON]) -> dict[str, JSON]:
    """QEMU's ``query-migrate`` fields (MigrationInfo) from livemig's stats, in ms.

    ``vfio.transferred`` is where QEMU reports the bytes of VFIO device state; the
    times are integers as QEMU gives them, and a figure livemig does not have yet
    (``downtime`` before the switchover) is left out, as QEMU does.
    """
    info: dict[str, JSON] = {"vfio": {"transferred": stats.get("transferred_bytes", 0)}}
    for ours, theirs in (
        ("total_ms", "total-time"),
        ("setup_ms", "setup-time"),
        ("downtime_ms", "downtime"),
        ("expected_downtime_ms", "expected-downtime"),
    ):
        value = stats.get(ours)
        if isinstance(value, int | float) and math.isfinite(value):
            info[theirs] = round(value)
    return info


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
            if not has_type(value, kinds):
                want = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
                raise ControlError(
                    "InvalidParameter",
                    f"{self.name}: argument {name!r} must be {want}, got {json.dumps(value)}",
                )
            where = _non_finite(value, name)
            if where is not None:
                raise ControlError(
                    "InvalidParameter",
                    f"{self.name}: {where[0]} must be a finite number, got {where[1]}",
                )
        return dict(arguments)


def _non_finite(value: JSON, path: str) -> tuple[str, str] | None:
    """Where in ``value`` an Infinity or NaN is (``parameters.timeout_s``) and it, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, json.dumps(value)
    if isinstance(value, dict):
        items: list[tuple[str, JSON]] = [(f"{path}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for inner_path, inner in items:
        found = _non_finite(inner, inner_path)
        if found is not None:
            return found
    return None


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


def greeting(name: str) -> dict[str, JSON]:
    """The QMP greeting of daemon ``name`` (the body under ``"QMP"``)."""
    numbers = [int(n) for n in re.findall(r"\d+", VERSION)[:3]]
    major, minor, micro = [*numbers, 0, 0, 0][:3]
    return {
        "version": {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"livemig {VERSION}",
        },
        "name": name,
        "capabilities": [],
    }


class Connection:
    """One client of the control API; commands and events once it negotiated (QMP)."""

    def __init__(self, writer: asyncio.StreamWriter, number: int, identity: str) -> None:
        self.writer = writer
        self.number = number
        #: Who the client is, for the audit log: ``uid=N(name)`` on the Unix socket, the
        #: certificate's subject over TLS.
        self.identity = identity
        #: Whether it sent ``qmp_capabilities``.
        self.negotiated = False
        #: Event names it wants; None is every event (after negotiation), empty none.
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
        """Whether this connection receives event ``name``."""
        return self.events is None or name in self.events


class ControlServer:
    """The Unix control socket (mode 0600): greets, reads requests, dispatches, broadcasts.

    Only the socket's owner (and root) can connect: the file is created under a 0177
    umask and checked afterwards. A live socket already at the path means another daemon
    owns it, and ``start`` refuses; a stale one is replaced. Other listeners (the TLS
    one in orchestrator.remote) hand their clients to :meth:`serve_client`.
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
        remove_stale_socket(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve_unix, self.path)
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
        """Send an event to every negotiated connection that wants it."""
        message = event(name, data)
        for connection in list(self._connections):
            if connection.negotiated and connection.wants(name):
                connection.send(message)

    @property
    def current(self) -> Connection:
        """The connection whose request is being handled (for ``subscribe``)."""
        assert self._current is not None
        return self._current

    async def _serve_unix(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve_client(reader, writer, _unix_identity(writer.get_extra_info("socket")))

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: str
    ) -> None:
        """Greet, then answer requests until the client leaves or loses framing."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._count += 1
        connection = Connection(writer, self._count, identity)
        self._connections.add(connection)
        client_log = log.bind(client=connection.number, identity=identity)
        client_log.debug("control_client_connected")
        parser = RequestParser()
        try:
            connection.send({"QMP": dict(self.greeting)})
            while not parser.failed:
                data = await reader.read(1 << 16)
                items = parser.feed(data) if data else parser.close()
                for item in items:
                    await self._handle(connection, item)
                await writer.drain()
                if not data:
                    break
        except (ConnectionError, OSError) as exc:
            client_log.debug("control_client_lost", error=str(exc))
        finally:
            self._connections.discard(connection)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            client_log.debug("control_client_disconnected")

    async def _handle(self, connection: Connection, item: Request | ControlError) -> None:
        request_id: JSON = None
        try:
            if isinstance(item, ControlError):
                raise item
            request_id = item.id
            if item.execute == "qmp_capabilities":
                connection.send(reply(self._negotiate(connection, item), request_id))
                return
            if not connection.negotiated:
                raise ControlError(
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            request = from_qemu(item)
            command = self.commands.get(request.execute)
            if command is None:
                raise ControlError(
                    "CommandNotFound",
                    f"unknown command {request.execute!r}; query-commands lists them",
                )
            arguments = command.check(request.arguments)
            log.info(  # the audit log: who ran what
                "control_command",
                client=connection.number,
                identity=connection.identity,
                command=request.execute,
                arguments=arguments,
            )
            self._current = connection
            try:
                result = await command.handler(**arguments)
            finally:
                self._current = None
            connection.send(reply(result, request_id))
        except ControlError as exc:
            log.info(
                "control_request_refused",
                client=connection.number,
                identity=connection.identity,
                error_class=exc.error_class,
                desc=exc.desc,
            )
            connection.send(error_reply(exc, request_id))
        except Exception as exc:  # a bug in a handler answers its client; the daemon goes on
            log.exception("control_command_crashed")
            connection.send(
                error_reply(ControlError("GenericError", f"internal error: {exc!r}"), request_id)
            )

    def _negotiate(self, connection: Connection, request: Request) -> dict[str, JSON]:
        """QMP's ``qmp_capabilities``: leave capabilities mode; events flow from now on."""
        if connection.negotiated:
            raise ControlError(
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
            )
        unknown = sorted(set(request.arguments) - {"enable"})
        if unknown:
            raise ControlError(
                "InvalidParameter", f"qmp_capabilities: unknown argument(s) {', '.join(unknown)}"
            )
        enable = request.arguments.get("enable", [])
        if not isinstance(enable, list):
            raise ControlError("InvalidParameter", "qmp_capabilities: 'enable' must be an array")
        offered = self.greeting.get("capabilities", [])
        for capability in enable:
            if capability not in offered:
                raise ControlError("GenericError", f"Capability {capability!r} not available")
        connection.negotiated = True
        connection.events = None
        return {}


# -- the TCP listener: mutual TLS and an allow-list -------------------------------------------

#: X.509 attribute names as ``ssl.getpeercert()`` gives them, and as allow-lists write them.
_ATTRIBUTES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "emailAddress",
    "domainComponent": "DC",
}

Subject = frozenset[tuple[str, str]]


def subject_pattern(text: str) -> Subject:
    """``CN=ops,O=example`` as attribute pairs; ValueError naming a malformed one."""
    pairs = set()
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value or name not in _ATTRIBUTES.values():
            known = ", ".join(sorted(set(_ATTRIBUTES.values())))
            raise ValueError(f"{part.strip()!r} in {text!r} is not NAME=value ({known})")
        pairs.add((name, value))
    return frozenset(pairs)


def peer_subject(cert: Mapping[str, Any] | None) -> Subject:
    """The subject of a peer certificate as ``ssl.getpeercert()`` returns it."""
    pairs = set()
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            pairs.add((_ATTRIBUTES.get(name, name), value))
    return frozenset(pairs)


def subject_text(subject: Subject) -> str:
    """A subject for people and audit logs: ``CN=ops,O=example``."""
    return ",".join(f"{name}={value}" for name, value in sorted(subject)) or "(no subject)"


class RemoteControlListener:
    """The control API over TCP, for management nodes: mutual TLS, then an allow-list.

    The TLS context requires a client certificate signed by the configured CA; a
    client whose subject matches no ``allow`` entry (a peer daemon's migration
    certificate from the same CA, say) gets an error instead of the greeting and is
    disconnected. Every command it runs is logged (``control_command``) with its
    subject. Connections are served by the :class:`ControlServer` like local ones.
    """

    name = "remote-control"

    def __init__(
        self,
        address: str,
        context: ssl.SSLContext,
        allow: Sequence[str],
        control: ControlServer,
    ) -> None:
        if context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("the TCP control listener requires client certificates")
        self.requested = address
        self.context = context
        self.allow = [subject_pattern(a) for a in allow]
        self.control = control
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        """The bound address (the real port when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            return self.requested
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"tcp:{host}:{port}"

    async def start(self) -> None:
        """Listen; OSError when the address is taken."""
        _, host, port = _tcp(self.requested)
        self._server = await asyncio.start_server(
            self._serve, host, port, ssl=self.context, ssl_handshake_timeout=10
        )
        log.info("remote_control_listening", address=self.address, allow=len(self.allow))

    async def stop(self) -> None:
        """Stop accepting and end this listener's connections."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        subject = peer_subject(writer.get_extra_info("peercert"))
        identity = subject_text(subject)
        peer = writer.get_extra_info("peername")
        if not any(pattern <= subject for pattern in self.allow):
            log.warning("remote_control_refused", identity=identity, peer=str(peer))
            refusal = ControlError(
                "PermissionDenied",
                f"certificate subject {identity} is not allowed to control this daemon "
                "([control] allow)",
            )
            writer.write(encode(error_reply(refusal)))
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        log.info("remote_control_connected", identity=identity, peer=str(peer))
        self._writers.add(writer)
        try:
            await self.control.serve_client(reader, writer, identity)
        finally:
            self._writers.discard(writer)


def _tcp(address: str) -> tuple[str, str, int]:
    """``tcp:HOST:PORT`` or ``HOST:PORT`` split; ValueError naming the expected form."""
    rest = address.removeprefix("tcp:")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r} is not tcp:HOST:PORT")
    return "tcp", host.strip("[]"), int(port)


def _unix_identity(sock: socket.socket | None) -> str:
    """``uid=1000(alice)`` for a Unix-socket client, from the kernel's peer credentials."""
    if sock is None:
        return "unix"
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        _, uid, _ = struct.unpack("3i", credentials)
    except (OSError, struct.error):
        return "unix"
    try:
        return f"uid={uid}({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid={uid}"


def remove_stale_socket(path: Path, what: str = "control socket") -> None:
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
        raise OSError(f"{what} {path} is in use by another process")
    finally:
        probe.close()


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
                    _, host, port = _tcp(where)
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

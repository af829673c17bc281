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
:class:`~orchestrator.service.control.ControlServer` and
:class:`~orchestrator.service.client.ControlClient`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import structlog

from orchestrator.engine.errors import MigrationBlocked
from orchestrator.engine.params import from_qemu_parameters
from transport.address import parse_address
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


def tcp_address(address: str) -> tuple[str, str, int]:
    """``tcp:HOST:PORT`` or ``HOST:PORT`` split; ValueError naming what is wrong."""
    kind, host, port = parse_address(address)
    if kind != "tcp":
        raise ValueError(f"{address!r}: a TCP control address is tcp:HOST:PORT")
    return kind, host, port

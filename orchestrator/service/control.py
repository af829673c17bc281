"""The control server: the daemon's QMP socket, and the TCP listener with mutual TLS.

The protocol itself is :mod:`orchestrator.service.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import socket
import ssl
import stat
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from orchestrator.service.protocol import (
    JSON,
    MAX_BACKLOG,
    VERSION,
    Command,
    ControlError,
    Request,
    RequestParser,
    encode,
    error_reply,
    event,
    from_qemu,
    reply,
    tcp_address,
)
from transport.address import format_address

log = structlog.get_logger(__name__)


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
        #: ``wants``' answers until a connection comes, goes, negotiates or subscribes
        #: (``subscribe``): asked at every device's state change, in the switchover too.
        self._wanted: dict[str, bool] = {}

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

    def wants(self, name: str) -> bool:
        """Whether any connection would receive event ``name`` (else it need not be made)."""
        wanted = self._wanted.get(name)
        if wanted is None:
            wanted = self._wanted[name] = any(
                c.negotiated and c.wants(name) for c in self._connections
            )
        return wanted

    def subscribe(self, connection: Connection, events: frozenset[str] | None) -> None:
        """Send ``connection`` the events named (None: every event) from now on."""
        connection.events = events
        self._wanted.clear()

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
        self._wanted.clear()
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
            self._wanted.clear()
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
        self.subscribe(connection, None)
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
        return format_address("tcp", host, port)

    async def start(self) -> None:
        """Listen; OSError when the address is taken."""
        _, host, port = tcp_address(self.requested)
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

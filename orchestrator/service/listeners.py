"""What accepts work from outside: the Listener shape and the migration listener.

The control socket (control.py) and the metrics endpoint (metrics.py) are listeners too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

import transport
from orchestrator.service.control import remove_stale_socket

if TYPE_CHECKING:
    from orchestrator.service.service import Service

log = structlog.get_logger(__name__)


class Listener(Protocol):
    """Something that accepts work from outside; started and stopped by the runner."""

    name: str

    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class MigrationListener:
    """Accepts incoming migrations on one address (transport.serve)."""

    name = "migration"

    def __init__(self, address: str, service: Service) -> None:
        self.requested = address
        self.service = service
        self._server: transport.Server | None = None

    @property
    def address(self) -> str:
        """The bound address (the real port when 0 was asked for)."""
        return self._server.address if self._server is not None else self.requested

    async def start(self) -> None:
        """Listen; OSError when the address is taken."""
        kind, path, _ = transport.parse_address(self.requested)
        if kind == "unix":
            remove_stale_socket(Path(path), "migration socket")
        self._server = await transport.serve(
            self.requested,
            self.service.accept,
            name=self.service.config.name,
            auth=self.service.server_auth,
            link_timeout_s=self.service.config.migration.link_timeout_s,
        )

    async def stop(self) -> None:
        """Stop listening; incoming migrations still running are cancelled (and reset)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        kind, path, _ = transport.parse_address(self.requested)
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


WILDCARDS = ("0.0.0.0", "::", "")
LOOPBACK = ("localhost", "127.0.0.1", "::1")


def same_host(a: str, b: str) -> bool:
    return a == b or (a in LOOPBACK and b in LOOPBACK)


def is_local(host: str) -> bool:
    """Whether ``host`` names this machine: loopback, our host name, or a local address."""
    if host in LOOPBACK or host == socket.gethostname():
        return True
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False  # a name: not resolved here
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, 0))  # only an address of this host can be bound
        except OSError:
            return False
    return True


def listens_on(address: str, listening: Iterable[str]) -> bool:
    """Whether ``address`` reaches one of ``listening`` (a daemon's bound addresses).

    The same address, or a TCP address on the same port whose host is the one bound
    (loopback names alike), a wildcard (it reaches this host), or any local address
    when a wildcard was bound. Host names other than ``localhost`` and our own are not
    resolved here.
    """
    try:
        kind, host, port = transport.parse_address(address)
    except ValueError:
        return False
    for bound in listening:
        own = transport.parse_address(bound)
        if (kind, host, port) == own:
            return True
        if kind == own[0] == "tcp" and port == own[2]:
            if same_host(host, own[1]) or host in WILDCARDS:
                return True
            if own[1] in WILDCARDS and is_local(host):
                return True
    return False


def shared_address(bound: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The first (key, why) of ``bound`` (key, address) pairs whose listener could not
    bind beside an earlier one, naming both; None when they all can."""
    for index, (key, address) in enumerate(bound):
        for other_key, other in bound[:index]:
            if clashes(address, other):
                also = other_key if other == address else f"{other_key} ({other})"
                return key, f"{address} is also {also}: each listener needs its own address"
    return None


def clashes(address: str, other: str) -> bool:
    """Whether listeners on ``address`` and ``other`` (both valid) could not both bind."""
    kind, host, port = transport.parse_address(address)
    other_kind, other_host, other_port = transport.parse_address(other)
    if kind != other_kind:
        return False
    if kind == "unix":
        return host == other_host
    if port == 0 or port != other_port:
        return False
    return same_host(host, other_host) or host in WILDCARDS or other_host in WILDCARDS

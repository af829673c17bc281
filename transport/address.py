"""Migration addresses: ``HOST:PORT``, ``tcp:HOST:PORT``, ``unix:PATH``."""

from __future__ import annotations

import structlog

log = structlog.get_logger(__name__)


def parse_address(address: str) -> tuple[str, str, int]:
    """``("tcp", host, port)`` or ``("unix", path, 0)`` from a livemig address.

    Accepted forms: ``tcp:HOST:PORT``, ``HOST:PORT``, ``[v6]:PORT`` and ``unix:/path``.
    """
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ValueError(f"{address!r}: empty unix socket path")
        return "unix", path, 0
    rest = address.removeprefix("tcp:")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r}: expected tcp:HOST:PORT, HOST:PORT or unix:/path")
    return "tcp", host.removeprefix("[").removesuffix("]") or "localhost", int(port)


def format_address(kind: str, host: str, port: int) -> str:
    """The inverse of :func:`parse_address`."""
    if kind == "unix":
        return f"unix:{host}"
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"

"""Migration addresses: ``HOST:PORT``, ``tcp:HOST:PORT``, ``unix:PATH``."""

from __future__ import annotations

_FORMS = "expected tcp:HOST:PORT, HOST:PORT or unix:/path"


def parse_address(address: str) -> tuple[str, str, int]:
    """``("tcp", host, port)`` or ``("unix", path, 0)`` from a livemig address.

    Accepted forms: ``tcp:HOST:PORT``, ``HOST:PORT``, ``[v6]:PORT`` and ``unix:/path``.
    ValueError names what is wrong (the port, the host, the brackets), since operators
    type these into configs and command lines.
    """
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path:
            raise ValueError(f"{address!r}: empty unix socket path")
        return "unix", path, 0
    rest = address.removeprefix("tcp:")
    if rest.startswith("//"):
        raise ValueError(f"{address!r}: no '//' after 'tcp:': write tcp:HOST:PORT")
    host, sep, port = rest.rpartition(":")
    if not sep:
        raise ValueError(f"{address!r}: {_FORMS} (no port given)")
    if not port:
        raise ValueError(f"{address!r}: no port after ':'")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"{address!r}: port {port!r} is not a number")
    if int(port) > 65535:
        raise ValueError(f"{address!r}: port {port} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif "[" in host or "]" in host:
        raise ValueError(f"{address!r}: unbalanced brackets around the host")
    elif ":" in host:
        raise ValueError(f"{address!r}: an IPv6 host goes in brackets: [{host}]:{port}")
    if any(c.isspace() or not c.isprintable() or c in "[]" for c in host):
        raise ValueError(
            f"{address!r}: host {host!r} has a space, a control character or a bracket "
            "(no resolver takes one)"
        )
    if not host:
        raise ValueError(
            f"{address!r}: empty host: name one (127.0.0.1 for this host only, 0.0.0.0 "
            "to listen on every interface)"
        )
    return "tcp", host, int(port)


def parse_destination(address: str) -> tuple[str, str, int]:
    """:func:`parse_address` for an address to connect to: port 0 (a listener's "any free
    port") names no daemon, so ValueError says so rather than a connection retried."""
    kind, host, port = parse_address(address)
    if kind == "tcp" and port == 0:
        raise ValueError(
            f"{address!r}: port 0 is no destination's port (a listener's 0 picks a free "
            "port): give the port the destination listens on"
        )
    return kind, host, port


def format_address(kind: str, host: str, port: int) -> str:
    """The inverse of :func:`parse_address`."""
    if kind == "unix":
        return f"unix:{host}"
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"

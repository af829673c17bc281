"""The daemon's TOML configuration, validated with errors naming the key and its line.

::

    name = "source"                          # announced in handshakes (default: host name)
    control_socket = "/run/livemig/control.sock"   # the default, where the CLI looks
    state_file = "/var/lib/livemig/owners.json"   # who owns each device (default: beside
                                             # the control socket, as NAME.owners.json)
    listen = ["0.0.0.0:7070", "unix:/run/livemig/migration.sock"]   # or one string
    metrics = "127.0.0.1:9464"               # optional Prometheus endpoint (or a port)
    max_total_bandwidth = 500e6              # optional: bytes/s all outgoing migrations share

    [auth]                                   # required for a listen address off loopback
    psk_file = "/etc/livemig/psk"            # pre-shared key (mode 0600, >= 16 bytes)
    # tls_cert, tls_key, tls_ca              # TLS (mutual when all three are given)
    # insecure = true                        # accept unauthenticated peers off loopback

    [control]                                # optional: the control API over TCP
    tcp = "0.0.0.0:7079"                     # for management nodes; mutual TLS only
    tls_cert = "/etc/livemig/control.pem"    # this daemon's certificate for it
    tls_key = "/etc/livemig/control.key"
    tls_ca = "/etc/livemig/operators-ca.pem" # the CA that signs the clients' certificates
    allow = ["CN=fleet-controller"]          # client subjects that may drive this daemon

    [migration]                              # defaults: any MigrationParams field
    downtime_limit_ms = 300                  # (link_timeout_s also applies to incoming)

    [daemon]
    max_records = 100                        # finished migrations kept for queries
    handshake_timeout_s = 10                 # an incoming migration's first message
    idle_timeout_s = 60                      # silence mid-stream, before COMMIT; longest window

    [[device]]                               # one per device this host owns
    kind = "simulated"                       # simulated | ram | vfio | vfio-user
    name = "sim0"
    state_mib = 16

    [[device]]
    kind = "vfio"
    name = "tty0"
    device = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"   # mdev UUID, PCI address or path
    # faults = { corrupt_stream = true }     # fault injection, for tests only
    # accept_incoming = true                 # exists to receive: starts idle, and takes a
                                             # migration whenever it holds no workload

    [[device]]
    kind = "vfio-user"                       # a device served by a vfio-user server
    name = "nvme0"
    socket = "/run/spdk/nvme0.sock"          # the server's UNIX socket (absolute)
    # features = ["STOP_COPY"]               # mask: stop-copy only (default: what it offers)

tomllib gives no positions, so :class:`_KeyLines` finds each key's line in the text:
a small scan of table headers and ``key =`` lines, which is all a config of this shape
uses. A key it cannot place (inside an inline table, say) is reported at its table.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.engine.errors import MigrationBlocked
from orchestrator.engine.params import MigrationParams
from orchestrator.service.control import subject_pattern
from orchestrator.service.devicetables import DeviceConfig as DeviceConfig
from orchestrator.service.devicetables import device_config
from orchestrator.service.listeners import shared_address
from orchestrator.service.protocol import DEFAULT_SOCKET
from orchestrator.service.tomlreader import ConfigError as ConfigError
from orchestrator.service.tomlreader import KeyPath, Reader
from transport.address import parse_address
from transport.auth import AuthConfig, client_tls_context, server_tls_context
from transport.checks import has_type

#: Shortest pre-shared key accepted, in bytes.
MIN_PSK_BYTES = 16


@dataclasses.dataclass(frozen=True, slots=True)
class AuthSettings:
    """How this daemon authenticates peers, as the config gave it."""

    psk: bytes | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_check_hostname: bool = True
    #: Listening off loopback without authentication was asked for explicitly.
    insecure: bool = False

    def server(self) -> AuthConfig:
        """What the migration listeners require of an incoming source."""
        context = None
        if self.tls_cert is not None:
            context = server_tls_context(self.tls_cert, self.tls_key, client_ca_file=self.tls_ca)
        return AuthConfig(psk=self.psk, ssl_context=context)

    def client(self) -> AuthConfig:
        """What an outgoing migration presents to, and requires of, the destination."""
        context = None
        if self.tls_ca is not None:
            context = client_tls_context(
                self.tls_ca,
                self.tls_cert,
                self.tls_key,
                check_hostname=self.tls_check_hostname,
            )
        return AuthConfig(psk=self.psk, ssl_context=context)

    @property
    def method(self) -> str:
        """A word for logs: which checks are on."""
        methods = [m for m, on in (("psk", self.psk), ("tls", self.tls_cert)) if on]
        return "+".join(methods) or "none"


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteControl:
    """The ``[control]`` TCP listener: mutual TLS and the client subjects allowed."""

    address: str
    tls_cert: Path
    tls_key: Path | None
    tls_ca: Path
    #: Each entry a subject pattern (``CN=ops,O=example``) a client must match.
    allow: tuple[str, ...]

    def ssl_context(self) -> ssl.SSLContext:
        """A server context that requires a client certificate signed by ``tls_ca``."""
        return server_tls_context(self.tls_cert, self.tls_key, client_ca_file=self.tls_ca)


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything a daemon needs, validated; ``file`` is where it came from."""

    file: str
    name: str
    control_socket: Path
    listen: tuple[str, ...]
    metrics: tuple[str, int] | None
    auth: AuthSettings
    migration: MigrationParams
    devices: tuple[DeviceConfig, ...]
    #: The ownership records (orchestrator.service.ownership); survives daemon restarts.
    state_file: Path | None = None
    #: The optional TCP control listener (``[control]``).
    remote_control: RemoteControl | None = None
    #: Bytes/s all outgoing migrations together may send; None is no host-wide cap.
    max_total_bandwidth: float | None = None
    #: Finished migrations remembered per direction (running ones are always kept).
    max_records: int = 100
    #: An incoming migration's handshake_timeout_s and idle_timeout_s (DestinationMigration).
    incoming_timeouts: Mapping[str, float] = dataclasses.field(default_factory=dict)


# -- loading --------------------------------------------------------------------------------

_TOP_KEYS = {
    "name",
    "control_socket",
    "state_file",
    "control",
    "max_total_bandwidth",
    "listen",
    "metrics",
    "auth",
    "migration",
    "device",
    "daemon",
}


def load(path: str | os.PathLike[str]) -> DaemonConfig:
    """Read and validate a config file; ConfigError says what is wrong and where."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, None, "", f"cannot read the config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(file, None, "", f"not UTF-8 text: {exc.reason}") from exc
    return parse(text, file=file)


def parse(text: str, *, file: str = "<config>") -> DaemonConfig:
    """Validate a config's text; relative paths in it are relative to the file's folder."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            file, int(line.group(1)) if line else None, "", f"not valid TOML: {exc}"
        ) from exc
    reader = Reader(file, text)
    base = Path(file).resolve().parent if file != "<config>" else Path.cwd()
    reader.refuse_unknown(document, (), _TOP_KEYS)

    name = reader.get(document, (), "name", str, socket.gethostname())
    if not name or len(name) > 64:
        raise reader.error(("name",), "must be 1 to 64 characters")
    if not re.fullmatch(r"[\w.-]+", name, re.ASCII) or name.startswith("."):
        raise reader.error(
            ("name",), f"must be letters, digits, '.', '-' or '_' (a host name), got {name!r}"
        )
    control = base / reader.get(document, (), "control_socket", str, str(DEFAULT_SOCKET))
    listen_value = reader.get(document, (), "listen", (str, list), [])
    listen = [listen_value] if isinstance(listen_value, str) else listen_value
    for index, address in enumerate(listen):
        if not isinstance(address, str):
            raise reader.error(("listen",), f"entry {index} must be a string, got {address!r}")
        _check_address(reader, ("listen",), address)
    listen = [_absolute(address, base) for address in listen]
    metrics = _metrics(reader, document.get("metrics"))
    auth = _auth(reader, reader.get(document, (), "auth", dict, {}), base)
    _refuse_open_listeners(reader, listen, auth)
    state_file = base / reader.get(
        document, (), "state_file", str, str(control.parent / f"{name}.owners.json")
    )
    remote = _remote_control(reader, reader.get(document, (), "control", dict, None), base)
    bound = [("listen", a) for a in listen] + [("control_socket", f"unix:{control}")]
    bound += [("metrics", f"{metrics[0]}:{metrics[1]}")] if metrics else []
    bound += [("control.tcp", remote.address)] if remote else []
    shared = shared_address(bound)
    if shared is not None:  # else the bind fails at start, as if another process held it
        raise reader.error(tuple(shared[0].split(".")), shared[1])
    migration = _migration(reader, reader.get(document, (), "migration", dict, {}))
    daemon = reader.get(document, (), "daemon", dict, {})
    reader.refuse_unknown(
        daemon, ("daemon",), {"max_records", "handshake_timeout_s", "idle_timeout_s"}
    )
    max_records = reader.get(daemon, ("daemon",), "max_records", int, 100)
    if max_records < 1:
        raise reader.error(("daemon", "max_records"), f"must be >= 1, got {max_records}")
    incoming_timeouts = {}
    for key, default in (("handshake_timeout_s", 10.0), ("idle_timeout_s", 60.0)):
        value = reader.get(daemon, ("daemon",), key, (int, float), default)
        if not 0 < value < 1e6:
            raise reader.error(("daemon", key), f"must be a number of seconds > 0, got {value}")
        incoming_timeouts[key] = float(value)
    entries = reader.get(document, (), "device", list, [])
    devices = tuple(device_config(reader, entry, index) for index, entry in enumerate(entries))
    seen: dict[str, int] = {}
    for index, device in enumerate(devices):
        if device.name in seen:
            raise reader.error(
                ("device", index, "name"),
                f"device name {device.name!r} is already used by device[{seen[device.name]}]",
            )
        seen[device.name] = index
    return DaemonConfig(
        file=file,
        name=name,
        control_socket=control,
        listen=tuple(listen),
        metrics=metrics,
        auth=auth,
        migration=migration,
        devices=devices,
        state_file=state_file,
        remote_control=remote,
        max_total_bandwidth=_total_bandwidth(reader, document),
        max_records=max_records,
        incoming_timeouts=incoming_timeouts,
    )


def _refuse_open_listeners(reader: Reader, listen: list[str], auth: AuthSettings) -> None:
    """A listen address off loopback needs [auth]: else anyone there may send migrations."""
    if auth.method != "none" or auth.insecure:
        return
    for address in listen:
        kind, host, _ = parse_address(address)
        if kind == "unix" or _is_loopback(host):
            continue
        raise reader.error(
            ("listen",),
            f"{address} is reachable from other hosts and [auth] is not configured, so any "
            "peer could send migrations here; add psk_file or TLS under [auth], or set "
            "[auth] insecure = true to accept that",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_address(reader: Reader, path: KeyPath, address: str) -> None:
    """An address the transport accepts: ``HOST:PORT``, ``tcp:HOST:PORT`` or ``unix:PATH``."""
    try:
        parse_address(address)
    except ValueError as exc:
        raise reader.error(path, str(exc)) from None


def _absolute(address: str, base: Path) -> str:
    if address.startswith("unix:"):
        return f"unix:{base / address[5:]}"
    return address


def _metrics(reader: Reader, value: object) -> tuple[str, int] | None:
    if value is None:
        return None
    if has_type(value, int):
        value = f"127.0.0.1:{value}"
    if not isinstance(value, str):
        raise reader.error(("metrics",), f"must be a port or host:port, got {value!r}")
    _check_address(reader, ("metrics",), value)
    if value.startswith("unix:"):
        raise reader.error(("metrics",), "the metrics endpoint is HTTP over TCP: use host:port")
    _, host, port = parse_address(value)
    return host, port


def _auth(reader: Reader, table: Mapping[str, Any], base: Path) -> AuthSettings:
    path: KeyPath = ("auth",)
    reader.refuse_unknown(
        table,
        path,
        {"psk_file", "tls_cert", "tls_key", "tls_ca", "tls_check_hostname", "insecure"},
    )
    psk = None
    if "psk_file" in table:
        psk_path = base / reader.get(table, path, "psk_file", str)
        key_path = (*path, "psk_file")
        try:
            mode = psk_path.stat().st_mode
            psk = psk_path.read_bytes().strip()
        except OSError as exc:
            raise reader.error(key_path, f"cannot read {psk_path}: {exc.strerror}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise reader.error(
                key_path, f"{psk_path} is readable by others (mode {mode & 0o777:o}); chmod 600 it"
            )
        if len(psk) < MIN_PSK_BYTES:
            raise reader.error(
                key_path, f"{psk_path} holds {len(psk)} bytes; a key needs {MIN_PSK_BYTES} or more"
            )
    files: dict[str, Path | None] = {}
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = reader.get(table, path, key, str, None)
        files[key] = None if value is None else base / value
        if files[key] is not None and not files[key].is_file():  # type: ignore[union-attr]
            raise reader.error((*path, key), f"{files[key]} is not a readable file")
    if files["tls_cert"] is None and files["tls_key"] is not None:
        raise reader.error((*path, "tls_key"), "tls_key without tls_cert")
    if files["tls_cert"] is not None and files["tls_ca"] is None:
        raise reader.error(
            (*path, "tls_cert"), "TLS needs tls_ca too: the CA that signed the peers' certificates"
        )
    settings = AuthSettings(
        psk=psk,
        tls_cert=files["tls_cert"],
        tls_key=files["tls_key"],
        tls_ca=files["tls_ca"],
        tls_check_hostname=reader.get(table, path, "tls_check_hostname", bool, True),
        insecure=reader.get(table, path, "insecure", bool, False),
    )
    if settings.tls_cert is not None:
        try:
            settings.server()
            settings.client()
        except (OSError, ValueError) as exc:
            raise reader.error((*path, "tls_cert"), f"cannot load the TLS files: {exc}") from exc
    return settings


def _total_bandwidth(reader: Reader, document: Mapping[str, Any]) -> float | None:
    value = reader.positive(document, (), "max_total_bandwidth", None)
    if value is not None and not math.isfinite(value):
        raise reader.error(("max_total_bandwidth",), f"must be finite, got {value!r}")
    return None if value is None else float(value)


def _remote_control(
    reader: Reader, table: Mapping[str, Any] | None, base: Path
) -> RemoteControl | None:
    """``[control]``: a TCP address, never without mutual TLS and an allow-list."""
    if table is None:
        return None
    path: KeyPath = ("control",)
    reader.refuse_unknown(table, path, {"tcp", "tls_cert", "tls_key", "tls_ca", "allow"})
    address = reader.get(table, path, "tcp", str)
    _check_address(reader, (*path, "tcp"), address)
    if address.startswith("unix:"):
        raise reader.error((*path, "tcp"), "must be HOST:PORT (the Unix socket is control_socket)")
    files: dict[str, Path] = {}
    for key in ("tls_cert", "tls_ca"):
        if key not in table:
            raise reader.error(
                path,
                f"the TCP control listener needs mutual TLS: missing {key!r} "
                "(tls_cert, tls_key and tls_ca: the CA that signs the clients' certificates)",
            )
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = reader.get(table, path, key, str, None)
        if value is not None:
            files[key] = base / value
            if not files[key].is_file():
                raise reader.error((*path, key), f"{files[key]} is not a readable file")
    allow = reader.get(table, path, "allow", list)
    if not allow or not all(isinstance(a, str) and "=" in a for a in allow):
        raise reader.error(
            (*path, "allow"),
            'must list the client certificate subjects allowed, as ["CN=name", ...]',
        )
    for entry in allow:
        try:
            subject_pattern(entry)
        except ValueError as exc:
            raise reader.error((*path, "allow"), str(exc)) from None
    settings = RemoteControl(
        address, files["tls_cert"], files.get("tls_key"), files["tls_ca"], tuple(allow)
    )
    try:
        settings.ssl_context()
    except (OSError, ValueError) as exc:
        raise reader.error((*path, "tls_cert"), f"cannot load the TLS files: {exc}") from exc
    return settings


def _migration(reader: Reader, table: Mapping[str, Any]) -> MigrationParams:
    """MigrationParams' own validation, its complaint placed at the key it names."""
    path: KeyPath = ("migration",)
    known = set(MigrationParams().as_dict())
    reader.refuse_unknown(table, path, known)
    try:
        return MigrationParams().updated(table)
    except MigrationBlocked as exc:
        named = exc.parameter if exc.parameter in table else None
        raise reader.error((*path, named) if named else path, str(exc)) from None

"""The vfio-user wire: message layout and one client connection over a UNIX socket.

Every message starts with a 16-byte header in host byte order (``msg_id`` u16,
``cmd`` u16, ``msg_size`` u32 including the header, ``flags`` u32, ``error_no`` u32);
a reply carries the command's id and number, the REPLY type, and on failure the ERROR
flag with an errno. Facts from the protocol (QEMU's docs/interop/vfio-user.rst) and
libvfio-user at efd091bc (include/vfio-user.h, lib/tran_sock.c):

* The client speaks first with VERSION (major 0, minor 2, a NUL-terminated JSON
  capabilities object); the reply's JSON may carry ``max_data_xfer_size``, the
  largest data payload of one message (1 MiB when absent).
* libvfio-user reads a message's body with one ``recv()``: a message the kernel split
  across socket buffers arrives short and is refused. Messages up to one socket
  buffer (~32 KiB) are sent whole, so :data:`SEND_LIMIT` caps what we send, and
  requests go one at a time (a reply proves the server read the whole request, so
  the next one starts in an empty socket).
* Each exchange runs shielded from the caller's cancellation: abandoning it midway
  would leave its reply to be taken for the next command's.
* The spec lets a server send its own commands (DMA_READ/WRITE) between a request and
  its reply. livemig maps no DMA, so a server has none to send; a message that is
  not the awaited reply breaks the connection rather than being guessed at.
* A reply's ERROR flag may come with an errno of 0 (the spec allows it).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import struct
from collections.abc import Sequence

from devices.base import Buffer

#: struct vfio_user_header
HEADER = struct.Struct("=HHIII")
#: struct vfio_user_version: major, minor, then JSON
VERSION_BODY = struct.Struct("=HH")
#: struct vfio_user_device_feature: argsz, flags, then data
FEATURE = struct.Struct("=II")
#: struct vfio_user_device_feature_migration: flags
MIGRATION_FLAGS = struct.Struct("=Q")
#: struct vfio_user_device_feature_mig_state: device_state, data_fd (unused)
MIG_STATE = struct.Struct("=II")
#: struct vfio_user_mig_data: argsz, size, then data
MIG_DATA = struct.Struct("=II")
#: struct vfio_user_region_access: offset, region, count, then data
REGION_ACCESS = struct.Struct("=QII")

VERSION = 1
REGION_READ = 9
REGION_WRITE = 10
DEVICE_RESET = 13
DEVICE_FEATURE = 16
MIG_DATA_READ = 17
MIG_DATA_WRITE = 18
COMMANDS = {
    VERSION: "VFIO_USER_VERSION",
    REGION_READ: "VFIO_USER_REGION_READ",
    REGION_WRITE: "VFIO_USER_REGION_WRITE",
    DEVICE_RESET: "VFIO_USER_DEVICE_RESET",
    DEVICE_FEATURE: "VFIO_USER_DEVICE_FEATURE",
    MIG_DATA_READ: "VFIO_USER_MIG_DATA_READ",
    MIG_DATA_WRITE: "VFIO_USER_MIG_DATA_WRITE",
}

F_TYPE_MASK = 0xF
F_TYPE_REPLY = 0x1
F_ERROR = 0x20

FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2

PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 2
#: What the protocol assumes when the server names no limit.
DEFAULT_MAX_DATA_XFER = 1 << 20
#: Largest message we send: one socket buffer's worth, with room to spare.
SEND_LIMIT = 24 << 10
#: Room for the header and a command's own fields in front of its data.
SEND_OVERHEAD = 64
#: Connection attempts while a server is between clients, and the pause between them.
CONNECT_ATTEMPTS = 50
CONNECT_RETRY_S = 0.02
#: Largest reply accepted: the largest data payload plus the bookkeeping around it.
REPLY_SLACK = 4096


class ProtocolFailure(Exception):
    """One exchange failed: the server's errno (``errno`` set) or a broken connection."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def errno_text(code: int) -> str:
    """``EINVAL (Invalid argument)`` for an errno; 0 is an error without one."""
    if code == 0:
        return "error without an errno"
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


class Connection:
    """One client connection: sequential request/reply exchanges with a timeout each."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._next_id = 0
        #: Why the connection is unusable, once it is.
        self.broken: str | None = None
        #: Largest data payload the server takes or sends in one message.
        self.max_data_xfer = DEFAULT_MAX_DATA_XFER

    @classmethod
    async def open(cls, path: str, *, request_timeout: float) -> Connection:
        """Connect and negotiate the version; ProtocolFailure if either fails."""
        try:
            async with asyncio.timeout(request_timeout):
                reader, writer = await cls._connect(path)
        except (OSError, TimeoutError) as exc:
            raise ProtocolFailure(f"cannot connect to {path}: {exc or 'timed out'}") from exc
        connection = cls(reader, writer, request_timeout)
        try:
            await connection._negotiate()
        except BaseException:
            connection.close()
            raise
        return connection

    @staticmethod
    async def _connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect, retrying for a moment while the server is between two clients.

        libvfio-user listens with a backlog of 0 and accepts the next client only once
        it has noticed the previous one leave, so a connect right after a hang-up can be
        refused although the server is alive.
        """
        attempt = 1
        while True:
            try:
                return await asyncio.open_unix_connection(path, limit=1 << 16)
            except (ConnectionRefusedError, BlockingIOError):
                if attempt == CONNECT_ATTEMPTS:
                    raise
            attempt += 1
            await asyncio.sleep(CONNECT_RETRY_S)

    async def _negotiate(self) -> None:
        caps = {"capabilities": {"max_msg_fds": 1, "max_data_xfer_size": DEFAULT_MAX_DATA_XFER}}
        body = VERSION_BODY.pack(PROTOCOL_MAJOR, PROTOCOL_MINOR) + json.dumps(caps).encode()
        reply = await self.request(VERSION, body + b"\0")
        if len(reply) < VERSION_BODY.size:
            raise ProtocolFailure(f"VERSION reply of {len(reply)} bytes")
        major, minor = VERSION_BODY.unpack_from(reply)
        if major != PROTOCOL_MAJOR:
            raise ProtocolFailure(f"server speaks protocol {major}.{minor}, not {PROTOCOL_MAJOR}.x")
        text = bytes(reply[VERSION_BODY.size :]).rstrip(b"\0")
        try:
            caps_reply = json.loads(text) if text else {}
            size = caps_reply.get("capabilities", {}).get("max_data_xfer_size")
        except (ValueError, AttributeError) as exc:
            raise ProtocolFailure(f"VERSION reply carries malformed JSON: {exc}") from exc
        if size is not None:
            if type(size) is not int or size < 4096:
                raise ProtocolFailure(f"server's max_data_xfer_size {size!r} is not usable")
            self.max_data_xfer = min(size, DEFAULT_MAX_DATA_XFER)

    async def request(self, command: int, *body: Buffer) -> memoryview:
        """Send one command and return its reply's body; ProtocolFailure on any failure."""
        if self.broken is not None:
            raise ProtocolFailure(f"connection unusable: {self.broken}")
        exchange = asyncio.ensure_future(self._exchange(command, body))
        # Retrieved here too, so an exchange whose caller was cancelled is not reported
        # as never retrieved (its failure already broke the connection if it mattered).
        exchange.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(exchange)

    async def _exchange(self, command: int, body: Sequence[Buffer]) -> memoryview:
        async with self._lock:
            if self.broken is not None:
                raise ProtocolFailure(f"connection unusable: {self.broken}")
            msg_id = self._next_id
            self._next_id = (msg_id + 1) & 0xFFFF
            size = HEADER.size + sum(len(part) for part in body)
            message = b"".join([HEADER.pack(msg_id, command, size, 0, 0), *body])
            try:
                async with asyncio.timeout(self._timeout):
                    self._writer.write(message)
                    await self._writer.drain()
                    head = await self._reader.readexactly(HEADER.size)
                    reply_id, reply_cmd, reply_size, flags, code = HEADER.unpack(head)
                    limit = HEADER.size + self.max_data_xfer + REPLY_SLACK
                    if not HEADER.size <= reply_size <= limit:
                        raise ProtocolFailure(f"reply size {reply_size} outside 16..{limit}")
                    reply = await self._reader.readexactly(reply_size - HEADER.size)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ProtocolFailure) as exc:
                what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
                self._break(what)
                raise ProtocolFailure(f"connection lost: {what}") from exc
            if (reply_id, reply_cmd) != (msg_id, command) or flags & F_TYPE_MASK != F_TYPE_REPLY:
                self._break(f"reply {reply_id}/{reply_cmd} flags {flags:#x} to {msg_id}/{command}")
                raise ProtocolFailure(f"connection lost: {self.broken}")
            if flags & F_ERROR:
                raise ProtocolFailure(errno_text(code), code)
            return memoryview(reply)

    def _break(self, why: str) -> None:
        self.broken = why
        self._writer.close()

    def close(self) -> None:
        """Hang up; idempotent. The server sees the client leave."""
        if self.broken is None:
            self.broken = "closed"
        self._writer.close()

"""One connection of a session: the asyncio protocol around a FrameDecoder.

Reads go straight into the decoder's buffers (``BufferedProtocol``); frames are decoded
as they arrive and handed to the session that adopted the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import sys
import termios
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import structlog

from transport.errors import (
    ConnectionLost,
    PeerHungUp,
    ProtocolError,
    SessionClosed,
    TransportError,
)
from transport.frames import (
    MAX_HEADER,
    PREFIX,
    Buffer,
    Frame,
    FrameDecoder,
    Tag,
    checksum,
    encode_fields,
    encode_header,
)
from transport.limits import Limits, MiB

if TYPE_CHECKING:
    from transport.session import Session

log = structlog.get_logger(__name__)

#: Writing pauses past this many buffered bytes per channel and resumes below LOW.
WRITE_HIGH_WATER = 8 * MiB
WRITE_LOW_WATER = 2 * MiB
#: Most a reader waits for before it is woken (SO_RCVLOWAT); a frame's last bytes always
#: wake it (the low-water mark is never above what the frame still misses). Measured on
#: loopback, 4 channels: 1 MiB gave 0.92-0.97 x raw without checksums, 256 KiB 0.89 (with
#: checksums both about 0.72: smaller reads keep the hashed bytes in cache, more reads
#: cost as much).
READ_LOW_WATER = 1 * MiB
#: Transports whose get_write_buffer_size() is exactly the bytes written to them that no
#: system call has handed to the kernel yet, leaving from the head, with the version of
#: the source that was read (uvloop 0.23's UVStream: its own list plus libuv's
#: write_queue_size; CPython 3.11's selector transport: its bytearray). Another version
#: may count differently: nothing is proven then. A TLS transport counts records.
EXACT_WRITE_BUFFERS = {
    "uvloop.loop.TCPTransport": "0.23.",
    "uvloop.loop.UnixTransport": "0.23.",
    "asyncio.selector_events._SelectorSocketTransport": "3.11.",
}


class Channel(asyncio.BufferedProtocol):
    """One connection: decodes into its own buffers, writes frames with their seq.

    Until a session adopts it, it decodes lazily (one frame per ``next_frame()``) so
    an unauthenticated peer cannot make it buffer more than one handshake frame.
    """

    def __init__(self, limits: Limits, on_made: Callable[[Channel], None] | None = None) -> None:
        self.limits = limits
        self.decoder = FrameDecoder(limits, handshake=True)
        self.index = 0
        #: Frames of this channel waiting in the session queue, and the bytes of the
        #: control payloads among them (copies: the receive buffers no longer hold them).
        self.queued = 0
        self.queued_bytes = 0
        #: Payload bytes and headers handed to the transport.
        self.submitted = 0
        self.transport: asyncio.Transport | None = None
        self.error: TransportError | None = None
        self._on_made = on_made
        self._session: Session | None = None
        self._seq = 0
        #: Whether session frames carry checksums, as the handshake agreed.
        self.checksums = True
        #: The TCP socket under a plain (not TLS) connection, and its SO_RCVLOWAT.
        self._socket: socket.socket | None = None
        #: The connection's socket, TLS or not: its kernel send queue says what the peer
        #: has not acknowledged yet (SIOCOUTQ).
        self._stream_socket: socket.socket | None = None
        #: Bytes the kernel held for us at the last liveness check (FIONREAD).
        self._kernel_waiting = 0
        self._low_water = 1
        self._waiter: asyncio.Future[None] | None = None
        #: Senders waiting for the write buffer to drain (several devices share a channel).
        self._drainers: list[asyncio.Future[None]] = []
        self._paused = False
        self._reading_paused = False
        self.closing = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: When the last byte arrived (time.monotonic()): any byte is a sign of life.
        self.heard = time.monotonic()
        #: The peer's address ("unix" for a Unix socket): admission counts per address.
        self.peer_host = "unix"
        #: Past the handshake (the server's admission no longer evicts it).
        self.admitted = False
        #: The server's handshake task for this connection.
        self.task: asyncio.Task[None] | None = None
        #: Called when the connection ends before a session adopted it.
        self.on_lost: Callable[[Channel], None] | None = None
        #: Set after this side sent CANCEL: what still arrives is read and dropped.
        self._discard: memoryview | None = None

    # -- asyncio.BufferedProtocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer_host = str(peer[0])
        sock = transport.get_extra_info("socket")
        self._stream_socket = sock
        # Under TLS the socket carries records the TLS layer may already have read ahead.
        plain = transport.get_extra_info("sslcontext") is None and sock is not None
        if plain and sock.family in (socket.AF_INET, socket.AF_INET6):
            self._socket = sock
        if self._on_made is not None:
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._discard is not None:
            return self._discard
        view = self.decoder.get_buffer(force=True)
        assert view is not None
        return view

    def buffer_updated(self, nbytes: int) -> None:
        self.heard = time.monotonic()
        if self._discard is not None:
            return
        self.decoder.advance(nbytes)
        if self._session is not None:
            self.process()
        else:
            self._wake()
            if self.decoder.buffered > PREFIX.size + MAX_HEADER + self.limits.max_handshake_payload:
                self._pause_reading()

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        unread = self.decoder.buffered
        cause = exc or EOFError(
            f"peer closed the connection mid-frame ({unread} bytes of it arrived)"
            if unread
            else "peer closed the connection"
        )
        if not self.closing:
            hung_up = exc is None and not unread
            lost = (PeerHungUp if hung_up else ConnectionLost)(f"channel {self.index}: {cause}")
            lost.__cause__ = cause
            self.fail(lost)
        if self._session is None and self.on_lost is not None:
            self.on_lost(self)
        elif self._session is not None:
            # A finished session may be kept (in a daemon's records): not its buffers.
            self.decoder.discard()
        self._discard = None
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._release_drainers()

    # -- reading ---------------------------------------------------------------------

    def hang_up(self, *, graceful: bool = False) -> None:
        """End this connection from our side: closing, then close (graceful) or abort."""
        self.closing = True
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    def fail(self, exc: TransportError) -> None:
        """Record the first error and hand it to the session, if one owns the channel."""
        if self.error is None:
            self.error = exc
        if self._session is not None:
            self._session._fail(exc)
        elif self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._release_drainers()

    def _release_drainers(self) -> None:
        drainers, self._drainers = self._drainers, []
        for fut in drainers:
            if not fut.done():
                fut.set_result(None)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    @property
    def lingering(self) -> bool:
        """Whether CANCEL went out and the connection waits for the peer to hang up."""
        return self._discard is not None

    @property
    def reading_paused(self) -> bool:
        """Whether this side stopped reading (backpressure): silence is then ours."""
        return self._reading_paused

    def cancel_and_linger(self, fields: Mapping[str, Any], linger_s: float) -> None:
        """Send CANCEL, then read and drop what arrives until the peer hangs up.

        Closing at once with unread input makes the kernel send a reset, which can
        destroy the CANCEL before the peer reads it; after ``linger_s`` the
        connection is dropped anyway.
        """
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(TransportError, OSError, RuntimeError):
            self.send_control(Tag.CANCEL, fields)
        self._discard = memoryview(bytearray(64 * 1024))
        self._reading_paused = True  # resume even if backpressure had paused reading
        self._resume_reading()
        asyncio.get_running_loop().call_later(linger_s, transport.abort)

    async def next_frame(self) -> Frame:
        """The next handshake frame (lazy decoding, before a session adopts the channel)."""
        while True:
            try:
                frame = self.decoder.next_frame()
            except ProtocolError as exc:
                self.fail(exc)
                raise
            if frame is not None:
                return frame
            if self.error is not None:
                raise self.error
            self._resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def adopt(self, session: Session, index: int) -> None:
        """Hand the channel to ``session``: decode eagerly from now on."""
        self._session = session
        self.index = index
        self.decoder.end_handshake(checksums=self.checksums)
        if self.error is not None:
            session._fail(self.error)
        else:
            self.process()

    def process(self) -> None:
        """Decode every complete frame and deliver it; pause reading when full."""
        session = self._session
        assert session is not None
        try:
            while session.error is None and (frame := self.decoder.next_frame()) is not None:
                session._on_frame(self, frame)
        except TransportError as exc:
            session._fail(exc)
        self.update_reading()
        if self._socket is not None:
            self._set_low_water(min(self.decoder.missing, READ_LOW_WATER))

    def note_arrivals(self, now: float) -> None:
        """Bytes the kernel holds for us count as life: SO_RCVLOWAT defers the wakeup
        until the rest of a frame (up to READ_LOW_WATER) is in, which on a slow link can
        take longer than link_timeout_s."""
        if self._socket is None:
            return
        waiting = _kernel_queue(self._socket, termios.FIONREAD)
        if waiting is not None and waiting != self._kernel_waiting:
            self._kernel_waiting = waiting
            self.heard = now

    def _set_low_water(self, nbytes: int) -> None:
        """Wake the reader once ``nbytes`` (at least 1) are readable."""
        nbytes = max(1, nbytes)
        if nbytes != self._low_water and self._socket is not None:
            self._low_water = nbytes
            with contextlib.suppress(OSError):  # closing: connection_lost follows
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)

    def update_reading(self) -> None:
        """Pause while the queue or the receive buffers are full, resume otherwise.

        The queue is full at ``max_queued_frames`` frames, or once its control payloads
        hold a receive segment's worth of bytes: a peer sending large control frames
        faster than the application takes them would otherwise pile up
        ``max_queued_frames`` of them (256 MiB a channel with the default limits).
        """
        if self.closing:
            return
        limits = self.limits
        if (
            self.queued >= limits.max_queued_frames
            or self.queued_bytes >= limits.receive_segment_size
            or self.decoder.get_buffer() is None
        ):
            self._pause_reading()
        else:
            self._resume_reading()

    # -- writing ---------------------------------------------------------------------

    def send(self, tag: Tag, device: int, chunk: Sequence[Buffer], length: int) -> None:
        """Write one frame now (never interleaved with another: no await inside)."""
        if self.transport is None or self.transport.is_closing():
            raise self.error or SessionClosed(f"channel {self.index} is closed")
        check = checksum(chunk) if self.checksums or self._session is None else 0
        header = encode_header(tag, device, self._seq, length, check)
        self._seq += 1
        self.transport.writelines([header, *chunk])
        self.submitted += len(header) + length

    def send_control(self, tag: Tag, fields: Mapping[str, Any] | None = None) -> None:
        """Write a control frame now."""
        payload = encode_fields(fields)
        self.send(tag, 0, (payload,), len(payload))

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above the high-water mark."""
        while self._paused and self.error is None and not self.closing:
            waiter = asyncio.get_running_loop().create_future()
            self._drainers.append(waiter)
            await waiter

    def backlog(self) -> int:
        """Bytes written but still in the transport's buffer (not taken by the kernel)."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def withdraw_unsent(self, since: int) -> bool:
        """Shut the connection for writing if every byte written after ``since`` (an
        earlier ``submitted``) is still in our own buffer: none of them can reach the peer
        then. True when done; False, nothing done, when a byte may have left (or the
        transport cannot say: TLS, closed, a version not read). No await: nothing moves
        between the two."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        kind = type(transport)
        read = EXACT_WRITE_BUFFERS.get(f"{kind.__module__}.{kind.__qualname__}")
        package = sys.modules.get(kind.__module__.partition(".")[0])  # asyncio: Python's
        if read is None or not getattr(package, "__version__", sys.version).startswith(read):
            return False
        if not 0 < self.submitted - since <= transport.get_write_buffer_size():
            return False
        sock = transport.get_extra_info("socket")
        try:  # on a duplicate: uvloop's socket object does not shut down
            with socket.fromfd(sock.fileno(), sock.family, sock.type) as duplicate:
                duplicate.shutdown(socket.SHUT_WR)  # the kernel takes no byte more
        except (OSError, AttributeError, ValueError):
            return False
        transport.abort()  # our buffer goes with the connection
        return True

    def limit_unsent(self, nbytes: int) -> None:
        """Let the kernel hold at most about ``nbytes`` not yet sent (TCP_NOTSENT_LOWAT).

        What is in flight stays TCP's to govern, and its send buffer keeps autotuning
        (the socket reports itself full, which is what makes the kernel grow it); only
        the queue behind the congestion window is bounded. TCP only (TLS included:
        its records queue there the same way).
        """
        sock = self._stream_socket
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # closing: connection_lost follows
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, nbytes)

    def unacknowledged(self) -> int:
        """Bytes written here that the peer has not acknowledged: ours and the kernel's.

        On a link slower than the sender they pile up; their shrinking is what the
        peer really received, where ``written`` only says what the kernel accepted.
        """
        queued = self.backlog()
        if self._stream_socket is not None:
            queued += _kernel_queue(self._stream_socket, termios.TIOCOUTQ) or 0
        return queued


def _kernel_queue(sock: socket.socket, request: int) -> int | None:
    """Bytes in a socket's kernel queue: FIONREAD (to read) or TIOCOUTQ (not yet
    acknowledged); None when the socket cannot say (closed, or not a stream)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int.from_bytes(raw, sys.byteorder, signed=True)

"""Sessions: the asyncio shell around the frame codec (connect, serve, send, recv).

A :class:`Session` is 1..N connections ("channels") to one peer, opened by
:func:`connect` on the source and handed to the handler of :func:`serve` on the
destination once every channel passed the handshake (see :mod:`transport.frames`).

Receiving is zero-copy: each channel is a ``BufferedProtocol`` reading straight into
the :class:`~transport.frames.FrameDecoder`'s buffers, and data frames reach ``recv()``
as views into them. On plain TCP the socket's SO_RCVLOWAT asks the kernel to wake the
reader only once the rest of the frame being received has arrived (up to
``READ_LOW_WATER``), so a 1 MiB chunk costs a few reads rather than one per few
segments (on loopback: from 0.6 to 0.7 x a raw socket's throughput with checksums,
from 0.77 to 0.9-1.0 x without).
Frames are decoded as soon as they arrive, so CANCEL and PING are
answered even while the application is busy sending. Sending writes the header and the
chunk's own buffers with ``writelines`` and waits only past the write high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import socket
import ssl
import sys
import termios
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog

from devices.base import Buffer, Chunk
from transport.auth import NONCE_SIZE, SESSION_ID_SIZE, AuthConfig, check_proof, new_nonce, proof
from transport.bandwidth import BandwidthEstimator, TokenBucket
from transport.errors import (
    AuthenticationError,
    ConnectionLost,
    LimitExceeded,
    PeerCancelled,
    ProtocolError,
    SessionClosed,
    TransportError,
    TransportTimeout,
)
from transport.frames import (
    DATA_TAGS,
    DEVICE_TAGS,
    MAX_HEADER,
    PREFIX,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    Tag,
    checksum,
    decode_devices,
    encode_fields,
    encode_header,
    require,
)
from transport.limits import Limits, MiB

log = structlog.get_logger(__name__)

#: Channels a session opens unless told otherwise: on this 2-core machine 4 loopback
#: connections moved 13-25 % more than 1 and 5-10 % more than 2 (transport/bench.py).
DEFAULT_CHANNELS = 4
#: Writing pauses past this many buffered bytes per channel and resumes below LOW.
WRITE_HIGH_WATER = 8 * MiB
WRITE_LOW_WATER = 2 * MiB
#: Most a reader waits for before it is woken (SO_RCVLOWAT); a frame's last bytes always
#: wake it (the low-water mark is never above what the frame still misses). Measured on
#: loopback, 4 channels: 1 MiB gave 0.92-0.97 x raw without checksums, 256 KiB 0.89 (with
#: checksums both about 0.72: smaller reads keep the hashed bytes in cache, more reads
#: cost as much).
READ_LOW_WATER = 1 * MiB
#: A PING is refused, and the session aborted, while this much written data is unread.
PONG_BACKLOG_LIMIT = 2 * WRITE_HIGH_WATER
#: Silence (no byte received) after which a session counts its link as lost.
DEFAULT_LINK_TIMEOUT_S = 5.0
#: Keep-alives go out this many times per ``link_timeout_s``, so one lost or late
#: keep-alive never looks like a dead link.
KEEPALIVES_PER_TIMEOUT = 4
#: After sending CANCEL, how long a side keeps reading (and discarding) so the CANCEL is
#: not lost to a reset, before it drops the connection.
CANCEL_LINGER_S = 2.0
#: First delay between connection attempts; doubles up to RETRY_MAX_S (full jitter).
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0

#: What each side may receive once the handshake is done.
_SOURCE_RECEIVES = {Tag.DEVICES_ACCEPTED, Tag.SWITCHOVER_ACK, Tag.SYNC_ACK, Tag.VERDICT}
_RECEIVES = {
    "source": frozenset(_SOURCE_RECEIVES | {Tag.CANCEL, Tag.PING, Tag.PONG}),
    "dest": frozenset(Tag) - _SOURCE_RECEIVES - {Tag.HELLO, Tag.AUTH},
}

Handler = Callable[["Session"], Awaitable[None]]


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


class _Channel(asyncio.BufferedProtocol):
    """One connection: decodes into its own buffers, writes frames with their seq.

    Until a session adopts it, it decodes lazily (one frame per ``next_frame()``) so
    an unauthenticated peer cannot make it buffer more than one handshake frame.
    """

    def __init__(self, limits: Limits, on_made: Callable[[_Channel], None] | None = None) -> None:
        self.limits = limits
        self.decoder = FrameDecoder(limits, handshake=True)
        self.index = 0
        #: Frames of this channel waiting in the session queue.
        self.queued = 0
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
        self.on_lost: Callable[[_Channel], None] | None = None
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
            lost = ConnectionLost(f"channel {self.index}: {cause}")
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
        try:
            raw = fcntl.ioctl(self._socket.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return
        waiting = int.from_bytes(raw, sys.byteorder, signed=True)
        if waiting != self._kernel_waiting:
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
        """Pause while the queue or the receive buffers are full, resume otherwise."""
        if self.closing:
            return
        if self.queued >= self.limits.max_queued_frames or self.decoder.get_buffer() is None:
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

    def unacknowledged(self) -> int:
        """Bytes written here that the peer has not acknowledged: ours and the kernel's.

        On a link slower than the sender they pile up; their shrinking is what the
        peer really received, where ``written`` only says what the kernel accepted.
        """
        queued = self.backlog()
        if self._stream_socket is not None:
            with contextlib.suppress(OSError, ValueError):
                raw = fcntl.ioctl(self._stream_socket.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                queued += int.from_bytes(raw, sys.byteorder, signed=True)
        return queued

    def written(self) -> int:
        """Bytes that left the transport's buffer (handed to the kernel)."""
        if self.transport is None:
            return 0
        return self.submitted - self.transport.get_write_buffer_size()


class Session:
    """A migration session with one peer over ``channels`` connections.

    Control frames travel on channel 0, a device's frames on channel ``device %
    channels``. Any error from the peer (ProtocolError, PeerCancelled, ConnectionLost)
    aborts the whole session and is raised by every later call; frames received before
    a plain connection loss are still delivered first. One task may ``recv()`` while
    others send.
    """

    def __init__(
        self,
        channels: Sequence[_Channel],
        *,
        role: str,
        peer_name: str,
        peer_max_payload: int,
        limits: Limits,
        session_id: bytes,
        link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
    ) -> None:
        if not link_timeout_s > 0:
            raise ValueError(f"link_timeout_s must be > 0, got {link_timeout_s!r}")
        self.role = role
        self.link_timeout_s = link_timeout_s
        self.peer_name = peer_name
        self.peer_max_payload = peer_max_payload
        self.limits = limits
        self.session_id = session_id
        self.channels = len(channels)
        self.error: TransportError | None = None
        self._chans = list(channels)
        self._receives = _RECEIVES[role]
        self._queue: deque[tuple[_Channel, Frame]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._held: tuple[_Channel, Frame] | None = None
        self._ended: set[int] = set()
        self._end_frame: Frame | None = None
        #: SYNC barriers seen per channel, and how many were delivered.
        self._syncs = [0] * len(channels)
        self._synced = 0
        self._sent_devices: int | None = None
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_id = 0
        self._bucket = TokenBucket()
        self._bucket_changed = asyncio.Event()
        self._log = log.bind(session=session_id.hex()[:12], role=role, peer=peer_name)
        self.bandwidth = BandwidthEstimator(self._written)
        self._keepalive: asyncio.TimerHandle | None = None
        for index, channel in enumerate(self._chans):
            channel.heard = time.monotonic()
            channel.adopt(self, index)
        self._log.info("session_opened", channels=self.channels)
        if self.error is None:
            self._schedule_keepalive()

    # -- receiving -------------------------------------------------------------------

    def _on_frame(self, channel: _Channel, frame: Frame) -> None:
        """Route one decoded frame (called from the protocol, synchronously)."""
        tag = frame.tag
        if tag not in self._receives:
            raise ProtocolError("tag", f"a {self.role} does not accept {tag.name}")
        if tag is Tag.PING:
            fields = frame.fields()
            stamp = require(fields, "id", int)
            if fields.get("reply") is False:
                return  # a keep-alive: its arrival was the point
            if channel.backlog() > PONG_BACKLOG_LIMIT:
                # A peer that pings but never reads would grow our write buffer forever.
                raise ProtocolError(
                    "tag", f"PING flood: {channel.backlog()} bytes unread by the peer"
                )
            channel.send_control(Tag.PONG, {"id": stamp, "t": time.monotonic()})
        elif tag is Tag.PONG:
            fields = frame.fields()
            waiter = self._pings.pop(require(fields, "id", int), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(float(require(fields, "t", (int, float))))
        elif tag is Tag.CANCEL:
            raise _cancelled(frame, "destination" if self.role == "source" else "source")
        elif tag is Tag.END_OF_STREAM:
            if channel.index in self._ended:
                raise ProtocolError("tag", f"second END_OF_STREAM on channel {channel.index}")
            self._ended.add(channel.index)
            if channel.index == 0:
                self._end_frame = frame
            if len(self._ended) == self.channels:
                assert self._end_frame is not None
                self._enqueue(self._chans[0], self._end_frame)
        elif tag is Tag.SYNC:
            self._syncs[channel.index] += 1
            if min(self._syncs) > self._synced:
                self._synced += 1
                self._enqueue(self._chans[0], frame)
        else:
            if tag is Tag.DEVICES:
                if self._chans[0].decoder.device_count is not None:
                    raise ProtocolError("tag", "second DEVICES frame")
                self.set_device_count(len(decode_devices(frame.fields(), self.limits)))
            elif tag in DEVICE_TAGS:
                expected = frame.device % self.channels
                if channel.index != expected:
                    raise ProtocolError(
                        "device",
                        f"device {frame.device} on channel {channel.index}, "
                        f"expected channel {expected}",
                    )
            self._enqueue(channel, frame)

    def _enqueue(self, channel: _Channel, frame: Frame) -> None:
        self._queue.append((channel, frame))
        channel.queued += 1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _release_held(self) -> None:
        if self._held is not None:
            channel, frame = self._held
            self._held = None
            channel.decoder.release(frame)
            if self.error is None:
                channel.update_reading()

    async def recv(self) -> Frame:
        """The next frame from any channel, in arrival order (per device: send order).

        A data frame's payload is valid until the next ``recv()``. PING, PONG and
        CANCEL never come out: the session answers them. END_OF_STREAM and each SYNC
        come out once, after they arrived on every channel. Raises PeerCancelled, ProtocolError,
        ConnectionLost (after the frames that came before it), or SessionClosed.
        """
        self._release_held()
        while True:
            error = self.error
            if error is not None and not (self._queue and isinstance(error, ConnectionLost)):
                raise error
            if self._queue:
                channel, frame = self._queue.popleft()
                channel.queued -= 1
                if frame._segment is not None:
                    self._held = (channel, frame)
                if error is None:
                    channel.update_reading()
                return frame
            if self._waiter is not None:
                raise RuntimeError("recv() is already being awaited by another task")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def set_device_count(self, count: int) -> None:
        """Accept device frames for devices 0..count-1 only (done by DEVICES itself)."""
        if count > self.limits.max_devices:
            raise LimitExceeded("devices", count, self.limits.max_devices)
        for channel in self._chans:
            channel.decoder.device_count = count

    # -- sending ---------------------------------------------------------------------

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    async def send_control(
        self, tag: Tag, fields: Mapping[str, Any] | None = None, *, device: int = 0
    ) -> None:
        """Send a control frame on channel 0; INITIAL_DATA_SENT and END_OF_DEVICE go on
        the device's channel, END_OF_STREAM and SYNC on every channel (after all sent
        before)."""
        self._check()
        if tag in DATA_TAGS or tag in (Tag.HELLO, Tag.AUTH):
            raise ValueError(f"{tag.name} is not a control frame of a session")
        payload = encode_fields(fields)
        if len(payload) > self.limits.max_control_payload:
            raise ValueError(f"{tag.name} fields take {len(payload)} bytes, over the limit")
        if tag is Tag.DEVICES:
            self._sent_devices = len(require(fields or {}, "devices", list))
        if tag in (Tag.END_OF_STREAM, Tag.SYNC):
            targets = [*self._chans[1:], self._chans[0]]
            for channel in targets:
                channel.send(tag, 0, (payload,), len(payload))
        else:
            if tag in DEVICE_TAGS:
                targets = [self._chans[device % self.channels]]
            else:
                targets, device = [self._chans[0]], 0
            targets[0].send(tag, device, (payload,), len(payload))
        for channel in targets:
            await channel.drain()
        self._check()

    async def send_chunk(self, tag: Tag, device: int, chunk: Chunk) -> int:
        """Send one chunk of ``device``'s stream as one frame; returns its payload size.

        ``tag`` is a data tag, or INITIAL_DATA_SENT / END_OF_DEVICE with an empty chunk.
        The checksum covers the chunk's buffers, which go to the socket as they are
        (the chunk must not change afterwards, as the device contract promises). Waits
        while the channel's write buffer is past the high-water mark and while the
        max-bandwidth bucket is in debt.
        """
        self._check()
        if tag not in DEVICE_TAGS:
            raise ValueError(f"{tag.name} is not a device frame")
        if self._sent_devices is not None and not 0 <= device < self._sent_devices:
            raise ValueError(f"device {device} was not announced ({self._sent_devices} devices)")
        length = sum(memoryview(part).nbytes for part in chunk)
        if length > self.peer_max_payload:
            raise ValueError(f"chunk of {length} bytes exceeds the peer's max_payload")
        channel = self._chans[device % self.channels]
        channel.send(tag, device, chunk, length)
        self._bucket.take(length)
        self.bandwidth.sample()
        await channel.drain()
        while self.error is None and (delay := self._bucket.delay()) > 0:
            self._bucket_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._bucket_changed.wait(), delay)
        self._check()
        return length

    async def send_end_of_device(self, device: int) -> None:
        """END_OF_DEVICE on the device's channel, so it follows all of its data."""
        await self.send_control(Tag.END_OF_DEVICE, device=device)

    def set_max_bandwidth(self, bytes_per_second: float | None) -> None:
        """Cap the data rate (token bucket over all channels); None lifts the cap."""
        self._bucket.set_rate(bytes_per_second)
        self._bucket_changed.set()

    def _written(self) -> int:
        return sum(channel.written() for channel in self._chans)

    def delivery(self) -> tuple[int, int]:
        """``(delivered, unacknowledged)`` bytes over all channels: what reached the peer
        and what still waits in our buffers or the kernel's (see _Channel.unacknowledged)."""
        waiting = sum(channel.unacknowledged() for channel in self._chans)
        submitted = sum(channel.submitted for channel in self._chans)
        return submitted - waiting, waiting

    async def ping(self) -> tuple[float, float, float]:
        """``(sent, peer, received)`` time.monotonic() stamps of one PING/PONG."""
        self._check()
        self._ping_id += 1
        ping_id = self._ping_id  # another ping() may run meanwhile and bump _ping_id
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = waiter
        sent = time.monotonic()
        try:
            self._chans[0].send_control(Tag.PING, {"id": ping_id, "t": sent})
            peer = await waiter
        finally:
            self._pings.pop(ping_id, None)
        return sent, peer, time.monotonic()

    # -- liveness --------------------------------------------------------------------

    def _schedule_keepalive(self) -> None:
        interval = self.link_timeout_s / KEEPALIVES_PER_TIMEOUT
        self._keepalive = asyncio.get_running_loop().call_later(interval, self._check_link)

    def _check_link(self) -> None:
        """Fail the session on a silent channel; send a keep-alive where we are quiet."""
        self._keepalive = None
        if self.error is not None:
            return
        now = time.monotonic()
        for channel in self._chans:
            if channel.reading_paused:
                channel.heard = now  # we stopped listening; the silence is ours
                continue
            channel.note_arrivals(now)
            if now - channel.heard > self.link_timeout_s:
                self._fail(
                    ConnectionLost(
                        f"no frame from {self.peer_name} for {self.link_timeout_s:.1f} s "
                        "(link_timeout_s)"
                    )
                )
                return
            if channel.backlog() == 0:  # bytes still queued to go out say enough
                with contextlib.suppress(TransportError, OSError, RuntimeError):
                    channel.send_control(Tag.PING, {"id": 0, "t": now, "reply": False})
        self._schedule_keepalive()

    # -- ending ----------------------------------------------------------------------

    def _fail(self, exc: TransportError, *, tell: Mapping[str, str] | None = None) -> None:
        """Abort the session because of ``exc`` (the first error wins).

        When ``exc`` is the peer's fault (a protocol error or a limit), or ``tell`` is
        given, the peer gets a CANCEL with the reason and a code before the connections
        go, so its error says why rather than "peer closed the connection".
        """
        if self.error is not None:
            return
        self.error = exc
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if not isinstance(exc, ConnectionLost):
            self._drop_queue()
        level = "info" if isinstance(exc, SessionClosed) else "warning"
        getattr(self._log, level)("session_aborted", error=str(exc), kind=type(exc).__name__)
        if tell is None and isinstance(exc, ProtocolError):
            code = "limit" if isinstance(exc, LimitExceeded) else "protocol"
            tell = {"reason": str(exc), "code": code}
        for channel in self._chans:
            if tell is not None:
                channel.cancel_and_linger(tell, min(CANCEL_LINGER_S, self.link_timeout_s))
            else:
                channel.closing = True
                if channel.transport is not None:
                    channel.transport.abort()
        self._wake_all()

    def _drop_queue(self) -> None:
        for channel, frame in self._queue:
            channel.decoder.release(frame)
        self._queue.clear()

    def _wake_all(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        for waiter in self._pings.values():
            if not waiter.done():
                assert self.error is not None
                waiter.set_exception(self.error)
        self._pings.clear()
        self._bucket_changed.set()
        for channel in self._chans:
            channel._wake()

    async def cancel(self, reason: str) -> None:
        """Tell the peer to abandon the session (CANCEL), then close."""
        if self.error is None:
            with contextlib.suppress(TransportError):
                self._chans[0].send_control(Tag.CANCEL, {"reason": reason, "code": "cancelled"})
            self._log.info("session_cancelled", reason=reason)
        await self._close(1.0, SessionClosed(f"session cancelled: {reason}"))

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - asyncpg-style budget
        """Flush what was sent and close every channel; abort() after ``timeout``."""
        await self._close(timeout, SessionClosed("session closed"))

    async def _close(self, timeout: float, reason: SessionClosed) -> None:  # noqa: ASYNC109
        if self.error is None:
            self.error = reason
            self._drop_queue()
            self._wake_all()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for channel in self._chans:
            channel.closing = True
            if channel.transport is not None and not channel.lingering:
                channel.transport.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(channel.closed for channel in self._chans))
        except TimeoutError:
            self.abort()
        self._release_held()

    def abort(self, reason: str | None = None, code: str = "aborted") -> None:
        """Drop every connection now; idempotent.

        With a ``reason``, the peer first gets CANCEL {reason, code} (and the
        connections linger briefly so it arrives); the peer's error then carries it.
        """
        tell = None if reason is None else {"reason": reason, "code": code}
        text = "session aborted" if reason is None else f"session aborted: {reason}"
        self._fail(SessionClosed(text), tell=tell)
        if tell is None:
            for channel in self._chans:
                # A lingering channel is delivering a CANCEL; its own timer ends it.
                if channel.transport is not None and not channel.lingering:
                    channel.transport.abort()


# -- handshake -------------------------------------------------------------------------


def _refuse(channel: _Channel, code: str, reason: str) -> None:
    """Send the peer a refusal and nothing else, then close."""
    with contextlib.suppress(TransportError):
        channel.send_control(Tag.CANCEL, {"reason": reason, "code": code})
    channel.closing = True
    if channel.transport is not None:
        channel.transport.close()


def _cancelled(frame: Frame, peer: str) -> PeerCancelled:
    """The error a received CANCEL stands for, with the peer's reason and code."""
    fields = frame.fields()
    reason, code = fields.get("reason"), fields.get("code")
    return PeerCancelled(
        reason[:500] if isinstance(reason, str) else "no reason given",
        code=code[:40] if isinstance(code, str) else None,
        peer=peer,
    )


def _raise_if_cancel(frame: Frame, expected: Tag) -> None:
    if frame.tag is Tag.CANCEL:
        fields = frame.fields()
        reason = str(fields.get("reason", "no reason given"))[:200]
        if fields.get("code") == "auth":
            raise AuthenticationError(f"peer refused us: {reason}")
        raise _cancelled(frame, "peer")
    if frame.tag is not expected:
        raise ProtocolError("tag", f"expected {expected.name}, got {frame.tag.name}")


def _bytes_field(fields: Mapping[str, Any], key: str, size: int) -> bytes:
    value: bytes = require(fields, key, bytes)
    if len(value) != size:
        raise ProtocolError(key, f"expected {size} bytes, got {len(value)}")
    return value


def _checksum_field(fields: Mapping[str, Any]) -> bool:
    """HELLO's ``checksum``: true when absent (a peer that predates it checks every frame)."""
    value = fields.get("checksum", True)
    if not isinstance(value, bool):
        raise ProtocolError("checksum", f"expected bool, got {value!r:.60}")
    return value


def _name_field(fields: Mapping[str, Any], limits: Limits) -> str:
    name: str = require(fields, "name", str)
    if len(name) > limits.max_name_length:
        raise LimitExceeded("name", len(name), limits.max_name_length)
    return name


async def _client_handshake(
    channel: _Channel,
    *,
    name: str,
    auth: AuthConfig,
    session: bytes,
    index: int,
    channels: int,
    limits: Limits,
) -> tuple[str, int]:
    """Run the source side of the handshake; returns the peer's name and max_payload."""
    nonce = new_nonce()
    channel.send_control(
        Tag.HELLO,
        {
            "version": PROTOCOL_VERSION,
            "name": name,
            "session": session,
            "channel": index,
            "channels": channels,
            "nonce": nonce,
            "auth": auth.method,
            "max_payload": limits.max_payload,
            "checksum": auth.requires_checksums,
        },
    )
    frame = await channel.next_frame()
    _raise_if_cancel(frame, Tag.HELLO)
    hello = frame.fields()
    if hello.get("version") != PROTOCOL_VERSION:
        raise ProtocolError("version", f"peer speaks {hello.get('version')!r}")
    channel.checksums = _checksum_field(hello)
    if auth.requires_checksums and not channel.checksums:
        _refuse(channel, "protocol", "this source requires per-chunk checksums")
        raise ProtocolError("checksum", "the destination refused per-chunk checksums")
    dest_nonce = _bytes_field(hello, "nonce", NONCE_SIZE)
    if auth.psk is not None and hello.get("auth") != "psk":
        _refuse(channel, "auth", "the source requires a pre-shared key")
        raise AuthenticationError("the destination does not authenticate with the key")
    reply = {}
    if auth.psk is not None:
        reply["proof"] = proof(auth.psk, "source", session, index, nonce, dest_nonce)
    channel.send_control(Tag.AUTH, reply)
    frame = await channel.next_frame()
    _raise_if_cancel(frame, Tag.AUTH)
    accepted = frame.fields()
    if auth.psk is not None and not check_proof(
        accepted.get("proof"), auth.psk, "dest", session, index, nonce, dest_nonce
    ):
        _refuse(channel, "auth", "authentication failed")
        raise AuthenticationError("the destination failed to prove the pre-shared key")
    max_payload = require(accepted, "max_payload", int)
    return _name_field(accepted, limits), max_payload


@dataclass(frozen=True, slots=True)
class _Hello:
    """What a source told about itself and the session a channel belongs to."""

    name: str
    session: bytes
    channel: int
    channels: int
    max_payload: int


async def _server_handshake(
    channel: _Channel, *, name: str, auth: AuthConfig, limits: Limits
) -> _Hello:
    """Run the destination side of the handshake on one channel."""
    frame = await channel.next_frame()
    _raise_if_cancel(frame, Tag.HELLO)
    fields = frame.fields()
    version = fields.get("version")
    if version != PROTOCOL_VERSION:
        _refuse(channel, "version", f"protocol version {PROTOCOL_VERSION} only")
        raise ProtocolError("version", f"peer speaks {version!r}, not {PROTOCOL_VERSION}")
    channels = require(fields, "channels", int)
    if not 1 <= channels <= limits.max_channels:
        raise LimitExceeded("channels", channels, limits.max_channels)
    index = require(fields, "channel", int)
    if not 0 <= index < channels:
        raise ProtocolError("channel", f"{index} is not in 0..{channels - 1}")
    hello = _Hello(
        name=_name_field(fields, limits),
        session=_bytes_field(fields, "session", SESSION_ID_SIZE),
        channel=index,
        channels=channels,
        max_payload=require(fields, "max_payload", int),
    )
    source_nonce = _bytes_field(fields, "nonce", NONCE_SIZE)
    nonce = new_nonce()
    channel.checksums = _checksum_field(fields) or auth.requires_checksums
    channel.send_control(
        Tag.HELLO,
        {
            "version": PROTOCOL_VERSION,
            "nonce": nonce,
            "auth": auth.method,
            "checksum": channel.checksums,
        },
    )
    frame = await channel.next_frame()
    _raise_if_cancel(frame, Tag.AUTH)
    answer = frame.fields()
    reply: dict[str, Any] = {"name": name, "max_payload": limits.max_payload}
    if auth.psk is not None:
        if not check_proof(
            answer.get("proof"), auth.psk, "source", hello.session, index, source_nonce, nonce
        ):
            _refuse(channel, "auth", "authentication failed")
            raise AuthenticationError(f"source {hello.name!r} failed to prove the key")
        reply["proof"] = proof(auth.psk, "dest", hello.session, index, source_nonce, nonce)
    channel.send_control(Tag.AUTH, reply)
    return hello


# -- connect -----------------------------------------------------------------------------


async def _open_channel(
    kind: str, host: str, port: int, auth: AuthConfig, limits: Limits
) -> _Channel:
    loop = asyncio.get_running_loop()
    factory = lambda: _Channel(limits)  # noqa: E731 - a one-line protocol factory
    if kind == "unix":
        _, channel = await loop.create_unix_connection(
            factory, host, ssl=auth.ssl_context, server_hostname=auth.server_hostname
        )
    else:
        hostname = (auth.server_hostname or host) if auth.ssl_context else None
        _, channel = await loop.create_connection(
            factory, host, port, ssl=auth.ssl_context, server_hostname=hostname
        )
    return channel


async def connect(
    address: str,
    *,
    name: str,
    auth: AuthConfig,
    channels: int = DEFAULT_CHANNELS,
    limits: Limits | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - one budget for every attempt and handshake
    link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
) -> Session:
    """Open a session to the destination at ``address`` over ``channels`` connections.

    A connection refused, reset or dropped before the handshake ends (a busy
    destination evicts pending handshakes) is retried with exponential backoff and
    jitter until ``timeout``; an authentication failure never is. Raises
    AuthenticationError (refused, or the destination failed to prove the key or its
    certificate), ConnectionLost (the last attempt's loss), ProtocolError, PeerCancelled,
    or TransportTimeout after ``timeout`` seconds for the whole set.
    """
    limits = limits or Limits()
    if not 1 <= channels <= limits.max_channels:
        raise ValueError(f"channels must be in 1..{limits.max_channels}, got {channels}")
    parse_address(address)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = RETRY_FIRST_S
    attempt = 1
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                opened, peer, peer_max, session = await _connect_once(
                    address, name=name, auth=auth, channels=channels, limits=limits
                )
            break
        except TimeoutError as exc:
            if isinstance(exc, TransportError):
                raise
            raise TransportTimeout(
                f"no session with {address} within {timeout} s ({attempt} attempts)"
            ) from exc
        except ConnectionLost as exc:
            pause = random.uniform(0, delay)
            if loop.time() + pause >= deadline:
                raise
            log.info("connect_retry", address=address, attempt=attempt, error=str(exc))
            await asyncio.sleep(pause)
            delay = min(delay * 2, RETRY_MAX_S)
            attempt += 1
    return Session(
        opened,
        role="source",
        peer_name=peer,
        peer_max_payload=peer_max,
        limits=limits,
        session_id=session,
        link_timeout_s=link_timeout_s,
    )


async def _connect_once(
    address: str, *, name: str, auth: AuthConfig, channels: int, limits: Limits
) -> tuple[list[_Channel], str, int, bytes]:
    """One attempt: every channel opened and through the handshake, or none."""
    kind, host, port = parse_address(address)
    session = os.urandom(SESSION_ID_SIZE)
    opened: list[_Channel] = []
    try:
        for index in range(channels):
            channel = await _open_channel(kind, host, port, auth, limits)
            opened.append(channel)
            peer, peer_max = await _client_handshake(
                channel,
                name=name,
                auth=auth,
                session=session,
                index=index,
                channels=channels,
                limits=limits,
            )
    except BaseException as exc:
        for channel in opened:
            channel.closing = True
            if channel.transport is not None:
                channel.transport.abort()
        if isinstance(exc, ConnectionLost) and isinstance(exc.__cause__, ssl.SSLError):
            raise AuthenticationError(f"TLS with {address} failed: {exc.__cause__}") from exc
        if isinstance(exc, ConnectionLost) and auth.ssl_context and not opened[-1].decoder.frames:
            # With TLS 1.3 a destination that rejects our certificate just hangs up.
            raise AuthenticationError(
                f"TLS with {address} failed: the destination hung up before HELLO "
                "(is our certificate trusted there?)"
            ) from exc
        if isinstance(exc, ssl.SSLError):
            raise AuthenticationError(f"TLS with {address} failed: {exc}") from exc
        if isinstance(exc, OSError):
            raise ConnectionLost(f"cannot connect to {address}: {exc}") from exc
        raise
    return opened, peer, peer_max, session


# -- serve -------------------------------------------------------------------------------


class _Group:
    """The channels of one session that passed the handshake so far."""

    def __init__(self, hello: _Hello, timer: asyncio.TimerHandle) -> None:
        self.hello = hello
        self.timer = timer
        self.channels: dict[int, _Channel] = {}


class _RefusalLog:
    """Counts refused, evicted and failed connections; logs one summary per interval.

    A flood of hostile connections must not become a flood of log lines.
    """

    INTERVAL_S = 1.0

    def __init__(self, bound: Any) -> None:
        self._log = bound
        self._reasons: Counter[str] = Counter()
        self._peers: Counter[str] = Counter()
        self._example = ""
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: str, peer: str, example: str = "") -> None:
        """Count one connection that was turned away or failed its handshake."""
        self._reasons[reason] += 1
        self._peers[peer] += 1
        self._example = example or self._example
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last summary."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reasons:
            self._log.warning(
                "connections_refused",
                reasons=dict(self._reasons),
                peers=dict(self._peers.most_common(5)),
                example=self._example[:200],
            )
        self._reasons.clear()
        self._peers.clear()
        self._example = ""


class Server:
    """A listening socket that runs ``handler(session)`` once per incoming session.

    Admission: a connection is *pending* from accept (after TLS, with TLS) until its
    session has every channel. At most ``max_pending_per_peer`` are pending per peer
    address and ``max_pending_handshakes`` in all; past either, the oldest connection
    still in the handshake from that address (or from the address holding the most) is
    dropped to make room, so a peer that completes the handshake promptly gets in
    whatever a keyless peer keeps opening. A failing handler aborts its own session
    only; the server keeps listening. ``close()`` stops listening and cancels
    handshakes and running handlers; ``wait_closed()`` waits until they are gone.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        auth: AuthConfig,
        limits: Limits,
        link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
    ) -> None:
        self.address = ""
        self.link_timeout_s = link_timeout_s
        self._handler = handler
        self._name = name
        self._auth = auth
        self._limits = limits
        self._server: asyncio.AbstractServer | None = None
        self._groups: dict[bytes, _Group] = {}
        #: Connections without a session yet, oldest first.
        self._pending: dict[_Channel, None] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._log = log.bind(server=name)
        self.refusals = _RefusalLog(self._log)

    @property
    def pending(self) -> int:
        """Connections in the handshake or waiting for the rest of their session."""
        return len(self._pending)

    def _protocol(self) -> _Channel:
        return _Channel(self._limits, on_made=self._accepted)

    def _accepted(self, channel: _Channel) -> None:
        assert channel.transport is not None
        if not self._make_room(channel.peer_host):
            self.refusals.note("full of authenticated channels", channel.peer_host)
            channel.closing = True
            channel.transport.abort()
            return
        self._pending[channel] = None
        channel.on_lost = self._lost
        task = asyncio.get_running_loop().create_task(self._handshake(channel))
        channel.task = task
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _make_room(self, host: str) -> bool:
        """Evict one pending unauthenticated connection if a limit is reached."""
        limits = self._limits
        mine = [c for c in self._pending if c.peer_host == host]
        if len(mine) >= limits.max_pending_per_peer:
            candidates = mine
        elif len(self._pending) >= limits.max_pending_handshakes:
            counts = Counter(c.peer_host for c in self._pending if not c.admitted)
            if not counts:
                return False
            heaviest = max(counts.values())
            candidates = [c for c in self._pending if counts[c.peer_host] == heaviest]
        else:
            return True
        victim = next((c for c in candidates if not c.admitted), None)
        if victim is None:
            return False
        self._drop(victim)
        self.refusals.note("evicted: handshake pending while full", victim.peer_host)
        return True

    def _lost(self, channel: _Channel) -> None:
        """A pending connection ended: free its slot, and its session's if it had one."""
        self._pending.pop(channel, None)
        for session_id, group in list(self._groups.items()):
            if channel in group.channels.values():
                group.timer.cancel()
                del self._groups[session_id]
                for member in group.channels.values():
                    self._drop(member)

    def _drop(self, channel: _Channel) -> None:
        """Hang up on a pending connection and forget it."""
        self._pending.pop(channel, None)
        channel.closing = True
        if channel.transport is not None:
            channel.transport.abort()
        if channel.task is not None:
            channel.task.cancel()

    async def _handshake(self, channel: _Channel) -> None:
        try:
            async with asyncio.timeout(self._limits.handshake_timeout):
                hello = await _server_handshake(
                    channel, name=self._name, auth=self._auth, limits=self._limits
                )
        except (TransportError, TimeoutError, OSError) as exc:
            kind = "handshake timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.refusals.note(f"handshake failed: {kind}", channel.peer_host, str(exc))
            self._drop(channel)
            return
        except asyncio.CancelledError:  # close() or eviction: the connection goes too
            self._drop(channel)
            raise
        channel.admitted = True
        channel.task = None
        self._join(channel, hello)

    def _join(self, channel: _Channel, hello: _Hello) -> None:
        group = self._groups.get(hello.session)
        if group is None:
            timer = asyncio.get_running_loop().call_later(
                self._limits.handshake_timeout, self._expire, hello.session
            )
            group = self._groups[hello.session] = _Group(hello, timer)
        elif group.hello.channels != hello.channels or hello.channel in group.channels:
            self.refusals.note("inconsistent channel", channel.peer_host, hello.name)
            self._pending.pop(channel, None)
            _refuse(channel, "protocol", f"channel {hello.channel} does not fit the session")
            return
        group.channels[hello.channel] = channel
        if len(group.channels) < hello.channels:
            return
        group.timer.cancel()
        del self._groups[hello.session]
        for member in group.channels.values():
            self._pending.pop(member, None)
        session = Session(
            [group.channels[i] for i in range(hello.channels)],
            role="dest",
            peer_name=group.hello.name,
            peer_max_payload=group.hello.max_payload,
            limits=self._limits,
            session_id=hello.session,
            link_timeout_s=self.link_timeout_s,
        )
        task = asyncio.get_running_loop().create_task(self._run(session))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _expire(self, session: bytes) -> None:
        group = self._groups.pop(session, None)
        if group is not None:
            self._log.warning("session_incomplete", peer=group.hello.name)
            for channel in group.channels.values():
                self._pending.pop(channel, None)
                _refuse(channel, "protocol", "not all channels of the session arrived")

    async def _run(self, session: Session) -> None:
        try:
            await self._handler(session)
        except asyncio.CancelledError:
            session.abort()
            raise
        except Exception as exc:  # a failing handler ends its session, not the server
            self._log.warning("handler_failed", error=str(exc), kind=type(exc).__name__)
            session.abort(str(exc) or type(exc).__name__, code="internal")
        else:
            await session.close()

    def close(self) -> None:
        """Stop listening; cancel handshakes in progress and running handlers."""
        if self._server is not None:
            self._server.close()
        for task in (*self._handshakes, *self._handlers):
            task.cancel()
        for session in list(self._groups):
            self._expire(session)
        for channel in list(self._pending):
            self._drop(channel)
        self.refusals.flush()

    async def wait_closed(self) -> None:
        """Wait until the listener and every handler have finished."""
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.gather(*self._handshakes, *self._handlers, return_exceptions=True)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(
    address: str,
    handler: Handler,
    *,
    name: str,
    auth: AuthConfig,
    limits: Limits | None = None,
    link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
) -> Server:
    """Listen on ``address`` (port 0 picks one: see ``Server.address``).

    With TLS, a connection reaches the admission limits once its TLS handshake is
    done; until then only ``handshake_timeout`` bounds it (layering TLS ourselves with
    ``loop.start_tls`` would count it earlier, but server-side start_tls stalls under
    uvloop 0.23).
    """
    limits = limits or Limits()
    if not link_timeout_s > 0:
        raise ValueError(f"link_timeout_s must be > 0, got {link_timeout_s!r}")
    server = Server(handler, name=name, auth=auth, limits=limits, link_timeout_s=link_timeout_s)
    kind, host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    # The TLS handshake comes before HELLO (the channel sees the connection only once
    # it is done), so it gets the same budget rather than asyncio's 60 s default.
    tls_timeout = limits.handshake_timeout if auth.ssl_context else None
    if kind == "unix":
        server._server = await loop.create_unix_server(
            server._protocol, host, ssl=auth.ssl_context, ssl_handshake_timeout=tls_timeout
        )
        server.address = format_address("unix", host, 0)
    else:
        server._server = await loop.create_server(
            server._protocol, host, port, ssl=auth.ssl_context, ssl_handshake_timeout=tls_timeout
        )
        bound = server._server.sockets[0].getsockname()
        server.address = format_address("tcp", bound[0], bound[1])
    server._log.info("server_listening", address=server.address)
    return server

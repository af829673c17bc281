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
chunk's own buffers with ``writelines`` and waits only past the write high-water mark;
a chunk over the peer's ``max_payload`` (from its HELLO) goes as several frames of
slices, since a device's stream may be cut anywhere (every resume channel takes pieces
of any size).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from transport.bandwidth import TokenBucket
from transport.channel import WRITE_HIGH_WATER, Channel
from transport.errors import (
    ConnectionLost,
    LimitExceeded,
    PeerHungUp,
    ProtocolError,
    SessionClosed,
    TransportError,
)
from transport.frames import (
    DATA_TAGS,
    DEVICE_TAGS,
    Chunk,
    Frame,
    Tag,
    encode_fields,
    typed_field,
)
from transport.handshake import peer_cancelled
from transport.limits import Limits

log = structlog.get_logger(__name__)

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
#: What each side may receive once the handshake is done.
_SOURCE_RECEIVES = {Tag.DEVICES_ACCEPTED, Tag.SWITCHOVER_ACK, Tag.SYNC_ACK, Tag.VERDICT}
_RECEIVES = {
    "source": frozenset(_SOURCE_RECEIVES | {Tag.CANCEL, Tag.PING, Tag.PONG}),
    "dest": frozenset(Tag) - _SOURCE_RECEIVES - {Tag.HELLO, Tag.AUTH},
}


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
        channels: Sequence[Channel],
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
        self.channel_count = len(channels)
        self.error: TransportError | None = None
        self._chans = list(channels)
        self._receives = _RECEIVES[role]
        self._queue: deque[tuple[Channel, Frame]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._held: tuple[Channel, Frame] | None = None
        self._ended: set[int] = set()
        self._end_frame: Frame | None = None
        #: SYNC barriers seen per channel, and how many were delivered.
        self._syncs = [0] * len(channels)
        self._synced = 0
        #: Devices of this migration, once the application said (set_device_count).
        self.device_count: int | None = None
        self._announced = False
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_id = 0
        self._bucket = TokenBucket()
        self._bucket_changed = asyncio.Event()
        self._log = log.bind(session=session_id.hex()[:12], role=role, peer=peer_name)
        self._keepalive: asyncio.TimerHandle | None = None
        #: Frames the application took (recv), and how many at the last link check: while
        #: reading is paused, a count that moves says it is slow, not stalled.
        self._taken = self._taken_seen = 0
        for index, channel in enumerate(self._chans):
            channel.heard = time.monotonic()
            channel.adopt(self, index)
        self._log.info("session_opened", channels=self.channel_count)
        if self.error is None:
            self._schedule_keepalive()

    # -- receiving -------------------------------------------------------------------

    def _on_frame(self, channel: Channel, frame: Frame) -> None:
        """Route one decoded frame (called from the protocol, synchronously)."""
        tag = frame.tag
        if tag not in self._receives:
            raise ProtocolError("tag", f"a {self.role} does not accept {tag.name}")
        if tag is Tag.PING:
            fields = frame.fields()
            stamp = typed_field(fields, "id", int)
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
            waiter = self._pings.pop(typed_field(fields, "id", int), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(float(typed_field(fields, "t", (int, float))))
        elif tag is Tag.CANCEL:
            raise peer_cancelled(frame, "destination" if self.role == "source" else "source")
        elif tag is Tag.END_OF_STREAM:
            if channel.index in self._ended:
                raise ProtocolError("tag", f"second END_OF_STREAM on channel {channel.index}")
            self._ended.add(channel.index)
            if channel.index == 0:
                self._end_frame = frame
            if len(self._ended) == self.channel_count:
                assert self._end_frame is not None
                self._enqueue(self._chans[0], self._end_frame)
        elif tag is Tag.SYNC:
            self._syncs[channel.index] += 1
            if min(self._syncs) > self._synced:
                self._synced += 1
                self._enqueue(self._chans[0], frame)
        else:
            if tag is Tag.DEVICES:
                if self._announced:
                    raise ProtocolError("tag", "second DEVICES frame")
                self._announced = True
                for each in self._chans:
                    each.decoder.announced = True
            elif tag in DEVICE_TAGS:
                expected = frame.device % self.channel_count
                if channel.index != expected:
                    raise ProtocolError(
                        "device",
                        f"device {frame.device} on channel {channel.index}, "
                        f"expected channel {expected}",
                    )
            self._enqueue(channel, frame)

    def _enqueue(self, channel: Channel, frame: Frame) -> None:
        self._queue.append((channel, frame))
        channel.queued += 1
        if frame._segment is None:  # a control payload, copied out of the buffers
            channel.queued_bytes += len(frame.payload)
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
                self._taken += 1
                if frame._segment is None:
                    channel.queued_bytes -= len(frame.payload)
                if frame.tag in DEVICE_TAGS and not frame.device < (self.device_count or 0):
                    channel.decoder.release(frame)
                    self._fail(ProtocolError("device", self._unannounced(frame.device)))
                    continue
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
        """Devices 0..count-1 only, both ways: the application read DEVICES (or sends it).

        The transport does not read DEVICES itself: its payload is the orchestrator's.
        Device frames that arrived before this are checked as they come out of recv().
        """
        if count > self.limits.max_devices:
            raise LimitExceeded("devices", count, self.limits.max_devices)
        self.device_count = count
        for channel in self._chans:
            channel.decoder.device_count = count

    def _unannounced(self, device: int) -> str:
        if self.device_count is None:
            return f"device {device} before the device count was set"
        return f"device {device} was not announced ({self.device_count} devices)"

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
        if tag in (Tag.END_OF_STREAM, Tag.SYNC):
            targets = [*self._chans[1:], self._chans[0]]
            for channel in targets:
                channel.send(tag, 0, (payload,), len(payload))
        else:
            if tag in DEVICE_TAGS:
                targets = [self._chans[device % self.channel_count]]
            else:
                targets, device = [self._chans[0]], 0
            targets[0].send(tag, device, (payload,), len(payload))
        for channel in targets:
            await channel.drain()
        self._check()

    async def send_chunk(self, tag: Tag, device: int, chunk: Chunk) -> int:
        """Send one chunk of ``device``'s stream as one frame (several when it exceeds the
        peer's max_payload); returns its payload size.

        ``tag`` is a data tag, or INITIAL_DATA_SENT / END_OF_DEVICE with an empty chunk.
        The checksum covers the chunk's buffers, which go to the socket as they are
        (the chunk must not change afterwards, as the device contract promises). Waits
        while the channel's write buffer is past the high-water mark and while the
        max-bandwidth bucket is in debt.
        """
        self._check()
        if tag not in DEVICE_TAGS:
            raise ValueError(f"{tag.name} is not a device frame")
        if self.device_count is not None and not 0 <= device < self.device_count:
            raise ValueError(f"device {device} was not announced ({self.device_count} devices)")
        length = sum(memoryview(part).nbytes for part in chunk)
        if length > self.peer_max_payload:
            return await self._send_pieces(tag, device, chunk, length)
        channel = self._chans[device % self.channel_count]
        channel.send(tag, device, chunk, length)
        self._bucket.take(length)
        await channel.drain()
        while self.error is None and (delay := self._bucket.delay()) > 0:
            self._bucket_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._bucket_changed.wait(), delay)
        self._check()
        return length

    async def _send_pieces(self, tag: Tag, device: int, chunk: Chunk, length: int) -> int:
        """A chunk over the peer's max_payload as several frames of at most that size, in
        order on the device's channel (every resume channel takes its stream in pieces of
        any size); the pieces are slices of the chunk's buffers, never copies."""
        limit = room = self.peer_max_payload
        piece: list[memoryview] = []
        for part in chunk:
            view = memoryview(part).cast("B")
            while view:
                piece.append(view[:room])
                room -= piece[-1].nbytes
                view = view[piece[-1].nbytes :]
                if not room:
                    await self.send_chunk(tag, device, tuple(piece))
                    piece, room = [], limit
        if piece:
            await self.send_chunk(tag, device, tuple(piece))
        return length

    async def send_end_of_device(self, device: int) -> None:
        """END_OF_DEVICE on the device's channel, so it follows all of its data."""
        await self.send_control(Tag.END_OF_DEVICE, device=device)

    def set_max_bandwidth(self, bytes_per_second: float | None) -> None:
        """Cap the data rate (token bucket over all channels); None lifts the cap."""
        self._bucket.set_rate(bytes_per_second)
        self._bucket_changed.set()

    def control_written(self) -> int:
        """Bytes written so far on the channel control frames go on (COMMIT's): a mark
        for :meth:`withdraw_control`."""
        return self._chans[0].submitted

    def withdraw_control(self, since: int) -> bool:
        """End the session if nothing written on the control channel after ``since`` (a
        :meth:`control_written` mark) has left our own buffer, so that none of it ever
        reaches the peer; True when it did (Channel.withdraw_unsent), False otherwise."""
        if not self._chans[0].withdraw_unsent(since):
            return False
        self.abort()
        return True

    def backlog(self) -> int:
        """Bytes written to the channels still in our buffers (no system call)."""
        return sum(channel.backlog() for channel in self._chans)

    def limit_unsent(self, nbytes: int) -> None:
        """Bound what each channel's kernel queue holds unsent (Channel.limit_unsent)."""
        for channel in self._chans:
            channel.limit_unsent(nbytes)

    def delivery(self) -> tuple[int, int]:
        """``(delivered, unacknowledged)`` bytes over all channels: what reached the peer
        and what still waits in our buffers or the kernel's (see Channel.unacknowledged)."""
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
        progressed, self._taken_seen = self._taken != self._taken_seen, self._taken
        for channel in self._chans:
            if channel.reading_paused:
                channel.heard = now  # we stopped listening; the silence is ours
                if not progressed:
                    continue  # a stalled application: the peer's link timeout tells it
                # Slower than the link but taking frames: alive, so the keep-alive goes.
            else:
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
        level = "info" if isinstance(exc, (SessionClosed, PeerHungUp)) else "warning"
        getattr(self._log, level)("session_aborted", error=str(exc), kind=type(exc).__name__)
        if tell is None and isinstance(exc, ProtocolError):
            tell = {"reason": str(exc), "code": exc.code}
        for channel in self._chans:
            if tell is not None:
                channel.cancel_and_linger(tell, min(CANCEL_LINGER_S, self.link_timeout_s))
            else:
                channel.hang_up()
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
                # wait(), not gather(): a cancelled close() must not cancel the channels'
                # closed futures, which a later close() (or the server) still waits on.
                await asyncio.wait([channel.closed for channel in self._chans])
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

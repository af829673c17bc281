"""The livemig wire format: tagged frames, and a pure decoder for them (no I/O).

This docstring is the one description of the format.

Frame
-----
Every byte on a connection belongs to a frame::

    offset  size  field
    0       2     magic, the ASCII bytes "LM"
    2       1     H, length of the header (1..40)
    3       H     header: msgpack array [tag, device, seq, flags, length, checksum]
    3+H     L     payload, L = length bytes

* ``tag`` is a :class:`Tag`; an unknown tag is refused.
* ``device`` is the device index (0 .. device_count-1) for device frames (the data tags
  and END_OF_DEVICE), 0 for every other frame.
* ``seq`` counts the frames sent on one connection in one direction, from 0, without
  gaps; HELLO is frame 0. A gap or a repeat is refused.
* ``flags`` is reserved and must be 0 in protocol version 1.
* ``length`` is the payload length: at most ``max_payload`` for data frames and
  ``max_control_payload`` for control frames (``max_handshake_payload`` before
  authentication).
* ``checksum`` is the xxh3-64 hash of the payload, as an unsigned integer, or 0 on a
  channel that agreed to go without (see Integrity). It detects corruption, not
  tampering: a peer is authenticated by the handshake, and a hostile network is kept
  out by TLS.

Payloads: the data tags (SETUP, PRECOPY_DATA, STOPCOPY_DATA, DEVICE_CONFIG) carry a
device's migration stream bytes verbatim; every other tag carries a msgpack map with
string keys (possibly empty), listed below.

Session
-------
A session is 1..16 connections ("channels"). Each channel starts with the handshake
(source = the connecting side, destination = the listening side; K = pre-shared key)::

    source -> HELLO {version: 1, name, session: 16 random bytes, channel: i,
                     channels: n, nonce: 32 random bytes (Nc), auth: "psk"|"none",
                     max_payload, checksum: bool}
    dest   -> HELLO {version: 1, nonce: 32 random bytes (Ns), auth: "psk"|"none",
                     checksum: bool}
    source -> AUTH  {proof: HMAC-SHA256(K, "livemig/1 source" session i Nc Ns)}  (or {})
    dest   -> AUTH  {proof: HMAC-SHA256(K, "livemig/1 dest" session i Nc Ns), name,
                     max_payload}                                          (or CANCEL)

The destination answers a failed proof, or a HELLO it refuses (a wrong version, a
field missing, mistyped or past its limits), with CANCEL {reason, code} naming the
field and nothing else; the source refuses a destination whose proof fails the same
way. ``max_payload`` is at least ``MIN_MAX_PAYLOAD`` (4 KiB) both ways.
Both nonces are fresh per connection, so a recorded proof never matches again. TLS, if
configured, wraps the whole connection.

Integrity
---------
The handshake's frames always carry the checksum. For the frames after AUTH each
channel uses what its HELLOs agreed: the source's ``checksum`` says whether it requires
the per-chunk checksum, and the destination's answers with the outcome, true when
either side requires it (a HELLO without the field requires it; a source that required
it refuses a destination answering false). A side requires it unless its connection is
TLS or its operator said so (``AuthConfig.checksums``): inside TLS every record carries
an authentication tag over every byte (AES-GCM or ChaCha20-Poly1305), which detects
corruption at least as surely as a 64-bit hash, and tampering too, so a second pass
over the payload adds no guarantee. On a channel without checksums every frame's
``checksum`` is 0 and any other value is refused. The checksum is computed once on the
sending side, over the chunk's own buffers as they are written, and once on the
receiving side, incrementally over the bytes of each read right after it (the same
xxh3-64, while the bytes are still in cache), compared when the frame is complete.
Both the checksum and the TLS tag are taken when the bytes are handed to the
connection (TLS may encrypt queued data later), so both rely on a chunk not changing
once sent, as the device contract promises.

Once all n channels of a session id are authenticated the destination runs one handler
for them. Then, control frames travel on channel 0 and a device's frames on channel
``device % n``, so one device's frames keep their order::

    DEVICES            source: {devices: [...], ...} (the orchestrator's message; the
                       application tells the session how many devices it announced)
    DEVICES_ACCEPTED   dest: {} or {error} when a device is incompatible
    SETUP / PRECOPY_DATA / STOPCOPY_DATA / DEVICE_CONFIG    source: raw device bytes
                       (an empty PRECOPY_DATA carries nothing: a paused source whose
                       devices have nothing to send says with it that it is there)
    INITIAL_DATA_SENT  source: empty, on the device's channel after its initial data
    SWITCHOVER_ACK     dest: {} (ready for the source to stop the devices)
    END_OF_DEVICE      source: {} (on the device's channel, after all its data)
    END_OF_STREAM      source: {} sent on every channel; delivered once all arrived
    VERDICT            dest: {stage: "loaded"|"resumed"|"failed", reason, ...}
    COMMIT             source: {} (the destination may run the devices)
    SYNC               source: {} sent on every channel; delivered once all arrived
    SYNC_ACK           dest: {} once it has taken in everything sent before SYNC
    CANCEL             either: {reason, code}; the session is aborted
    PING / PONG        either: {id, t}: keep-alive and clock stamps (time.monotonic)

The fields named are the transport's, except DEVICES', which the orchestrator defines
(see ``orchestrator/engine/messages.py``). Data for a device not announced by DEVICES, device frames
after END_OF_STREAM or on the wrong channel, a frame the receiving side never
receives (e.g. VERDICT at the destination), and a second HELLO or AUTH are refused.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type hints
import xxhash

from transport.checks import has_type
from transport.errors import LimitExceeded, ProtocolError
from transport.limits import Limits

PROTOCOL_VERSION = 1
MAGIC = b"LM"
PREFIX = struct.Struct("!2sB")
#: Longest header: fixarray + 6 integers of at most 9 bytes each, with room to spare.
MAX_HEADER = 40
#: What a peer that is not a livemig listener sends first, for the error (an operator
#: who gave another port of the daemon reads which).
FOREIGN = {
    b"HT": ": an HTTP answer (the metrics port?)",
    b'{"': ": JSON (the control port?)",
    b"\x15\x03": ": a TLS alert (a TLS listener? configure TLS for this peer)",
    b"\x16\x03": ": a TLS handshake (a TLS listener? configure TLS for this peer)",
}
#: A read into a receive buffer asks for at least this much room when it can.
MIN_READ = 64 * 1024
#: The bytes a frame's payload may be made of (the transport never looks inside them).
Buffer = bytes | bytearray | memoryview
#: One device frame's payload, as the buffers it is written from.
Chunk = tuple[Buffer, ...]


class Tag(enum.IntEnum):
    """What a frame is; the numbers are on the wire."""

    HELLO = 1
    AUTH = 2
    DEVICES = 3
    DEVICES_ACCEPTED = 4
    SETUP = 5
    PRECOPY_DATA = 6
    STOPCOPY_DATA = 7
    DEVICE_CONFIG = 8
    INITIAL_DATA_SENT = 9
    SWITCHOVER_ACK = 10
    END_OF_DEVICE = 11
    END_OF_STREAM = 12
    VERDICT = 13
    CANCEL = 14
    PING = 15
    PONG = 16
    COMMIT = 17
    SYNC = 18
    SYNC_ACK = 19


#: Tags whose payload is raw device stream bytes.
DATA_TAGS = frozenset({Tag.SETUP, Tag.PRECOPY_DATA, Tag.STOPCOPY_DATA, Tag.DEVICE_CONFIG})
#: Tags addressed to a device, sent on its channel (the others carry device 0).
DEVICE_TAGS = DATA_TAGS | {Tag.INITIAL_DATA_SENT, Tag.END_OF_DEVICE}
#: Tags valid during the handshake.
HANDSHAKE_TAGS = frozenset({Tag.HELLO, Tag.AUTH, Tag.CANCEL})
#: Tags valid once the handshake is done.
SESSION_TAGS = frozenset(Tag) - {Tag.HELLO, Tag.AUTH}
_TAGS = {int(t): t for t in Tag}


class _Segment:
    """One receive buffer, and how many delivered frames still point into it.

    An anonymous mapping rather than a bytearray: the kernel supplies zeroed pages as
    the first read touches them, where a bytearray would zero every byte again first.
    """

    __slots__ = ("buffer", "held", "view")

    def __init__(self, size: int) -> None:
        # A zero-length mapping is EINVAL: the empty segment of a discarded decoder.
        self.buffer: mmap.mmap | bytearray = mmap.mmap(-1, size) if size else bytearray()
        self.view = memoryview(self.buffer)
        self.held = 0


@dataclass(slots=True)
class Frame:
    """One decoded frame; a data frame's payload is a view into a receive buffer."""

    tag: Tag
    device: int
    seq: int
    flags: int
    payload: memoryview
    _segment: _Segment | None = field(default=None, repr=False, compare=False)

    def fields(self) -> dict[str, Any]:
        """The control payload as a dict; ProtocolError naming the tag if it is not one."""
        return unpack_fields(self.payload, self.tag.name)


def checksum(chunk: Sequence[Buffer]) -> int:
    """The xxh3-64 of the concatenated buffers, computed without joining them."""
    if len(chunk) == 1:
        return xxhash.xxh3_64_intdigest(chunk[0])
    hasher = xxhash.xxh3_64()
    for part in chunk:
        hasher.update(part)
    return hasher.intdigest()


def encode_header(
    tag: Tag, device: int, seq: int, length: int, checksum: int, flags: int = 0
) -> bytes:
    """The prefix and msgpack header that precede a payload of ``length`` bytes."""
    header: bytes = msgpack.packb((int(tag), device, seq, flags, length, checksum))
    return PREFIX.pack(MAGIC, len(header)) + header


def encode_fields(fields: Mapping[str, Any] | None) -> bytes:
    """A control payload: the fields as a msgpack map (bytes stay bytes)."""
    packed: bytes = msgpack.packb(dict(fields or {}), use_bin_type=True)
    return packed


def encode_frame(tag: Tag, device: int, seq: int, chunk: Sequence[Buffer]) -> list[Buffer]:
    """Header plus payload buffers, ready for ``writelines`` (payload not copied)."""
    length = sum(memoryview(part).nbytes for part in chunk)
    return [encode_header(tag, device, seq, length, checksum(chunk)), *chunk]


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack_fields(payload: Buffer, what: str) -> dict[str, Any]:
    """Decode a control payload into a dict with str keys; ProtocolError otherwise."""
    if not len(payload):
        return {}
    try:
        value = msgpack.unpackb(payload, raw=False, ext_hook=_reject_ext, timestamp=0)
    except Exception as exc:  # any failure to parse hostile bytes is the peer's fault
        raise ProtocolError(what, f"malformed msgpack payload ({exc})") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError(what, "payload is not a map with string keys")
    return value


def typed_field(fields: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``fields[key]`` if it has type ``kind``, else ProtocolError naming ``key``."""
    value = fields.get(key)
    if not has_type(value, kind):
        raise ProtocolError(key, f"expected {getattr(kind, '__name__', kind)}, got {value!r:.60}")
    return value


class FrameDecoder:
    """Turns the bytes of one connection into validated frames; the pure core, no I/O.

    Bytes arrive either by ``feed(data)`` (copied in) or, for zero-copy receive, by
    writing into the view ``get_buffer()`` returns and calling ``advance(n)``.
    ``next_frame()`` returns the next complete frame or None. A data frame's payload is
    a view into a receive buffer that stays valid until ``release(frame)``; control
    payloads are copied, so they need no release. Memory is bounded: at most
    ``limits.receive_segments`` buffers exist, and ``get_buffer()`` returns None (the
    caller pauses reading) while all of them hold unreleased frames. Bytes are copied
    only when a frame would straddle the end of a buffer: expecting each frame to be as
    large as the last data frame, ``get_buffer()`` offers room only up to the last
    whole frame that fits, so a stream of equal chunks is never copied.

    Every violation raises ProtocolError (or LimitExceeded) naming the field; after
    one, the decoder is dead and raises the same error again.
    """

    def __init__(self, limits: Limits | None = None, *, handshake: bool = False) -> None:
        self.limits = limits or Limits()
        #: Whether DEVICES arrived: device frames are refused before it.
        self.announced = False
        #: How many devices DEVICES announced, once the application said (see
        #: Session.set_device_count); device frames for others are refused.
        self.device_count: int | None = None
        #: Set once END_OF_STREAM was decoded; device frames are refused after it.
        self.ended = False
        self._handshake = handshake
        size = MIN_READ if handshake else self.limits.receive_segment_size
        self._seg = _Segment(size)
        self._segments = 1
        self._free: list[_Segment] = []
        self._start = 0
        self._end = 0
        self._need = PREFIX.size
        self._header: tuple[Tag, int, int, int, int, int] | None = None
        #: Bytes of the last data frame: the next is expected as large (see get_buffer).
        self._expect = 0
        self._seq = 0
        self._error: ProtocolError | None = None
        self._discarded = False
        #: Whether session frames carry checksums (the handshake's always do).
        self.checksums = True
        self._hasher = xxhash.xxh3_64()
        #: Bytes of the current frame's payload hashed so far.
        self._hashed = 0

    def end_handshake(self, *, checksums: bool = True) -> None:
        """Accept session frames (up to the full limits) from now on.

        ``checksums`` is what the handshake agreed: without them a session frame's
        checksum must be 0 and the payload is not hashed.
        """
        self._handshake = False
        self.checksums = checksums

    @property
    def capacity(self) -> int:
        """Bytes currently allocated for receive buffers (for memory-bound checks)."""
        return self._seg.view.nbytes + sum(s.view.nbytes for s in self._free)

    @property
    def frames(self) -> int:
        """Frames decoded so far (the next expected seq)."""
        return self._seq

    @property
    def missing(self) -> int:
        """Bytes of the current frame still to arrive, once its header is known (else 0)."""
        return 0 if self._header is None else self._need - (self._end - self._start)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded into a frame."""
        return self._end - self._start

    def feed(self, data: Buffer) -> None:
        """Copy ``data`` in; BufferError if unreleased frames leave no room for it."""
        source = memoryview(data).cast("B")
        while source:
            target = self.get_buffer()
            if target is None:
                raise BufferError("receive buffers full: take and release frames first")
            n = min(len(target), len(source))
            target[:n] = source[:n]
            self.advance(n)
            source = source[n:]

    def get_buffer(self, force: bool = False) -> memoryview | None:
        """Room to receive into (non-empty), or None while every buffer holds frames.

        With ``force`` it never returns None, exceeding the buffer count by one: for a
        transport that reads once more after it was asked to pause.
        """
        seg = self._seg
        # At a frame's start, the next frame is expected to be as large as the last.
        want = self._need if self._header is not None else max(self._need, self._expect)
        if self._start + want > len(seg.buffer) or self._end == len(seg.buffer):
            # What arrived of the current frame moves to the start of a buffer it fits in.
            partial = self._end - self._start
            if seg.held == 0 and len(seg.buffer) >= want and len(seg.buffer) > partial:
                seg.view[:partial] = seg.view[self._start : self._end]
            else:
                fresh = self._take_segment(max(want, partial + MIN_READ), force)
                if fresh is None:
                    return None
                fresh.view[:partial] = seg.view[self._start : self._end]
                if seg.held == 0:
                    self._free.append(seg)
                self._seg = seg = fresh
            self._start, self._end = 0, partial
        stop = len(seg.buffer)
        if self._expect:
            # Read no further than the end of the last frame of the expected size that fits
            # whole, so the next starts a fresh buffer instead of being copied out of this
            # one's tail.
            stop -= (stop - self._start - want) % self._expect
        return seg.view[self._end : stop if self._end < stop else None]

    def _take_segment(self, size: int, force: bool) -> _Segment | None:
        while self._free:
            seg = self._free.pop()
            if len(seg.buffer) >= size:
                return seg
            self._segments -= 1  # too small for this frame: let it go
        if self._segments >= self.limits.receive_segments and not force:
            return None
        self._segments += 1
        floor = MIN_READ if self._handshake else self.limits.receive_segment_size
        return _Segment(max(size, floor))

    def discard(self) -> None:
        """Let go of every receive buffer: the connection is over.

        Frames already handed out stay valid (their views keep their buffer alive);
        releasing them later no longer makes a buffer reusable.
        """
        self._discarded = True
        self._free.clear()
        self._seg = _Segment(0)
        self._start = self._end = 0
        self._need = PREFIX.size
        self._header = None

    def advance(self, n: int) -> None:
        """Record that ``n`` bytes were written into the last ``get_buffer()`` view."""
        self._end += n

    def release(self, frame: Frame) -> None:
        """Let the buffer under ``frame.payload`` be reused; the view is released."""
        seg = frame._segment
        if seg is None:
            return
        frame._segment = None
        # Released, a stale view raises instead of reading reused bytes; a view someone
        # exported further cannot be released, and the buffer is reused all the same.
        with contextlib.suppress(BufferError):
            frame.payload.release()
        seg.held -= 1
        if seg.held == 0 and seg is not self._seg and not self._discarded:
            self._free.append(seg)

    def next_frame(self) -> Frame | None:
        """The next complete frame, validated, or None until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_frame()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_frame(self) -> Frame | None:
        seg, start = self._seg, self._start
        available = self._end - start
        if self._header is None:
            if available < PREFIX.size:
                return None
            magic, size = PREFIX.unpack_from(seg.buffer, start)
            if magic != MAGIC:
                seen = FOREIGN.get(bytes(magic), "")
                raise ProtocolError("magic", f"expected {MAGIC!r}, got {bytes(magic)!r}{seen}")
            if not 0 < size <= MAX_HEADER:
                raise ProtocolError("header_length", f"{size} is not in 1..{MAX_HEADER}")
            if available < PREFIX.size + size:
                self._need = PREFIX.size + size
                return None
            header = seg.view[start + PREFIX.size : start + PREFIX.size + size]
            self._header = self._parse_header(header)
            self._need = PREFIX.size + size + self._header[4]
        tag, device, seq, flags, length, check = self._header
        begin = start + self._need - length
        if available < self._need:
            if self.checksums and self._end > begin + self._hashed:
                # Hash what just arrived while it is in cache, not when the frame is whole.
                self._hasher.update(seg.view[begin + self._hashed : self._end])
                self._hashed = self._end - begin
            return None
        payload = seg.view[begin : start + self._need]
        if self.checksums:
            if self._hashed:
                self._hasher.update(payload[self._hashed :])
                actual = self._hasher.intdigest()
                self._hasher.reset()
                self._hashed = 0
            else:
                actual = xxhash.xxh3_64_intdigest(payload)
            if actual != check:
                raise ProtocolError(
                    "checksum", f"mismatch on {tag.name} frame {seq} of device {device}"
                )
        need = self._need
        self._start += need
        self._need = PREFIX.size
        self._header = None
        if tag is Tag.END_OF_STREAM:
            self.ended = True
        if tag in DATA_TAGS:
            self._expect = need
            seg.held += 1
            return Frame(tag, device, seq, flags, payload, seg)
        return Frame(tag, device, seq, flags, memoryview(bytes(payload)))

    def _parse_header(self, header: memoryview) -> tuple[Tag, int, int, int, int, int]:
        try:
            value = msgpack.unpackb(header, use_list=False, max_bin_len=0, max_str_len=0)
        except Exception as exc:  # any failure to parse hostile bytes is the peer's fault
            raise ProtocolError("header", f"malformed msgpack ({exc})") from None
        if (
            not isinstance(value, tuple)
            or len(value) != 6
            or not all(type(v) is int and v >= 0 for v in value)
        ):
            raise ProtocolError("header", "expected 6 non-negative integers")
        raw_tag, device, seq, flags, length, check = value
        tag = _TAGS.get(raw_tag)
        if tag is None:
            raise ProtocolError("tag", f"unknown tag {raw_tag}")
        if seq != self._seq:
            raise ProtocolError("seq", f"expected {self._seq}, got {seq} ({tag.name})")
        self._seq += 1
        allowed = HANDSHAKE_TAGS if self._handshake else SESSION_TAGS
        if tag not in allowed:
            phase = "handshake" if self._handshake else "session"
            raise ProtocolError("tag", f"{tag.name} is not valid during the {phase}")
        if flags:
            raise ProtocolError("flags", f"{flags:#x}: no flags are defined")
        if not self.checksums and check:
            raise ProtocolError("checksum", f"{check:#x} on a channel agreed without checksums")
        if tag in DATA_TAGS:
            limit = self.limits.max_payload
        elif self._handshake:
            limit = self.limits.max_handshake_payload
        else:
            limit = self.limits.max_control_payload
        if length > limit:
            raise LimitExceeded("payload_length", length, limit)
        if tag in DEVICE_TAGS:
            self._check_device(tag, device)
        elif device:
            raise ProtocolError("device", f"{tag.name} carries device {device}, expected 0")
        return tag, device, seq, flags, length, check

    def _check_device(self, tag: Tag, device: int) -> None:
        if self.ended:
            raise ProtocolError("tag", f"{tag.name} for device {device} after END_OF_STREAM")
        if self.device_count is None and not self.announced:
            raise ProtocolError("device", f"{tag.name} for device {device} before DEVICES")
        if self.device_count is not None and device >= self.device_count:
            raise ProtocolError(
                "device", f"device {device} was not announced ({self.device_count} devices)"
            )

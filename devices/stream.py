"""The migration stream of the block-tracked devices (simulated and guest RAM).

A stream is a sequence of records, one per chunk the saving channel returns::

    record  = header body
    header  = type:u8 pad:3 body_len:u32 seq:u32 pad:4 check:u64  (24 bytes, little-endian)
    HELLO   = magic:8s version:u16 pad:2 kind:16s state_size:u64 block_size:u32
    BLOCKS  = run_count:u32 runs:(start:u32 count:u32)* data
    END     = records:u32 blocks:u64

``seq`` numbers the records of one session from 0; ``check`` is the xxh3-64 hash of the
header's first three fields and the body, so a flipped bit, a lost record or a reordered
one is caught (format 2; format 1's CRC-32 ran at 4.7 GB/s here, a tenth of xxh3's
speed, and cost each end 0.2 s of CPU per GB moved). A BLOCKS run whose count has
``ZERO_RUN`` set carries no data: the blocks are zero (a zero page costs 8 bytes at
most, usually a fraction of a run entry). Other runs
carry ``count * block_size`` bytes each, in run order, after the run table. A session
is HELLO, any number of BLOCKS (a block may come again with newer content), and END,
sent once at the permanent end of STOP_COPY.

:class:`StreamDecoder` is the pure core of the resuming side: ``feed`` takes the stream
in pieces of any size, applies blocks as they arrive and latches the first problem;
``verdict`` says whether the stream was whole, well-formed and meant for this device.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import xxhash

from devices.base import Buffer

MAGIC = b"LIVEMIG\x00"
HELLO, BLOCKS, END = 1, 2, 3
ZERO_RUN = 1 << 31

HEADER = struct.Struct("<BxxxIIxxxxQ")
_HEADER_PREFIX = struct.Struct("<BxxxII")
_HELLO = struct.Struct("<8sHxx16sQI")
_COUNT = struct.Struct("<I")
_END = struct.Struct("<IQ")
_RUN = struct.Struct("<II")
#: Format 1's record header (CRC-32) was this long: its HELLO's magic followed it.
_V1_HEADER_SIZE = 16
#: Larger bodies are refused as corrupt before any buffering (a hostile length field).
MAX_BODY = 256 << 20
_NAMES = {HELLO: "HELLO", BLOCKS: "BLOCKS", END: "END"}


@dataclass(frozen=True, slots=True)
class StreamIdentity:
    """What a stream announces about its device, compared by the destination."""

    kind: str
    format_version: int
    state_size: int
    block_size: int


def record(kind: int, seq: int, body: Iterable[Buffer]) -> bytes:
    """The header of a record whose body is ``body`` (the pieces, in order)."""
    parts = list(body)
    body_len = sum(len(p) for p in parts)
    check = xxhash.xxh3_64(_HEADER_PREFIX.pack(kind, body_len, seq))
    for part in parts:
        check.update(part)
    return HEADER.pack(kind, body_len, seq, check.intdigest())


def hello(identity: StreamIdentity) -> bytes:
    """The HELLO record (seq 0) announcing ``identity``."""
    body = _HELLO.pack(
        MAGIC,
        identity.format_version,
        identity.kind.encode(),
        identity.state_size,
        identity.block_size,
    )
    return record(HELLO, 0, (body,)) + body


def blocks(seq: int, runs: array[int], data: list[Buffer]) -> tuple[Buffer, ...]:
    """A BLOCKS record as buffers: header plus run table, then the data pieces as given.

    ``runs`` alternates start and count (count | ZERO_RUN for zero runs); ``data`` holds
    the bytes of the non-zero runs in order. The data pieces are not copied.
    """
    table = _COUNT.pack(len(runs) // 2) + runs.tobytes()
    head = record(BLOCKS, seq, (table, *data))
    return (head + table, *data)


def end(seq: int, blocks_sent: int) -> bytes:
    """The END record closing a session of ``seq`` records that sent ``blocks_sent`` blocks."""
    body = _END.pack(seq, blocks_sent)
    return record(END, seq, (body,)) + body


class StreamDecoder:
    """Incremental parser of one session's stream; applies blocks, latches the first fault.

    ``write_blocks(first, data)`` stores whole blocks starting at block ``first``;
    ``zero_blocks(first, count)`` zeroes ``count`` blocks. Both are called only after a
    record's checksum matched and the stream's HELLO matched ``expect``.
    """

    def __init__(
        self,
        expect: StreamIdentity,
        write_blocks: Callable[[int, memoryview], None],
        zero_blocks: Callable[[int, int], None],
    ) -> None:
        self.expect = expect
        self.problem: str | None = None
        self._write = write_blocks
        self._zero = zero_blocks
        self._n_blocks = expect.state_size // expect.block_size
        self._received = bytearray(self._n_blocks)
        self._blocks_seen = 0
        self._seq = 0
        self._ended = False
        self._buf = bytearray()

    def feed(self, data: Buffer) -> None:
        """Take the next piece of the stream; a piece may end anywhere inside a record.

        Whole records inside ``data`` are applied straight from it; only a record split
        across pieces is buffered (copied), since the caller may reuse ``data``.
        """
        view = memoryview(data).cast("B")
        while view and self.problem is None:
            if not self._buf:
                wanted = self._wanted(view)
                if len(view) < wanted:
                    self._buf += view
                    return
                self._record(view[:wanted])
                view = view[wanted:]
                continue
            take = self._wanted(self._buf) - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._wanted(self._buf):
                whole, self._buf = self._buf, bytearray()
                self._record(memoryview(whole))

    def _wanted(self, view: Buffer) -> int:
        """Size of the record ``view`` starts with, or of a header while that is incomplete."""
        if len(view) < HEADER.size:
            return HEADER.size
        body_len: int = HEADER.unpack_from(view)[1]
        if self._seq == 0 and bytes(view[_V1_HEADER_SIZE : HEADER.size]) == MAGIC:
            # The HELLO's magic right after a 16-byte header: format 1, whose records the
            # checks here would only call corrupt.
            self._fail(
                "foreign stream: format 1 (16-byte record headers), this device reads "
                f"format {self.expect.format_version}"
            )
        if body_len > MAX_BODY:
            self._fail(f"corrupt stream: record {self._seq} claims a {body_len}-byte body")
        return HEADER.size + body_len

    def _record(self, view: memoryview) -> None:
        kind, body_len, seq, check = HEADER.unpack_from(view)
        body = view[HEADER.size :]
        if self._ended:
            self._fail("corrupt stream: data after the END record")
            return
        actual = xxhash.xxh3_64(_HEADER_PREFIX.pack(kind, body_len, seq))
        actual.update(body)
        if actual.intdigest() != check:
            self._fail(f"corrupt stream: checksum mismatch in record {self._seq}")
        elif seq != self._seq:
            self._fail(f"short stream: record {seq} arrived where record {self._seq} was due")
        elif kind not in _NAMES:
            self._fail(f"corrupt stream: record {seq} has unknown type {kind}")
        elif (kind == HELLO) != (seq == 0):
            self._fail(f"corrupt stream: record {seq} is a misplaced {_NAMES[kind]}")
        elif kind == HELLO:
            self._hello(body)
        elif kind == BLOCKS:
            self._blocks(body)
        else:
            self._end(body)
        self._seq += 1

    def _hello(self, body: memoryview) -> None:
        if len(body) != _HELLO.size or bytes(body[:8]) != MAGIC:
            self._fail("foreign stream: not a livemig block-device stream")
            return
        _, version, kind_raw, state_size, block_size = _HELLO.unpack(body)
        got = StreamIdentity(
            kind_raw.rstrip(b"\0").decode(errors="replace"), version, state_size, block_size
        )
        want = self.expect
        for field, theirs, ours in (
            ("kind", got.kind, want.kind),
            ("format version", got.format_version, want.format_version),
            ("state size", got.state_size, want.state_size),
            ("block size", got.block_size, want.block_size),
        ):
            if theirs != ours:
                self._fail(f"foreign stream: {field} is {theirs!r}, this device has {ours!r}")
                return

    def _blocks(self, body: memoryview) -> None:
        if len(body) < _COUNT.size:
            self._fail(f"corrupt stream: record {self._seq} is too short for a run table")
            return
        (n_runs,) = _COUNT.unpack_from(body)
        table_end = _COUNT.size + n_runs * _RUN.size
        if table_end > len(body):
            self._fail(f"corrupt stream: record {self._seq} run table overruns the record")
            return
        runs = array("I")
        runs.frombytes(body[_COUNT.size : table_end])
        block_size, pos = self.expect.block_size, table_end
        for i in range(0, len(runs), 2):
            first, count = runs[i], runs[i + 1]
            zero = bool(count & ZERO_RUN)
            count &= ~ZERO_RUN
            data_len = 0 if zero else count * block_size
            if first + count > self._n_blocks or pos + data_len > len(body):
                self._fail(f"corrupt stream: record {self._seq} has a run outside the state")
                return
            if zero:
                self._zero(first, count)
            else:
                self._write(first, body[pos : pos + data_len])
            self._received[first : first + count] = b"\x01" * count
            self._blocks_seen += count
            pos += data_len
        if pos != len(body):
            self._fail(f"corrupt stream: record {self._seq} has trailing bytes")

    def _end(self, body: memoryview) -> None:
        if len(body) != _END.size:
            self._fail("corrupt stream: malformed END record")
            return
        records, blocks_sent = _END.unpack(body)
        if records != self._seq or blocks_sent != self._blocks_seen:
            self._fail(
                f"short stream: the source sent {records} records and {blocks_sent} blocks, "
                f"{self._seq} records and {self._blocks_seen} blocks arrived"
            )
        self._ended = True

    def _fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def verdict(self) -> str | None:
        """None if the stream was complete and valid; otherwise what is wrong with it."""
        if self.problem is not None:
            return self.problem
        if self._seq == 0 and not self._buf:
            return "short stream: nothing was received"
        if not self._ended:
            return f"short stream: it stops after {self._seq} records, before its END record"
        missing = self._received.count(0)
        if missing:
            first = self._received.find(0)
            return (
                f"short stream: {missing} of {self._n_blocks} blocks never arrived "
                f"(first missing block {first})"
            )
        return None

"""Devices whose state is one byte region tracked in fixed-size blocks.

The machinery the simulated device and the guest-RAM device share: the state region,
per-block dirty tracking for pre-copy, a workload that writes blocks at a rate taken
from the event-loop clock, the saving and resuming channels speaking
:mod:`devices.stream`, the digest and fault injection.

Tracking is two byte maps with one byte per block (``bytes.find`` scans them at C
speed): ``pending`` (to be sent: never sent in this session, or written since it was
sent) and ``unsent`` (never sent in this session). ``initial_bytes`` counts the unsent
blocks, ``dirty_bytes`` the pending blocks that were already sent once.

Chunk stability: while the device runs (PRE_COPY states) a chunk carries copies of the
blocks, at most one chunk's worth; in STOP_COPY, where nothing writes, it carries views
of the state itself. Views stay valid until the device runs again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import structlog

from devices import stream
from devices.base import (
    Arc,
    ArcDevice,
    ArcHandler,
    Buffer,
    Chunk,
    DeviceDescriptor,
    MigratableDevice,
    PrecopyInfo,
    ResumeChannel,
    SaveChannel,
)
from devices.errors import ArcFailed, ChannelIOError, StateValidationError
from devices.fsm import ARCS, RUNNING_STATES, SAVING_GROUP, Feature, State

log = structlog.get_logger(__name__)

ALL_FEATURES = Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY

#: Seconds between workload steps. How much a step writes follows the clock, not the tick.
WORKLOAD_TICK = 0.01
#: A chunk may cover this many times its data budget in zero blocks (they cost no data).
ZERO_BLOCKS_PER_DATA_BLOCK = 64
_STAMP = struct.Struct("<Q")
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_PATTERN_SIZE = 1 << 20


@dataclass
class Faults:
    """Faults to inject; assign a new one to ``device.faults`` at any time."""

    #: These arcs raise ArcFailed every time they run.
    fail_arcs: frozenset[Arc] = frozenset()
    #: A read fails with ChannelIOError once the session has returned this many bytes.
    fail_read_after: int | None = None
    #: A read blocks once the session has returned this many bytes, until release_stall().
    stall_read_after: int | None = None
    #: RESUMING -> STOP rejects the loaded state as corrupt.
    corrupt_validation: bool = False


@dataclass
class _Session:
    """Progress of one saving session."""

    seq: int = 0
    blocks_sent: int = 0
    bytes_read: int = 0
    ended: bool = False
    cursor: int = 0


class PagedDevice(ArcDevice):
    """A device whose state is ``state_size`` bytes tracked in ``block_size`` blocks.

    ``hot_blocks`` is how many blocks, from the first, the workload writes; each write
    rewrites eight bytes of one block (so a block is dirtied whole). Subclasses fill the
    initial content. The workload follows ``clock`` (the event loop's by default) from
    ``open`` to ``close``; a timer catches it up while it runs, and so do reads, precopy
    queries and state changes. ``run_workload`` advances it by hand.
    """

    #: 2: records carry an xxh3-64 check (1: CRC-32), see devices.stream.
    format_version: ClassVar[int] = 2

    def __init__(
        self,
        name: str,
        *,
        state_size: int,
        block_size: int,
        chunk_size: int,
        features: Feature,
        dirty_rate: float,
        hot_blocks: int,
        seed: int,
        faults: Faults | None,
        clock: Callable[[], float] | None,
    ) -> None:
        if block_size <= 0 or block_size % _STAMP.size:
            raise ValueError(f"{name}: block size {block_size} is not a positive multiple of 8")
        if state_size <= 0 or state_size % block_size:
            raise ValueError(
                f"{name}: state size {state_size} is not a positive multiple of {block_size}"
            )
        if state_size // block_size >= stream.ZERO_RUN:
            raise ValueError(f"{name}: {state_size // block_size} blocks exceed the stream limit")
        if chunk_size < block_size:
            raise ValueError(f"{name}: chunk size {chunk_size} is below the block size")
        if dirty_rate < 0:
            raise ValueError(f"{name}: negative dirty rate {dirty_rate}")
        super().__init__(name, features)
        self.state_size = state_size
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.dirty_rate = dirty_rate
        self.seed = seed
        self.faults = faults or Faults()
        self.n_blocks = state_size // block_size
        #: The device state. Written by the workload and by RESUMING, read by the channel.
        self.memory = bytearray(state_size)
        #: Blocks the workload has written so far (reads of this are how tests see it).
        self.writes = 0
        #: Set while a read is stalled by ``Faults.stall_read_after``.
        self.read_stalled = asyncio.Event()
        self._view = memoryview(self.memory)
        self._hot_blocks = max(1, min(hot_blocks, self.n_blocks))
        self._rng = random.Random(seed)
        self._pending = bytearray(self.n_blocks)
        self._unsent = bytearray(self.n_blocks)
        self._n_unsent = 0
        self._n_dirty = 0
        self._session = _Session()
        self._zero_window = memoryview(bytes(chunk_size // block_size * block_size))
        self._wakeup = asyncio.Event()
        self._stall_release = asyncio.Event()
        self._throttle = 0.0
        self._paused = 0
        self._credit = 0.0
        self._clock = clock
        self._now: Callable[[], float] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self.add_state_listener(self._on_state_change)

    # -- content -------------------------------------------------------------------------

    def fill_seeded(self, first_block: int, end_block: int) -> None:
        """Fill blocks with content derived from the seed; no two blocks alike."""
        start, stop = first_block * self.block_size, end_block * self.block_size
        pattern = random.Random(self.seed).randbytes(min(_PATTERN_SIZE, stop - start))
        for offset in range(start, stop, len(pattern)):
            piece = min(len(pattern), stop - offset)
            self._view[offset : offset + piece] = pattern[:piece]
        for block in range(first_block, end_block):
            stamp = (block * _GOLDEN ^ self.seed) & _MASK64 | 1
            _STAMP.pack_into(self.memory, block * self.block_size, stamp)

    def touch(self, block: int) -> None:
        """Write to ``block`` as the workload does; valid while the device runs."""
        self.require(*RUNNING_STATES, what="a workload write")
        if not 0 <= block < self.n_blocks:
            raise ValueError(f"{self.name}: block {block} outside 0..{self.n_blocks - 1}")
        self._write(block)
        self._wakeup.set()

    def _write(self, block: int) -> None:
        self.writes += 1
        slots = self.block_size // _STAMP.size
        offset = block * self.block_size + (self.writes % slots) * _STAMP.size
        _STAMP.pack_into(self.memory, offset, (self.writes * _GOLDEN ^ self.seed) & _MASK64 | 1)
        if self._state in SAVING_GROUP and not self._pending[block]:
            self._pending[block] = 1
            self._n_dirty += 1

    # -- workload ------------------------------------------------------------------------

    def run_workload(self, seconds: float) -> None:
        """Write what ``seconds`` of the workload at its rate and throttle would write."""
        self._credit += seconds * self.dirty_rate * (1.0 - self._throttle)
        count = int(self._credit // self.block_size)
        if not count:
            return
        self._credit -= count * self.block_size
        self.replay(count)

    def replay(self, writes: int) -> None:
        """Make the workload's next ``writes`` writes at once.

        The workload's writes follow from the seed alone, so a fresh device of the same
        configuration that replays another's ``writes`` holds exactly its content: how
        tests prove a device kept what its own workload produced, nothing more or less.
        """
        pick = self._rng.randrange
        for _ in range(writes):
            self._write(pick(self._hot_blocks))
        self._wakeup.set()

    async def open(self) -> None:
        """Start the workload's clock, and its timer if it dirties anything."""
        if self._now is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._now = self._clock or self._loop.time
        self._last = self._now()
        self._arm()

    async def close(self) -> None:
        """Stop the workload."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._now = self._loop = None

    def _arm(self) -> None:
        """Start the timer if the workload writes and is not ticking yet.

        Only while the device runs: a stopped device (64 of them after a switchover,
        each ticking 100 times a second) has nothing to write.
        """
        if self._loop is None or self._timer is not None or not self.dirty_rate:
            return
        if self._state in RUNNING_STATES:
            self._timer = self._loop.call_later(WORKLOAD_TICK, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._catch_up(self._state in RUNNING_STATES)
        self._arm()

    def _catch_up(self, running: bool) -> None:
        """Run the workload for the clock time since the last catch-up, if it was running."""
        if self._now is None:
            return
        now = self._now()
        elapsed, self._last = now - self._last, now
        if running and not self._paused:
            self.run_workload(elapsed)

    def _on_state_change(self, device: MigratableDevice, old: State, new: State) -> None:
        # The workload's clock matters only where the device starts or stops running:
        # between two running (or two stopped) states, the next catch-up counts the
        # time alike, and a switchover's arcs skip the work (each arc is downtime).
        running = old in RUNNING_STATES
        if self.dirty_rate and running != (new in RUNNING_STATES):
            self._catch_up(running)  # time until now ran in the old state
            self._arm()
        self._wakeup.set()

    # -- the FSM -------------------------------------------------------------------------

    def arc_actions(self) -> dict[Arc, ArcHandler]:
        """No arc needs work of its own but RESUMING -> STOP; sessions are the base's job."""
        return {
            arc: self._validate if arc == (State.RESUMING, State.STOP) else _no_action
            for arc in ARCS[self.features]
        }

    def fail_arc(self, arc_from: State, arc_to: State) -> None:
        fail_arcs = self.faults.fail_arcs
        if fail_arcs and (arc_from, arc_to) in fail_arcs:  # the common case builds no tuple
            raise ArcFailed(self.name, f"{arc_from.name} -> {arc_to.name} failed (injected)")

    def descriptor(self) -> DeviceDescriptor:
        """The handshake identity, with the state size a destination must match."""
        return dataclasses.replace(super().descriptor(), state_size=self.state_size)

    def identity(self) -> stream.StreamIdentity:
        """What this device's stream announces and what it accepts."""
        return stream.StreamIdentity(
            self.kind, self.format_version, self.state_size, self.block_size
        )

    def new_save_channel(self) -> SaveChannel:
        self._pending[:] = b"\x01" * self.n_blocks
        self._unsent[:] = self._pending
        self._n_unsent, self._n_dirty = self.n_blocks, 0
        self._session = _Session()
        return PagedSaveChannel(self)

    def new_resume_channel(self) -> ResumeChannel:
        return PagedResumeChannel(self)

    def _validate(self) -> None:
        """RESUMING -> STOP: accept the loaded state only if its stream was whole and ours."""
        channel = self._channel
        assert isinstance(channel, PagedResumeChannel)
        problem = channel.decoder.verdict()
        if problem is None and self.faults.corrupt_validation:
            problem = "corrupt stream: validation failure injected"
        if problem is not None:
            log.warning("state_rejected", device=self.name, kind=self.kind, problem=problem)
            self.state = State.ERROR  # the stream is consumed: there is nothing to go back to
            raise StateValidationError(self.name, f"{self.kind} state rejected: {problem}")

    async def hard_reset(self) -> None:
        """Drop any session; the content stays what it was (a device reset is no wipe)."""
        await super().hard_reset()
        self._credit = 0.0

    # -- queries -------------------------------------------------------------------------

    def precopy_info(self) -> PrecopyInfo:
        self.require(State.PRE_COPY, State.PRE_COPY_P2P, what="precopy_info")
        self._catch_up(True)
        return PrecopyInfo(self._n_unsent * self.block_size, self._n_dirty * self.block_size)

    def stop_copy_size(self) -> int:
        if self._state in SAVING_GROUP:
            return (self._n_unsent + self._n_dirty) * self.block_size
        return self.state_size

    async def digest(self) -> bytes:
        """SHA-256 of the whole state, hashed in a thread while the workload is paused.

        Meaningful while nothing else writes the state (not while RESUMING is loading it).
        """
        self._catch_up(self._state in RUNNING_STATES)
        self._paused += 1
        try:
            return await asyncio.to_thread(_sha256, self._view)
        finally:
            self._paused -= 1
            if self._now is not None:
                self._last = self._now()  # the paused time is not made up for later

    def release_stall(self) -> None:
        """Let a read stalled by ``Faults.stall_read_after`` go on, and stall no more."""
        self.faults.stall_read_after = None
        self._stall_release.set()

    # -- the channels' side --------------------------------------------------------------

    def _readable(self) -> bool:
        session = self._session
        return (
            session.seq == 0 or self._state == State.STOP_COPY or self._n_unsent + self._n_dirty > 0
        )

    def _take_blocks(self, views: bool) -> Chunk | None:
        """The next BLOCKS record of pending blocks, or None if nothing is pending."""
        session, bs, pending = self._session, self.block_size, self._pending
        data_budget = self.chunk_size // bs
        block_budget = data_budget * ZERO_BLOCKS_PER_DATA_BLOCK
        runs: array[int] = array("I")
        data: list[Buffer] = []
        taken = data_blocks = 0
        cursor, wrapped = session.cursor, False
        while data_blocks < data_budget and taken < block_budget:
            start = pending.find(1, cursor)
            if start < 0:
                if cursor == 0 or wrapped:
                    break
                cursor, wrapped = 0, True
                continue
            stop = pending.find(0, start)
            stop = min(self.n_blocks if stop < 0 else stop, start + block_budget - taken)
            block = start
            while block < stop and data_blocks < data_budget:
                zeros = self._zero_run(block, stop)
                if zeros:
                    runs.extend((block, zeros | stream.ZERO_RUN))
                    block += zeros
                    continue
                count = self._data_run(block, min(stop, block + data_budget - data_blocks))
                piece = self._view[block * bs : (block + count) * bs]
                data.append(piece if views else bytes(piece))
                runs.extend((block, count))
                data_blocks += count
                block += count
            self._mark_sent(start, block)
            taken += block - start
            cursor = block
        session.cursor = 0 if cursor >= self.n_blocks else cursor
        if not runs:
            return None
        chunk = stream.blocks(session.seq, runs, data)
        session.seq += 1
        session.blocks_sent += taken
        return chunk

    def _zero_run(self, block: int, stop: int) -> int:
        """How many blocks from ``block`` (before ``stop``) are all zero."""
        memory, bs = self.memory, self.block_size
        window = len(self._zero_window) // bs
        first = block
        while block < stop:
            span = min(window, stop - block)
            if memory.startswith(self._zero_window[: span * bs], block * bs):
                block += span
                continue
            zero_block = self._zero_window[:bs]
            while block < stop and memory.startswith(zero_block, block * bs):
                block += 1
            break
        return block - first

    def _data_run(self, block: int, stop: int) -> int:
        """How many blocks from ``block`` (before ``stop``, at least one) are not zero."""
        memory, bs, zero_block = self.memory, self.block_size, self._zero_window[: self.block_size]
        first = block
        block += 1
        while block < stop and not memory.startswith(zero_block, block * bs):
            block += 1
        return block - first

    def _mark_sent(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        first_time = self._unsent.count(1, start, stop)
        self._n_unsent -= first_time
        self._n_dirty -= stop - start - first_time
        cleared = bytes(stop - start)
        self._pending[start:stop] = cleared
        self._unsent[start:stop] = cleared

    def _store_blocks(self, first: int, data: memoryview) -> None:
        offset = first * self.block_size
        self._view[offset : offset + len(data)] = data

    def _zero_blocks(self, first: int, count: int) -> None:
        offset, stop = first * self.block_size, (first + count) * self.block_size
        window = len(self._zero_window)
        while offset < stop:
            piece = min(window, stop - offset)
            self._view[offset : offset + piece] = self._zero_window[:piece]
            offset += piece


def _no_action() -> None:
    """An arc whose whole effect is the state change (and the base's session bookkeeping)."""


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


class PagedSaveChannel(SaveChannel):
    """The saving session of a :class:`PagedDevice`."""

    def __init__(self, device: PagedDevice) -> None:
        super().__init__(device)
        self._dev = device

    async def read(self) -> Chunk | None:
        self.check_open()
        dev, session = self._dev, self._dev._session
        await self._inject_faults(session)
        dev._catch_up(dev.state in RUNNING_STATES)
        chunk: Chunk | None
        if session.seq == 0:
            chunk = (stream.hello(dev.identity()),)
            session.seq = 1
        elif dev.state != State.STOP_COPY:
            chunk = dev._take_blocks(views=False)
        elif (chunk := dev._take_blocks(views=True)) is None:
            if session.ended:
                return ()
            chunk = (stream.end(session.seq, session.blocks_sent),)
            session.ended = True
        elif not dev._n_unsent + dev._n_dirty:
            # The last blocks carry the END record: one piece less to send in the
            # downtime window, per device.
            chunk = (*chunk, stream.end(session.seq, session.blocks_sent))
            session.ended = True
        if chunk is not None:
            session.bytes_read += sum(len(b) for b in chunk)
        return chunk

    async def _inject_faults(self, session: _Session) -> None:
        faults, dev = self._dev.faults, self._dev
        if faults.fail_read_after is not None and session.bytes_read >= faults.fail_read_after:
            raise ChannelIOError(
                dev.name, f"read failed after {session.bytes_read} bytes (injected fault)"
            )
        if faults.stall_read_after is not None and session.bytes_read >= faults.stall_read_after:
            dev._stall_release.clear()
            dev.read_stalled.set()
            log.info("read_stalled", device=dev.name, after_bytes=session.bytes_read)
            try:
                await dev._stall_release.wait()
            finally:
                dev.read_stalled.clear()
            self.check_open()

    async def wait_readable(self) -> None:
        dev = self._dev
        while True:
            self.check_open()
            dev._catch_up(dev.state in RUNNING_STATES)
            if dev._readable():
                return
            dev._wakeup.clear()
            await dev._wakeup.wait()


class PagedResumeChannel(ResumeChannel):
    """The resuming session of a :class:`PagedDevice`: blocks land in the state as they come."""

    def __init__(self, device: PagedDevice) -> None:
        super().__init__(device)
        self.decoder = stream.StreamDecoder(
            device.identity(), device._store_blocks, device._zero_blocks
        )

    async def write(self, data: Buffer) -> None:
        self.check_open()
        self.decoder.feed(data)

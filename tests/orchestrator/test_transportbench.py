"""The transport bench's raw baseline: where its receiver puts the bytes it reads."""

from __future__ import annotations

from orchestrator.bench.transportbench import RAW_READ_BUFFER, _RawSink
from transport.frames import MIN_READ


def test_the_raw_sink_reads_where_its_last_read_ended_and_wraps() -> None:
    """Reads walk the buffer and start over once less than MIN_READ is left, as the framed
    receiver's reads walk its segments, so raw is not charged less for a hot destination."""
    finished: list[bool] = []
    sink = _RawSink(RAW_READ_BUFFER * 3, lambda: finished.append(True))
    first = sink.get_buffer(-1)
    assert len(first) == RAW_READ_BUFFER
    sink.buffer_updated(1000)
    assert len(sink.get_buffer(-1)) == RAW_READ_BUFFER - 1000
    sink.buffer_updated(RAW_READ_BUFFER - 1000 - (MIN_READ - 1))
    assert len(sink.get_buffer(-1)) == RAW_READ_BUFFER
    assert not finished

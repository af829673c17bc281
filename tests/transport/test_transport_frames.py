"""The pure frame codec: round trips, every refusal, and fuzzing with bounded memory."""

from __future__ import annotations

import os
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport import (
    Frame,
    FrameDecoder,
    LimitExceeded,
    Limits,
    ProtocolError,
    Tag,
)
from transport.frames import (
    DATA_TAGS,
    DEVICE_TAGS,
    HANDSHAKE_TAGS,
    MAGIC,
    PREFIX,
    encode_fields,
    encode_frame,
    encode_header,
)

#: Small buffers so thousands of fuzz examples stay cheap; still several frames each.
SMALL = Limits(
    max_payload=4096, max_control_payload=1024, receive_segment_size=8192, receive_segments=3
)
#: The most any decoder under SMALL may allocate: a forced extra segment included.
SMALL_BOUND = (SMALL.receive_segments + 1) * (SMALL.max_payload + 64 + 65536)


def stream(frames: list[tuple[Tag, int, bytes]], first_seq: int = 0) -> bytes:
    """The wire bytes of ``frames`` numbered from ``first_seq``."""
    return b"".join(
        b"".join(encode_frame(tag, device, first_seq + i, (payload,)))  # type: ignore[arg-type]
        for i, (tag, device, payload) in enumerate(frames)
    )


def session_decoder(limits: Limits = SMALL, devices: int = 4) -> FrameDecoder:
    """A decoder past the handshake that knows ``devices`` devices."""
    decoder = FrameDecoder(limits)
    decoder.device_count = devices
    return decoder


def drain(decoder: FrameDecoder) -> list[tuple[Tag, int, int, bytes]]:
    """Every complete frame, copied out and released."""
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append((frame.tag, frame.device, frame.seq, bytes(frame.payload)))
        decoder.release(frame)
    return out


def payload_for(tag: Tag, data: bytes) -> bytes:
    """Raw bytes for data tags, a msgpack map for the others."""
    return data if tag in DATA_TAGS else encode_fields({"k": data})


@pytest.mark.parametrize("tag", list(Tag))
def test_every_tag_round_trips(tag: Tag) -> None:
    """Each tag encodes and decodes to the same tag, device, seq and payload."""
    decoder = FrameDecoder(handshake=tag in HANDSHAKE_TAGS)
    decoder.device_count = 8
    device = 5 if tag in DEVICE_TAGS else 0
    payload = payload_for(tag, bytes(range(256)) * 3)
    decoder.feed(stream([(tag, device, payload)]))
    frame = decoder.next_frame()
    assert frame is not None
    assert (frame.tag, frame.device, frame.seq, frame.flags) == (tag, device, 0, 0)
    assert bytes(frame.payload) == payload
    if tag not in DATA_TAGS:
        assert frame.fields() == {"k": bytes(range(256)) * 3}
    assert decoder.next_frame() is None


def test_chunk_buffers_are_framed_without_joining() -> None:
    """A chunk of several buffers becomes one payload, checksummed across the parts."""
    parts = (b"head", bytearray(b"middle"), memoryview(b"tail"))
    wire = encode_frame(Tag.STOPCOPY_DATA, 1, 0, parts)
    assert wire[1:] == list(parts)
    decoder = session_decoder()
    decoder.feed(b"".join(bytes(p) for p in wire))
    assert drain(decoder) == [(Tag.STOPCOPY_DATA, 1, 0, b"headmiddletail")]


frame_lists = st.lists(
    st.tuples(
        st.sampled_from(sorted(set(Tag) - HANDSHAKE_TAGS - {Tag.END_OF_STREAM})),
        st.integers(0, 3),
        st.binary(max_size=600),
    ),
    max_size=12,
)


def normalise(frames: list[tuple[Tag, int, bytes]]) -> list[tuple[Tag, int, bytes]]:
    """Give each frame a payload and device its tag allows."""
    return [
        (tag, device if tag in DEVICE_TAGS else 0, payload_for(tag, data))
        for tag, device, data in frames
    ]


@given(frames=frame_lists, cuts=st.lists(st.integers(1, 700), max_size=30))
@settings(max_examples=300, deadline=None)
def test_any_split_of_a_stream_decodes_the_same(
    frames: list[tuple[Tag, int, bytes]], cuts: list[int]
) -> None:
    """However the bytes are split across reads, the same frames come out in order."""
    frames = normalise(frames)
    data = stream(frames)
    decoder = session_decoder()
    out = []
    position = 0
    for size in [*cuts, len(data)]:
        decoder.feed(data[position : position + size])
        position += size
        out.extend(drain(decoder))
    assert out == [(t, d, i, p) for i, (t, d, p) in enumerate(frames)]


def feed_hostile(decoder: FrameDecoder, data: bytes, piece: int) -> None:
    """Feed ``data`` in pieces; only frames or ProtocolError may come out, memory bounded."""
    try:
        for start in range(0, len(data), piece):
            decoder.feed(data[start : start + piece])
            while (frame := decoder.next_frame()) is not None:
                assert isinstance(frame, Frame)
                if frame.tag not in DATA_TAGS:
                    frame.fields()
                decoder.release(frame)
            assert decoder.capacity <= SMALL_BOUND
    except ProtocolError:
        pass
    assert decoder.capacity <= SMALL_BOUND


@given(data=st.binary(max_size=3000), piece=st.integers(1, 512), handshake=st.booleans())
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_only_yield_frames_or_protocol_errors(
    data: bytes, piece: int, handshake: bool
) -> None:
    """Random input never escapes as anything but frames or ProtocolError."""
    decoder = FrameDecoder(SMALL, handshake=handshake)
    decoder.device_count = 2
    feed_hostile(decoder, MAGIC + data if data[:1] == b"\x00" else data, piece)


@given(
    frames=frame_lists,
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete"]),
            st.integers(0),
            st.binary(min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=4,
    ),
    piece=st.integers(1, 900),
)
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_streams_only_yield_frames_or_protocol_errors(
    frames: list[tuple[Tag, int, bytes]], edits: list[tuple[str, int, bytes]], piece: int
) -> None:
    """A valid stream with bytes flipped, inserted or deleted fails cleanly or decodes."""
    data = bytearray(stream(normalise(frames)))
    for kind, where, blob in edits:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= blob[0] or 1
        elif kind == "insert":
            data[at:at] = blob
        else:
            del data[at : at + len(blob)]
    feed_hostile(session_decoder(), bytes(data), piece)


def header_bytes(items: Any) -> bytes:
    """A frame prefix around an arbitrary msgpack header value."""
    packed = msgpack.packb(items)
    return PREFIX.pack(MAGIC, len(packed)) + packed


REFUSALS: list[tuple[str, bytes, str]] = [
    ("bad magic", b"XX\x05" + b"\x00" * 10, "magic"),
    ("empty header", MAGIC + b"\x00", "header_length"),
    ("huge header", MAGIC + b"\xff", "header_length"),
    ("header not msgpack", MAGIC + b"\x03\xc1\xc1\xc1", "header"),
    ("header wrong shape", header_bytes([1, 2, 3]), "header"),
    ("header negative", header_bytes([6, 0, 0, 0, -1, 0]), "header"),
    ("header bool", header_bytes([6, 0, 0, 0, True, 0]), "header"),
    ("unknown tag", header_bytes([99, 0, 0, 0, 0, 0]), "tag"),
    ("seq gap", encode_header(Tag.PING, 0, 1, 0, 0), "seq"),
    ("flags set", encode_header(Tag.PING, 0, 0, 0, 0, flags=4), "flags"),
    ("handshake tag in session", encode_header(Tag.HELLO, 0, 0, 0, 0), "tag"),
    ("control with device", encode_header(Tag.PING, 3, 0, 0, 0), "device"),
    ("device not announced", encode_header(Tag.PRECOPY_DATA, 4, 0, 0, 0), "device"),
    ("data too large", encode_header(Tag.PRECOPY_DATA, 0, 0, 4097, 0), "payload_length"),
    ("control too large", encode_header(Tag.VERDICT, 0, 0, 1025, 0), "payload_length"),
    ("corrupt payload", encode_header(Tag.PRECOPY_DATA, 0, 0, 3, 12345) + b"abc", "checksum"),
    (
        "data after END_OF_STREAM",
        stream([(Tag.END_OF_STREAM, 0, b""), (Tag.PRECOPY_DATA, 0, b"x")]),
        "tag",
    ),
    (
        "END_OF_DEVICE after END_OF_STREAM",
        stream([(Tag.END_OF_STREAM, 0, b""), (Tag.END_OF_DEVICE, 1, b"")]),
        "tag",
    ),
]


@pytest.mark.parametrize(
    ("data", "seen"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n", "HTTP"),
        (b'{"QMP": {}}\r\n', "JSON"),
        (b"\x15\x03\x03", "TLS"),
    ],
)
def test_a_foreign_peer_is_named_by_what_it_sent(data: bytes, seen: str) -> None:
    """A peer that is not a livemig listener (another port of the daemon) is refused
    with what its first bytes look like, so the operator sees which port was given."""
    decoder = session_decoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError, match=seen) as caught:
        drain(decoder)
    assert caught.value.field == "magic"


@pytest.mark.parametrize(("data", "field"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_field(data: bytes, field: str) -> None:
    """Each violation raises ProtocolError naming the field, and the decoder stays dead."""
    decoder = session_decoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError) as caught:
        drain(decoder)
    assert caught.value.field == field
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_size_limits_are_limit_exceeded() -> None:
    """An oversized payload is refused from its header alone, naming limit and value."""
    decoder = session_decoder()
    decoder.feed(encode_header(Tag.STOPCOPY_DATA, 0, 0, 1 << 40, 0))
    with pytest.raises(LimitExceeded) as caught:
        decoder.next_frame()
    assert (caught.value.field, caught.value.value, caught.value.limit) == (
        "payload_length",
        1 << 40,
        4096,
    )


def test_handshake_payload_limit_applies_before_authentication() -> None:
    """Before authentication a control payload may not exceed max_handshake_payload."""
    decoder = FrameDecoder(SMALL, handshake=True)
    decoder.feed(encode_header(Tag.HELLO, 0, 0, SMALL.max_handshake_payload + 1, 0))
    with pytest.raises(LimitExceeded, match="payload_length"):
        decoder.next_frame()


def test_data_before_devices_is_refused() -> None:
    """A data frame before the device list was announced names the device field."""
    decoder = FrameDecoder(SMALL)
    decoder.feed(stream([(Tag.SETUP, 0, b"x")]))
    with pytest.raises(ProtocolError, match="before DEVICES") as caught:
        decoder.next_frame()
    assert caught.value.field == "device"


@pytest.mark.parametrize(
    "payload", [b"\x93\x01\x02\x03", b"\x81\x01\x02", b"\xc1", b"\xd4\x05\x00"]
)
def test_control_payload_must_be_a_string_keyed_map(payload: bytes) -> None:
    """fields() refuses arrays, integer keys, invalid msgpack and extension types."""
    decoder = session_decoder()
    decoder.feed(stream([(Tag.VERDICT, 0, payload)]))
    frame = decoder.next_frame()
    assert frame is not None
    with pytest.raises(ProtocolError) as caught:
        frame.fields()
    assert caught.value.field == "VERDICT"


def test_receive_buffers_are_reused_once_frames_are_released() -> None:
    """Streaming far more than the buffers hold keeps memory at the segment bound."""
    decoder = session_decoder()
    received = 0
    for seq in range(1000):
        decoder.feed(stream([(Tag.PRECOPY_DATA, 1, bytes(4000))], first_seq=seq))
        received += sum(len(p) for *_, p in drain(decoder))
    assert decoder.capacity <= SMALL_BOUND
    assert received == 4_000_000 > 10 * decoder.capacity


def test_unreleased_frames_stop_the_decoder_taking_more() -> None:
    """While every buffer holds frames the caller keeps, feeding more is refused."""
    decoder = session_decoder()
    held = []

    def take_without_release() -> None:
        for seq in range(1000):
            decoder.feed(stream([(Tag.PRECOPY_DATA, 0, bytes(4000))], first_seq=seq))
            while (frame := decoder.next_frame()) is not None:
                held.append(frame)

    with pytest.raises(BufferError):
        take_without_release()
    assert decoder.capacity <= SMALL_BOUND
    assert len(held) < 1000


def test_released_payload_view_cannot_be_read() -> None:
    """After release a stale payload view raises instead of reading reused bytes."""
    decoder = session_decoder()
    decoder.feed(stream([(Tag.PRECOPY_DATA, 0, b"abc")]))
    frame = decoder.next_frame()
    assert frame is not None
    decoder.release(frame)
    with pytest.raises(ValueError, match="released"):
        bytes(frame.payload)


def test_a_channel_without_checksums_takes_zero_and_refuses_any_other() -> None:
    """Agreed without checksums, a frame's checksum must be 0 and the payload is not hashed."""
    decoder = session_decoder()
    decoder.end_handshake(checksums=False)
    decoder.feed(encode_header(Tag.PRECOPY_DATA, 0, 0, 3, 0) + b"abc")
    assert drain(decoder) == [(Tag.PRECOPY_DATA, 0, 0, b"abc")]
    honest = encode_frame(Tag.PRECOPY_DATA, 0, 1, (b"abc",))
    decoder.feed(b"".join(bytes(p) for p in honest))
    with pytest.raises(ProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.field == "checksum"


@pytest.mark.parametrize("cut", [40, 1000, 2999])
def test_corruption_is_caught_when_the_payload_arrives_in_pieces(cut: int) -> None:
    """The payload hashed read by read catches a flipped byte in an earlier read."""
    payload = bytearray(os.urandom(3000))
    wire = bytearray(b"".join(bytes(p) for p in encode_frame(Tag.PRECOPY_DATA, 0, 0, (payload,))))
    wire[len(wire) - 3000 + cut // 2] ^= 1
    decoder = session_decoder()
    decoder.feed(wire[: len(wire) - 3000 + cut])
    assert decoder.next_frame() is None
    decoder.feed(wire[len(wire) - 3000 + cut :])
    with pytest.raises(ProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.field == "checksum"


def test_reads_stop_where_the_next_frame_would_not_fit() -> None:
    """After a data frame, the room offered ends on a frame boundary, so no frame is split."""
    decoder = session_decoder()
    frames = stream([(Tag.PRECOPY_DATA, 0, os.urandom(3000)) for _ in range(8)])
    size = len(frames) // 8
    taken = 0
    while taken < len(frames):
        room = decoder.get_buffer()
        assert room is not None
        n = min(len(room), len(frames) - taken)
        room[:n] = frames[taken : taken + n]
        decoder.advance(n)
        taken += n
        while (frame := decoder.next_frame()) is not None:
            assert len(frame.payload) == 3000
            decoder.release(frame)
        if taken >= size:
            assert (decoder.buffered + len(decoder.get_buffer() or b"")) % size == 0
    assert decoder.frames == 8


def test_missing_counts_the_rest_of_the_frame_once_its_header_is_known() -> None:
    """missing is 0 between frames, then what the current frame still lacks."""
    decoder = session_decoder()
    wire = stream([(Tag.PRECOPY_DATA, 0, b"x" * 1000)])
    assert decoder.missing == 0
    decoder.feed(wire[:2])
    assert decoder.next_frame() is None
    assert decoder.missing == 0  # not even the header length yet
    decoder.feed(wire[2:300])
    assert decoder.next_frame() is None
    assert decoder.missing == len(wire) - 300
    decoder.feed(wire[300:])
    assert decoder.next_frame() is not None
    assert decoder.missing == 0


def test_discarding_the_buffers_keeps_handed_out_frames_and_does_not_fail() -> None:
    """discard() (a closed connection) lets go of the buffers without an error, and a
    data frame handed out before stays readable."""
    decoder = FrameDecoder()
    decoder.device_count = 1
    payload = b"p" * 1000
    for part in encode_frame(Tag.PRECOPY_DATA, 0, 0, (payload,)):
        decoder.feed(bytes(part))
    frame = decoder.next_frame()
    assert frame is not None
    decoder.discard()
    assert bytes(frame.payload) == payload
    decoder.release(frame)

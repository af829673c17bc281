"""Golden frames: the exact bytes of one frame of every kind, pinned before any code moves.

A change here is a change of the wire format: bump PROTOCOL_VERSION and say why.
"""

from __future__ import annotations

import pytest

from transport.frames import (
    DATA_TAGS,
    DEVICE_TAGS,
    HANDSHAKE_TAGS,
    FrameDecoder,
    Tag,
    encode_fields,
    encode_frame,
)

#: The control fields of each non-data frame (the data frames carry b"device-bytes").
FIELDS: dict[str, dict[str, object]] = {
    "HELLO": {
        "version": 1,
        "name": "src",
        "session": b"\x01" * 16,
        "channel": 0,
        "channels": 2,
        "nonce": b"\x02" * 32,
        "auth": "psk",
        "max_payload": 1048576,
        "checksum": True,
    },
    "AUTH": {"proof": b"\x03" * 32},
    "DEVICES": {
        "devices": [{"name": "sim0", "kind": "simulated", "format_version": 1, "features": 7}]
    },
    "DEVICES_ACCEPTED": {},
    "INITIAL_DATA_SENT": {},
    "SWITCHOVER_ACK": {},
    "END_OF_DEVICE": {},
    "END_OF_STREAM": {},
    "VERDICT": {"stage": "loaded", "reason": ""},
    "CANCEL": {"reason": "stop", "code": "cancelled"},
    "PING": {"id": 3, "t": 1.5},
    "PONG": {"id": 3, "t": 2.5},
    "COMMIT": {},
    "SYNC": {},
    "SYNC_ACK": {},
}

#: Frame 0 of its connection; device frames for device 1, the others for device 0.
GOLDEN = {
    Tag.HELLO: (
        "4c4d109601000000cc8ccf396d66ae9e0c367489a776657273696f6e01a46e61"
        "6d65a3737263a773657373696f6ec41001010101010101010101010101010101"
        "a76368616e6e656c00a86368616e6e656c7302a56e6f6e6365c4200202020202"
        "020202020202020202020202020202020202020202020202020202a461757468"
        "a370736bab6d61785f7061796c6f6164ce00100000a8636865636b73756dc3"
    ),
    Tag.AUTH: (
        "4c4d0f960200000029cfdcfca54b23d12a7281a570726f6f66c4200303030303"
        "030303030303030303030303030303030303030303030303030303"
    ),
    Tag.DEVICES: (
        "4c4d0f96030000003ecffd319ac30e886daa81a7646576696365739184a46e61"
        "6d65a473696d30a46b696e64a973696d756c61746564ae666f726d61745f7665"
        "7273696f6e01a8666561747572657307"
    ),
    Tag.DEVICES_ACCEPTED: "4c4d0f960400000001cf6b148c087250094180",
    Tag.SETUP: "4c4d0f96050100000ccf827fe4af9147c2dd6465766963652d6279746573",
    Tag.PRECOPY_DATA: "4c4d0f96060100000ccf827fe4af9147c2dd6465766963652d6279746573",
    Tag.STOPCOPY_DATA: "4c4d0f96070100000ccf827fe4af9147c2dd6465766963652d6279746573",
    Tag.DEVICE_CONFIG: "4c4d0f96080100000ccf827fe4af9147c2dd6465766963652d6279746573",
    Tag.INITIAL_DATA_SENT: "4c4d0f960901000001cf6b148c087250094180",
    Tag.SWITCHOVER_ACK: "4c4d0f960a00000001cf6b148c087250094180",
    Tag.END_OF_DEVICE: "4c4d0f960b01000001cf6b148c087250094180",
    Tag.END_OF_STREAM: "4c4d0f960c00000001cf6b148c087250094180",
    Tag.VERDICT: (
        "4c4d0f960d00000016cffc71fcdc37e1b5ce82a57374616765a66c6f61646564a6726561736f6ea0"
    ),
    Tag.CANCEL: (
        "4c4d0f960e0000001ccf85408ba3a04c4f0082a6726561736f6ea473746f70a4"
        "636f6465a963616e63656c6c6564"
    ),
    Tag.PING: ("4c4d0f960f00000010cf809bf5aa8e0aadf682a2696403a174cb3ff8000000000000"),
    Tag.PONG: ("4c4d0f961000000010cf280b281f6bfc0b1f82a2696403a174cb4004000000000000"),
    Tag.COMMIT: "4c4d0f961100000001cf6b148c087250094180",
    Tag.SYNC: "4c4d0f961200000001cf6b148c087250094180",
    Tag.SYNC_ACK: "4c4d0f961300000001cf6b148c087250094180",
}


def _frame(tag: Tag) -> bytes:
    payload = b"device-bytes" if tag in DATA_TAGS else encode_fields(FIELDS[tag.name])
    device = 1 if tag in DEVICE_TAGS else 0
    return b"".join(bytes(part) for part in encode_frame(tag, device, 0, [payload]))


def test_every_tag_has_a_golden_frame() -> None:
    """No frame kind is left unpinned."""
    assert set(GOLDEN) == set(Tag)


@pytest.mark.parametrize("tag", list(Tag), ids=lambda t: t.name)
def test_a_frame_encodes_to_its_golden_bytes(tag: Tag) -> None:
    """The encoder produces exactly the pinned bytes."""
    assert _frame(tag).hex() == GOLDEN[tag]


@pytest.mark.parametrize("tag", list(Tag), ids=lambda t: t.name)
def test_the_golden_bytes_decode_to_the_frame(tag: Tag) -> None:
    """The decoder reads the pinned bytes back into the same tag, device and payload."""
    decoder = FrameDecoder(handshake=tag in HANDSHAKE_TAGS - {Tag.CANCEL})
    decoder.device_count = 2
    decoder.feed(bytes.fromhex(GOLDEN[tag]))
    frame = decoder.next_frame()
    assert frame is not None
    assert (frame.tag, frame.device, frame.seq) == (tag, 1 if tag in DEVICE_TAGS else 0, 0)
    if tag in DATA_TAGS:
        assert bytes(frame.payload) == b"device-bytes"
    else:
        assert frame.fields() == FIELDS[tag.name]

"""The limits a session enforces on what its peer sends."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
#: The least max_payload a side may announce: a chunk goes in frames of at most the peer's
#: max_payload, and at this size a frame's header (at most 40 bytes) is under 1 % of it.
#: Below it each MiB of state could take a million frames (36 times its memory buffered).
MIN_MAX_PAYLOAD = 4 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on peer input; exceeding one raises LimitExceeded naming it.

    Together they bound the memory a peer can make a session allocate: at most
    ``receive_segments`` buffers of ``max(receive_segment_size, max_payload)`` bytes per
    channel, plus the copied payloads of the control frames waiting for ``recv()``:
    reading pauses once they hold ``receive_segment_size`` bytes (or count
    ``max_queued_frames`` frames), so a read's worth more may still come in.
    """

    #: Largest payload of a data frame (one device chunk), in bytes.
    max_payload: int = 16 * MiB
    #: Largest payload of a control frame (a msgpack map), in bytes.
    max_control_payload: int = 256 * 1024
    #: Largest control payload accepted before authentication completed.
    max_handshake_payload: int = 4096
    #: Most devices one DEVICES frame may announce.
    max_devices: int = 1024
    #: Longest device name or kind, in characters.
    max_name_length: int = 256
    #: Most parallel connections one session may use.
    max_channels: int = 16
    #: Most received frames waiting for ``recv()`` before reading pauses (their control
    #: payloads also pause it at ``receive_segment_size`` bytes).
    max_queued_frames: int = 1024
    #: Most connections a server holds without a session (in the TLS or livemig
    #: handshake, or waiting for the session's other channels); past it the oldest
    #: unauthenticated one is dropped.
    max_pending_handshakes: int = 64
    #: The same, per peer address (a session needs at most ``max_channels``).
    max_pending_per_peer: int = 16
    #: Seconds a connection (TLS included, from accept) or a session's set of channels
    #: has to finish the handshake.
    handshake_timeout: float = 5.0
    #: Size of one receive buffer; larger frames get a buffer of their own size.
    receive_segment_size: int = 4 * MiB
    #: Receive buffers per channel; reading pauses while all hold unread frames.
    receive_segments: int = 4

    def __post_init__(self) -> None:
        for name in ("max_payload", "max_control_payload", "max_handshake_payload"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_payload < MIN_MAX_PAYLOAD:
            raise ValueError(f"max_payload must be at least {MIN_MAX_PAYLOAD} (peers refuse less)")
        if self.max_channels < 1 or self.receive_segments < 2 or self.max_queued_frames < 1:
            raise ValueError("max_channels, max_queued_frames >= 1 and receive_segments >= 2")
        if self.max_pending_per_peer < 1 or self.max_pending_handshakes < 1:
            raise ValueError("max_pending_per_peer and max_pending_handshakes must be >= 1")
        if not self.handshake_timeout > 0:
            raise ValueError("handshake_timeout must be > 0")

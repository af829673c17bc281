"""A control frame still whole in our own write buffer can be withdrawn: the connection
is shut for writing at once, and not one byte of the frame reaches the peer. Under both
event loops, since the proof reads each transport's buffer accounting."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvloop
from transport_helpers import PSK, announce

from tests.conftest import Runner
from transport import (
    AuthConfig,
    ConnectionLost,
    Limits,
    Session,
    Tag,
    TransportError,
    connect,
    serve,
)
from transport.channel import Channel
from transport.limits import KiB, MiB

#: Bound of every wait.
DEADLINE_S = 10.0


def test_a_frame_behind_unread_data_is_withdrawn_and_never_arrives(run: Runner) -> None:
    """Behind data the peer does not read, a COMMIT written to the transport is still
    whole in our buffer: withdrawing it ends the session, and the peer, reading again,
    loses the connection inside the data the kernel had taken, never seeing the COMMIT."""

    async def body() -> None:
        got: list[Tag] = []
        errors: list[TransportError] = []
        reading, ended = asyncio.Event(), asyncio.Event()

        async def handler(session: Session) -> None:
            try:
                session.set_device_count(len((await session.recv()).fields()["devices"]))
                await reading.wait()
                while True:
                    got.append((await session.recv()).tag)
            except TransportError as exc:
                errors.append(exc)
            finally:
                ended.set()

        limits = Limits(receive_segment_size=256 * KiB, receive_segments=2)
        auth = AuthConfig(psk=PSK)
        async with await serve("127.0.0.1:0", handler, name="d", auth=auth, limits=limits) as srv:
            source = await connect(srv.address, name="s", auth=auth, limits=limits)
            await source.send_control(Tag.DEVICES, announce(1))
            source.set_device_count(1)
            sock: Any = source._chans[0].transport.get_extra_info("socket")  # type: ignore[union-attr]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
            chunk = (bytes(256 * KiB),)
            while source.backlog() <= MiB:  # the peer's buffers and the kernel's fill
                await source.send_chunk(Tag.PRECOPY_DATA, 0, chunk)
            mark = source.control_written()
            await source.send_control(Tag.COMMIT)
            assert source.withdraw_control(mark)
            assert source.error is not None
            reading.set()
            await asyncio.wait_for(ended.wait(), DEADLINE_S)
        assert Tag.COMMIT not in got
        assert isinstance(errors[0], ConnectionLost), errors  # the end, no CANCEL

    run(body())


def test_a_frame_the_kernel_took_is_not_withdrawn(run: Runner) -> None:
    """A frame written with nothing ahead of it goes to the kernel at once: it may reach
    the peer, so it is not withdrawn and the session goes on."""

    async def body() -> None:
        async def handler(session: Session) -> None:
            await session.recv()
            await session.recv()

        auth = AuthConfig(psk=PSK)
        async with await serve("127.0.0.1:0", handler, name="d", auth=auth) as srv:
            source = await connect(srv.address, name="s", auth=auth)
            mark = source.control_written()
            await source.send_control(Tag.DEVICES, announce(1))
            assert not source.withdraw_control(mark)
            assert source.error is None
            source.abort()

    run(body())


class _RecordLayer:
    """A transport whose buffer counts something else than our bytes (as TLS does)."""

    aborted = False

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 1 << 30

    def abort(self) -> None:
        self.aborted = True


async def test_a_transport_whose_buffer_is_not_known_exact_never_withdraws() -> None:
    """Only transports whose buffer accounting was read in their source are trusted: any
    other (TLS's record layer, say) answers that nothing is proven, and is left alone."""
    channel = Channel(Limits())
    layer = _RecordLayer()
    channel.transport = layer  # type: ignore[assignment]
    channel.submitted = 100
    assert not channel.withdraw_unsent(0)
    assert not layer.aborted


class _NewerUvloopStream:
    """A transport of uvloop's stream class, as a uvloop version not read would make it:
    its buffer may count differently, so its figures prove nothing."""

    aborted = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 1 << 30

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def abort(self) -> None:
        self.aborted = True


_NewerUvloopStream.__module__, _NewerUvloopStream.__qualname__ = "uvloop.loop", "TCPTransport"


async def test_a_transport_of_a_version_whose_source_was_not_read_never_withdraws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The accounting was read in one version of each transport's source: under another
    (uvloop 0.99 here) nothing is proven, the socket is not shut and the transport is left
    alone, so the outcome stays unknown rather than resting on a guess."""
    monkeypatch.setattr(uvloop, "__version__", "0.99.0")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = Channel(Limits())
        layer = _NewerUvloopStream(ours)
        channel.transport = layer  # type: ignore[assignment]
        channel.submitted = 100
        assert not channel.withdraw_unsent(0)
        assert not layer.aborted
        ours.send(b"x")  # still open for writing
        assert theirs.recv(1) == b"x"

"""The vfio-user client against a scripted server: negotiation, limits and broken replies."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from devices.errors import ChannelIOError, DeviceError
from devices.fsm import State
from devices.vfio_user import VfioUserDevice
from devices.vfio_user import protocol as p

Reply = Callable[[int, bytes], tuple[int, bytes] | None]


class ScriptedServer:
    """Answers VERSION and the migration queries; ``on`` overrides a command's reply."""

    def __init__(self, max_xfer: int | None) -> None:
        self.max_xfer = max_xfer
        self.on: dict[int, Reply] = {}
        self.requests: list[tuple[int, int]] = []  # (command, body size)
        self.state = State.RUNNING
        #: Added to the msg_id of every reply (a server out of step).
        self.skew = 0
        self.writers: list[asyncio.StreamWriter] = []

    def answer(self, command: int, body: bytes) -> tuple[int, bytes] | None:
        """(errno, reply body), or None to stay silent."""
        if command in self.on:
            return self.on[command](command, body)
        if command == p.VERSION:
            caps = {
                "capabilities": {}
                if self.max_xfer is None
                else {"max_data_xfer_size": self.max_xfer}
            }
            return 0, struct.pack("=HH", 0, 2) + json.dumps(caps).encode() + b"\0"
        if command == p.DEVICE_FEATURE:
            argsz, flags = p.FEATURE.unpack_from(body)
            if flags & p.FEATURE_SET:
                self.state = State(p.MIG_STATE.unpack_from(body, 8)[0])
                return 0, body
            value = 5 if flags & 0xFFFF == p.FEATURE_MIGRATION else int(self.state)
            return 0, p.FEATURE.pack(argsz, flags) + struct.pack("=Q", value)
        if command == p.MIG_DATA_READ:
            _, size = p.MIG_DATA.unpack(body)
            return 0, p.MIG_DATA.pack(8 + size, size) + bytes(size)
        return 0, body[:8]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests until the client leaves."""
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readexactly(p.HEADER.size)
                msg_id, command, size, _, _ = p.HEADER.unpack(head)
                body = await reader.readexactly(size - p.HEADER.size)
                self.requests.append((command, len(body)))
                answer = self.answer(command, body)
                if answer is None:
                    continue
                code, reply = answer
                flags = p.F_TYPE_REPLY | (p.F_ERROR if code else 0)
                reply_id = (msg_id + self.skew) & 0xFFFF
                writer.write(p.HEADER.pack(reply_id, command, 16 + len(reply), flags, code) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        """Hang up on every client."""
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


Start = Callable[..., Awaitable[VfioUserDevice]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """``await start(server, **options)``: serve ``server`` on a socket, a device on it."""
    running: list[asyncio.Server] = []
    scripts: list[ScriptedServer] = []
    made: list[VfioUserDevice] = []

    async def serve(server: ScriptedServer, **options: Any) -> VfioUserDevice:
        path = tmp_path / f"s{len(running)}.sock"
        running.append(await asyncio.start_unix_server(server.serve, path))
        scripts.append(server)
        device = VfioUserDevice("dev", socket=str(path), **options)
        made.append(device)
        return device

    yield serve
    for device in made:
        await device.close()
    for script in scripts:
        await script.close()
    for listener in running:
        listener.close()
        await listener.wait_closed()


async def test_the_servers_max_data_xfer_size_bounds_every_message(start: Start) -> None:
    """A server that takes 8 KiB gets reads asking 8 KiB and writes of at most 8 KiB."""
    server = ScriptedServer(max_xfer=8192)
    device = await start(server)
    await device.set_state(State.PRE_COPY)
    assert len((await device.save_channel().read() or ())[0]) == 8192
    await device.set_state(State.RUNNING)
    await device.set_state(State.RESUMING)
    await device.resume_channel().write(bytes(20000))
    writes = [size for command, size in server.requests if command == p.MIG_DATA_WRITE]
    assert writes == [8 + 8192, 8 + 8192, 8 + 20000 - 2 * 8192]
    assert max(size for command, size in server.requests if command == p.MIG_DATA_READ) == 8


async def test_writes_stay_within_one_socket_buffer(start: Start) -> None:
    """Without a server limit, a 100 KiB write goes out in messages under 24 KiB each."""
    server = ScriptedServer(max_xfer=None)
    device = await start(server)
    await device.set_state(State.RESUMING)
    await device.resume_channel().write(bytes(100 << 10))
    writes = [size for command, size in server.requests if command == p.MIG_DATA_WRITE]
    assert sum(size - 8 for size in writes) == 100 << 10
    assert max(writes) + p.HEADER.size <= p.SEND_LIMIT


async def test_an_error_reply_names_command_device_state_and_errno(start: Start) -> None:
    """An errno from the server becomes a ChannelIOError naming all four; the link lives on."""
    server = ScriptedServer(max_xfer=None)
    server.on[p.MIG_DATA_READ] = lambda command, body: (errno.EIO, b"")
    device = await start(server)
    await device.set_state(State.PRE_COPY)
    with pytest.raises(ChannelIOError, match=r"dev: MIG_DATA_READ failed in state PRE_COPY: EIO"):
        await device.save_channel().read()
    assert device.state == State.PRE_COPY
    await device.set_state(State.RUNNING)


async def test_a_reply_to_another_message_breaks_the_connection(start: Start) -> None:
    """A reply out of step means the stream is lost: the device is ERROR, a reset reconnects."""
    server = ScriptedServer(max_xfer=None)
    device = await start(server)
    await device.open()
    server.skew = 1
    with pytest.raises(DeviceError, match="connection lost"):
        await device.set_state(State.STOP)
    assert device.state == State.ERROR
    server.skew = 0
    await device.reset()
    assert device.state == State.RUNNING


async def test_a_silent_server_times_out(start: Start) -> None:
    """A server that never answers costs timeout_s, not forever."""
    server = ScriptedServer(max_xfer=None)
    device = await start(server, timeout_s=0.2)
    await device.open()
    server.on[p.DEVICE_FEATURE] = lambda command, body: None
    with pytest.raises(
        DeviceError, match=r"dev: RUNNING -> STOP failed: DEVICE_FEATURE\(SET\|MIG.*timed out"
    ):
        await device.set_state(State.STOP)
    assert device.state == State.ERROR


async def test_a_read_cancelled_midway_makes_the_stream_unusable(start: Start) -> None:
    """The reply of a cancelled read is lost with its data: later reads fail, not skip it."""
    server = ScriptedServer(max_xfer=None)
    device = await start(server, timeout_s=5)
    await device.set_state(State.PRE_COPY)
    asked = asyncio.Event()
    server.on[p.MIG_DATA_READ] = lambda command, body: asked.set()  # and no reply
    channel = device.save_channel()
    reader = asyncio.create_task(channel.read())
    await asked.wait()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    with pytest.raises(ChannelIOError, match="dev: a read was cancelled midway"):
        await channel.read()

"""A device's migration data fd, as the contract's save and resume channels."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from devices.base import (
    Buffer,
    Chunk,
    DriverSaveChannel,
    ResumeChannel,
)
from devices.errors import (
    ChannelIOError,
)
from devices.fsm import State
from devices.vfio.uapi import os_error

if TYPE_CHECKING:
    from devices.vfio.device import VfioDevice


#: Largest piece read from a saving data fd at once.
READ_SIZE = 1 << 20


class _FdChannel:
    """A data fd watched by the event loop; shared by both channel directions."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._end_wait: Callable[[], None] | None = None

    async def wait(
        self,
        watch: Callable[[int, Callable[[], None]], None],
        unwatch: Callable[[int], bool],
        at_least: float = 0.0,
    ) -> None:
        """Return once the loop reports the fd ready and ``at_least`` s passed, or it closes.

        ``watch``/``unwatch`` are the loop's add_reader/remove_reader (or the writer pair).
        A file the loop cannot watch (no poll handler in the driver) counts as ready.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        fd = self.fd
        watching = True
        timer: asyncio.TimerHandle | None = None

        def finish() -> None:
            if not waiter.done():
                waiter.set_result(None)

        def stop() -> None:
            nonlocal watching
            if watching:
                unwatch(fd)
                watching = False
            if timer is not None:
                timer.cancel()

        def ready() -> None:
            nonlocal timer
            stop()
            timer = loop.call_later(at_least, finish) if at_least else None
            if timer is None:
                finish()

        def end() -> None:
            stop()
            finish()

        try:
            watch(fd, ready)
        except PermissionError:
            # epoll refuses files without a poll handler (mtty's data fds); poll()
            # and select() call such a file always ready, and so do we.
            watching = False
            ready()
        self._end_wait = end
        try:
            await waiter
        finally:
            stop()
            self._end_wait = None

    def close_fd(self) -> None:
        """Close the fd (once); a pending wait returns and its caller sees the closed channel."""
        if self.fd < 0:
            return
        if self._end_wait is not None:
            self._end_wait()
        os.close(self.fd)
        self.fd = -1


class VfioSaveChannel(DriverSaveChannel):
    """The saving data fd: PRE_COPY, PRE_COPY_P2P and STOP_COPY share it."""

    #: After a "nothing now" read, how long wait_readable waits at least: drivers
    #: without a poll handler (mtty) report the fd readable all the time, and the
    #: caller would spin.
    idle_wait = 0.02
    #: The corrupt_stream fault flips the first byte (mtty checks its header's magic).
    spoil_at = 0

    def __init__(self, device: VfioDevice, fd: int) -> None:
        super().__init__(device)
        self.io = _FdChannel(fd)

    @property
    def fd(self) -> int:
        """The data fd (for VFIO_MIG_GET_PRECOPY_INFO)."""
        return self.io.fd

    async def read(self) -> Chunk | None:
        while True:
            self.check_open()
            state = self.device.state
            try:
                data = os.read(self.io.fd, READ_SIZE)
            except BlockingIOError:
                await self.wait_readable()
                continue
            except OSError as exc:
                if exc.errno == errno.ENOMSG and state != State.STOP_COPY:
                    return self.took(b"", state)
                raise os_error(
                    self.device.name, "read(data_fd)", state, exc, ChannelIOError
                ) from exc
            return self.took(data, state)

    async def wait_readable(self) -> None:
        self.check_open()
        loop = asyncio.get_running_loop()
        idle_wait = self.idle_wait if self.waits_idle() else 0.0
        await self.io.wait(loop.add_reader, loop.remove_reader, idle_wait)
        self.check_open()

    def replace_fd(self, fd: int) -> None:
        """Continue on a new fd of the same, fully read session (see VfioDevice.digest)."""
        self.io.close_fd()
        self.io = _FdChannel(fd)

    def close(self) -> None:
        self.io.close_fd()
        super().close()


class VfioResumeChannel(ResumeChannel):
    """The resuming data fd; failed writes are remembered by the device."""

    def __init__(self, device: VfioDevice, fd: int) -> None:
        super().__init__(device)
        self.vfio = device
        self.io = _FdChannel(fd)
        self.written = 0

    async def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        loop = asyncio.get_running_loop()
        while view:
            self.check_open()
            try:
                count = os.write(self.io.fd, view)
            except BlockingIOError:
                await self.io.wait(loop.add_writer, loop.remove_writer)
                continue
            except OSError as exc:
                self.vfio.write_failed(self.written, exc)
                raise os_error(
                    self.device.name,
                    f"write(data_fd) at stream offset {self.written}",
                    self.device.state,
                    exc,
                    ChannelIOError,
                ) from exc
            if count == 0:
                failure = OSError(errno.EIO, "write() returned 0")
                self.vfio.write_failed(self.written, failure)
                raise ChannelIOError(
                    self.device.name, f"write(data_fd) at {self.written} accepted no bytes"
                ) from failure
            self.written += count
            view = view[count:]

    def close(self) -> None:
        self.io.close_fd()
        super().close()

"""Start and stop vfio-user server processes for tests (built by tests.vfio_user.build).

:class:`Server` is one process serving one socket; :func:`start_testdev` and :func:`start_sample`
start livemig's test device or the library's sample. The test device's control
registers (BAR0, see testdev.c) are wrapped by :func:`control_read` and friends.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from devices.vfio_user import VfioUserDevice
from tests.vfio_user import build

PAGE = 4096
#: BAR0 registers of the test device.
REG_RATE = 0x00
REG_WRITES = 0x08
REG_SIZE = 0x10
REG_BAD_PAGES = 0x18
REG_TOUCH = 0x20
#: Region numbers: the test device's control registers and its state.
BAR0, BAR1 = 0, 1
_U64 = struct.Struct("<Q")


@dataclass
class Server:
    """A running server process and its socket."""

    socket: Path
    process: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Return once the socket listens; raise with the server's log if it exits first."""
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv} exited {self.process.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv} did not listen in {timeout} s: {self.output()}")
            time.sleep(0.005)

    def output(self) -> str:
        """The server's stderr so far (its last 2000 characters)."""
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.socket.unlink(missing_ok=True)


def _start(argv: list[str], socket: Path) -> Server:
    socket.unlink(missing_ok=True)
    log = socket.with_suffix(".log")
    with log.open("wb") as sink:
        process = subprocess.Popen([*argv, str(socket)], stdout=sink, stderr=sink)
    server = Server(socket, process, log, [*argv, str(socket)])
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def start_testdev(socket: Path, *, size: int = 1 << 20, rate: int = 0, seed: int = 0) -> Server:
    """livemig's test device: ``size`` bytes of state, ``rate`` pages rewritten per second."""
    binary = build.servers().testdev
    return _start([str(binary), "-s", str(size), "-r", str(rate), "-S", str(seed)], socket)


def start_sample(socket: Path) -> Server:
    """The library's samples/server (BAR0 a time_t, BAR1 16 KiB)."""
    return _start([str(build.servers().sample)], socket)


async def control_read(device: VfioUserDevice, register: int) -> int:
    """Read a test device register."""
    return int(_U64.unpack(await device.region_read(BAR0, register, 8))[0])


async def control_write(device: VfioUserDevice, register: int, value: int) -> None:
    """Write a test device register."""
    await device.region_write(BAR0, register, _U64.pack(value))

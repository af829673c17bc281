"""Shared pieces of the transport tests: a recording destination, descriptors, the key."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from devices.base import DeviceDescriptor
from devices.fsm import Feature
from transport import Frame, Session, Tag, TransportError

PSK = b"test pre-shared key"


def descriptors(count: int) -> list[DeviceDescriptor]:
    """``count`` distinct device descriptors."""
    return [DeviceDescriptor(f"dev{i}", "sim", 1, Feature.STOP_COPY) for i in range(count)]


@dataclass
class Recorder:
    """A destination handler that records what it receives until END_OF_STREAM."""

    frames: list[tuple[Tag, int, bytes]] = field(default_factory=list)
    error: TransportError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    on_frame: Callable[[Session, Frame], Awaitable[None]] | None = None

    async def __call__(self, session: Session) -> None:
        try:
            while True:
                frame = await session.recv()
                self.frames.append((frame.tag, frame.device, bytes(frame.payload)))
                if self.on_frame is not None:
                    await self.on_frame(session, frame)
                if frame.tag is Tag.END_OF_STREAM:
                    await session.send_control(Tag.VERDICT, {"resumed": True, "reason": ""})
                    return
        except TransportError as exc:
            self.error = exc
        finally:
            self.done.set()

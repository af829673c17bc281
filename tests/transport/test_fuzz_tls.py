"""Malformed frames and HELLOs through a TLS listener, after a valid TLS handshake.

With TLS the server accepts connections and runs TLS itself (transport/server.py), so
what follows a completed TLS handshake reaches the HELLO checks and the session over
the TLS transport, which the daemon fuzz (tests/orchestrator/test_hostile_fuzz.py,
plain TCP) never reaches. Each case completes TLS, authenticates in some, sends one of
that fuzz's malformed inputs, or bytes under the TLS layer (noise, a record that fails
its authentication, a record header that lies about its length, a bare alert), then
resets, closes TLS properly, or reads the server's answer until it hangs up. After all
of them the server must have ended every session it formed with a named transport
error, told every peer that read an answer why, raised nothing unhandled, freed every
slot, socket and task, and still serve a real source. LIVEMIG_FUZZ_TLS_CASES sets the
cases per event loop (default 100; asyncio and uvloop both run).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import socket
import ssl
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs
from test_transport_hostile_tls import open_sockets, settled, tls_peer
from transport_helpers import PSK, RawPeer, tls_auth

from tests.conftest import Runner
from tests.orchestrator.test_hostile_fuzz import hostile_bytes
from transport import Limits, Session, Tag, TransportError, connect, serve

CASES = int(os.environ.get("LIVEMIG_FUZZ_TLS_CASES", "100"))
WORKERS = 8
#: Short deadlines so the cases that leave a frame half sent end soon.
LIMITS = Limits(handshake_timeout=0.5)
LINK_S = 0.5


class Destination:
    """A handler that reads every frame until its session fails, answering
    END_OF_STREAM with a verdict; records how each session ended."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.completed = 0

    async def __call__(self, session: Session) -> None:
        try:
            while True:
                frame = await session.recv()
                if frame.tag is Tag.DEVICES:
                    session.set_device_count(len(frame.fields()["devices"]))
                elif frame.tag is Tag.END_OF_STREAM:
                    await session.send_control(Tag.VERDICT, {"stage": "resumed"})
                    self.completed += 1
                    return
        except Exception as exc:  # what escapes the transport must be one of its errors
            self.errors.append(exc)


def under_tls(rng: random.Random) -> bytes:
    """Bytes for the TCP stream under an established TLS session, of a kind at random."""
    kind = rng.randrange(4)
    if kind == 0:  # noise
        return rng.randbytes(rng.randrange(1, 512))
    if kind == 1:  # an application data record whose authentication fails
        body = rng.randbytes(rng.randrange(17, 300))
        return b"\x17\x03\x03" + len(body).to_bytes(2, "big") + body
    if kind == 2:  # a record header announcing more than a record may hold, then a little
        return b"\x17\x03\x03\xff\xff" + rng.randbytes(rng.randrange(0, 64))
    return b"\x15\x03\x03\x00\x02\x02\x28"  # a plaintext alert after the handshake


def raw_send(peer: RawPeer, data: bytes) -> None:
    """Write ``data`` into the TCP stream itself, under the peer's TLS layer."""
    fd = os.dup(peer.writer.get_extra_info("socket").fileno())
    with socket.socket(fileno=fd) as sock, contextlib.suppress(OSError):
        sock.send(data)


async def one_case(
    address: str, context: ssl.SSLContext, rng: random.Random, answers: list[tuple[Tag, str]]
) -> None:
    """TLS, maybe HELLO and AUTH, one malformed input (over TLS or under it), then one
    of three endings."""
    try:
        peer = await tls_peer(address, context)
    except (OSError, ssl.SSLError, TimeoutError):
        return  # evicted while the listener was full: that connection never existed
    try:
        seq = 0
        if rng.random() < 0.4:
            answer = await peer.handshake(PSK)
            if answer is None or answer.tag is not Tag.AUTH:
                return
            seq = peer.seq
        if rng.random() < 0.25:
            raw_send(peer, under_tls(rng))
        else:
            peer.writer.write(hostile_bytes(rng, seq))
            await peer.writer.drain()
        ending = rng.randrange(3)
        if ending == 0:
            return  # the finally aborts: a reset
        if ending == 1:
            peer.writer.close()  # close_notify, then FIN
            await peer.writer.wait_closed()
            return
        async with asyncio.timeout(10 * LINK_S):
            while (frame := await peer.read_frame()) is not None:
                if frame.tag is not Tag.PING:  # keep-alives say nothing
                    fields = frame.fields() if frame.tag is Tag.CANCEL else {}
                    answers.append((frame.tag, str(fields.get("reason", ""))))
    except (OSError, ssl.SSLError, TransportError, AssertionError):
        pass  # the server hung up first: the point is what it keeps
    finally:
        peer.writer.transport.abort()


def test_malformed_input_after_tls_is_refused_by_name_and_leaves_nothing(
    run: Runner, tmp_path: Path
) -> None:
    """After CASES malformed inputs behind valid TLS handshakes: each formed session ended
    with a named TransportError, each answer a peer read was a CANCEL with a reason,
    nothing unhandled, no slot, socket or task left, and a real TLS source gets through."""
    server_auth, client_auth = tls_auth(tmp_path)
    assert client_auth.ssl_context is not None
    context = client_auth.ssl_context
    unhandled: list[dict[str, Any]] = []

    async def body() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        destination = Destination()
        answers: list[tuple[Tag, str]] = []
        before = open_sockets()
        with capture_logs() as logs:
            server = await serve(
                "127.0.0.1:0", destination, name="dest", auth=server_auth, limits=LIMITS,
                link_timeout_s=LINK_S,
            )  # fmt: skip
            async with server:
                rng = random.Random(23)
                seeds = iter(range(CASES))

                async def worker() -> None:
                    for seed in seeds:
                        await one_case(
                            server.address, context, random.Random(rng.random() + seed), answers
                        )

                await asyncio.gather(*(worker() for _ in range(WORKERS)))
                await settled(lambda: server.pending == 0, "every slot freed")
                session = await connect(
                    server.address, name="source", auth=client_auth, link_timeout_s=LINK_S
                )
                await session.send_control(Tag.DEVICES, {"devices": ["dev0"]})
                session.set_device_count(1)
                await session.send_chunk(Tag.PRECOPY_DATA, 0, (b"state",))
                await session.send_control(Tag.END_OF_STREAM)
                assert (await session.recv()).tag is Tag.VERDICT
                await session.close()
        await settled(lambda: open_sockets() <= before, "every descriptor closed")
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert destination.completed == 1
        named = [e for e in destination.errors if isinstance(e, TransportError) and str(e)]
        assert named == destination.errors, [repr(e) for e in destination.errors]
        assert len(destination.errors) > CASES // 10, "sessions formed and were refused"
        wrong = [(tag, reason) for tag, reason in answers if tag is not Tag.CANCEL or not reason]
        assert not wrong, wrong
        assert answers, "some peers read why they were refused"
        failed = [e for e in logs if e["event"] in ("handler_failed", "accept_failed")]
        assert not failed, failed
        refused = [e["reasons"] for e in logs if e["event"] == "connections_refused"]
        assert refused, "the refusals were counted"
        gc.collect()  # an exception nobody retrieved is reported when its task goes

    run(body())
    assert not unhandled, unhandled

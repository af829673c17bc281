"""The destination's side: :func:`serve` accepts channels, groups them into sessions."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from transport.address import format_address, parse_address
from transport.auth import AuthConfig
from transport.channel import Channel
from transport.errors import (
    TransportError,
)
from transport.handshake import Hello, server_handshake
from transport.limits import Limits
from transport.session import CANCEL_LINGER_S, DEFAULT_LINK_TIMEOUT_S, Session

log = structlog.get_logger(__name__)

Handler = Callable[["Session"], Awaitable[None]]

#: After accept() failed for want of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM), the
#: pause before the next try: the failure repeats until something is freed, and the
#: pending connection keeps the listener readable, so retrying at once would spin.
ACCEPT_RETRY_S = 1.0


class _Group:
    """The channels of one session that passed the handshake so far."""

    def __init__(self, hello: Hello, timer: asyncio.TimerHandle) -> None:
        self.hello = hello
        self.timer = timer
        self.channels: dict[int, Channel] = {}


def _misfit(group: _Group, hello: Hello) -> str | None:
    """Why a channel's HELLO does not fit the session its id names, or None.

    The session is built from its first channel's HELLO and checks each channel's
    frames as that channel agreed, so every channel must have said the same.
    """
    if hello.channel in group.channels:
        return f"channel {hello.channel} joined already"
    for field in ("channels", "name", "max_payload", "checksum"):
        if getattr(hello, field) != getattr(group.hello, field):
            return f"{field} differs"
    return None


class _TlsHandshake:
    """A connection accepted but still in its TLS handshake: it holds an admission slot
    like a channel in the HELLO handshake, and can be evicted the same way."""

    admitted = False

    def __init__(self, sock: socket.socket, host: str, deadline: float) -> None:
        self.sock = sock
        self.peer_host = host
        #: When the handshake budget ends (loop time): TLS and HELLO share it.
        self.deadline = deadline
        self.task: asyncio.Task[None] | None = None

    def hang_up(self) -> None:
        """Drop the connection (the handshake task, if running, is cancelled too)."""
        self.sock.close()


class _RefusalLog:
    """Counts refused, evicted and failed connections; logs one summary per interval.

    A flood of hostile connections must not become a flood of log lines.
    """

    INTERVAL_S = 1.0

    def __init__(self, bound: Any) -> None:
        self._log = bound
        self._reasons: Counter[str] = Counter()
        self._peers: Counter[str] = Counter()
        self._example = ""
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: str, peer: str, example: str = "") -> None:
        """Count one connection that was turned away or failed its handshake."""
        self._reasons[reason] += 1
        self._peers[peer] += 1
        self._example = example or self._example
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last summary."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reasons:
            self._log.warning(
                "connections_refused",
                reasons=dict(self._reasons),
                peers=dict(self._peers.most_common(5)),
                example=self._example[:200],
            )
        self._reasons.clear()
        self._peers.clear()
        self._example = ""


class Server:
    """A listening socket that runs ``handler(session)`` once per incoming session.

    Admission: a connection is *pending* from accept (TLS handshake included) until its
    session has every channel. At most ``max_pending_per_peer`` are pending per peer
    address and ``max_pending_handshakes`` in all; past either, the oldest connection
    still in the handshake from that address (or from the address holding the most) is
    dropped to make room, so a peer that completes the handshake promptly gets in
    whatever a keyless peer keeps opening. A failing handler aborts its own session
    only; the server keeps listening. ``close()`` stops listening and cancels
    handshakes and running handlers; ``wait_closed()`` waits until they are gone.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        auth: AuthConfig,
        limits: Limits,
        link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
    ) -> None:
        self.address = ""
        self.link_timeout_s = link_timeout_s
        self._handler = handler
        self._name = name
        self._auth = auth
        self._limits = limits
        self._server: asyncio.AbstractServer | None = None
        self._groups: dict[bytes, _Group] = {}
        #: Connections without a session yet (in TLS, HELLO, or waiting for their
        #: session's other channels), oldest first.
        self._pending: dict[Channel | _TlsHandshake, None] = {}
        #: With TLS on TCP the server accepts itself, so a connection counts from accept.
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        #: Channels refused after authentication, lingering until their CANCEL is out.
        self._letting_go: set[Channel] = set()
        self._log = log.bind(server=name)
        self.refusals = _RefusalLog(self._log)

    @property
    def pending(self) -> int:
        """Connections in the handshake or waiting for the rest of their session."""
        return len(self._pending)

    def _protocol(self) -> Channel:
        return Channel(self._limits, on_made=self._accepted)

    async def _accept_tls(self, listener: socket.socket) -> None:
        """Accept TCP connections and take each through TLS, counted from the start."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except (ConnectionAbortedError, InterruptedError):
                continue  # that connection is gone; the next may be fine
            except OSError as exc:  # out of descriptors or memory: a listener must outlive it
                self._log.warning("accept_failed", error=str(exc), retry_s=ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            deadline = loop.time() + self._limits.handshake_timeout
            entry = _TlsHandshake(sock, str(peer[0]), deadline)
            if not self._admissible(entry.peer_host):
                sock.close()
                continue
            self._pending[entry] = None
            entry.task = loop.create_task(self._tls_up(entry))
            self._handshakes.add(entry.task)
            entry.task.add_done_callback(self._handshakes.discard)

    async def _tls_up(self, entry: _TlsHandshake) -> None:
        """The TLS handshake of one accepted connection; then its channel takes the slot."""

        def protocol() -> Channel:
            return Channel(self._limits, on_made=lambda channel: self._admit(channel, entry))

        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                protocol,
                entry.sock,
                ssl=self._auth.ssl_context,
                ssl_handshake_timeout=self._limits.handshake_timeout,
            )
        except (OSError, ConnectionError, TimeoutError) as exc:
            self.refusals.note("TLS handshake failed", entry.peer_host, str(exc))
            self._pending.pop(entry, None)
            entry.hang_up()
        except asyncio.CancelledError:  # close() or eviction: the connection goes too
            self._pending.pop(entry, None)
            entry.hang_up()
            raise

    def _admit(self, channel: Channel, entry: _TlsHandshake) -> None:
        """TLS is up: the channel takes its connection's slot and starts HELLO."""
        if self._pending.pop(entry, False) is False:
            channel.hang_up()  # evicted while the handshake finished
            return
        self._start(channel, entry.deadline)

    def _accepted(self, channel: Channel) -> None:
        assert channel.transport is not None
        if not self._admissible(channel.peer_host):
            channel.hang_up()
            return
        loop = asyncio.get_running_loop()
        self._start(channel, loop.time() + self._limits.handshake_timeout)

    def _admissible(self, host: str) -> bool:
        """Room for one more pending connection from ``host`` (evicting one if a limit is
        reached); when there is none, the refusal is counted."""
        if self._make_room(host):
            return True
        self.refusals.note("full of authenticated channels", host)
        return False

    def _start(self, channel: Channel, deadline: float) -> None:
        """Count the channel as pending and run its HELLO handshake until ``deadline``."""
        self._pending[channel] = None
        channel.on_lost = self._lost
        task = asyncio.get_running_loop().create_task(self._handshake(channel, deadline))
        channel.task = task
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _make_room(self, host: str) -> bool:
        """Evict one pending unauthenticated connection if a limit is reached."""
        limits = self._limits
        mine = [c for c in self._pending if c.peer_host == host]
        if len(mine) >= limits.max_pending_per_peer:
            candidates = mine
        elif len(self._pending) >= limits.max_pending_handshakes:
            counts = Counter(c.peer_host for c in self._pending if not c.admitted)
            if not counts:
                return False
            heaviest = max(counts.values())
            candidates = [c for c in self._pending if counts[c.peer_host] == heaviest]
        else:
            return True
        victim = next((c for c in candidates if not c.admitted), None)
        if victim is None:
            return False
        self._drop(victim)
        self.refusals.note("evicted: handshake pending while full", victim.peer_host)
        return True

    def _lost(self, channel: Channel) -> None:
        """A pending connection ended: free its slot, and its session's if it had one."""
        self._pending.pop(channel, None)
        for session_id, group in list(self._groups.items()):
            if channel in group.channels.values():
                group.timer.cancel()
                del self._groups[session_id]
                for member in group.channels.values():
                    self._drop(member)

    def _drop(self, channel: Channel | _TlsHandshake) -> None:
        """Hang up on a pending connection and forget it."""
        self._pending.pop(channel, None)
        channel.hang_up()
        if channel.task is not None:
            channel.task.cancel()

    async def _handshake(self, channel: Channel, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                hello = await server_handshake(
                    channel, name=self._name, auth=self._auth, limits=self._limits
                )
        except (TransportError, TimeoutError, OSError) as exc:
            kind = "handshake timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.refusals.note(f"handshake failed: {kind}", channel.peer_host, str(exc))
            self._drop(channel)
            return
        except asyncio.CancelledError:  # close() or eviction: the connection goes too
            self._drop(channel)
            raise
        channel.admitted = True
        channel.task = None
        self._join(channel, hello)

    def _join(self, channel: Channel, hello: Hello) -> None:
        group = self._groups.get(hello.session)
        if group is None:
            timer = asyncio.get_running_loop().call_later(
                self._limits.handshake_timeout, self._expire, hello.session
            )
            group = self._groups[hello.session] = _Group(hello, timer)
        elif (misfit := _misfit(group, hello)) is not None:
            self.refusals.note("inconsistent channel", channel.peer_host, hello.name)
            self._pending.pop(channel, None)
            self._let_go(channel, f"channel {hello.channel} does not fit the session: {misfit}")
            return
        group.channels[hello.channel] = channel
        if len(group.channels) < hello.channels:
            return
        group.timer.cancel()
        del self._groups[hello.session]
        for member in group.channels.values():
            self._pending.pop(member, None)
        session = Session(
            [group.channels[i] for i in range(hello.channels)],
            role="dest",
            peer_name=group.hello.name,
            peer_max_payload=group.hello.max_payload,
            limits=self._limits,
            session_id=hello.session,
            link_timeout_s=self.link_timeout_s,
        )
        task = asyncio.get_running_loop().create_task(self._run(session))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _expire(self, session: bytes) -> None:
        group = self._groups.pop(session, None)
        if group is not None:
            self._log.warning("session_incomplete", peer=group.hello.name)
            for channel in group.channels.values():
                self._pending.pop(channel, None)
                self._let_go(channel, "not all channels of the session arrived")

    def _let_go(self, channel: Channel, reason: str) -> None:
        """Refuse an authenticated channel: CANCEL, then drop it after a linger (a TLS
        close would wait up to 30 s for a close_notify from a peer that reads nothing)."""
        channel.cancel_and_linger(
            {"reason": reason, "code": "protocol"}, min(CANCEL_LINGER_S, self.link_timeout_s)
        )
        self._letting_go.add(channel)
        channel.closed.add_done_callback(lambda _: self._letting_go.discard(channel))

    async def _run(self, session: Session) -> None:
        """Run the handler, then close its session: a CANCEL still going out (see
        Session.abort) keeps its linger, and this task lasts until the connections are
        gone, so wait_closed() does not return while one is open."""
        try:
            try:
                await self._handler(session)
            except Exception as exc:  # a failing handler ends its session, not the server
                self._log.warning("handler_failed", error=str(exc), kind=type(exc).__name__)
                session.abort(str(exc) or type(exc).__name__, code="internal")
            await session.close()
        except asyncio.CancelledError:
            session.abort()
            await session.close(CANCEL_LINGER_S)
            raise

    def close(self) -> None:
        """Stop listening; cancel handshakes in progress and running handlers."""
        if self._server is not None:
            self._server.close()
        if self._acceptor is not None:
            self._acceptor.cancel()
        if self._listener is not None:
            self._listener.close()
        for task in (*self._handshakes, *self._handlers):
            task.cancel()
        for session in list(self._groups):
            self._expire(session)
        for channel in list(self._pending):
            self._drop(channel)
        self.refusals.flush()

    async def wait_closed(self) -> None:
        """Wait until the listener, every handler and every connection have finished."""
        if self._server is not None:
            await self._server.wait_closed()
        if self._acceptor is not None:
            await asyncio.gather(self._acceptor, return_exceptions=True)
        await asyncio.gather(*self._handshakes, *self._handlers, return_exceptions=True)
        if self._letting_go:  # each ends within its linger
            await asyncio.wait([channel.closed for channel in self._letting_go])

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(
    address: str,
    handler: Handler,
    *,
    name: str,
    auth: AuthConfig,
    limits: Limits | None = None,
    link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S,
) -> Server:
    """Listen on ``address`` (port 0 picks one: see ``Server.address``).

    With TLS on TCP the server accepts connections itself and runs each TLS handshake
    with ``loop.connect_accepted_socket``, so a connection holds an admission slot
    from accept: a peer that opens connections and never finishes TLS is evicted like
    one that never sends HELLO. (``loop.start_tls`` on an accepted transport would do
    the same, but server-side it stalls under uvloop 0.23.)
    That accept loop, like asyncio's own, outlives accept() failures: running out of
    descriptors is logged (``accept_failed``) and retried after ``ACCEPT_RETRY_S``.
    """
    limits = limits or Limits()
    if not link_timeout_s > 0:
        raise ValueError(f"link_timeout_s must be > 0, got {link_timeout_s!r}")
    server = Server(handler, name=name, auth=auth, limits=limits, link_timeout_s=link_timeout_s)
    kind, host, port = parse_address(address)
    loop = asyncio.get_running_loop()
    # The TLS handshake comes before HELLO (the channel sees the connection only once
    # it is done), so it gets the same budget rather than asyncio's 60 s default.
    tls_timeout = limits.handshake_timeout if auth.ssl_context else None
    if kind == "unix":
        server._server = await loop.create_unix_server(
            server._protocol, host, ssl=auth.ssl_context, ssl_handshake_timeout=tls_timeout
        )
        server.address = format_address("unix", host, 0)
    elif auth.ssl_context is not None:
        family, _, _, _, where = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        listener = socket.create_server(where[:2], family=family)
        listener.setblocking(False)
        server._listener = listener
        server._acceptor = loop.create_task(server._accept_tls(listener))
        bound = listener.getsockname()
        server.address = format_address("tcp", bound[0], bound[1])
    else:
        server._server = await loop.create_server(server._protocol, host, port)
        bound = server._server.sockets[0].getsockname()
        server.address = format_address("tcp", bound[0], bound[1])
    server._log.info("server_listening", address=server.address)
    return server

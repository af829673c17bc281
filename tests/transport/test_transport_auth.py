"""Authentication: PSK challenge-response both ways, replay, refusals, and TLS."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from transport_helpers import PSK, RawPeer, Recorder, hello_fields

from tests.pki import make_pki
from transport import (
    AuthConfig,
    AuthenticationError,
    ProtocolError,
    Server,
    Tag,
    client_tls_context,
    connect,
    serve,
    server_tls_context,
)
from transport.auth import proof


async def test_matching_keys_authenticate(server: Server) -> None:
    """Both sides holding the key get a session with each other's names."""
    session = await connect(server.address, name="source", auth=AuthConfig(psk=PSK), channels=2)
    assert (session.peer_name, session.channel_count) == ("dest", 2)
    await session.close()


@pytest.mark.parametrize("key", [b"wrong key", None], ids=["wrong-key", "no-key"])
async def test_source_without_the_key_is_refused(
    server: Server, recorder: Recorder, key: bytes | None
) -> None:
    """A source with a wrong key or none is refused and the handler never runs."""
    with pytest.raises(AuthenticationError, match="refused"):
        await connect(server.address, name="intruder", auth=AuthConfig(psk=key))
    session = await connect(server.address, name="source", auth=AuthConfig(psk=PSK))
    await session.close()
    await recorder.done.wait()
    assert recorder.frames == []


async def test_source_with_a_key_refuses_a_destination_without_one(recorder: Recorder) -> None:
    """A source holding a key will not talk to a destination that cannot prove it."""
    async with await serve("127.0.0.1:0", recorder, name="open", auth=AuthConfig()) as server:
        with pytest.raises(AuthenticationError, match="does not authenticate"):
            await connect(server.address, name="source", auth=AuthConfig(psk=PSK))


async def test_refused_peer_gets_nothing_but_the_refusal(server: Server) -> None:
    """A wrong proof is answered by CANCEL with code "auth", then the connection closes."""
    peer = await RawPeer.open(server.address)
    answer = await peer.handshake(b"not the key")
    assert answer is not None
    assert answer.tag is Tag.CANCEL
    assert answer.fields()["code"] == "auth"
    assert await peer.read_frame() is None
    await peer.close()


async def test_replayed_proof_is_refused(server: Server) -> None:
    """A proof recorded from a successful handshake fails against a fresh challenge."""
    session, nonce = b"s" * 16, b"n" * 32
    first = await RawPeer.open(server.address)
    await first.send(Tag.HELLO, hello_fields(session, nonce))
    hello = await first.read_frame()
    assert hello is not None
    recorded = proof(PSK, "source", session, 0, nonce, hello.fields()["nonce"])
    await first.send(Tag.AUTH, {"proof": recorded})
    accepted = await first.read_frame()
    assert accepted is not None
    assert accepted.tag is Tag.AUTH
    await first.close()

    replay = await RawPeer.open(server.address)
    await replay.send(Tag.HELLO, hello_fields(session, nonce))
    second = await replay.read_frame()
    assert second is not None
    assert second.fields()["nonce"] != hello.fields()["nonce"]
    await replay.send(Tag.AUTH, {"proof": recorded})
    refusal = await replay.read_frame()
    assert refusal is not None
    assert refusal.tag is Tag.CANCEL
    assert await replay.read_frame() is None
    await replay.close()


async def test_destination_with_a_bad_proof_is_refused() -> None:
    """A destination that answers with a proof not made with the key is refused."""
    seen: asyncio.Queue[Tag] = asyncio.Queue()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = RawPeer(reader, writer)
        await peer.read_frame()
        await peer.send(Tag.HELLO, {"version": 1, "nonce": b"x" * 32, "auth": "psk"})
        await peer.read_frame()
        await peer.send(Tag.AUTH, {"proof": b"y" * 32, "name": "fake", "max_payload": 1024})
        refusal = await peer.read_frame()
        await seen.put(refusal.tag if refusal else Tag.HELLO)
        await peer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    with pytest.raises(AuthenticationError, match="failed to prove"):
        await connect(f"{host}:{port}", name="source", auth=AuthConfig(psk=PSK))
    assert await seen.get() is Tag.CANCEL
    server.close()
    await server.wait_closed()


# -- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA with a server and a client certificate, plus a foreign CA."""
    return make_pki(tmp_path_factory.mktemp("pki"), ("server", "client"))


def _server_auth(pki: Path, *, mutual: bool) -> AuthConfig:
    context = server_tls_context(
        pki / "server.crt", pki / "server.key", client_ca_file=pki / "ca.crt" if mutual else None
    )
    return AuthConfig(psk=PSK, ssl_context=context)


async def test_mutual_tls_session_carries_data(pki: Path, recorder: Recorder) -> None:
    """With mutual TLS and the key a session streams data and gets its verdict."""
    auth = _server_auth(pki, mutual=True)
    async with await serve("localhost:0", recorder, name="dest", auth=auth) as server:
        port = server.address.rsplit(":", 1)[1]
        context = client_tls_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        session = await connect(
            f"localhost:{port}", name="source", auth=AuthConfig(psk=PSK, ssl_context=context)
        )
        await session.send_control(
            Tag.DEVICES,
            {"devices": [{"name": "d", "kind": "k", "format_version": 1, "features": 1}]},
        )
        await session.send_chunk(Tag.PRECOPY_DATA, 0, (b"secret" * 1000,))
        await session.send_control(Tag.END_OF_STREAM)
        assert (await session.recv()).tag is Tag.VERDICT
        await session.close()
    assert recorder.frames[1] == (Tag.PRECOPY_DATA, 0, b"secret" * 1000)


async def test_tls_client_refuses_an_untrusted_server(pki: Path, recorder: Recorder) -> None:
    """A source trusting another CA refuses the destination's certificate."""
    async with await serve(
        "localhost:0", recorder, name="dest", auth=_server_auth(pki, mutual=False)
    ) as server:
        port = server.address.rsplit(":", 1)[1]
        context = client_tls_context(pki / "other-ca.crt")
        with pytest.raises(AuthenticationError, match="TLS"):
            await connect(
                f"localhost:{port}", name="source", auth=AuthConfig(psk=PSK, ssl_context=context)
            )


async def test_mutual_tls_refuses_a_client_without_certificate(
    pki: Path, recorder: Recorder
) -> None:
    """A destination requiring client certificates refuses a source without one."""
    async with await serve(
        "localhost:0", recorder, name="dest", auth=_server_auth(pki, mutual=True)
    ) as server:
        port = server.address.rsplit(":", 1)[1]
        context = client_tls_context(pki / "ca.crt")
        with pytest.raises(AuthenticationError, match="TLS"):
            await connect(
                f"localhost:{port}", name="source", auth=AuthConfig(psk=PSK, ssl_context=context)
            )
    assert recorder.frames == []


def test_tls_helpers_build_verifying_contexts(pki: Path) -> None:
    """The helpers verify peers: hostname on the client, certificates with mutual TLS."""
    client = client_tls_context(pki / "ca.crt")
    assert client.check_hostname
    assert client.verify_mode is ssl.CERT_REQUIRED
    server = server_tls_context(
        pki / "server.crt", pki / "server.key", client_ca_file=pki / "ca.crt"
    )
    assert server.verify_mode is ssl.CERT_REQUIRED


async def test_a_source_sent_to_an_http_port_is_told_so() -> None:
    """Connecting to a port that answers HTTP (the daemon's metrics port given by
    mistake) fails at once, saying an HTTP server answered."""

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProtocolError, match="HTTP answer"):
            await connect(f"127.0.0.1:{port}", name="source", auth=AuthConfig(), timeout=5)
    finally:
        server.close()
        await server.wait_closed()

"""Peer authentication: pre-shared-key proofs (pure) and TLS context helpers.

The handshake itself is described in :mod:`transport.frames`; this module computes
and checks the proofs. A proof is an HMAC-SHA256 under the key over a label naming
the side, the session id, the channel index and both nonces, so it is bound to one
connection: a recorded proof fails against a fresh nonce, and a source proof can never
pass as a destination proof.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

NONCE_SIZE = 32
SESSION_ID_SIZE = 16
_LABELS = {"source": b"livemig/1 source", "dest": b"livemig/1 dest"}

StrPath = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How a session authenticates its peer: a pre-shared key, TLS, both or neither.

    ``psk`` enables the HMAC challenge-response (both sides need the same key; a side
    with a key refuses a peer without it). ``ssl_context`` wraps every connection in
    TLS; build one with :func:`client_tls_context` / :func:`server_tls_context`.
    ``server_hostname`` overrides the name a client checks the server certificate
    against (default: the host of the address). ``checksums`` says whether this side
    requires the per-chunk checksum: None (the default) requires it outside TLS only,
    where nothing else covers the payload; False is for a link trusted otherwise.
    """

    psk: bytes | None = None
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    checksums: bool | None = None

    @property
    def requires_checksums(self) -> bool:
        """Whether this side asks for per-chunk checksums (see the HELLO ``checksum`` field)."""
        return self.ssl_context is None if self.checksums is None else self.checksums

    @property
    def method(self) -> str:
        """The auth method announced in HELLO."""
        return "psk" if self.psk is not None else "none"


def new_nonce() -> bytes:
    """A fresh random challenge."""
    return os.urandom(NONCE_SIZE)


def proof(
    psk: bytes, side: str, session: bytes, channel: int, source_nonce: bytes, dest_nonce: bytes
) -> bytes:
    """The proof ``side`` ("source" or "dest") gives that it holds ``psk``."""
    message = b"".join(
        (_LABELS[side], session, struct.pack("!I", channel), source_nonce, dest_nonce)
    )
    return hmac.new(psk, message, hashlib.sha256).digest()


def check_proof(
    candidate: object,
    psk: bytes,
    side: str,
    session: bytes,
    channel: int,
    source_nonce: bytes,
    dest_nonce: bytes,
) -> bool:
    """Whether ``candidate`` is the right proof, compared in constant time."""
    if not isinstance(candidate, bytes):
        return False
    expected = proof(psk, side, session, channel, source_nonce, dest_nonce)
    return hmac.compare_digest(candidate, expected)


def client_tls_context(
    ca_file: StrPath,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A source-side TLS context trusting ``ca_file``; a cert/key pair for mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=Path(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if cert_file is not None:
        context.load_cert_chain(Path(cert_file), None if key_file is None else Path(key_file))
    return context


def server_tls_context(
    cert_file: StrPath, key_file: StrPath | None = None, *, client_ca_file: StrPath | None = None
) -> ssl.SSLContext:
    """A destination-side TLS context; with ``client_ca_file`` clients need a certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(Path(cert_file), None if key_file is None else Path(key_file))
    if client_ca_file is not None:
        context.load_verify_locations(cafile=Path(client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context

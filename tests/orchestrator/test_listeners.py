"""The daemon's listeners: one stale-socket probe for the control and migration sockets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orchestrator.service.control import remove_stale_socket
from orchestrator.service.listeners import listens_on


def test_a_regular_file_at_a_socket_path_is_left_alone(tmp_path: Path) -> None:
    """A file that is not a socket is refused, not unlinked (it may be the user's data)."""
    path = tmp_path / "migrate.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        remove_stale_socket(path, "migration socket")
    assert path.read_text() == "precious"


def test_a_socket_nobody_listens_on_is_removed_and_a_live_one_is_refused(tmp_path: Path) -> None:
    """A leftover socket goes; one a process still listens on raises naming the path."""
    path = tmp_path / "migrate.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(OSError, match=r"migration socket .* is in use"):
            remove_stale_socket(path, "migration socket")
    remove_stale_socket(path, "migration socket")
    assert not path.exists()


@pytest.mark.parametrize(
    ("address", "bound", "reaches"),
    [
        ("127.0.0.1:7070", ["127.0.0.1:7070"], True),
        ("localhost:7070", ["127.0.0.1:7070"], True),
        ("127.0.0.1:7071", ["127.0.0.1:7070"], False),
        ("127.0.0.1:7070", ["0.0.0.0:7070"], True),
        ("0.0.0.0:7070", ["127.0.0.1:7070"], True),
        ("192.0.2.1:7070", ["0.0.0.0:7070"], False),
        ("unix:/run/a.sock", ["unix:/run/a.sock"], True),
        ("unix:/run/b.sock", ["unix:/run/a.sock"], False),
        ("not an address", ["127.0.0.1:7070"], False),
    ],
)
def test_listens_on_tells_whether_an_address_reaches_a_listener(
    address: str, bound: list[str], reaches: bool
) -> None:
    """One matcher for 'migrate to oneself' and migrate-incoming's uri: ports, loopback
    names, wildcards both ways, unix paths compared whole."""
    assert listens_on(address, bound) is reaches

"""The daemon's listeners: one stale-socket probe for the control and migration sockets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orchestrator.service.control import remove_stale_socket


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

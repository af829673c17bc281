"""A destination address with port 0 is refused where it is typed, naming the port.

Port 0 asks a listener for any free port; no daemon can be reached there, so a
destination (``migrate --to``, ``--control tcp:``, :func:`transport.connect`) on it is a
typing error to name at once, not a connection to retry until ``connect_timeout_s``.
"""

from __future__ import annotations

import asyncio

import pytest

import transport
from orchestrator.cli import commands as cli
from orchestrator.cli import exits
from orchestrator.service.config import parse


@pytest.mark.parametrize(
    "argv",
    [
        ["migrate", "--to", "10.0.0.2:0", "--control", "/nonexistent.sock"],
        ["migrate", "--to", "tcp:[::1]:0", "--control", "/nonexistent.sock"],
        ["devices", "--control", "tcp:10.0.0.2:0", "--ca", "x", "--cert", "y"],
    ],
)
def test_port_zero_on_the_command_line_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A destination on port 0 exits 2 naming the port, before any daemon is asked."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == exits.EXIT_USAGE
    assert "port 0 is no destination's port" in capsys.readouterr().err


async def test_connecting_to_port_zero_is_refused_at_once() -> None:
    """:func:`transport.connect` to port 0 raises ValueError naming the port on its first
    call, instead of retrying until its timeout."""
    with pytest.raises(ValueError, match="port 0 is no destination's port"):
        await asyncio.wait_for(
            transport.connect("127.0.0.1:0", name="a", auth=transport.AuthConfig(), timeout=0.5),
            5.0,
        )


def test_port_zero_still_listens() -> None:
    """A listen address keeps port 0 (any free port), as tests and examples use it."""
    config = parse('control_socket = "c.sock"\nlisten = ["127.0.0.1:0"]\n', file="/tmp/d.toml")
    assert list(config.listen) == ["127.0.0.1:0"]

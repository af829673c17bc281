"""A second look at migration addresses: hosts that no resolver can take are refused at
parse time, naming the host, rather than failing later at connect or bind."""

from __future__ import annotations

import re

import pytest

from transport.address import parse_address


@pytest.mark.parametrize(
    "address",
    [" h:7070", "h :7070", "tcp:ho st:7070", "h\n:7070", "h\t:7070", "[[::1]]:7070", "[::1 ]:7070"],
)
def test_a_host_with_a_space_a_control_character_or_a_bracket_is_refused(address: str) -> None:
    """A typo's space, a pasted newline or doubled brackets in the host is refused naming
    the host (a newline would otherwise reach the logs verbatim)."""
    with pytest.raises(ValueError, match=r"host .* (space|control character|bracket)"):
        parse_address(address)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("[fe80::1%eth0]:7070", ("tcp", "fe80::1%eth0", 7070)),
        ("host.example.:7070", ("tcp", "host.example.", 7070)),
        ("h:007070", ("tcp", "h", 7070)),
        ("tcp:[::ffff:10.0.0.1]:1", ("tcp", "::ffff:10.0.0.1", 1)),
    ],
)
def test_scope_ids_trailing_dots_and_leading_zeros_are_accepted(
    address: str, parsed: tuple[str, str, int]
) -> None:
    """An IPv6 scope id, a fully qualified name's trailing dot and a port's leading zeros
    are valid and kept as typed (the port read as decimal)."""
    assert parse_address(address) == parsed


@pytest.mark.parametrize("port", ["+80", "-1", " 80", "80 ", "8_0", "0x50"])
def test_a_port_with_a_sign_space_or_separator_is_refused_naming_it(port: str) -> None:
    """``int()`` would take ``+80``, `` 80`` and ``8_0``; the parser names them instead."""
    with pytest.raises(ValueError, match=re.escape(f"port {port!r} is not a number")):
        parse_address(f"h:{port}")

"""The control protocol's pure core: decoding requests, checking arguments, encoding."""

from __future__ import annotations

import json

import pytest

from orchestrator.service.protocol import Arg, Command, ControlError, decode_request, encode, event


async def _nothing() -> None:
    """A handler that is never called here."""


@pytest.mark.parametrize(
    ("line", "desc"),
    [
        (b"{", "not JSON"),
        (b"\xff", "not UTF-8"),
        (b"42", "must be a JSON object, got int"),
        (b'{"arguments": {}}', "lacks 'execute'"),
        (b'{"execute": "x", "arguments": []}', "'arguments' must be a JSON object"),
        (b'{"execute": "x", "exec": 1}', "unknown member(s): exec"),
    ],
)
def test_malformed_requests_are_named(line: bytes, desc: str) -> None:
    """Each way a request can be malformed gets an InvalidRequest that says which."""
    with pytest.raises(ControlError) as caught:
        decode_request(line)
    assert caught.value.error_class == "InvalidRequest"
    assert desc in caught.value.desc


def test_a_request_keeps_its_id() -> None:
    """The id comes back as given, whatever JSON it is."""
    request = decode_request(b'{"execute": "query-devices", "id": {"n": 1}}')
    assert (request.execute, request.arguments, request.id) == ("query-devices", {}, {"n": 1})


def test_arguments_are_checked_by_name_and_type() -> None:
    """Unknown, missing and mistyped arguments are refused naming the argument."""
    command = Command("c", _nothing, {"a": Arg(str, required=True), "n": Arg(int)})
    assert command.check({"a": "x", "n": 3}) == {"a": "x", "n": 3}
    for arguments, desc in [
        ({"a": "x", "z": 1}, "unknown argument(s) z"),
        ({}, "missing argument 'a'"),
        ({"a": "x", "n": True}, "argument 'n' must be an integer, got true"),
    ]:
        with pytest.raises(ControlError, match="c: ") as caught:
            command.check(arguments)
        assert caught.value.error_class == "InvalidParameter"
        assert desc in caught.value.desc


def test_non_finite_numbers_become_null() -> None:
    """An estimate with no bandwidth yet (infinity) is sent as null, keeping JSON strict."""
    line = encode({"return": {"expected_downtime_ms": float("inf"), "x": [float("nan"), 1.5]}})
    assert json.loads(line) == {"return": {"expected_downtime_ms": None, "x": [None, 1.5]}}


def test_events_carry_a_qmp_timestamp() -> None:
    """Events are stamped in seconds and microseconds like QMP's."""
    message = event("MIGRATION", {"status": "active"}, now=12.25)
    assert message["timestamp"] == {"seconds": 12, "microseconds": 250000}


async def test_a_reply_larger_than_a_request_line_reaches_the_client(tmp_path) -> None:
    """A big answer (stats with a long history) is read whole, not taken for a lost daemon."""
    from orchestrator.service.client import ControlClient
    from orchestrator.service.control import ControlServer
    from orchestrator.service.protocol import MAX_REQUEST

    big = "x" * (2 * MAX_REQUEST)

    async def history() -> str:
        return big

    server = ControlServer(
        tmp_path / "ctl.sock", {"big": Command("big", history, {})}, greeting={"name": "t"}
    )
    await server.start()
    try:
        client = await ControlClient.connect(tmp_path / "ctl.sock")
        assert await client.execute("big") == big
        await client.close()
    finally:
        await server.stop()


async def test_the_server_says_whether_any_client_wants_an_event(tmp_path) -> None:
    """An event that no negotiated client wants need not be made (the daemon skips its
    DEVICE_STATE reports then); one client that did not narrow its events is enough."""
    from orchestrator.service.client import ControlClient
    from orchestrator.service.control import ControlServer

    server: ControlServer

    async def subscribe(events: list[str]) -> dict[str, str]:
        server.subscribe(server.current, frozenset(events))
        return {}

    server = ControlServer(
        tmp_path / "ctl.sock",
        {"subscribe": Command("subscribe", subscribe, {"events": Arg(list, required=True)})},
        greeting={"name": "t"},
    )
    await server.start()
    try:
        assert not server.wants("DEVICE_STATE")  # nobody connected
        client = await ControlClient.connect(tmp_path / "ctl.sock")
        assert server.wants("DEVICE_STATE")  # a negotiated client gets every event
        await client.execute("subscribe", events=["MIGRATION"])
        assert not server.wants("DEVICE_STATE")
        await client.execute("subscribe", events=["MIGRATION", "DEVICE_STATE"])
        assert server.wants("DEVICE_STATE")
        await client.close()
    finally:
        await server.stop()

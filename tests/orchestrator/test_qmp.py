"""QMP compatibility of the control protocol: framing, negotiation, QEMU's names and units."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.engine.errors import MigrationBlocked
from orchestrator.engine.params import (
    MigrationParams,
    from_qemu_parameters,
    to_qemu_parameters,
)
from orchestrator.service.control import ControlServer, greeting
from orchestrator.service.protocol import (
    MAX_DEPTH,
    Arg,
    Command,
    ControlError,
    Request,
    RequestParser,
    from_qemu,
)

# -- the streaming parser --------------------------------------------------------------------

_TEXT = st.text(alphabet=st.sampled_from('ab{}[]"\\ \n\u00e9:,'), max_size=12)
_REQUESTS = st.lists(
    st.builds(
        lambda name, args, rid: {"execute": name, "arguments": args, "id": rid},
        _TEXT,
        st.dictionaries(_TEXT, st.one_of(_TEXT, st.integers(), st.lists(_TEXT, max_size=3))),
        st.one_of(st.integers(), _TEXT),
    ),
    min_size=1,
    max_size=5,
)


def _requests(items: list[Request | ControlError]) -> list[dict[str, Any]]:
    assert all(isinstance(item, Request) for item in items), items
    return [
        {"execute": r.execute, "arguments": r.arguments, "id": r.id}
        for r in items
        if isinstance(r, Request)
    ]


@given(messages=_REQUESTS, cuts=st.lists(st.integers(min_value=0), max_size=8), sep=st.booleans())
def test_requests_are_framed_by_brackets_whatever_the_splits(
    messages: list[dict[str, Any]], cuts: list[int], sep: bool
) -> None:
    """Requests written back to back, with or without newlines, cut anywhere, come out whole."""
    data = ("\n" if sep else "").join(json.dumps(m) for m in messages).encode()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    parser = RequestParser()
    out: list[Request | ControlError] = []
    for start, end in itertools.pairwise(points):
        out += parser.feed(data[start:end])
    assert _requests(out) == messages


def test_bare_tokens_get_errors_and_the_stream_goes_on() -> None:
    """A top-level non-object is answered as such; the request after it is still read."""
    parser = RequestParser()
    items = parser.feed(b'hello 42\n[1]"s"\xff\xfe {"execute":"x"}')
    descs = [item.desc for item in items if isinstance(item, ControlError)]
    assert len(descs) == 5
    assert "not JSON" in descs[0]
    assert "must be a JSON object, got int" in descs[1]
    assert "got list" in descs[2]
    assert "got str" in descs[3]
    assert "not UTF-8" in descs[4]
    assert isinstance(items[-1], Request)
    assert items[-1].execute == "x"
    assert not parser.failed


def test_a_token_at_end_of_input_is_answered() -> None:
    """A bare token the client ends with EOF instead of white space still gets its error."""
    parser = RequestParser()
    assert parser.feed(b"42") == []
    (item,) = parser.close()
    assert isinstance(item, ControlError)
    assert "got int" in item.desc


def test_deep_nesting_is_an_invalid_request_not_a_recursion_error() -> None:
    """``[`` x 100 000 is refused at the depth limit, before any JSON parsing recurses."""
    parser = RequestParser()
    (item,) = parser.feed(b"[" * 100_000)
    assert isinstance(item, ControlError)
    assert item.error_class == "InvalidRequest"
    assert f"nested deeper than {MAX_DEPTH}" in item.desc
    assert parser.failed
    assert parser.feed(b'{"execute": "x"}') == []


def test_nesting_up_to_the_limit_is_accepted() -> None:
    """A request exactly MAX_DEPTH deep is parsed."""
    inner = "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2)
    (item,) = RequestParser().feed(f'{{"execute": "x", "arguments": {{"a": {inner}}}}}'.encode())
    assert isinstance(item, Request)


@pytest.mark.parametrize("chunk", [1 << 10, 1 << 16, 3 << 20])
def test_an_oversized_request_fails_the_framing(chunk: int) -> None:
    """Past the size limit, in whatever pieces it comes, the request is refused and framing lost."""
    parser = RequestParser(max_size=1 << 20)
    data = b'{"execute": "x", "arguments": {"a": "' + b"y" * (2 << 20) + b'"}}'
    items: list[Request | ControlError] = []
    for start in range(0, len(data), chunk):
        items += parser.feed(data[start : start + chunk])
        if parser.failed:
            break
    (item,) = items
    assert isinstance(item, ControlError)
    assert "longer than 1048576 bytes" in item.desc


def test_braces_and_quotes_inside_strings_do_not_frame() -> None:
    """Brackets, escaped quotes and backslashes inside strings are content, not structure."""
    message = {"execute": 'a}"]\\', "arguments": {"k": '{[\\"', "l": ["}"]}}
    data = json.dumps(message).encode()
    parser = RequestParser()
    items = [item for byte in data for item in parser.feed(bytes([byte]))]
    assert _requests(items) == [message | {"id": None}]


# -- arguments: non-finite numbers -------------------------------------------------------------


async def _nothing(**_: Any) -> None:
    """A handler that is never called here."""


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_numbers_are_invalid_parameters(literal: str) -> None:
    """Infinity and NaN anywhere in the arguments are refused, naming where."""
    text = '{"execute": "migrate", "arguments": {"parameters": {"timeout_s": VALUE}}}'
    text = text.replace("VALUE", literal)
    (request,) = RequestParser().feed(text.encode())
    assert isinstance(request, Request)
    command = Command("migrate", _nothing, {"parameters": Arg(dict)})
    with pytest.raises(ControlError) as caught:
        command.check(request.arguments)
    assert caught.value.error_class == "InvalidParameter"
    assert f"parameters.timeout_s must be a finite number, got {literal}" in caught.value.desc


_FLOATS = [f.name for f in dataclasses.fields(MigrationParams) if "float" in str(f.type)]


@pytest.mark.parametrize("name", _FLOATS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_every_float_parameter_refuses_non_finite_values(name: str, value: float) -> None:
    """MigrationParams itself (config files, the API) refuses an infinite or NaN number."""
    with pytest.raises(MigrationBlocked, match=f"parameter {name} must be finite"):
        MigrationParams().updated({name: value})


# -- QEMU's names ---------------------------------------------------------------------------


def test_qemu_command_names_and_arguments_map_onto_livemig() -> None:
    """``migrate uri``, ``migrate_cancel``, flat parameters and ``state`` are translated."""
    assert from_qemu(Request("migrate", {"uri": "tcp:h:1"}, 1)) == Request(
        "migrate", {"destination": "tcp:h:1"}, 1
    )
    assert from_qemu(Request("migrate_cancel", {})).execute == "migrate-cancel"
    assert from_qemu(
        Request("migrate-set-parameters", {"downtime-limit": 50, "max-bandwidth": 10**6})
    ).arguments == {"parameters": {"downtime_limit_ms": 50.0, "max_bandwidth": 1e6}}
    assert from_qemu(Request("migrate-continue", {"state": "pre-switchover"})).arguments == {}


@pytest.mark.parametrize(
    ("request_", "desc"),
    [
        (Request("migrate", {"uri": "tcp:h:1", "destination": "h:1"}), "not both"),
        (Request("migrate-set-parameters", {"compress-level": 1}), "'compress-level'"),
        (Request("migrate-set-parameters", {"downtime-limit": "x"}), "must be a number"),
        (Request("migrate-set-parameters", {"multifd-channels": 1.5}), "must be an integer"),
        (Request("migrate-continue", {"state": "active"}), "'pre-switchover'"),
    ],
)
def test_qemu_arguments_without_a_meaning_here_are_refused(request_: Request, desc: str) -> None:
    """A QEMU argument livemig cannot honour is an InvalidParameter naming it."""
    with pytest.raises(ControlError) as caught:
        from_qemu(request_)
    assert caught.value.error_class == "InvalidParameter"
    assert desc in caught.value.desc


def test_qemu_parameter_units_round_trip() -> None:
    """ms, bytes/s and percentages convert both ways; 0 bandwidth is "unset" as in QEMU."""
    params = MigrationParams().updated(
        from_qemu_parameters(
            {"downtime-limit": 250, "max-bandwidth": 0, "cpu-throttle-initial": 30}
        )
    )
    assert params.downtime_limit_ms == 250
    assert params.max_bandwidth is None
    assert params.throttle_initial == pytest.approx(0.3)
    qemu = to_qemu_parameters(params)
    assert qemu["downtime-limit"] == 250
    assert qemu["max-bandwidth"] == 0
    assert qemu["cpu-throttle-initial"] == 30
    assert qemu["multifd-channels"] == params.channels


# -- the server: negotiation and events --------------------------------------------------------


class Wire:
    """A raw client of a ControlServer: writes bytes, reads newline-ended messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), 10)
        assert line, "the server hung up"
        message: dict[str, Any] = json.loads(line)
        return message


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, Wire]]:
    """A ControlServer with an ``echo`` command, and a raw client that read the greeting."""

    async def echo(value: Any = None) -> Any:
        return value

    server = ControlServer(
        tmp_path / "c.sock",
        {"echo": Command("echo", echo, {"value": Arg((str, int, list, dict))})},
        greeting=greeting("t"),
    )
    await server.start()
    reader, writer = await asyncio.open_unix_connection(tmp_path / "c.sock")
    wire = Wire(reader, writer)
    hello = await wire.read()
    assert hello["QMP"]["capabilities"] == []
    assert set(hello["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    yield server, wire
    writer.close()
    await server.stop()


async def test_commands_wait_for_capabilities_negotiation(
    served: tuple[ControlServer, Wire],
) -> None:
    """Before ``qmp_capabilities`` commands are CommandNotFound; a second one is refused."""
    _, wire = served
    await wire.send(b'{"execute": "echo", "arguments": {"value": 1}, "id": "a"}')
    answer = await wire.read()
    assert answer["error"]["class"] == "CommandNotFound"
    assert "qmp_capabilities" in answer["error"]["desc"]
    assert answer["id"] == "a"
    await wire.send(b'{"execute": "qmp_capabilities", "id": "b"}')
    assert await wire.read() == {"return": {}, "id": "b"}
    await wire.send(b'{"execute": "qmp_capabilities"}')
    assert (await wire.read())["error"]["class"] == "CommandNotFound"


async def test_an_unknown_capability_is_refused(served: tuple[ControlServer, Wire]) -> None:
    """``enable`` may only name capabilities the greeting offered (none)."""
    _, wire = served
    await wire.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert "'oob' not available" in (await wire.read())["error"]["desc"]


async def test_events_flow_after_negotiation_without_subscribe(
    served: tuple[ControlServer, Wire],
) -> None:
    """No event before ``qmp_capabilities``; every event after it, as QMP clients expect."""
    server, wire = served
    server.broadcast("EARLY", {})
    await wire.send(
        b'{"execute": "qmp_capabilities"}{"execute": "echo", "arguments": {"value": 1}}'
    )
    assert await wire.read() == {"return": {}}
    assert await wire.read() == {"return": 1}
    server.broadcast("MIGRATION", {"status": "active"})
    message = await wire.read()
    assert (message["event"], message["data"]) == ("MIGRATION", {"status": "active"})


async def test_pipelined_and_split_requests_are_answered_in_order(
    served: tuple[ControlServer, Wire],
) -> None:
    """Several requests in one write, and one request in many writes, each get their reply."""
    _, wire = served
    await wire.send(b'{"execute": "qmp_capabilities"}')
    await wire.read()
    await wire.send(b"".join(b'{"execute":"echo","arguments":{"value":%d}}' % i for i in range(3)))
    assert [await wire.read() for _ in range(3)] == [{"return": i} for i in range(3)]
    for byte in b'{"execute": "echo", "arguments": {"value": "}{"}, "id": 9}':
        await wire.send(bytes([byte]))
    assert await wire.read() == {"return": "}{", "id": 9}


async def test_too_deep_a_request_is_answered_then_the_connection_closed(
    served: tuple[ControlServer, Wire],
) -> None:
    """Deep nesting gets InvalidRequest (not GenericError: RecursionError), then EOF."""
    _, wire = served
    await wire.send(b"[" * 100_000)
    answer = await wire.read()
    assert answer["error"]["class"] == "InvalidRequest"
    assert "nested deeper" in answer["error"]["desc"]
    assert await asyncio.wait_for(wire.reader.read(), 10) == b""

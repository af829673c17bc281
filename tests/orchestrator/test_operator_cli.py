"""What the operator's commands answer: exit codes that say how a cancel ended, and
addresses whose mistakes are named.

``livemig cancel`` is driven against a scripted daemon: the engine makes an accepted
cancel win today, so the other endings cannot be produced by real daemons on demand,
yet the command must not report them as success.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devices.fsm import State
from orchestrator.cli import commands as cli
from orchestrator.cli import exits
from orchestrator.cli.parser import build_parser
from orchestrator.service.commands import Commands
from orchestrator.service.config import ConfigError, parse
from orchestrator.service.ownership import Owner
from orchestrator.service.protocol import ControlError, DaemonUnreachable
from orchestrator.service.service import Service
from tests.orchestrator.conftest import Spec
from transport.address import parse_address

MID = "3f2a9c0e41b7"


class ScriptedDaemon:
    """A control client whose daemon accepts the cancel and then ends as scripted."""

    def __init__(self, final: dict[str, Any] | BaseException, state: str = "RUNNING") -> None:
        self.final = final
        self.state = state
        self.commands: list[str] = []

    async def subscribe(self, events: list[str]) -> None:
        assert events == ["MIGRATION"]

    async def execute(self, command: str, **arguments: Any) -> Any:
        self.commands.append(command)
        if command == "migrate-cancel":
            return {"id": MID}
        if command == "query-migrate":
            return {"migration_id": MID, "status": "device"}
        assert command == "query-devices"
        return [
            {"name": "sim0", "kind": "simulated", "state": self.state, "features": [],
             "migration": None, "owner": "running here"},
        ]  # fmt: skip

    async def next_event(
        self,
        match: Callable[[dict[str, Any]], bool],
        timeout: float,  # noqa: ASYNC109 - ControlClient.next_event's signature
    ) -> Any:
        if isinstance(self.final, BaseException):
            raise self.final
        message = {"event": "MIGRATION", "data": self.final}
        assert match(message)
        return message


def ended(status: str, outcome: str, error: str | None = None) -> dict[str, Any]:
    """The data of the final MIGRATION event of a migration that ended so."""
    placement = {"sim0": "destination" if outcome == "destination" else "source"}
    if outcome in ("unknown", "split"):
        placement = {"sim0": "stopped: no verdict from the destination"}
    stats = {"status": status, "outcome": outcome, "placement": placement, "error": error}
    return {"id": MID, "status": status, "error": error, "stats": stats}


async def cancel(
    daemon: ScriptedDaemon, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, str, str]:
    """Run ``livemig cancel`` against ``daemon``; (exit code, stdout, stderr)."""
    args = argparse.Namespace(command="cancel", id=None, json="--json" in options)
    code = await cli._cmd_cancel(args, daemon)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_a_cancel_that_rolled_back_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """Cancelled with the workload back on the source: exit 0, the devices shown."""
    code, out, err = await cancel(ScriptedDaemon(ended("cancelled", "source")), capsys)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"migration {MID}: cancelled"
    assert "running here" in out


@pytest.mark.parametrize(
    ("final", "state", "code", "says"),
    [
        (
            ended("completed", "destination"),
            "STOP",
            exits.EXIT_REFUSED,
            f"migration {MID} completed before the cancel took effect: the workload now runs "
            "on the destination",
        ),
        (
            ended("failed", "source", "lost the destination: reset"),
            "RUNNING",
            exits.EXIT_FAILED,
            f"migration {MID} failed before the cancel took effect (lost the destination: "
            "reset); the source devices run again",
        ),
        (
            ended("failed", "unknown", "no verdict"),
            "STOP",
            exits.EXIT_OUTCOME_UNKNOWN,
            f"migration {MID} ended with its outcome unknown (no verdict)",
        ),
        (
            ended("failed", "split", "sim0 did not resume"),
            "STOP",
            exits.EXIT_SPLIT,
            f"migration {MID} ended split (sim0 did not resume)",
        ),
    ],
    ids=["completed", "failed", "unknown", "split"],
)
async def test_a_cancel_that_did_not_roll_back_says_so_and_exits_non_zero(
    capsys: pytest.CaptureFixture[str], final: dict[str, Any], state: str, code: int, says: str
) -> None:
    """An accepted cancel whose migration ended otherwise than rolled back exits with the
    code of that ending (as ``migrate`` would) and says what happened and what to do."""
    got, out, err = await cancel(ScriptedDaemon(final, state), capsys)
    assert got == code
    assert out.splitlines()[0] == f"migration {MID}: {final['status']}"
    assert says in err
    assert "livemig " in err.split(says, 1)[1], "what to do next"


async def test_cancel_json_carries_the_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    """``cancel --json`` prints one object with the status, outcome and error."""
    code, out, _ = await cancel(
        ScriptedDaemon(ended("failed", "unknown", "no verdict"), "STOP"), capsys, "--json"
    )
    assert code == exits.EXIT_OUTCOME_UNKNOWN
    assert len(out.splitlines()) == 1
    result = cli.json.loads(out)
    assert (result["status"], result["outcome"], result["error"]) == (
        "failed",
        "unknown",
        "no verdict",
    )


@pytest.mark.parametrize(
    ("failure", "code", "says"),
    [
        (TimeoutError(), exits.EXIT_OUTCOME_UNKNOWN, "had not ended 60 s after the cancel"),
        (
            DaemonUnreachable("lost the daemon: reset"),
            exits.EXIT_UNREACHABLE,
            "lost the daemon: reset before migration",
        ),
    ],
    ids=["no-end", "daemon-gone"],
)
async def test_a_cancel_whose_end_is_not_seen_says_it_is_not_known(
    capsys: pytest.CaptureFixture[str], failure: BaseException, code: int, says: str
) -> None:
    """No final event (a hung rollback, a daemon gone): no traceback and no exit 0, but
    the code and a message that the ending is unknown and where to look."""
    got, _, err = await cancel(ScriptedDaemon(failure), capsys)
    assert got == code
    assert says in err
    assert f"livemig status --id {MID}" in err


# -- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range (0-65535)"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:\u00b2", "is not a number"),
        ("127.0.0.1:", "no port after ':'"),
        ("nowhere", "expected tcp:HOST:PORT, HOST:PORT or unix:/path (no port given)"),
        (":7070", "empty host"),
        ("tcp::7070", "empty host"),
        ("[]:7070", "empty host"),
        ("::1:7070", "an IPv6 host goes in brackets: [::1]:7070"),
        ("[::1:7070", "unbalanced brackets"),
        ("tcp://10.0.0.2:7070", "no '//' after 'tcp:'"),
    ],
)
def test_a_bad_address_is_refused_naming_the_problem(address: str, says: str) -> None:
    """Each malformed address is refused with what is wrong with it, not only the form."""
    with pytest.raises(ValueError, match=re.escape(says)) as refused:
        parse_address(address)
    assert repr(address) in str(refused.value)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:7070", ("tcp", "127.0.0.1", 7070)),
        ("tcp:host-b:0", ("tcp", "host-b", 0)),
        ("[::1]:65535", ("tcp", "::1", 65535)),
        ("unix:/run/x.sock", ("unix", "/run/x.sock", 0)),
    ],
)
def test_good_addresses_still_parse(address: str, parsed: tuple[str, str, int]) -> None:
    """The accepted forms are unchanged."""
    assert parse_address(address) == parsed


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        ('listen = ["127.0.0.1:99999"]', "listen: '127.0.0.1:99999': port 99999 is out of range"),
        ("metrics = 99999", "metrics: '127.0.0.1:99999': port 99999 is out of range"),
        ('metrics = ":9100"', "metrics: ':9100': empty host"),
    ],
)
def test_a_bad_address_in_the_config_is_named_at_its_key(lines: str, says: str) -> None:
    """The config names the key and the address's problem."""
    with pytest.raises(ConfigError) as refused:
        parse(f'control_socket = "c.sock"\n{lines}\n', file="/tmp/d.toml")
    assert says in str(refused.value)


def test_a_bad_destination_on_the_command_line_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``migrate --to`` with a malformed address exits 2 naming the problem, before any
    daemon is asked."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "--to", "10.0.0.2:99999", "--control", "/nonexistent.sock"])
    assert exited.value.code == exits.EXIT_USAGE
    assert "port 99999 is out of range (0-65535)" in capsys.readouterr().err


async def test_a_bad_uri_to_arm_is_named(tmp_path: Path) -> None:
    """``migrate-incoming`` with a malformed ``uri`` names the address's problem, not
    only that the daemon does not listen there."""
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [])
    try:
        with pytest.raises(ControlError) as refused:
            await Commands(service).migrate_incoming(uri="127.0.0.1:99999")
        assert refused.value.error_class == "InvalidParameter"
        assert "uri: '127.0.0.1:99999': port 99999 is out of range" in refused.value.desc
    finally:
        service.book.close()


def test_migrating_to_the_own_control_socket_is_refused_naming_it(tmp_path: Path) -> None:
    """``migrate --to unix:CONTROL`` (the control socket mistaken for a migration
    listener) is refused at once, naming the socket, rather than failing on its
    greeting's bytes ("magic: expected b'LM'")."""
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [])
    try:
        with pytest.raises(ControlError) as refused:
            service.start_migration(f"unix:{tmp_path}/c.sock", None, {})
        assert refused.value.error_class == "InvalidParameter"
        assert "is this daemon's control socket" in refused.value.desc
    finally:
        service.book.close()


def test_a_bad_tcp_control_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``--control tcp:HOST:PORT`` with a malformed address exits 2 naming the problem,
    before any certificate is loaded or daemon dialled."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["devices", "--control", "tcp:10.0.0.2:99999", "--ca", "x", "--cert", "y"])
    assert exited.value.code == exits.EXIT_USAGE
    assert "port 99999 is out of range (0-65535)" in capsys.readouterr().err


async def test_migrating_a_stopped_workload_says_to_resume_it_first(tmp_path: Path) -> None:
    """``migrate`` of a device whose workload is here but stopped (a split outcome, or
    found stopped at start) says so and to resume it first, not "no workload runs
    here"."""
    device = Spec("sim0", seed=1).build(source=True)
    await device.open()
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [device])
    try:
        service.book.set(["sim0"], Owner.STOPPED, peer="src", migration_id="m1")
        with pytest.raises(ControlError) as refused:
            service.start_migration("127.0.0.1:9", None, {})
        assert refused.value.error_class == "WrongState"
        assert "sim0 (stopped: its workload is here but does not run)" in refused.value.desc
        assert "livemig resume sim0 first" in refused.value.desc
    finally:
        service.book.close()
        await device.close()


def test_a_relative_unix_destination_means_the_operators_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``migrate --to unix:dst.sock`` names a socket in the operator's folder; the daemon
    runs elsewhere, so the CLI sends the absolute path."""
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["migrate", "--to", "unix:dst.sock"])
    assert args.to == f"unix:{tmp_path / 'dst.sock'}"


@pytest.mark.parametrize("command", ["device_resume", "query_digests", "migrate_incoming"])
async def test_a_device_named_twice_is_refused_before_anything_moves(
    tmp_path: Path, command: str
) -> None:
    """``resume sim0 sim0`` (or digests, or an arm) naming a device twice is refused by
    name before anything moves: resume and digests walk the named devices at once, and
    the FSM core walks each from the state it saw, so nothing serializes two walks of
    one device (a failed resume step ends in a reset, which loses the state)."""
    device = Spec("sim0", seed=1).build(source=True)
    await device.open()
    service = Service(parse(f'control_socket = "{tmp_path}/c.sock"\n'), [device])
    try:
        await device.set_state(State.STOP)
        with pytest.raises(ControlError) as refused:
            await getattr(Commands(service), command)(devices=["sim0", "sim0"])
        assert refused.value.error_class == "InvalidParameter"
        assert "devices: sim0 is named twice" in refused.value.desc
        assert device.state == State.STOP
        assert service.book.armed() == {}
    finally:
        service.book.close()
        await device.close()

"""The command line: parsing, parameter options, exit codes without a daemon."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from orchestrator import cli
from orchestrator.params import MigrationParams


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` configures structlog for the process; put the defaults back for other tests."""
    yield
    structlog.reset_defaults()


def test_every_migration_parameter_has_an_option() -> None:
    """``migrate`` accepts one option per MigrationParams field, by its name."""
    args = cli.build_parser().parse_args(
        [
            "migrate",
            "--control",
            "c.sock",
            "--to",
            "127.0.0.1:1",
            "--downtime-limit-ms",
            "50",
            "--no-p2p",
            "--policy",
            "force",
            "--force-after-iterations",
            "3",
            "--max-bandwidth-mbps",
            "2.5",
        ]
    )
    parameters = cli._parameters(args)
    assert parameters == {
        "downtime_limit_ms": 50.0,
        "p2p": False,
        "policy": "force",
        "force_after_iterations": 3,
        "max_bandwidth": 2.5e6,
    }
    assert MigrationParams().updated(parameters).max_bandwidth == 2.5e6


def test_options_not_given_are_left_to_the_daemon() -> None:
    """Without parameter options nothing is sent: the daemon's config defaults apply."""
    args = cli.build_parser().parse_args(["set", "--control", "c.sock"])
    assert cli._parameters(args) == {}


def test_a_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing required option is a usage error, exit code 2."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "--control", "c.sock"])
    assert exited.value.code == cli.EXIT_USAGE
    assert "--to" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "devices", "cancel", "continue", "events"])
def test_an_unreachable_daemon_exits_4_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Every command says why it cannot reach the daemon, as text and as --json."""
    code = cli.main([command, "--control", str(tmp_path / "none.sock"), "--json"])
    assert code == cli.EXIT_UNREACHABLE
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["class"] == "DaemonUnreachable"
    assert "is the daemon running?" in captured.err


def test_fsm_table_still_prints_the_paths(capsys: pytest.CaptureFixture[str]) -> None:
    """The FSM table command is unchanged."""
    assert cli.main(["fsm-table", "--features", "STOP_COPY"]) == 0
    assert "STOP_COPY" in capsys.readouterr().out

"""The command line: parsing, parameter options, exit codes, and how ``migrate`` shows progress."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path

import pytest

from orchestrator.bench import command as bench_command
from orchestrator.cli import commands as cli
from orchestrator.cli import parser
from orchestrator.engine.params import MigrationParams
from orchestrator.service.config import parse
from orchestrator.service.protocol import ControlError
from tests.orchestrator.test_daemon import DEADLINE, ROOT, Pair, start_pair


def test_every_migration_parameter_has_an_option() -> None:
    """``migrate`` accepts one option per MigrationParams field, by its name."""
    args = parser.build_parser().parse_args(
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
            "--max-bandwidth",
            "2.5",
        ]
    )
    parameters = parser.given_parameters(args)
    assert parameters == {
        "downtime_limit_ms": 50.0,
        "p2p": False,
        "policy": "force",
        "force_after_iterations": 3,
        "max_bandwidth": 2.5e6,
    }
    assert MigrationParams().updated(parameters).max_bandwidth == 2.5e6


@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [
        ("100", 100e6),
        ("2.5", 2.5e6),
        ("500MB/s", 500e6),
        ("1GiB/s", float(1 << 30)),
        ("64 KiB/s", 65536.0),
        ("10kB/s", 1e4),
        ("none", None),
        ("None", None),
    ],
)
@pytest.mark.parametrize("option", ["--max-bandwidth", "--switchover-bandwidth"])
def test_a_bare_bandwidth_is_mb_per_s_and_none_clears(
    option: str, text: str, bytes_per_s: float | None
) -> None:
    """Bandwidth options read MB/s (as the progress shows), take units, and ``none``."""
    for command in ("migrate", "set"):
        argv = [command, option, text] + (["--to", "h:1"] if command == "migrate" else [])
        parameters = parser.given_parameters(parser.build_parser().parse_args(argv))
        assert parameters == {option[2:].replace("-", "_"): bytes_per_s}


def test_the_bench_reads_bandwidth_like_every_other_command() -> None:
    """``bench --max-bandwidth`` takes MB/s, units and none as migrate and set do."""
    for text, mbps in (("50", 50.0), ("1GB/s", 1000.0), ("none", None)):
        args = parser.build_parser().parse_args(["bench", "--max-bandwidth", text])
        assert bench_command.bench_options(args).max_bandwidth_mbps == mbps


def test_bench_json_keeps_the_iterations_only_when_asked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``bench --json --history`` gives each run the pre-copy samples the switchover rule
    saw; plain ``--json`` leaves them out."""
    small = ["bench", "--in-process", "--devices", "1", "--state-mib", "1", "--repeat", "2"]
    assert cli.main([*small, "--json", "--history"]) == cli.EXIT_OK
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert len(runs) == 2
    for run in runs:
        assert run["history"], "each run has its iterations"
        assert {"t_s", "pending_bytes", "expected_downtime_ms"} <= run["history"][0].keys()
    assert cli.main([*small, "--json"]) == cli.EXIT_OK
    assert all("history" not in run for run in json.loads(capsys.readouterr().out)["runs"])


@pytest.mark.parametrize("text", ["0", "-5", "fast", "10 furlongs/s", "inf"])
def test_a_bandwidth_that_is_none_of_those_is_a_usage_error(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zero, negative and unknown units are refused by the parser, naming the forms it takes."""
    with pytest.raises(SystemExit) as exited:
        parser.build_parser().parse_args(["set", "--max-bandwidth", text])
    assert exited.value.code == cli.EXIT_USAGE
    assert "--max-bandwidth" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--timeout-s", "--downtime-limit-ms", "--channels"])
def test_numbers_must_be_finite_and_only_optional_ones_take_none(option: str) -> None:
    """``inf`` is refused everywhere; ``none`` only unsets parameters that may be unset."""
    for text in ("inf", "nan", "none"):
        with pytest.raises(SystemExit):
            parser.build_parser().parse_args(["set", option, text])
    args = parser.build_parser().parse_args(["set", "--force-after-s", "none"])
    assert parser.given_parameters(args) == {"force_after_s": None}


def test_help_shows_the_built_in_defaults_of_migration_params(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each parameter's help quotes MigrationParams' own default, and says the config rules."""
    with pytest.raises(SystemExit):
        cli.main(["migrate", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split("migration parameters:")[1]
    assert "may differ from the built-in defaults" in text
    defaults = MigrationParams()
    for field in dataclasses.fields(MigrationParams):
        value = getattr(defaults, field.name)
        if isinstance(value, bool):
            shown = "yes" if value else "no"
        elif value is None:
            shown = "none"
        elif isinstance(value, float):
            shown = f"{value:g}"
        else:
            shown = str(getattr(value, "value", value))
        flag = "--" + field.name.replace("_", "-")
        metavar = r"(?: [A-Z]+| {[a-z,]+}|, --no-\S+)?"
        option = re.search(re.escape(flag) + metavar + r" \(([^)]*)\)", text)
        assert option is not None, flag
        assert option.group(1).endswith(f"built-in default {shown}"), (flag, option.group(1))


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``livemig --version`` prints the distribution's version."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"livemig {metadata.version('livemig')}"


def test_the_cli_and_the_config_default_to_one_control_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --control or LIVEMIG_CONTROL the CLI looks where a daemon listens by default."""
    monkeypatch.delenv("LIVEMIG_CONTROL", raising=False)
    args = parser.build_parser().parse_args(["devices"])
    config = parse('[[device]]\nkind = "simulated"\nname = "sim0"\nstate_mib = 1\n')
    assert Path(args.control) == config.control_socket == Path("/run/livemig/control.sock")
    monkeypatch.setenv("LIVEMIG_CONTROL", "/elsewhere.sock")
    assert parser.build_parser().parse_args(["devices"]).control == "/elsewhere.sock"


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt install systemd)"
)
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """The shipped unit, pointed at this installation's ``livemig``, verifies clean."""
    assert SYSTEMD_ANALYZE is not None
    livemig = Path(sys.executable).with_name("livemig")
    assert livemig.is_file(), "livemig is not installed next to this Python (pip install -e .)"
    unit = (ROOT / "examples" / "livemig.service").read_text()
    assert "ExecStart=/usr/local/bin/livemig daemon " in unit
    copy = tmp_path / "livemig.service"
    copy.write_text(unit.replace("/usr/local/bin/livemig", str(livemig)))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = [line for line in result.stderr.splitlines() if "livemig.service" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []


def test_options_not_given_are_left_to_the_daemon() -> None:
    """Without parameter options nothing is sent: the daemon's config defaults apply."""
    args = parser.build_parser().parse_args(["set", "--control", "c.sock"])
    assert parser.given_parameters(args) == {}


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


# -- the progress views of ``migrate``, against real daemons ------------------------------


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """A source and a destination daemon sharing a pre-shared key."""
    async for running in start_pair(tmp_path):
        yield running


ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def _read_until_hangup(master: int) -> bytes:
    """Everything written to a pty until its last writer is gone; closes ``master``."""
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: no process holds the other end any more
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return b"".join(chunks)


async def migrate_on_a_terminal(pair: Pair) -> tuple[int, str, str]:
    """``livemig migrate`` with a pseudo-terminal as stdout; (exit code, screen, stderr)."""
    master, slave = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator.cli",
            "migrate",
            "--to",
            pair.address,
            "--control",
            str(pair.folder / "source.sock"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=slave,
            stderr=asyncio.subprocess.PIPE,
            env=os.environ | {"PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "100"},
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    screen = asyncio.ensure_future(asyncio.to_thread(_read_until_hangup, master))
    try:
        assert process.stderr is not None
        err, code = await asyncio.wait_for(
            asyncio.gather(process.stderr.read(), process.wait()), DEADLINE
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = await asyncio.wait_for(screen, DEADLINE)
    text = ANSI.sub("", output.decode(errors="replace")).replace("\r", "")
    return code, text, err.decode()


#: How the views print a byte count (progress.human_bytes) and a rate (human_rate).
BYTES = r"\d+ B|\d+\.\d (?:KiB|MiB|GiB)"
RATE = r"\d+\.\d MB/s"
DOWNTIME = r"\d+\.\d ms|-"


async def test_migrate_on_a_terminal_shows_the_live_panel(pair: Pair) -> None:
    """On a tty ``migrate`` draws the rich panel with every progress field, then the summary."""
    code, screen, err = await migrate_on_a_terminal(pair)
    assert code == 0, err
    assert re.search(r"^\s*migration: [a-z-]+\s*$", screen, re.M), screen
    for label, value in [
        ("iteration", r"[1-9]\d*"),
        ("sent", BYTES),
        ("remaining", BYTES),
        ("bandwidth", RATE),
        ("expected downtime", DOWNTIME),
    ]:
        row = rf"^[│|] {label}\s+[│|]\s+(?:{value}) [│|]$"
        assert re.search(row, screen, re.M), f"no {label!r} row in:\n{screen}"
    assert "iteration 1: sent" not in screen, "plain lines instead of the panel"
    assert "status: completed" in screen.splitlines()


async def test_migrate_without_a_terminal_prints_plain_lines(pair: Pair) -> None:
    """Without a tty ``migrate`` prints status and progress lines, no escape sequences."""
    code, out, err = await pair.cli("migrate", "--to", pair.address)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["status: setup", "status: active"]
    progress = rf"iteration [1-9]\d*: sent (?:{BYTES}), remaining (?:{BYTES}), "
    progress += rf"bandwidth {RATE}, expected downtime (?:{DOWNTIME})"
    assert re.fullmatch(progress, lines[2]), lines[2]
    assert "status: completed" in lines
    assert "\x1b" not in out
    assert "│" not in out


async def test_progress_shows_the_bandwidth_while_data_flows(pair: Pair) -> None:
    """Every MIGRATION_PASS after which bytes were sent reports a bandwidth above zero."""
    code, _, err = await pair.cli("migrate", "--to", pair.address, "--max-bandwidth", "20")
    assert code == 0, err
    passes = []
    while True:
        message = await pair.src.next_event(
            lambda m: m["event"] in ("MIGRATION_PASS", "MIGRATION"), DEADLINE
        )
        if message["event"] == "MIGRATION" and "stats" in message["data"]:
            break
        if message["event"] == "MIGRATION_PASS":
            passes.append(message["data"])
    assert len(passes) >= 2
    sent_before = 0
    for stats in passes:
        if stats["transferred_bytes"] > sent_before:
            assert stats["bandwidth_bps"] > 0, stats
        sent_before = stats["transferred_bytes"]


async def test_progress_goes_on_while_paused_before_switchover(pair: Pair) -> None:
    """Paused, the devices keep running and streaming: passes keep coming, bytes keep moving."""
    code, _, err = await pair.cli(
        "migrate", "--to", pair.address, "--pause-before-switchover", "--detach", "--json"
    )
    assert code == 0, err
    await pair.migration_event("pre-switchover")
    paused = []
    while len(paused) < 3:
        message = await pair.src.next_event(lambda m: m["event"] == "MIGRATION_PASS", DEADLINE)
        paused.append(message["data"])
    assert {p["status"] for p in paused} == {"pre-switchover"}
    assert [p["iterations"] for p in paused] == sorted({p["iterations"] for p in paused})
    assert paused[-1]["transferred_bytes"] > paused[0]["transferred_bytes"], "dirty data streams"
    assert set((await pair.states(pair.src)).values()) == {"PRE_COPY"}
    code, _, err = await pair.cli("continue")
    assert code == 0, err
    await pair.migration_event("completed")
    assert await pair.src.execute("query-digests") == await pair.dst.execute("query-digests")


async def test_set_changes_the_defaults_shown_after_a_migration_and_none_clears(
    pair: Pair,
) -> None:
    """After a migration ended, ``set`` changes the defaults and ``params`` shows them."""
    code, _, err = await pair.cli("migrate", "--to", pair.address, "--json")
    assert code == 0, err
    code, out, err = await pair.cli("set", "--max-bandwidth", "100", "--downtime-limit-ms", "70")
    assert code == 0, err
    assert "max_bandwidth              100 MB/s" in out.splitlines()
    code, out, err = await pair.cli("params", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["max_bandwidth"], shown["max-bandwidth"]) == (100e6, 100_000_000)
    assert shown["downtime_limit_ms"] == 70
    code, out, err = await pair.cli("set", "--max-bandwidth", "none")
    assert code == 0, err
    assert (await pair.src.execute("query-migrate-parameters"))["max_bandwidth"] is None


async def test_migrating_to_the_daemon_itself_is_refused_with_the_reason(pair: Pair) -> None:
    """A destination that is the daemon's own listener is refused before anything moves."""
    own = (await pair.dst.execute("query-daemon"))["listen"][0]
    port = own.rsplit(":", 1)[1]
    for destination in (own, f"localhost:{port}", f"tcp:127.0.0.1:{port}"):
        with pytest.raises(ControlError) as caught:
            await pair.dst.execute("migrate", destination=destination)
        assert caught.value.error_class == "InvalidParameter"
        assert "is this daemon (destination) itself" in caught.value.desc
    assert set((await pair.states(pair.dst)).values()) == {"RUNNING"}


def test_a_closed_pipe_ends_the_cli_quietly() -> None:
    """Output into a pipe nobody reads (``| head -1``) ends without a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "fsm-table"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == cli.EXIT_OK

"""A second look at ``livemig cancel``: a daemon lost after the cancel was taken, at each
later request the command makes."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.cli import exits
from orchestrator.service.protocol import DaemonUnreachable
from tests.orchestrator.test_operator_cli import MID, ScriptedDaemon, cancel, ended


class LostAt(ScriptedDaemon):
    """A scripted daemon that is lost when the command asks it ``lost_at``."""

    def __init__(self, final: dict[str, Any] | BaseException, lost_at: str) -> None:
        super().__init__(final)
        self.lost_at = lost_at

    async def execute(self, command: str, **arguments: Any) -> Any:
        if command == self.lost_at:
            raise DaemonUnreachable("lost the daemon: reset")
        return await super().execute(command, **arguments)


@pytest.mark.parametrize(
    ("final", "code"),
    [
        (ended("cancelled", "source"), exits.EXIT_OK),
        (ended("failed", "unknown", "no verdict"), exits.EXIT_OUTCOME_UNKNOWN),
        (ended("completed", "destination"), exits.EXIT_REFUSED),
    ],
    ids=["rolled-back", "unknown", "completed"],
)
async def test_a_daemon_lost_after_the_final_event_keeps_the_ending_s_code(
    capsys: pytest.CaptureFixture[str], final: dict[str, Any], code: int
) -> None:
    """The final event arrived, then the daemon went (before the device list): the exit
    code is still the ending's (7 stays "outcome unknown", not 4), with the ending shown
    and a word that the device list could not be read."""
    got, out, err = await cancel(LostAt(final, "query-devices"), capsys)
    assert got == code
    assert f"migration {MID}: {final['status']}" in out
    assert "device list" in err


async def test_a_daemon_lost_after_the_wait_ran_out_says_where_to_look(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No final event within the wait, and then the daemon is lost when asked how far the
    migration got: exit 4 with the migration named and where to look, no traceback."""
    got, _, err = await cancel(LostAt(TimeoutError(), "query-migrate"), capsys)
    assert got == exits.EXIT_UNREACHABLE
    assert f"livemig status --id {MID}" in err

"""``livemig``'s exit codes, and which one each ending of a migration gets.

The codes are listed for people in :mod:`orchestrator.cli.parser`'s docstring (``--help``)
and in the README; scripts test them, so a code never changes meaning.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_UNVERIFIED = 6
EXIT_OUTCOME_UNKNOWN = 7
EXIT_SPLIT = 8
EXIT_INTERRUPTED = 130

#: A migration's final status -> the code of ``migrate`` (keys: the final statuses).
STATUS_EXIT = {"completed": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
#: Outcomes past COMMIT that are neither place, whatever the status says.
OUTCOME_EXIT = {"unknown": EXIT_OUTCOME_UNKNOWN, "split": EXIT_SPLIT}


def migrate_exit(stats: dict[str, Any]) -> int:
    """The exit code of ``livemig migrate`` for a migration's final stats."""
    outcome_code = OUTCOME_EXIT.get(stats.get("outcome") or "")
    if outcome_code is not None:
        return outcome_code
    return STATUS_EXIT.get(stats["status"], EXIT_FAILED)


def cancel_exit(migration_id: str, result: dict[str, Any]) -> tuple[int, str]:
    """The exit code of a cancel whose migration ended so, and what to tell the operator
    ('' for 0).

    Only a rollback is the cancel's success; any other ending takes the code ``migrate``
    would give it, except a completed migration: too late, as a refused cancel is.
    """
    status, outcome, error = result["status"], result["outcome"], result["error"]
    if outcome == "unknown":
        return EXIT_OUTCOME_UNKNOWN, (
            f"migration {migration_id} ended with its outcome unknown ({error}): the source "
            "devices stay stopped; check on the destination whether it runs them (livemig "
            "devices there), and only if not, livemig resume --force here"
        )
    if outcome == "split":
        return EXIT_SPLIT, (
            f"migration {migration_id} ended split ({error}): the devices that did not "
            "resume stay stopped on the destination; livemig resume DEVICE... there retries them"
        )
    if status == "completed":
        return EXIT_REFUSED, (
            f"migration {migration_id} completed before the cancel took effect: the workload "
            "now runs on the destination; to bring it back, livemig migrate it back from there"
        )
    if status == "failed":
        return EXIT_FAILED, (
            f"migration {migration_id} failed before the cancel took effect ({error}); the "
            "source devices run again (livemig devices)"
        )
    return EXIT_OK, ""  # cancelled: rolled back, the source runs the workload

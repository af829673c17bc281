"""Ownership records and arms: durable, validated, one migration per arm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from orchestrator.service.ownership import Owner, OwnershipBook


def test_records_survive_a_new_book_on_the_same_file(tmp_path: Path) -> None:
    """A record written by one book is what the next book (a restarted daemon) reads."""
    path = tmp_path / "state" / "owners.json"
    book = OwnershipBook(path, ["a", "b"], accept_incoming=["b"])
    assert book.get("a").owner == Owner.RUNNING_HERE
    assert book.get("b").owner == Owner.IDLE
    book.set(["a"], Owner.OUTCOME_UNKNOWN, peer="dst:7070", migration_id="m1", reason="r")
    book.close()  # the daemon exited
    again = OwnershipBook(path, ["a", "b", "c"])
    assert again.get("a").owner == Owner.OUTCOME_UNKNOWN
    assert again.get("a").peer == "dst:7070"
    assert again.get("a").migration_id == "m1"
    assert again.get("c").owner == Owner.RUNNING_HERE
    assert not list(path.parent.glob(".*.tmp")), "the temporary file is renamed away"


def test_a_new_state_file_beside_records_that_keep_our_devices_stopped_warns(
    tmp_path: Path,
) -> None:
    """A daemon renamed without an explicit state_file starts a new, empty one; when a
    file beside it says one of its devices migrated away, the start warns naming it
    (records that let devices run, or name other devices, say nothing)."""
    old = OwnershipBook(tmp_path / "old-name.owners.json", ["a", "b", "c"])
    old.set(["a"], Owner.MIGRATED_AWAY, peer="dst:7070", migration_id="m1", reason="")
    old.close()
    with capture_logs() as logs:
        OwnershipBook(tmp_path / "new-name.owners.json", ["a", "b"]).close()
    [warning] = [e for e in logs if e["event"] == "state_file_new_beside_records"]
    assert warning["other"] == str(tmp_path / "old-name.owners.json")
    assert warning["devices"] == ["a"]
    with capture_logs() as logs:
        OwnershipBook(tmp_path / "third.owners.json", ["b", "c"]).close()
        OwnershipBook(tmp_path / "new-name.owners.json", ["a", "b"]).close()  # not new now
    assert not [e for e in logs if e["event"] == "state_file_new_beside_records"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "Expecting"),
        ('{"version": 9, "devices": {}}', "not a version 1 state file"),
        ('{"version": 1, "devices": {"a": {"owner": "nobody"}}}', "unknown owner 'nobody'"),
        ('{"version": 1, "devices": {"a": {"owner": "idle", "peer": 3}}}', "peer must be"),
    ],
)
def test_a_damaged_state_file_is_refused_naming_it(
    tmp_path: Path, content: str, problem: str
) -> None:
    """A damaged state file stops the daemon (never a silent reset of the fence)."""
    path = tmp_path / "owners.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as caught:
        OwnershipBook(path, ["a"])
    assert str(path) in str(caught.value)


def test_an_arm_names_its_sender_lapses_and_is_spent() -> None:
    """Arms admit only the named peer, lapse after their timeout, and are spent once."""
    now = [100.0]
    book = OwnershipBook(None, ["a", "b"], clock=lambda: now[0])
    assert "not armed to receive (owner here: running here)" in str(
        book.admission_problem("a", "src")
    )
    book.arm(["a"], "src", None)
    assert book.admission_problem("a", "src") is None
    assert "armed for 'src', not 'other'" in str(book.admission_problem("a", "other"))
    book.spend(["a"])
    assert book.admission_problem("a", "src") is not None
    book.arm(["b"], None, 30)
    now[0] += 29
    assert book.admission_problem("b", "anyone") is None
    assert book.armed()["b"]["expires_in_s"] == 1
    now[0] += 2
    assert "expired" in str(book.admission_problem("b", "anyone"))


def test_accept_incoming_arms_only_while_no_workload_is_here() -> None:
    """A standing arm holds while the device is idle or migrated away, not once received."""
    book = OwnershipBook(None, ["r"], accept_incoming=["r"])
    assert book.admission_problem("r", "src") is None
    assert book.armed()["r"]["standing"]
    book.set(["r"], Owner.RECEIVED, peer="src", migration_id="m")
    assert book.admission_problem("r", "src") is not None
    book.set(["r"], Owner.MIGRATED_AWAY, peer="dst", migration_id="m2")
    assert book.admission_problem("r", "src") is None
    assert book.default_armable() == ["r"]


def test_the_state_file_is_plain_json(tmp_path: Path) -> None:
    """Operators can read the state file: a version and one record per device."""
    path = tmp_path / "owners.json"
    OwnershipBook(path, ["a"]).set(["a"], Owner.MIGRATED_AWAY, peer="p", migration_id="m")
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert document["devices"]["a"]["owner"] == "migrated away"

"""A second look at the state file's lock and the records around an incoming migration."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.service.ownership import Owner, OwnershipBook


def _fenced_file(path: Path) -> str:
    """A state file whose one record keeps ``dev`` stopped (its workload moved away)."""
    book = OwnershipBook(path, ["dev"])
    book.set(["dev"], Owner.MIGRATED_AWAY, peer="b", migration_id="m1")
    book.close()
    return path.read_text()


def test_a_lock_path_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    """A symlink at the lock's path (to the state file itself) is refused by name, and the
    file it points at keeps every byte: the lock must never erase the fences it guards."""
    state = tmp_path / "a.owners.json"
    before = _fenced_file(state)
    lock = tmp_path / ".a.owners.json.lock"
    lock.unlink()
    lock.symlink_to(state.name)
    with pytest.raises(ValueError, match=r"\.a\.owners\.json\.lock is not a regular file"):
        OwnershipBook(state, ["dev"])
    assert state.read_text() == before
    assert json.loads(before)["devices"]["dev"]["owner"] == Owner.MIGRATED_AWAY.value


def test_a_lock_path_that_is_a_fifo_is_refused_by_name(tmp_path: Path) -> None:
    """Something other than a regular file at the lock's path is refused, naming it, rather
    than truncated and written with our pid."""
    state = tmp_path / "a.owners.json"
    _fenced_file(state)
    lock = tmp_path / ".a.owners.json.lock"
    lock.unlink()
    os.mkfifo(lock)
    with pytest.raises(ValueError, match=r"\.a\.owners\.json\.lock is not a regular file"):
        OwnershipBook(state, ["dev"])

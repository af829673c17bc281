"""The records a destination daemon that died while it received leaves for its restart."""

from __future__ import annotations

import json
import os
import stat as stat_module
from pathlib import Path
from typing import Any

import pytest

from devices.fsm import State
from orchestrator.engine.destination import Offer
from orchestrator.service.config import parse
from orchestrator.service.ownership import Owner, OwnershipBook
from orchestrator.service.service import Incoming, Service, _IncomingGate
from tests.orchestrator.conftest import Spec


async def test_a_device_that_starts_afresh_is_idle_after_a_cut_short_admission(
    tmp_path: Path,
) -> None:
    """A model (it starts afresh with each daemon: no state survives its death) admitted
    while it ran a workload, whose daemon died before the load: the restart records it
    ``idle``, as the workload died with the daemon; the admission's note is dropped."""
    config = parse(f'control_socket = "{tmp_path}/c.sock"\n')
    device = Spec("sim0", seed=2).build(source=True)
    service = Service(config, [device])
    service.book.arm(["sim0"], None, None)
    _IncomingGate(service, Incoming("claim", "source", None)).admit(
        Offer("m1", "source", ("sim0",))
    )
    before = service.book.get("sim0").before
    assert before is not None
    assert before.owner == Owner.RUNNING_HERE
    service.book.close()
    again = Spec("sim0", seed=2).build(source=True)
    assert again.found_at_open is None
    assert again.state == State.RUNNING
    restarted = Service(config, [again])
    await restarted.fence()
    record = restarted.book.get("sim0")
    assert (record.owner, record.before, record.migration_id) == (Owner.IDLE, None, "m1")
    restarted.book.close()
    assert config.state_file is not None
    assert "before" not in json.loads(config.state_file.read_text())["devices"]["sim0"]


def test_a_state_file_record_with_a_nested_before_is_refused_by_name(tmp_path: Path) -> None:
    """The record an admission replaced is kept one level deep; a state file nesting it
    further, or giving something else than a record, is refused naming the field."""
    path = tmp_path / "a.owners.json"
    inner = {"owner": "running here", "before": {"owner": "idle"}}
    for before in (inner, "running here"):
        document = {"version": 1, "devices": {"dev": {"owner": "idle", "before": before}}}
        path.write_text(json.dumps(document))
        with pytest.raises(ValueError, match="before must be a record without a before"):
            OwnershipBook(path, ["dev"])


def test_a_record_with_its_before_survives_the_state_file(tmp_path: Path) -> None:
    """The admission's ``idle`` keeps the record it replaced through a write and a read."""
    path = tmp_path / "a.owners.json"
    book = OwnershipBook(path, ["dev"])
    book.set(["dev"], Owner.MIGRATED_AWAY, peer="b", migration_id="m0")
    kept = book.get("dev")
    book.set(["dev"], Owner.IDLE, peer="c", migration_id="m1", before={"dev": kept})
    book.close()
    again = OwnershipBook(path, ["dev"])
    assert again.get("dev").before == kept
    assert again.get("dev").owner == Owner.IDLE
    again.close()


def test_a_lock_replaced_by_a_file_of_another_file_system_with_its_inode_number_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock path naming a file on another file system whose inode number equals that of
    the held lock (the state folder's file system unmounted under the daemon, say) is a
    replaced lock: the write is refused, since another daemon may have locked that file."""
    path = tmp_path / "owners.json"
    book = OwnershipBook(path, ["a"])
    lock = tmp_path / ".owners.json.lock"
    held = os.stat(lock)
    real_stat = os.stat

    def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(target, *args, **kwargs)
        if Path(target) != lock:
            return result
        fields = list(result)
        fields[stat_module.ST_DEV] = held.st_dev + 1  # same number, another device
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", stat)
    try:
        with pytest.raises(OSError, match=r"\.owners\.json\.lock was removed or replaced"):
            book.set(["a"], Owner.MIGRATED_AWAY, peer="dst:7070", migration_id="m1")
        assert book.get("a").owner == Owner.RUNNING_HERE
    finally:
        monkeypatch.undo()
        book.close()

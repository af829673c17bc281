"""VfioDevice on a real kernel: the lab guest runs tests/vm/guest against mtty (one boot).

The lab is built (or found in its cache) first; a cold build installs Debian packages
as root and takes minutes. One guest boot runs the whole in-guest pytest session
(the device contract suite with the VFIO harness, the in-process mtty migration
scenarios, P2P order as the kernel saw it, eight mdevs whose arcs overlap, and two
livemig daemons migrating an mtty mdev through the CLI) and leaves a JUnit report in
the results folder, plus ``two_daemons.json``, ``p2p_order.json`` and
``arcs_overlap.json``, what those scenarios saw; the tests here read them.
"""

from __future__ import annotations

import json
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devices import vfio
from devices.fsm import Feature, State
from tests.vm import lab as lab_module

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

#: The only reason a guest test may skip: fault injection, which a kernel driver lacks.
ALLOWED_SKIP = "cannot inject faults"

GUEST_COMMAND = (
    "python3 -m pytest -c /project/pyproject.toml --rootdir /project -p no:cacheprovider"
    " -q -rs --junitxml=/results/junit.xml /project/tests/vm/guest"
)


@dataclass(frozen=True)
class GuestSession:
    """The in-guest pytest run: its outcome per test id, and its output."""

    returncode: int
    output: str
    outcomes: dict[str, tuple[str, str]]  # test id -> (outcome, message)
    results: Path


@pytest.fixture(scope="module")
def guest(lab: lab_module.Lab, tmp_path_factory: pytest.TempPathFactory) -> GuestSession:
    """Boot once and run every in-guest test; parse its JUnit report."""
    result = lab_module.run(lab, GUEST_COMMAND, results=tmp_path_factory.mktemp("guest"))
    report = result.results / "junit.xml"
    if not report.is_file():
        code = result.returncode
        pytest.fail(f"the guest's pytest left no report (exit {code}):\n{result.output}")
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome, message = tag, element.get("message") or ""
                break
        outcomes[test_id] = (outcome, message)
    return GuestSession(result.returncode, result.output, outcomes, result.results)


def test_guest_session_passes(guest: GuestSession) -> None:
    """Every in-guest test passes; the only skips are the fault-injection tests."""
    bad = {
        test_id: f"{outcome}: {message}"
        for test_id, (outcome, message) in guest.outcomes.items()
        if outcome != "passed" and not (outcome == "skipped" and ALLOWED_SKIP in message)
    }
    assert not bad, f"guest tests did not pass: {bad}\n{guest.output[-6000:]}"
    assert guest.returncode == 0, guest.output[-6000:]


@pytest.mark.parametrize(
    "test_name",
    [
        "test_migration_carries_the_uart_state",
        "test_cancel_mid_precopy_returns_the_source_to_running",
        "test_corrupted_stream_fails_the_destination_not_the_source",
        "test_short_stream_fails_in_the_kernel_and_stays_resuming",
        "test_stop_copy_to_precopy_is_refused_before_the_kernel",
        "test_data_fd_waits_work_under_uvloop",
        "test_two_daemons_cancel_then_migrate_the_uart_state",
        "test_two_daemons_corrupted_stream",
        "test_p2p_order_forward_as_the_kernel_saw_it",
        "test_p2p_order_on_rollback_after_an_arc_failure",
        "test_p2p_order_on_rollback_after_a_cancel",
        "test_eight_mdevs_migrate_with_their_arcs_overlapping",
        "test_the_net_table_rows_complete_and_the_round_trip_follows_the_delay",
    ],
)
def test_mtty_scenario_passed_in_guest(guest: GuestSession, test_name: str) -> None:
    """Each mtty scenario ran in the guest and passed."""
    matches = {k: v for k, v in guest.outcomes.items() if k.endswith(f"::{test_name}")}
    assert matches, f"{test_name} did not run in the guest"
    assert all(outcome == "passed" for outcome, _ in matches.values()), matches


def scenario(guest: GuestSession, name: str) -> dict[str, Any]:
    """What the guest's two-daemon test recorded for ``name``; fails if it recorded nothing."""
    report = guest.results / "two_daemons.json"
    logs = guest.results / "two-daemons"
    where = f"(daemon logs under {logs})\n{guest.output[-4000:]}"
    if not report.is_file():
        pytest.fail(f"the guest's two-daemon tests left no {report.name} {where}")
    facts = json.loads(report.read_text()).get(name)
    if not facts:
        pytest.fail(f"the guest's two-daemon tests recorded no {name!r} scenario {where}")
    return dict(facts)


def test_two_daemons_migrate_carries_the_uart_content(guest: GuestSession) -> None:
    """`livemig migrate` between two daemons completed and the destination's FIFOs match."""
    facts = scenario(guest, "migrate")
    assert (facts.get("exit"), facts.get("status")) == (0, "completed"), (
        f"migrate exited {facts.get('exit')} with status {facts.get('status')}: "
        f"{facts.get('error')}"
    )
    before, after = facts["digests_before"], facts["digests_after"]
    assert before["source"] != before["destination"], "the two mdevs started out equal"
    assert after["destination"] == before["source"], f"digests: before {before}, after {after}"
    assert facts["destination_uart"] == facts["written"], (
        f"destination FIFOs {facts['destination_uart']}, written to the source {facts['written']}"
    )


def test_two_daemons_restart_keeps_the_migrated_source_stopped(guest: GuestSession) -> None:
    """After the migration, a source daemon stopped (SIGTERM) and started again finds its
    mdev still in STOP, recorded ``migrated away``; after the last stop the kernel still
    holds it in STOP: closing the daemon reset nothing."""
    facts = scenario(guest, "migrate")
    restarted = facts.get("source_after_restart") or {}
    assert (restarted.get("state"), restarted.get("owner")) == ("STOP", "migrated away"), facts
    assert facts.get("source_kernel_state") == "STOP", facts


def test_two_daemons_cancel_leaves_the_source_running(guest: GuestSession) -> None:
    """`livemig cancel` at pre-switchover returned the source to RUNNING, its state unchanged."""
    facts = scenario(guest, "cancel")
    assert facts.get("paused_status") == "pre-switchover", facts
    assert (facts.get("cancel_exit"), facts.get("cancel_status")) == (0, "cancelled"), facts
    assert facts["source_device"]["state"] == "RUNNING", facts["source_device"]
    assert facts["digest_after"] == facts["digests_before"]["source"], (
        "the source's registers or FIFOs changed across the cancelled migration"
    )
    assert facts["destination_device"]["state"] == "RUNNING", facts["destination_device"]


def test_two_daemons_corrupt_stream_fails_on_the_destination(guest: GuestSession) -> None:
    """A corrupt stream failed the destination (EFAULT); the source stayed intact."""
    facts = scenario(guest, "corrupt")
    assert (facts.get("exit"), facts.get("status")) == (1, "failed"), (
        f"migrate of a corrupt stream exited {facts.get('exit')} with {facts.get('status')}"
    )
    assert "tty0" in facts["error"], facts["error"]
    assert "EFAULT" in facts["error"], facts["error"]
    assert facts["source_device"]["state"] == "RUNNING", facts["source_device"]
    assert facts["digest_after"] == facts["digest_before"], (
        "the source's registers or FIFOs changed across the failed migration"
    )
    assert facts["destination_incoming"]["status"] == "failed", facts["destination_incoming"]
    assert (facts.get("retry_exit"), facts.get("retry_status")) == (0, "completed"), (
        f"the destination daemon did not take a good migration after the failure: "
        f"{facts.get('retry_error')}"
    )
    assert facts["destination_uart"] == facts["written"], (
        f"destination FIFOs {facts['destination_uart']}, written to the source {facts['written']}"
    )


def test_p2p_order_was_read_back_from_the_kernel(guest: GuestSession) -> None:
    """The P2P scenarios recorded each device's states as mtty reported them."""
    report = guest.results / "p2p_order.json"
    assert report.is_file(), guest.output[-4000:]
    facts = json.loads(report.read_text())
    print(json.dumps(facts, indent=1))
    assert set(facts) == {"forward", "rollback_arc_failure", "rollback_cancel"}, facts
    forward = facts["forward"]["histories"]
    for label in ("src:tty0", "src:tty1"):
        assert forward[label][:4] == ["RUNNING", "PRE_COPY", "PRE_COPY_P2P", "STOP_COPY"], forward


def test_eight_mdevs_arcs_overlapped(guest: GuestSession) -> None:
    """Eight mdevs' switchover SETs were in the kernel at once; the figures are printed."""
    report = guest.results / "arcs_overlap.json"
    assert report.is_file(), guest.output[-4000:]
    facts = json.loads(report.read_text())
    print(json.dumps(facts, indent=1))
    steps = facts["steps"]
    assert all(step["sets"] == facts["devices"] == 8 for step in steps.values()), steps
    assert max(step["concurrency"] for step in steps.values()) >= 2, steps


def test_net_table_was_made_in_the_guest(guest: GuestSession) -> None:
    """The real-network table (delay and loss need the guest's netem) came back; printed."""
    table = guest.results / "net_table.md"
    assert table.is_file(), guest.output[-4000:]
    print(table.read_text())
    assert table.read_text().count("| yes |") == len(table.read_text().splitlines()) - 2


def test_contract_suite_ran_against_vfio(guest: GuestSession) -> None:
    """The device contract suite ran against VfioDevice, most of it applicable to mtty."""
    contract = {k: v for k, v in guest.outcomes.items() if "test_vfio_contract" in k}
    passed = [k for k, (outcome, _) in contract.items() if outcome == "passed"]
    assert len(passed) >= 15, contract


# -- the uAPI constants against the guest kernel's own header ----------------------------


def _defines(header: str) -> dict[str, int]:
    """The integer #defines of vfio.h, _IO(VFIO_TYPE, VFIO_BASE + n) evaluated."""
    values: dict[str, int] = {}
    for name, body in re.findall(r"^#define\s+(\w+)\s+(.+?)\s*(?:/\*.*)?$", header, re.M):
        io = re.fullmatch(r"_IO\(VFIO_TYPE,\s*VFIO_BASE\s*\+\s*(\d+)\)", body)
        shift = re.fullmatch(r"\(\s*(\d+)\s*<<\s*(\d+)\s*\)", body)
        plain = re.fullmatch(r"\(?\s*(0x[0-9a-fA-F]+|\d+)\s*\)?", body)
        if io:
            values[name] = (ord(";") << 8) | (100 + int(io.group(1)))
        elif shift:
            values[name] = int(shift.group(1)) << int(shift.group(2))
        elif plain:
            values[name] = int(plain.group(1), 0)
        elif body == "(';')":
            values[name] = ord(";")
    return values


def _struct_format(header: str, name: str) -> str:
    """The struct module format of ``struct name`` in the header (fixed fields only)."""
    match = re.search(rf"struct {name} \{{(.*?)\n\}};", header, re.S)
    assert match, f"struct {name} not in vfio.h"
    codes = {"__u32": "I", "__s32": "i", "__u64": "Q", "__aligned_u64": "Q"}
    fields = re.findall(r"^\s*(__\w+)\s+(\w+)(\[\])?;", match.group(1), re.M)
    return "=" + "".join(codes[t] for t, _, flexible in fields if not flexible)


def test_constants_match_the_kernel_header(lab: lab_module.Lab) -> None:
    """devices/vfio/uapi.py's ioctls, flags, states and layouts equal the 6.12 vfio.h."""
    header = lab.vfio_header.read_text()
    defines = _defines(header)
    for name in [
        "VFIO_TYPE",
        "VFIO_BASE",
        "VFIO_GET_API_VERSION",
        "VFIO_CHECK_EXTENSION",
        "VFIO_SET_IOMMU",
        "VFIO_GROUP_GET_STATUS",
        "VFIO_GROUP_SET_CONTAINER",
        "VFIO_GROUP_GET_DEVICE_FD",
        "VFIO_DEVICE_GET_INFO",
        "VFIO_DEVICE_GET_REGION_INFO",
        "VFIO_DEVICE_RESET",
        "VFIO_DEVICE_FEATURE",
        "VFIO_MIG_GET_PRECOPY_INFO",
        "VFIO_API_VERSION",
        "VFIO_TYPE1v2_IOMMU",
        "VFIO_GROUP_FLAGS_VIABLE",
        "VFIO_GROUP_FLAGS_CONTAINER_SET",
        "VFIO_DEVICE_FEATURE_MASK",
        "VFIO_DEVICE_FEATURE_GET",
        "VFIO_DEVICE_FEATURE_SET",
        "VFIO_DEVICE_FEATURE_PROBE",
        "VFIO_DEVICE_FEATURE_MIGRATION",
        "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE",
        "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
        "VFIO_REGION_INFO_FLAG_READ",
        "VFIO_REGION_INFO_FLAG_WRITE",
    ]:
        assert getattr(vfio, name) == defines[name], name
    for feature in Feature:
        assert defines[f"VFIO_MIGRATION_{feature.name}"] == feature.value
    enum = re.search(r"enum vfio_device_mig_state \{(.*?)\};", header, re.S)
    assert enum
    states = dict(re.findall(r"VFIO_DEVICE_STATE_(\w+)\s*=\s*(\d+)", enum.group(1)))
    assert {name: int(value) for name, value in states.items()} == {s.name: s.value for s in State}
    layouts: dict[str, struct.Struct] = {
        "vfio_device_feature": vfio.FEATURE_HEADER,
        "vfio_device_feature_migration": vfio.MIGRATION_PAYLOAD,
        "vfio_device_feature_mig_state": vfio.MIG_STATE_PAYLOAD,
        "vfio_device_feature_mig_data_size": vfio.MIG_DATA_SIZE_PAYLOAD,
        "vfio_precopy_info": vfio.PRECOPY_INFO,
        "vfio_group_status": vfio.GROUP_STATUS,
        "vfio_region_info": vfio.REGION_INFO,
    }
    for name, layout in layouts.items():
        assert _struct_format(header, name) == layout.format, name


def test_lab_is_cached_by_package_versions(lab: lab_module.Lab) -> None:
    """The lab folder is named by the kernel and the versions it was built from."""
    assert lab.root.name.startswith(lab_module.KERNEL)
    assert Path(lab.root, "manifest.json").is_file()
    assert lab.manifest["kernel"] == lab_module.KERNEL

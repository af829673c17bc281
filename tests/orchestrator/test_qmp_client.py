"""QEMU's own QMP library (``qemu.qmp``) drives real livemig daemons as it drives QEMU."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.orchestrator.test_daemon import DEADLINE, Pair, start_pair


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """A source and a destination daemon sharing a pre-shared key."""
    async for running in start_pair(tmp_path):
        yield running


@pytest.fixture
async def qmp(pair: Pair) -> AsyncIterator[QMPClient]:
    """A ``qemu.qmp`` client connected (greeting read, capabilities negotiated) to the source."""
    client = QMPClient("livemig-source")
    await asyncio.wait_for(client.connect(str(pair.folder / "source.sock")), DEADLINE)
    yield client
    await client.disconnect()


def _uri(address: str) -> str:
    """QEMU's ``tcp:HOST:PORT`` form of a daemon's listen address."""
    return address if address.startswith("tcp:") else f"tcp:{address}"


async def test_qemu_qmp_connects_and_reads_the_greeting(qmp: QMPClient) -> None:
    """The library's greeting check and negotiation pass; commands answer."""
    assert qmp.greeting is not None
    assert qmp.greeting.QMP.version["package"].startswith("livemig ")
    daemon = await qmp.execute("query-daemon")
    assert isinstance(daemon, dict)
    assert daemon["name"] == "source"


async def test_qemu_qmp_migrates_by_uri_and_receives_the_events(pair: Pair, qmp: QMPClient) -> None:
    """``migrate {"uri": "tcp:..."}``, then MIGRATION events to completed, without subscribe."""
    with qmp.listener("MIGRATION") as listener:
        started = await qmp.execute("migrate", {"uri": _uri(pair.address)})
        assert isinstance(started, dict)
        statuses = []
        async with asyncio.timeout(DEADLINE):
            async for message in listener:
                statuses.append(message["data"]["status"])
                if message["data"]["status"] in ("completed", "failed", "cancelled"):
                    break
    assert statuses[0] == "setup"
    assert statuses[-1] == "completed", statuses
    info = await qmp.execute("query-migrate", {"id": started["id"]})
    assert isinstance(info, dict)
    assert info["status"] == "completed"
    assert info["downtime"] == round(info["downtime_ms"]) >= 0
    assert info["total-time"] == round(info["total_ms"]) > 0
    assert info["vfio"]["transferred"] == info["transferred_bytes"] > 0
    assert await pair.src.execute("query-digests") == await pair.dst.execute("query-digests")


async def test_qemu_parameter_names_and_units_through_qemu_qmp(qmp: QMPClient) -> None:
    """QEMU's flat parameter names and units are set, and read back beside livemig's."""
    await qmp.execute("migrate-set-parameters", {"downtime-limit": 40, "max-bandwidth": 5_000_000})
    params = await qmp.execute("query-migrate-parameters")
    assert isinstance(params, dict)
    assert (params["downtime_limit_ms"], params["downtime-limit"]) == (40, 40)
    assert (params["max_bandwidth"], params["max-bandwidth"]) == (5e6, 5_000_000)


async def test_errors_reach_qemu_qmp_with_their_class(qmp: QMPClient) -> None:
    """A refused command raises the library's ExecuteError carrying livemig's class and desc."""
    with pytest.raises(ExecuteError) as caught:
        await qmp.execute("migrate_cancel")
    assert caught.value.error_class == "MigrationNotFound"
    with pytest.raises(ExecuteError) as caught:
        await qmp.execute("migrate-set-parameters", {"compress-level": 1})
    assert caught.value.error_class == "InvalidParameter"
    assert "compress-level" in caught.value.error.error.desc

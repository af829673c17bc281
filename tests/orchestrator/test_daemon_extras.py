"""The daemon pair beyond the basics: Prometheus metrics and mutual TLS, as real processes.

Every wait is on a reply or an event from the daemons, bounded by a deadline; nothing
sleeps to let something happen, and nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.orchestrator.test_daemon import DEADLINE, DEVICES, running_pair, write_psk
from tests.pki import make_pki

NAMES = ("sim0", "idle0", "ram0")


def write_config(folder: Path, role: str, *, top: str = "", auth: str) -> Path:
    """A daemon config: extra top-level keys, an ``[auth]`` body, the test devices."""
    listen = '"127.0.0.1:0"' if role == "destination" else ""
    path = folder / f"{role}.toml"
    path.write_text(
        f'name = "{role}"\ncontrol_socket = "{role}.sock"\nlisten = [{listen}]\n{top}\n'
        f"[auth]\n{auth}\n" + DEVICES.format(rate=4 if role == "source" else 0)
    )
    return path


def scrape(url: str) -> dict[str, float]:
    """Every sample of a Prometheus endpoint, keyed ``name{label="value",...}``."""
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_count_a_completed_migration(tmp_path: Path) -> None:
    """After one migration the source's endpoint shows it started, completed, bytes, downtime."""
    write_psk(tmp_path / "psk", "a" * 32)
    source = write_config(
        tmp_path, "source", top='metrics = "127.0.0.1:0"', auth='psk_file = "psk"'
    )
    destination = write_config(tmp_path, "destination", auth='psk_file = "psk"')
    async with running_pair(tmp_path, source, destination) as pair:
        endpoints = (await pair.src.execute("query-daemon"))["metrics"]
        assert len(endpoints) == 1
        assert not endpoints[0].endswith(":0/metrics"), "the bound port, not the one asked for"
        before = await asyncio.to_thread(scrape, endpoints[0])
        assert before["livemig_migrations_started_total"] == 0
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 0, err
        stats = json.loads(out)
        after = await asyncio.to_thread(scrape, endpoints[0])
    assert after["livemig_migrations_started_total"] == 1
    assert after['livemig_migrations_finished_total{status="completed"}'] == 1
    assert after["livemig_sent_bytes_total"] == stats["transferred_bytes"] > 0
    assert stats["downtime_ms"] > 0
    # The stats give milliseconds rounded to the microsecond.
    assert after["livemig_last_downtime_seconds"] == pytest.approx(
        stats["downtime_ms"] / 1e3, abs=1e-6
    )
    assert after["livemig_migrations_in_flight"] == 0
    assert after["livemig_bandwidth_bytes_per_second"] == 0


def tls_auth(pki: Path, *, ca: str = "ca") -> str:
    """An ``[auth]`` body for mutual TLS with the host certificate, trusting ``ca``."""
    return (
        f'tls_cert = "{pki / "host.crt"}"\n'
        f'tls_key = "{pki / "host.key"}"\n'
        f'tls_ca = "{pki / f"{ca}.crt"}"\n'
    )


async def test_a_migration_over_mutual_tls_is_byte_exact(tmp_path: Path) -> None:
    """Two daemons authenticating by certificates alone migrate, and the digests match."""
    pki = make_pki(tmp_path / "pki", ("host",))
    source = write_config(tmp_path, "source", auth=tls_auth(pki))
    destination = write_config(tmp_path, "destination", auth=tls_auth(pki))
    async with running_pair(tmp_path, source, destination) as pair:
        assert (await pair.dst.execute("query-daemon"))["auth"] == "tls"
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 0, err
        assert json.loads(out)["status"] == "completed"
        assert await pair.states(pair.src) == dict.fromkeys(NAMES, "STOP")
        assert await pair.states(pair.dst) == dict.fromkeys(NAMES, "RUNNING")
        assert await pair.src.execute("query-digests") == await pair.dst.execute("query-digests")


async def test_a_destination_that_does_not_trust_the_source_fails_cleanly(
    tmp_path: Path,
) -> None:
    """A destination trusting another CA refuses the source's certificate; nothing moves."""
    pki = make_pki(tmp_path / "pki", ("host",))
    source = write_config(tmp_path, "source", auth=tls_auth(pki))
    destination = write_config(tmp_path, "destination", auth=tls_auth(pki, ca="other-ca"))
    async with running_pair(tmp_path, source, destination) as pair:
        before = await pair.src.execute("query-digests", devices=["idle0"])
        code, out, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 1, err
        assert json.loads(out)["status"] == "failed"
        assert "TLS" in err, err
        assert await pair.states(pair.src) == dict.fromkeys(NAMES, "RUNNING")
        assert await pair.states(pair.dst) == dict.fromkeys(NAMES, "RUNNING")
        assert await pair.src.execute("query-digests", devices=["idle0"]) == before
        assert await pair.dst.execute("query-migrations") == []

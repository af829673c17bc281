"""The control API over TCP: mutual TLS, an allow-list of subjects, an audit log.

Real daemon processes; every wait is on a reply or an event, bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.service.client import ControlClient
from orchestrator.service.config import ConfigError, parse
from orchestrator.service.protocol import ControlError
from tests.orchestrator.test_daemon import DEADLINE, ROOT, Pair, running_pair
from tests.orchestrator.test_daemon_extras import tls_auth, write_config
from tests.pki import make_pki
from transport.auth import client_tls_context

#: Leaves of the test PKI: the daemons' migration certificate, the destination's control
#: listener certificate, and an operator's client certificate.
LEAVES = ("host", "control", "fleet")


def control_table(pki: Path, *, allow: str = '["CN=fleet"]') -> str:
    """A ``[control]`` table: TLS listener on a free port, allowing ``allow``."""
    return (
        '[control]\ntcp = "127.0.0.1:0"\n'
        f'tls_cert = "{pki / "control.crt"}"\ntls_key = "{pki / "control.key"}"\n'
        f'tls_ca = "{pki / "ca.crt"}"\nallow = {allow}\n'
    )


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """Daemons migrating over mutual TLS; the destination also serves control over TLS."""
    pki = make_pki(tmp_path / "pki", LEAVES)
    source = write_config(tmp_path, "source", auth=tls_auth(pki))
    destination = write_config(tmp_path, "destination", top=control_table(pki), auth=tls_auth(pki))
    # write_config puts ``top`` before [auth]; the [control] table must not swallow it.
    text = destination.read_text()
    table = control_table(pki)
    destination.write_text(text.replace(table, "") + "\n" + table)
    async with running_pair(tmp_path, source, destination) as running:
        yield running


async def remote(pair: Pair) -> str:
    """The destination's TLS control address."""
    (address,) = (await pair.dst.execute("query-daemon"))["remote_control"]
    assert address.startswith("tcp:127.0.0.1:")
    return str(address)


async def livemig(*args: str) -> tuple[int, str, str]:
    """``livemig ARGS`` as a process; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    out, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def credentials(pki: Path, leaf: str, ca: str = "ca") -> list[str]:
    """The CLI's TLS options for client certificate ``leaf``."""
    return ["--ca", str(pki / f"{ca}.crt"), "--cert", str(pki / f"{leaf}.crt"),
            "--key", str(pki / f"{leaf}.key")]  # fmt: skip


async def test_an_allowed_operator_drives_the_daemon_and_is_audited(pair: Pair) -> None:
    """The CLI with the operator's certificate runs commands; each is logged with its subject."""
    pki = pair.folder / "pki"
    address = await remote(pair)
    code, out, err = await livemig(
        "devices", "--control", address, *credentials(pki, "fleet"), "--json"
    )
    assert code == 0, err
    assert {d["name"] for d in json.loads(out)} == {"sim0", "idle0", "ram0"}
    audit = [
        (entry["identity"], entry["command"])
        for entry in map(json.loads, pair.destination.output().splitlines())
        if entry["event"] == "control_command"
    ]
    assert [a for a in audit if not a[0].startswith("uid=")] == [("CN=fleet", "query-devices")]
    local = f"uid={os.getuid()}({pwd.getpwuid(os.getuid()).pw_name})"
    assert (local, "query-daemon") in audit, "the Unix socket's commands are audited too"


async def test_a_peer_daemons_migration_certificate_cannot_drive_it(pair: Pair) -> None:
    """Same CA, not on the allow-list: refused with the subject named, exit 5, and logged."""
    pki = pair.folder / "pki"
    address = await remote(pair)
    code, out, err = await livemig(
        "devices", "--control", address, *credentials(pki, "host"), "--json"
    )
    assert code == 5, err
    assert json.loads(out)["error"]["class"] == "PermissionDenied"
    assert "CN=host is not allowed" in err
    logged = [json.loads(line) for line in pair.destination.output().splitlines()]
    assert any(e["event"] == "remote_control_refused" for e in logged)
    assert not [e for e in logged if e.get("identity") == "CN=host" and "command" in e]


async def test_a_certificate_from_another_ca_fails_the_tls_handshake(pair: Pair) -> None:
    """A client the CA did not sign never reaches the protocol: exit 4, TLS named."""
    pki = pair.folder / "pki"
    address = await remote(pair)
    code, _, err = await livemig("devices", "--control", address, *credentials(pki, "other-ca"))
    assert code == 4, err
    assert "livemig devices:" in err


async def test_a_tcp_address_without_certificates_is_a_usage_error(pair: Pair) -> None:
    """The CLI will not try TCP without mutual TLS."""
    code, _, err = await livemig("devices", "--control", await remote(pair))
    assert code == 2
    assert "--ca and --cert" in err


async def test_events_reach_a_remote_client_without_subscribe(pair: Pair) -> None:
    """A TLS client gets the destination's events once negotiated, as QMP clients expect.

    (``qemu.qmp`` itself is not used over TLS here: on Python 3.11 its disconnect waits
    forever on an SSL transport, whose flow control pauses at a zero high-water mark.)
    """
    pki = pair.folder / "pki"
    context = client_tls_context(pki / "ca.crt", pki / "fleet.crt", pki / "fleet.key")
    async with await ControlClient.connect(await remote(pair), ssl_context=context) as client:
        code, _, err = await pair.cli("migrate", "--to", pair.address, "--json")
        assert code == 0, err
        incoming = await client.next_event(
            lambda m: m["event"] == "INCOMING_MIGRATION" and m["data"]["status"] == "completed",
            DEADLINE,
        )
    assert set(incoming["data"]["devices"]) == {"sim0", "idle0", "ram0"}


async def test_several_running_migrations_are_never_guessed(pair: Pair) -> None:
    """With two migrations running, commands without an id refuse and name both."""
    first = await pair.src.execute(
        "migrate",
        destination=pair.address,
        devices=["sim0"],
        parameters={"downtime_limit_ms": 0.001, "timeout_s": 120},
    )
    second = await pair.src.execute(
        "migrate",
        destination=pair.address,
        devices=["ram0"],
        parameters={"downtime_limit_ms": 0.001, "timeout_s": 120},
    )
    # Both past their first iterations (and the switchover-ack that wakes them): on Python
    # 3.11 a cancel that lands as that wakeup fires is lost (asyncio.wait_for swallows it).
    active: set[str] = set()
    while active != {first["id"], second["id"]}:
        event = await pair.src.next_event(
            lambda m: m["event"] == "MIGRATION_PASS" and m["data"]["iterations"] >= 3, DEADLINE
        )
        active.add(event["data"]["id"])
    for command in ("query-migrate", "migrate-cancel", "migrate-continue", "migrate-switchover"):
        with pytest.raises(ControlError) as caught:
            await pair.src.execute(command)
        assert caught.value.error_class == "InvalidParameter", command
        assert first["id"] in caught.value.desc
        assert second["id"] in caught.value.desc
    with pytest.raises(ControlError, match="give 'id'"):
        await pair.src.execute("migrate-set-parameters", parameters={"downtime_limit_ms": 5})
    code, out, err = await pair.cli("status", "--json")
    assert code == 0, err
    assert {m["migration_id"] for m in json.loads(out)["migrations"]} == active
    code, _, err = await pair.cli("cancel")
    assert code == 5
    assert first["id"] in err
    assert second["id"] in err
    for started in (first, second):
        await pair.src.execute("migrate-cancel", id=started["id"])
        await pair.src.next_event(
            lambda m, i=started["id"]: (
                m["event"] == "MIGRATION"
                and m["data"]["id"] == i
                and m["data"]["status"] == "cancelled"
            ),
            DEADLINE,
        )
    assert set((await pair.states(pair.src)).values()) == {"RUNNING"}


async def test_the_client_library_speaks_tls_too(pair: Pair) -> None:
    """ControlClient connects to tcp:HOST:PORT with a client context and runs commands."""
    pki = pair.folder / "pki"
    context = client_tls_context(pki / "ca.crt", pki / "fleet.crt", pki / "fleet.key")
    async with await ControlClient.connect(await remote(pair), ssl_context=context) as client:
        assert (await client.execute("query-daemon"))["name"] == "destination"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[control]\ntcp = "127.0.0.1:0"\nallow = ["CN=x"]\n', "needs mutual TLS"),
        ("[control]\ntcp = 'unix:/x'\n", "must be HOST:PORT"),
        (
            '[control]\ntcp = "127.0.0.1:0"\ntls_cert = "{pki}/control.crt"\n'
            'tls_key = "{pki}/control.key"\ntls_ca = "{pki}/ca.crt"\n',
            "missing required key 'allow'",
        ),
        (
            '[control]\ntcp = "127.0.0.1:0"\ntls_cert = "{pki}/control.crt"\n'
            'tls_key = "{pki}/control.key"\ntls_ca = "{pki}/ca.crt"\nallow = ["fleet"]\n',
            "must list the client certificate subjects",
        ),
        (
            '[control]\ntcp = "127.0.0.1:0"\ntls_cert = "{pki}/control.crt"\n'
            'tls_key = "{pki}/control.key"\ntls_ca = "{pki}/ca.crt"\nallow = ["XX=fleet"]\n',
            "is not NAME=value",
        ),
    ],
    ids=["no-tls", "unix", "no-allow", "allow-not-subjects", "allow-unknown-attribute"],
)
def test_the_tcp_listener_is_refused_without_tls_and_an_allow_list(
    tmp_path: Path, table: str, message: str
) -> None:
    """The config never yields a TCP control listener without mutual TLS and an allow-list."""
    pki = make_pki(tmp_path / "pki", LEAVES)
    with pytest.raises(ConfigError, match=message):
        parse(table.replace("{pki}", str(pki)), file=str(tmp_path / "d.toml"))

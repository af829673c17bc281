"""The daemon config: what it accepts, and errors that name the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.fsm import Feature
from devices.ram import RamDevice
from devices.simulated import SimulatedDevice
from orchestrator.engine.params import Policy
from orchestrator.service import config
from orchestrator.service.config import ConfigError

GOOD = """\
name = "src"
control_socket = "ctl.sock"
listen = ["127.0.0.1:7070", "unix:mig.sock"]
metrics = 9464

[auth]
psk_file = "psk"

[migration]
downtime_limit_ms = 50
policy = "throttle"

[[device]]
kind = "simulated"
name = "sim0"
state_mib = 1
dirty_mbps = 2
features = ["STOP_COPY", "P2P", "PRE_COPY"]

[[device]]
kind = "ram"
name = "ram0"
size_mib = 2
working_set_mib = 1
faults = { corrupt_validation = true }
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder holding a valid pre-shared key file."""
    psk = tmp_path / "psk"
    psk.write_text("0123456789abcdef0123456789abcdef\n")
    psk.chmod(0o600)
    return tmp_path


def load(folder: Path, text: str) -> config.DaemonConfig:
    path = folder / "livemig.toml"
    path.write_text(text)
    return config.load(path)


def refused(folder: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(folder, text)
    return caught.value


def test_a_good_config_maps_onto_params_auth_and_devices(folder: Path) -> None:
    """Every section lands where it belongs, paths resolved against the config's folder."""
    loaded = load(folder, GOOD)
    assert loaded.name == "src"
    assert loaded.control_socket == folder / "ctl.sock"
    assert loaded.listen == ("127.0.0.1:7070", f"unix:{folder / 'mig.sock'}")
    assert loaded.metrics == ("127.0.0.1", 9464)
    assert loaded.auth.psk == b"0123456789abcdef0123456789abcdef"
    assert loaded.migration.downtime_limit_ms == 50
    assert loaded.migration.policy is Policy.THROTTLE
    sim, ram = (d.build() for d in loaded.devices)
    assert isinstance(sim, SimulatedDevice)
    assert sim.state_size == 1 << 20
    assert sim.dirty_rate == 2e6
    assert sim.features == Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY
    assert isinstance(ram, RamDevice)
    assert ram.faults.corrupt_validation


@pytest.mark.parametrize(
    ("edit", "line", "message"),
    [
        (("[auth]", "[auth]\nbogus = 1"), 7, "auth.bogus: unknown key"),
        (('name = "src"', 'nmae = "src"'), 1, "nmae: unknown key (did you mean 'name'?)"),
        (("state_mib = 1", 'state_mib = "big"'), 16, "device[0].state_mib: must be an integer"),
        (("state_mib = 1", "state_mib = -1"), 16, "device[0].state_mib: must not be negative"),
        (('kind = "ram"', 'kind = "gpu"'), 21, "device[1].kind: unknown device kind 'gpu'"),
        (('name = "ram0"', 'name = "sim0"'), 22, "device[1].name: device name 'sim0' is already"),
        (("downtime_limit_ms = 50", "downtime_limit_ms = -5"), 10, "migration.downtime_limit_ms"),
        (("downtime_limit_ms = 50", "max_bandwith = 5"), 10, "did you mean 'max_bandwidth'"),
        (('policy = "throttle"', 'policy = "hope"'), 11, "migration.policy: parameter policy"),
        (('"unix:mig.sock"', '"mig.sock"'), 3, "listen: 'mig.sock': expected"),
        (("metrics = 9464", 'metrics = "unix:/x"'), 4, "metrics: the metrics endpoint is HTTP"),
        (('psk_file = "psk"', 'psk_file = "nope"'), 7, "auth.psk_file: cannot read"),
        (("dirty_mbps = 2", "dirty_mbps = 2\ndirty_rate = 5"), 18, "sets dirty_rate like"),
        (("features = [", 'features = ["WARP", '), 18, "unknown feature 'WARP'"),
        (("{ corrupt_validation = true }", "{ explode = true }"), 25, "unknown fault(s) explode"),
        (
            ("{ corrupt_validation = true }", '{ fail_read_after = "x" }'),
            25,
            "fail_read_after must be a byte count",
        ),
    ],
)
def test_each_mistake_is_named_with_its_key_and_line(
    folder: Path, edit: tuple[str, str], line: int | None, message: str
) -> None:
    """The error says which key is wrong, on which line, and why."""
    old, new = edit
    assert old in GOOD
    error = refused(folder, GOOD.replace(old, new, 1))
    assert error.line == line
    assert message in str(error)
    assert str(error).startswith(f"{folder / 'livemig.toml'}:{line}:" if line else str(folder))


def test_broken_toml_reports_the_parser_line(folder: Path) -> None:
    """A syntax error keeps tomllib's position."""
    error = refused(folder, GOOD.replace("[migration]", "[migration"))
    assert error.line == 9
    assert "not valid TOML" in str(error)


def test_a_psk_file_others_can_read_is_refused(folder: Path) -> None:
    """A key readable by group or others is refused with the fix in the message."""
    (folder / "psk").chmod(0o644)
    error = refused(folder, GOOD)
    assert "auth.psk_file" in str(error)
    assert "chmod 600" in str(error)


def test_a_short_psk_is_refused(folder: Path) -> None:
    """A key under 16 bytes is refused."""
    (folder / "psk").write_text("short\n")
    assert "a key needs 16 or more" in str(refused(folder, GOOD))


def test_tls_needs_a_ca(folder: Path) -> None:
    """A certificate without the CA that checks peers is refused at its key."""
    (folder / "cert.pem").write_text("x")
    error = refused(folder, GOOD.replace('psk_file = "psk"', 'tls_cert = "cert.pem"'))
    assert error.key == "auth.tls_cert"
    assert "tls_ca" in str(error)


def test_a_device_the_constructor_refuses_is_reported_at_its_table(folder: Path) -> None:
    """Arguments that only clash inside the constructor are reported at the [[device]] line."""
    loaded = load(folder, GOOD.replace("working_set_mib = 1", "working_set_mib = 3"))
    with pytest.raises(ConfigError) as caught:
        loaded.devices[1].build()
    assert caught.value.line == 20
    assert "device 'ram0': (ram) working set" in str(caught.value)


def test_a_vfio_device_needs_its_device_key(folder: Path) -> None:
    """A vfio entry without the device it opens is refused before anything is opened."""
    error = refused(folder, GOOD + '\n[[device]]\nkind = "vfio"\nname = "gpu0"\n')
    assert error.line == 27
    assert "missing required key 'device'" in str(error)


def test_the_examples_are_valid() -> None:
    """The shipped example configs load."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    for name in ("source.toml", "destination.toml"):
        loaded = config.load(examples / name)
        assert loaded.devices


def test_a_listener_off_loopback_needs_auth_or_insecure(folder: Path) -> None:
    """Listening on a non-loopback address without [auth] is refused, naming the fix."""
    text = 'control_socket = "c.sock"\nlisten = ["0.0.0.0:7070"]\n'
    with pytest.raises(ConfigError, match=r"d.toml:2: listen: 0.0.0.0:7070 is reachable"):
        config.parse(text, file=str(folder / "d.toml"))
    loose = config.parse(text + "[auth]\ninsecure = true\n", file=str(folder / "d.toml"))
    assert loose.auth.insecure
    for local in ("127.0.0.1:7070", "localhost:7070", "[::1]:7070", "unix:m.sock"):
        config.parse(f'control_socket = "c.sock"\nlisten = ["{local}"]\n', file="d.toml")


def test_the_state_file_defaults_beside_the_control_socket(folder: Path) -> None:
    """Without state_file the ownership records live next to the control socket."""
    parsed = config.parse(
        'name = "h1"\ncontrol_socket = "run/c.sock"\n[[device]]\nkind = "simulated"\n'
        'name = "x"\nstate_mib = 1\naccept_incoming = true\n',
        file=str(folder / "d.toml"),
    )
    assert parsed.state_file == folder / "run" / "h1.owners.json"
    assert parsed.devices[0].accept_incoming


def test_incoming_timeouts_come_from_the_daemon_table(folder: Path) -> None:
    """[daemon] handshake_timeout_s / idle_timeout_s reach incoming migrations, validated."""
    base = 'control_socket = "c.sock"\n[daemon]\n'
    parsed = config.parse(base + "idle_timeout_s = 2\n", file=str(folder / "d.toml"))
    assert parsed.incoming_timeouts == {"handshake_timeout_s": 10.0, "idle_timeout_s": 2.0}
    with pytest.raises(ConfigError, match=r"d.toml:3: daemon.handshake_timeout_s: must be"):
        config.parse(base + "handshake_timeout_s = 0\n", file=str(folder / "d.toml"))

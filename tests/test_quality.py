"""The code stays lint-clean, formatted and type-correct (ruff and mypy strict)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(command: list[str]) -> None:
    """The tool reports nothing on the whole tree."""
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_tools_are_the_pinned_versions() -> None:
    """ruff and mypy run at the versions the test extra pins (pip install -e '.[test]' if not)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["optional-dependencies"]["test"]:
        name, _, version = requirement.partition("==")
        if version:
            pins[name] = version
    assert {"ruff", "mypy"} <= set(pins)
    for name, version in pins.items():
        assert metadata.version(name) == version, name


#: The layers, lowest first: a module may import its own layer and those below it.
LAYERS = (
    "devices",
    "transport",
    "orchestrator.engine",
    "orchestrator.service",
    "orchestrator.cli",
    "orchestrator.bench",
)
#: Benchmarks: no production module imports them.
BENCH = "orchestrator.bench"
#: Production modules past MAX_LINES, each with the reason it stays whole.
LONG_MODULES: dict[str, str] = {
    "devices/paged.py": "one model: the paged device and its fault injection share every path",
    "devices/vfio_user/device.py": "one protocol client: the device and its message exchanges",
    "transport/frames.py": "the wire format's one description (its docstring) and pure codec",
    "orchestrator/service/service.py": "one owner table (devices, migrations both ways) and the "
    "events it emits: split, every half would reach into the other's records",
    "orchestrator/service/protocol.py": "the control protocol's one description (its "
    "docstring) and its pure core: requests, replies, events, argument checks",
    # Not split (issue 12): its seams (setup, pre-copy, switchover, rollback) are methods
    # of one object sharing ~20 attributes (session, tasks, meters, phases); mixins across
    # files would spread that state rather than divide the work. A follow-up.
    "orchestrator/engine/source.py": "one migration's state, shared by all its stages",
    "devices/vfio/device.py": "one device's FSM over the kernel: arcs, recovery, the optional "
    "queries and region I/O share its fds, its state and its arc pool",
    "transport/session.py": "one state: routing what arrives, sending, liveness, teardown",
}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Every module of the three packages by dotted name."""
    found = {}
    for package in ("devices", "transport", "orchestrator"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] in ("__init__", "__main__"):
                parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join(parts)] = path
    return found


def _layer(module: str) -> int | None:
    """The index in LAYERS of the layer ``module`` belongs to (None: not layered)."""
    for index in range(len(LAYERS) - 1, -1, -1):
        if module == LAYERS[index] or module.startswith(LAYERS[index] + "."):
            return index
    return None


def _imports(path: Path, module: str) -> set[str]:
    """The modules ``path`` imports anywhere (functions and TYPE_CHECKING blocks too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_no_lower_layer_imports_a_higher_one() -> None:
    """devices <- transport <- engine <- service <- cli, and only benchmarks import bench."""
    wrong = []
    modules = _modules()
    for module, path in modules.items():
        own = _layer(module)
        for imported in _imports(path, module):
            theirs = _layer(imported)
            if own is not None and theirs is not None and theirs > own:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))
    assert {m for m in modules if _layer(m) is None} <= {"orchestrator"}


def test_no_production_module_imports_a_benchmark_when_loaded() -> None:
    """Importing every production module (and running ``livemig --help``) loads no benchmark."""
    production = [m for m in _modules() if not m.startswith(BENCH) and not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {production!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({BENCH!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_production_modules_stay_short() -> None:
    """No production module is past MAX_LINES lines unless LONG_MODULES says why (and the
    list names none that is short)."""
    long = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for module, path in _modules().items()
        if not module.startswith(BENCH)
    }
    long = {path: lines for path, lines in long.items() if lines > MAX_LINES}
    assert set(long) <= set(LONG_MODULES), long
    assert set(LONG_MODULES) <= set(long), "listed but short now (drop them from the list)"


def test_the_transport_knows_nothing_of_devices() -> None:
    """The transport carries opaque frames: no transport module imports devices."""
    wrong = [
        f"{module} imports {imported}"
        for module, path in _modules().items()
        if module.startswith("transport")
        for imported in _imports(path, module)
        if imported == "devices" or imported.startswith("devices.")
    ]
    assert not wrong, "\n".join(wrong)

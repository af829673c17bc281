"""The code stays lint-clean, formatted and type-correct (ruff and mypy strict)."""

from __future__ import annotations

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

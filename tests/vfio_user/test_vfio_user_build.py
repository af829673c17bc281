"""The build of the vfio-user servers: cached by content, skipped or failed when impossible."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vfio_user import build


def test_a_missing_tarball_skips_with_the_reason_on_a_clone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the tarball and outside CI, tests skip and say where it was looked for."""
    monkeypatch.setenv("LIVEMIG_LIBVFIO_USER_TARBALL", str(tmp_path / "absent.tar.gz"))
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(build, "_built", None)
    with pytest.raises(pytest.skip.Exception, match=r"tarball not found at .*absent\.tar\.gz"):
        build.servers()


def test_a_missing_tarball_fails_under_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CI the same situation fails the test: CI never passes by skipping."""
    monkeypatch.setenv("LIVEMIG_LIBVFIO_USER_TARBALL", str(tmp_path / "absent.tar.gz"))
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(build, "_built", None)
    with pytest.raises(pytest.fail.Exception, match="unavailable under CI: libvfio-user tarball"):
        build.servers()


def test_builds_are_cached_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second build of the same tarball and testdev.c is the cached one, and runs."""
    first = build.servers()
    monkeypatch.setattr(build, "_built", None)
    again = build.build()
    assert again == first
    assert first.testdev.is_file()
    assert first.sample.resolve().is_file()
    assert first.testdev.parent.name == build._key(build.tarball())

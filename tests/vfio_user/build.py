"""Build the vendored libvfio-user, its sample server and livemig's test device, once.

The tarball is ``$LIVEMIG_LIBVFIO_USER_TARBALL``, else ``../shared/vendor/`` next to
the repository (see that folder's README for the recipe and the quirks). Builds are
cached under ``$LIVEMIG_LAB_CACHE/vfio-user`` (or ``~/.cache/livemig-vfio-user``),
keyed by a hash of the tarball, ``testdev.c`` and this recipe, so a warm run costs a
hash. Missing Debian build packages are apt-installed when running as root.

:func:`servers` is what tests call: on a user's clone without the tarball or the
packages it skips with the reason; under CI (``$CI`` set) it fails instead, so a CI
run never passes by skipping. CLI: ``python -m tests.vfio_user.build``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_TARBALL = ROOT.parent / "shared" / "vendor" / "libvfio-user-efd091bc.tar.gz"
PACKAGES = ("meson", "ninja-build", "libjson-c-dev", "libcmocka-dev", "pkg-config", "gcc")
#: Bump when the steps below change, so cached builds are redone.
RECIPE = "2"


class BuildError(Exception):
    """The servers could not be built; the message says which step and why."""


@dataclass(frozen=True)
class Servers:
    """The built executables."""

    #: livemig's test device (tests/vfio_user/testdev.c).
    testdev: Path
    #: The library's samples/server, with BAR1 made a power of two.
    sample: Path


def tarball() -> Path:
    """Where the vendored tarball is expected."""
    configured = os.environ.get("LIVEMIG_LIBVFIO_USER_TARBALL")
    return Path(configured) if configured else DEFAULT_TARBALL


def cache_root() -> Path:
    """``$LIVEMIG_LAB_CACHE/vfio-user`` or ``~/.cache/livemig-vfio-user``."""
    configured = os.environ.get("LIVEMIG_LAB_CACHE")
    if configured:
        return Path(configured) / "vfio-user"
    return Path.home() / ".cache" / "livemig-vfio-user"


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, check=False, env=env, timeout=600
        )
    except FileNotFoundError as exc:
        raise BuildError(f"{what}: {argv[0]} is not installed") from exc
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise BuildError(f"{what} failed (exit {result.returncode}): {' '.join(argv)}\n{tail}")


def _missing_packages() -> list[str]:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\\t${db:Status-Abbrev}\\n", *PACKAGES],
        capture_output=True,
        text=True,
        check=False,
    )
    installed = {
        line.split("\t")[0]
        for line in result.stdout.splitlines()
        if line.split("\t")[1].startswith("ii")
    }
    return [p for p in PACKAGES if p not in installed]


def ensure_packages() -> None:
    """apt-get install the build packages that are missing (none on a warm machine)."""
    if shutil.which("dpkg-query") is None:
        raise BuildError(f"not a Debian system: install {', '.join(PACKAGES)} by hand")
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError(f"needs packages {missing} and only root can apt-get install them")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    _run(["apt-get", *lock, "update", "-q"], "apt-get update")
    _run(
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *missing],
        "apt-get install",
    )
    still = _missing_packages()
    if still:
        raise BuildError(f"packages still missing after apt-get install: {still}")


def _key(source: Path) -> str:
    digest = hashlib.sha256(RECIPE.encode())
    for path in (source, HERE / "testdev.c"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(source: Path | None = None) -> Servers:
    """Build (or find in the cache) the servers from the tarball ``source``."""
    source = source or tarball()
    if not source.is_file():
        raise BuildError(
            f"libvfio-user tarball not found at {source} "
            "(set LIVEMIG_LIBVFIO_USER_TARBALL to the vendored libvfio-user-*.tar.gz)"
        )
    out = cache_root() / _key(source)
    servers = Servers(out / "testdev", out / "sample-server")
    if servers.testdev.exists() and servers.sample.exists():
        return servers
    ensure_packages()
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if servers.testdev.exists() and servers.sample.exists():
            return servers
        work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_root()))
        try:
            _compile(source, work)
            work.rename(out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return servers


def _compile(source: Path, work: Path) -> None:
    tree = work / "src"
    tree.mkdir()
    with tarfile.open(source) as archive:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse odd members
            archive.extractall(tree, filter="data")
        else:
            archive.extractall(tree)  # older 3.11: the vendored tarball is ours
    sample = tree / "samples" / "server.c"
    text = sample.read_text()
    # At efd091bc the sample refuses to start: BAR1 must be a power of two (upstream
    # later made it 0x4000 too). Its mmap areas stay the first and third pages.
    if "const size_t bar1_size = 0x3000;" not in text:
        raise BuildError(f"{sample}: the BAR1 size this recipe patches is not there")
    sample.write_text(text.replace("bar1_size = 0x3000;", "bar1_size = 0x4000;"))
    _run(["meson", "setup", "build"], "meson setup", cwd=tree)
    _run(["ninja", "-C", "build"], "ninja", cwd=tree)
    lib = tree / "build" / "lib"
    _run(
        [
            "gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
            f"-I{tree / 'include'}", "-o", str(work / "testdev"), str(HERE / "testdev.c"),
            f"-L{lib}", "-lvfio-user", "-lpthread", "-Wl,-rpath,$ORIGIN/src/build/lib",
        ],
        "compiling testdev.c",
    )  # fmt: skip
    # Both find the library by an $ORIGIN-relative rpath, so the folder can move.
    (work / "sample-server").symlink_to("src/build/samples/server")


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"vfio-user servers unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"vfio-user servers unavailable: {reason}")


_built: Servers | None = None


def servers() -> Servers:
    """The built servers for a test; skips (fails under CI) when they cannot be built."""
    global _built
    if _built is None:
        try:
            _built = build()
        except BuildError as exc:
            _unavailable(str(exc))
    return _built


if __name__ == "__main__":
    print(build())

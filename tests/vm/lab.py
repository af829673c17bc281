"""The mtty VFIO lab: a Debian 6.12 kernel with the mtty sample driver in a TCG guest.

This machine has no /dev/vfio and no KVM, so the real VFIO backend is proven inside a
QEMU guest whose kernel runs the kernel's own ``samples/vfio-mdev/mtty.c`` driver
(migration uAPI v2 with STOP_COPY, P2P and PRE_COPY). Everything is built from Debian
packages into a cache directory keyed by their versions and re-used when present:

* ``build()`` apt-installs what is missing (checked with dpkg first, so a warm machine
  installs nothing), extracts mtty.c and vfio.h from linux-source, builds mtty.ko out of
  tree, debootstraps a bookworm root with python3, kmod and iproute2, adds the kernel's modules
  and a small PID 1, and makes an ext4 image. The project's Python dependencies are
  downloaded as cp311 wheels and unpacked into a folder shared with the guest.
* ``run()`` boots the guest with the checkout (read-only), the dependencies
  (read-only) and a per-run results folder (read-write) shared over 9p. The guest
  loads vfio, mdev and mtty, creates the mdevs of ``MDEVS`` with known UUIDs, runs a
  shell script and powers off; the exit code and output come back through the results
  folder, never scraped from the console.

Any step that cannot be done raises :class:`LabError` with what failed: the lab never
skips. CLI: ``python -m tests.vm.lab build`` and ``python -m tests.vm.lab run -- CMD``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

ROOT = Path(__file__).resolve().parents[2]

#: The guest kernel: Debian bookworm's 6.12 LTS build, which has mtty's PRE_COPY.
KERNEL = "6.12.107+deb12-amd64"
#: linux-source is pinned to the kernel's own version so mtty.c matches the headers.
SOURCE_VERSION = "6.12.107-1~deb12u1"
#: Debian packages the lab needs on the host; the headers pull in the signed image.
PACKAGES: tuple[str, ...] = (
    "qemu-system-x86",
    f"linux-image-{KERNEL}",
    f"linux-headers-{KERNEL}",
    "linux-source-6.12",
    "debootstrap",
    "e2fsprogs",
    "make",
)
#: Packages whose versions decide what the cached image contains.
KEY_PACKAGES: tuple[str, ...] = (
    f"linux-image-{KERNEL}",
    f"linux-headers-{KERNEL}",
    "linux-source-6.12",
    "debootstrap",
)
#: Bump when the build recipe changes in a way the package versions do not show.
RECIPE = 2
#: Bump when the way the guest's dependency folder is made changes.
DEPS_RECIPE = 2
#: Test tools the in-guest pytest session needs besides the runtime dependencies.
GUEST_TEST_DEPS: tuple[str, ...] = ("pytest", "pytest-asyncio", "pytest-timeout", "hypothesis")
#: UUIDs of the lab's mdevs: this prefix and four hex digits.
_UUID_PREFIX = "83b8f4f2-509f-382f-3c1e-e6bfe0fa"
#: How many single-port mdevs migrate at once in the arcs-overlap test (and as targets).
PERF_DEVICES = 8
#: The mdevs every guest gets, as (name, UUID, mdev type). ``src``/``dst`` and
#: ``src2``/``dst2`` are dual-port (the two-device P2P tests); ``perf_srcN``/``perf_dstN``
#: are single-port, for the eight-device test. mtty shares 24 ports among all its
#: mdevs (MAX_MTTYS; ``available_instances`` is what is left divided by the type's
#: ports), and these use all of them: 4 x 2 + 16 x 1.
MDEVS: tuple[tuple[str, str, str], ...] = (
    ("src", f"{_UUID_PREFIX}1001", "mtty-2"),
    ("dst", f"{_UUID_PREFIX}1002", "mtty-2"),
    ("src2", f"{_UUID_PREFIX}1003", "mtty-2"),
    ("dst2", f"{_UUID_PREFIX}1004", "mtty-2"),
    *((f"perf_src{i}", f"{_UUID_PREFIX}11{i:02x}", "mtty-1") for i in range(PERF_DEVICES)),
    *((f"perf_dst{i}", f"{_UUID_PREFIX}12{i:02x}", "mtty-1") for i in range(PERF_DEVICES)),
)

#: PID 1 of the guest: mount the shares, run the per-run script, power off whatever happens.
GUEST_INIT = """\
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
modprobe 9pnet_virtio && modprobe 9p
for tag in project deps results; do
    mkdir -p /$tag
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 $tag /$tag \
        || echo "livemig-lab: cannot mount $tag"
done
if [ -f /results/.lab/guest.sh ]; then
    /bin/sh /results/.lab/guest.sh > /results/.lab/guest.log 2>&1
else
    echo "livemig-lab: /results/.lab/guest.sh missing"
fi
sync
umount /results
echo o > /proc/sysrq-trigger
sleep 30
"""

#: Per-run script (written into the results folder): set up VFIO and mtty, run the command.
GUEST_SCRIPT = """\
set -u
exec 2>&1
date +%s.%N > /results/.lab/started
for m in vfio vfio_iommu_type1 mdev mtty; do
    modprobe $m || {{ echo "livemig-lab: modprobe $m failed"; \
        echo 97 > /results/.lab/exit_code; exit; }}
done
types=/sys/devices/virtual/mtty/mtty/mdev_supported_types
for spec in {mdevs}; do
    uuid=${{spec%:*}}; type=${{spec#*:}}
    echo $uuid > $types/$type/create || {{ left=$(cat $types/$type/available_instances); \
        echo "livemig-lab: cannot create $type mdev $uuid ($left available)"; \
        echo 98 > /results/.lab/exit_code; exit; }}
done
# Loopback up (there is no init system to do it), for daemons talking over 127.0.0.1.
python3 -c 'import fcntl, socket, struct
fcntl.ioctl(socket.socket(), 0x8914, struct.pack("16sH", b"lo", 0x41))' \
    || echo "livemig-lab: cannot bring lo up"
{exports}
cd /tmp
/bin/sh /results/.lab/command.sh > /results/.lab/output.log 2>&1
echo $? > /results/.lab/exit_code
date +%s.%N > /results/.lab/finished
"""


class LabError(RuntimeError):
    """The lab could not be built or the guest did not run the command to its end."""


@dataclass(frozen=True)
class Lab:
    """A built lab: the cached image plus the guest's Python dependencies."""

    root: Path
    image: Path
    deps: Path
    source: Path
    manifest: Mapping[str, object]

    @property
    def vfio_header(self) -> Path:
        """include/uapi/linux/vfio.h of the guest kernel, extracted from linux-source."""
        return self.source / "vfio.h"


@dataclass(frozen=True)
class RunResult:
    """What a guest run left: the command's exit code and output, and where to find more."""

    returncode: int
    output: str
    results: Path
    console: Path
    seconds: float
    guest_seconds: float | None = None


def cache_root() -> Path:
    """Where labs are cached: ``$LIVEMIG_LAB_CACHE`` or ``~/.cache/livemig-lab``."""
    configured = os.environ.get("LIVEMIG_LAB_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "livemig-lab"


def _run(argv: Sequence[str], *, what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a build command; on failure raise LabError with its output's tail."""
    try:
        result = subprocess.run(  # type: ignore[call-overload]
            list(argv), capture_output=True, text=True, check=False, **kwargs
        )
    except FileNotFoundError as exc:
        raise LabError(f"{what}: {argv[0]} is not installed ({exc})") from exc
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise LabError(f"{what} failed (exit {result.returncode}): {shlex.join(argv)}\n{tail}")
    return result  # type: ignore[no-any-return]


@contextlib.contextmanager
def _step(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time one build step and log it."""
    started = time.monotonic()
    log.info("lab_step_started", step=name)
    yield
    timings[name] = round(time.monotonic() - started, 1)
    log.info("lab_step_done", step=name, seconds=timings[name])


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise builds sharing one cache (two pytest runs, CI and a developer)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _package_versions(packages: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each package, None when it is not installed."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\\t${db:Status-Abbrev}\\t${Version}\\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    versions: dict[str, str | None] = dict.fromkeys(packages)
    for line in result.stdout.splitlines():
        name, status, version = line.split("\t")
        if status.startswith("ii"):
            versions[name] = version
    return versions


def ensure_packages(timings: dict[str, float]) -> dict[str, str]:
    """Install the missing host packages (none on a warm machine); return all versions."""
    wanted = {p: (SOURCE_VERSION if p == "linux-source-6.12" else None) for p in PACKAGES}
    versions = _package_versions(PACKAGES)
    missing = [
        p for p, v in versions.items() if v is None or (wanted[p] is not None and v != wanted[p])
    ]
    if missing:
        if os.geteuid() != 0:
            raise LabError(f"lab needs packages {missing} and only root can apt-get install them")
        specs = [f"{p}={wanted[p]}" if wanted[p] else p for p in missing]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with _step(timings, "apt"):
            wait_lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt may be running
            _run(["apt-get", *wait_lock, "update", "-q"], what="apt-get update", env=env)
            _run(
                ["apt-get", *wait_lock, "install", "-y", "-q", "--no-install-recommends", *specs],
                what="apt-get install",
                env=env,
            )
        versions = _package_versions(PACKAGES)
    absent = [p for p, v in versions.items() if v is None]
    if absent:
        raise LabError(f"packages still missing after apt-get install: {absent}")
    return {p: v for p, v in versions.items() if v is not None}


def _key(versions: Mapping[str, str]) -> str:
    """Cache key: the kernel plus a hash of the package versions and the recipe."""
    material = json.dumps(
        {
            "recipe": RECIPE,
            "init": GUEST_INIT,
            "packages": {p: versions[p] for p in KEY_PACKAGES},
        },
        sort_keys=True,
    )
    return f"{KERNEL}-{hashlib.sha256(material.encode()).hexdigest()[:12]}"


def _extract_sources(into: Path) -> None:
    """Take mtty.c and vfio.h from the linux-source tarball (one xz pass, ~15 s)."""
    tarball = Path("/usr/src/linux-source-6.12.tar.xz")
    members = ["samples/vfio-mdev/mtty.c", "include/uapi/linux/vfio.h"]
    with tempfile.TemporaryDirectory(dir=into.parent) as tmp:
        _run(
            ["tar", "-xJf", str(tarball), "-C", tmp, *[f"linux-source-6.12/{m}" for m in members]],
            what="extract mtty.c and vfio.h from linux-source",
        )
        into.mkdir()
        for member in members:
            shutil.copy(Path(tmp, "linux-source-6.12", member), into / Path(member).name)


def _build_module(source: Path, into: Path) -> Path:
    """Build mtty.ko out of tree against the guest kernel's headers."""
    into.mkdir()
    shutil.copy(source / "mtty.c", into / "mtty.c")
    (into / "Kbuild").write_text("obj-m := mtty.o\n")
    _run(
        ["make", "-C", f"/usr/src/linux-headers-{KERNEL}", f"M={into}", "modules"],
        what="build mtty.ko",
    )
    module = into / "mtty.ko"
    if not module.is_file():
        raise LabError(f"build mtty.ko: make succeeded but {module} is missing")
    return module


def _mirror() -> str:
    """The Debian mirror apt already uses on this host (debootstrap needs the same)."""
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        deb822 = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.MULTILINE)
        one_line = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+bookworm\b", text, re.M)
        for match in (deb822, one_line):
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def _make_rootfs(into: Path, module: Path) -> None:
    """Debootstrap a bookworm root (python3, kmod, iproute2), the kernel's modules, PID 1."""
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,kmod,iproute2",
            "bookworm",
            str(into),
            _mirror(),
        ],
        what="debootstrap bookworm",
    )
    modules = into / "usr/lib/modules" / KERNEL
    modules.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path("/lib/modules") / KERNEL, modules, symlinks=True)
    for link in ("build", "source"):  # point into the host's /usr/src; useless in the guest
        (modules / link).unlink(missing_ok=True)
    (modules / "extra").mkdir(exist_ok=True)
    shutil.copy(module, modules / "extra" / "mtty.ko")
    _run(["depmod", "-b", str(into), KERNEL], what="depmod in the guest root")
    init = into / "sbin/livemig-lab-init"
    init.write_text(GUEST_INIT)
    init.chmod(0o755)
    # apt's downloaded .debs are not needed in the image.
    for deb in (into / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def _make_image(rootfs: Path, image: Path) -> None:
    """An ext4 image of the root (sparse, 1 GiB) made without mounting anything."""
    _run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "lablab", "-d", str(rootfs), str(image), "1G"],
        what="mke2fs the guest image",
    )


def _check_initrd() -> None:
    """The guest boots the host's initrd; it must carry virtio_blk and ext4 to find its root."""
    initrd = Path(f"/boot/initrd.img-{KERNEL}")
    if not initrd.is_file():
        raise LabError(f"{initrd} is missing: the linux-image postinst did not build it")
    listing = _run(["lsinitramfs", str(initrd)], what="list the initrd").stdout
    for needed in ("virtio_blk.ko", "ext4.ko"):
        if needed not in listing:
            raise LabError(
                f"{initrd} lacks {needed} (initramfs-tools MODULES=dep?); "
                "set MODULES=most in /etc/initramfs-tools and run update-initramfs -u"
            )


def guest_requirements() -> list[str]:
    """The runtime dependencies from pyproject.toml plus the in-guest test tools."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *GUEST_TEST_DEPS]


def ensure_deps(root: Path, timings: dict[str, float]) -> Path:
    """Download cp311 manylinux wheels and unpack them into a folder for PYTHONPATH."""
    requirements = guest_requirements()
    material = "\n".join([str(DEPS_RECIPE), *sorted(requirements)])
    digest = hashlib.sha256(material.encode()).hexdigest()[:12]
    site = root / f"deps-{digest}" / "site"
    if site.is_dir():
        return site
    with _step(timings, "wheels"), tempfile.TemporaryDirectory(dir=root) as tmp:
        wheels = Path(tmp, "wheels")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--platform",
                "manylinux2014_x86_64",
                "-d",
                str(wheels),
                *requirements,
            ],
            what="pip download of the guest's wheels",
        )
        staged = Path(tmp, "site")
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(staged)
        # Byte-compile here: under TCG the guest takes ~15 s to compile pytest and
        # hypothesis on every boot, and it cannot cache them on a read-only share.
        _run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", str(staged)],
            what="byte-compile the guest's dependencies",
        )
        site.parent.mkdir(exist_ok=True)
        staged.rename(site)
    return site


def build(root: Path | None = None) -> Lab:
    """Build the lab (or find it in the cache) and return it; raise LabError if impossible."""
    root = root or cache_root()
    timings: dict[str, float] = {}
    started = time.monotonic()
    with _locked(root):
        versions = ensure_packages(timings)
        lab_dir = root / _key(versions)
        manifest_path = lab_dir / "manifest.json"
        if not manifest_path.is_file():
            _check_initrd()
            shutil.rmtree(lab_dir, ignore_errors=True)  # a build that died half-way
            lab_dir.mkdir(parents=True)
            with _step(timings, "extract"):
                _extract_sources(lab_dir / "src")
            with _step(timings, "module"):
                module = _build_module(lab_dir / "src", lab_dir / "mtty")
            with _step(timings, "debootstrap"):
                _make_rootfs(lab_dir / "rootfs", module)
            with _step(timings, "image"):
                _make_image(lab_dir / "rootfs", lab_dir / "rootfs.ext4")
            manifest_path.write_text(
                json.dumps({"kernel": KERNEL, "packages": versions, "timings": timings}, indent=2)
            )
        deps = ensure_deps(root, timings)
    manifest = json.loads(manifest_path.read_text())
    log.info("lab_ready", lab=str(lab_dir), seconds=round(time.monotonic() - started, 1), **timings)
    return Lab(lab_dir, lab_dir / "rootfs.ext4", deps, lab_dir / "src", manifest)


def guest_env() -> dict[str, str]:
    """The environment the guest command gets (also describes the guest to tests)."""
    env = {
        "PYTHONPATH": "/project:/deps",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
        "LIVEMIG_IN_GUEST": "1",
        "LIVEMIG_LAB_RESULTS": "/results",
    }
    for name, uuid, _ in MDEVS:
        env[f"LIVEMIG_MDEV_{name.upper()}"] = uuid
    return env


def run(
    lab: Lab,
    command: str,
    *,
    results: Path | None = None,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    memory_mb: int = 1024,
) -> RunResult:
    """Boot the guest, run the shell ``command`` in it and return what it reported.

    ``command`` is a /bin/sh script run in /tmp with the checkout at /project
    (read-only), the dependencies at /deps and ``results`` (a fresh folder by default)
    at /results, where it may leave files for the host. The mdevs of ``MDEVS``
    exist and their UUIDs are in ``$LIVEMIG_MDEV_<NAME>`` (``$LIVEMIG_MDEV_SRC`` ...). The
    root disk is a snapshot: nothing the guest writes there survives the run. Raises
    LabError if the guest did not run the command to its end within ``timeout``.
    """
    if results is None:
        (lab.root.parent / "runs").mkdir(exist_ok=True)
        results = Path(tempfile.mkdtemp(prefix="run-", dir=lab.root.parent / "runs"))
    control = results / ".lab"
    control.mkdir(parents=True, exist_ok=True)
    for stale in control.iterdir():
        stale.unlink()
    exports = "\n".join(
        f"export {k}={shlex.quote(v)}" for k, v in {**guest_env(), **(env or {})}.items()
    )
    (control / "guest.sh").write_text(
        GUEST_SCRIPT.format(
            mdevs=" ".join(f"{uuid}:{kind}" for _, uuid, kind in MDEVS), exports=exports
        )
    )
    (control / "command.sh").write_text(command + "\n")
    console = control / "console.log"
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-m",
        str(memory_mb),
        "-smp",
        "2",
        "-serial",
        f"file:{console}",
        "-kernel",
        f"/boot/vmlinuz-{KERNEL}",
        "-initrd",
        f"/boot/initrd.img-{KERNEL}",
        "-append",
        "console=ttyS0 root=/dev/vda rw init=/sbin/livemig-lab-init panic=-1 quiet",
        "-drive",
        f"file={lab.image},if=virtio,format=raw,snapshot=on",
    ]
    shares = {"project": (ROOT, True), "deps": (lab.deps, True), "results": (results, False)}
    for tag, (path, readonly) in shares.items():
        spec = f"local,path={path},mount_tag={tag},security_model=none"
        argv += ["-virtfs", spec + (",readonly=on" if readonly else "")]
    started = time.monotonic()
    log.info("lab_boot", results=str(results))
    try:
        boot = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(
            f"guest did not power off within {timeout:.0f} s; console tail:\n{_tail(console)}"
        ) from exc
    except FileNotFoundError as exc:
        raise LabError("qemu-system-x86_64 is not installed: run build() first") from exc
    seconds = time.monotonic() - started
    exit_file = control / "exit_code"
    if boot.returncode != 0 or not exit_file.is_file():
        guest_log = control / "guest.log"
        raise LabError(
            f"guest did not run the command to its end (qemu exit {boot.returncode}) "
            f"{boot.stderr.strip()}\nguest log:\n{_tail(guest_log)}\nconsole tail:\n"
            f"{_tail(console)}"
        )
    guest_seconds = None
    if (control / "finished").is_file():
        guest_seconds = float((control / "finished").read_text()) - float(
            (control / "started").read_text()
        )
    result = RunResult(
        returncode=int(exit_file.read_text()),
        output=(control / "output.log").read_text(errors="replace"),
        results=results,
        console=console,
        seconds=seconds,
        guest_seconds=guest_seconds,
    )
    log.info(
        "lab_run_done",
        returncode=result.returncode,
        seconds=round(seconds, 1),
        command_seconds=None if guest_seconds is None else round(guest_seconds, 2),
    )
    return result


def _tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file, or a note that it is missing."""
    if not path.is_file():
        return f"({path} missing)"
    return path.read_text(errors="replace")[-chars:]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``build`` prints the lab folder; ``run -- CMD`` boots a guest and runs CMD."""
    parser = argparse.ArgumentParser(prog="python -m tests.vm.lab", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("build", help="build the lab into the cache (or find it there)")
    runner = sub.add_parser("run", help="boot the guest and run a shell command in it")
    runner.add_argument("--timeout", type=float, default=600.0)
    runner.add_argument("--results", type=Path, help="folder shared as /results")
    runner.add_argument("command", nargs=argparse.REMAINDER, help="shell command (after --)")
    args = parser.parse_args(argv)
    try:
        lab = build()
        if args.action == "build":
            print(lab.root)
            return 0
        words = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not words:
            parser.error("run needs a command")
        result = run(lab, " ".join(words), results=args.results, timeout=args.timeout)
    except LabError as exc:
        print(f"livemig-lab: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.output)
    print(f"[exit {result.returncode} after {result.seconds:.1f} s; {result.results}]")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

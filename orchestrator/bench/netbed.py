"""A two-host network on one machine, for benchmarks and tests of real links.

Two network namespaces (the source host and the destination host) joined by a veth
pair: two network stacks and real TCP between them, with the link shaped by ``tc`` on
both ends. A rate cap uses ``tbf``, which every kernel here has; delay and loss use
``netem``, which this project's host kernel lacks and the VFIO lab's guest kernel has
(``NetBedUnavailable`` says so). The hosts take 198.18.0.1 (source) and 198.18.0.2
(destination), from the range RFC 2544 sets aside for benchmark networks; they exist
only inside the two namespaces.

Needs root. Every namespace is removed on the way out, and the namespaces of a run that
was killed are swept at the next start (their names carry the creating process's pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PREFIX = "livemig-net"
SOURCE_ADDRESS = "198.18.0.1"
DESTINATION_ADDRESS = "198.18.0.2"
MIGRATION_PORT = 7070
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?(bit|bps)$")
_UNITS = {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}


class NetBedUnavailable(Exception):
    """This machine cannot build the test network; the message says what is missing."""


@dataclasses.dataclass(frozen=True, slots=True)
class LinkSpec:
    """How the link between the two hosts is shaped (each direction alike)."""

    #: Line rate in bits/s; None leaves the link unshaped.
    rate_bps: float | None = None
    #: One-way delay added in each direction (so the round trip gains twice this).
    delay_ms: float = 0.0
    #: Packets dropped in each direction, in percent.
    loss_pct: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``rate=1gbit,delay=15ms,loss=0.1%``; ValueError naming the bad part."""
        values: dict[str, float | None] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            key, value = key.strip(), value.strip().lower()
            if key == "rate":
                match = _RATE.match(value)
                if not match:
                    raise ValueError(f"rate {value!r}: use a number and kbit, mbit or gbit")
                number, unit, kind = match.groups()
                scale = _UNITS[unit] * (8 if kind == "bps" else 1)
                values["rate_bps"] = float(number) * scale
            elif key == "delay":
                values["delay_ms"] = _number(key, value.removesuffix("ms"))
            elif key == "loss":
                values["loss_pct"] = _number(key, value.removesuffix("%"))
                if not values["loss_pct"] < 100:  # type: ignore[operator]
                    raise ValueError(f"loss {value!r}: must be under 100%")
            else:
                raise ValueError(f"unknown link setting {key!r} (rate, delay, loss)")
        return cls(**values)  # type: ignore[arg-type]

    @property
    def needs_netem(self) -> bool:
        """Whether shaping needs the netem qdisc (delay or loss)."""
        return self.delay_ms > 0 or self.loss_pct > 0

    def describe(self) -> str:
        """The spec in the form ``parse`` reads."""
        parts = []
        if self.rate_bps is not None:
            parts.append(f"rate={self.rate_bps / 1e6:g}mbit")
        if self.delay_ms:
            parts.append(f"delay={self.delay_ms:g}ms")
        if self.loss_pct:
            parts.append(f"loss={self.loss_pct:g}%")
        return ",".join(parts) or "unshaped"


def _number(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} {value!r} is not a number") from None
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{key} {value!r}: must be a finite number >= 0")
    return number


class NetBed:
    """The two namespaces and their link; ``async with`` builds and removes them."""

    def __init__(self, link: LinkSpec) -> None:
        self.link = link
        tag = f"{os.getpid()}-{id(self) % 10_000}"
        self.namespaces = {"source": f"{PREFIX}-s-{tag}", "destination": f"{PREFIX}-d-{tag}"}
        self.interfaces = {"source": "lm-veth-s", "destination": "lm-veth-d"}
        self._built = False

    def prefix(self, role: str) -> list[str]:
        """The command prefix that runs a program on host ``role``."""
        return ["ip", "netns", "exec", self.namespaces[role]]

    async def __aenter__(self) -> NetBed:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Build both hosts and shape the link; NetBedUnavailable if this machine cannot."""
        check_available(self.link)
        await sweep_stale()
        source, destination = self.namespaces["source"], self.namespaces["destination"]
        veth_s, veth_d = self.interfaces["source"], self.interfaces["destination"]
        self._built = True
        try:
            for namespace in (source, destination):
                await _run("ip", "netns", "add", namespace)
                await _run("ip", "-n", namespace, "link", "set", "lo", "up")
            await _run(
                "ip", "-n", source, "link", "add", veth_s, "type", "veth",
                "peer", "name", veth_d, "netns", destination,
            )  # fmt: skip
            for namespace, veth, address in (
                (source, veth_s, SOURCE_ADDRESS),
                (destination, veth_d, DESTINATION_ADDRESS),
            ):
                await _run("ip", "-n", namespace, "addr", "add", f"{address}/30", "dev", veth)
                await _run("ip", "-n", namespace, "link", "set", veth, "up")
                await self._shape(namespace, veth)
        except BaseException:
            await self.close()
            raise
        log.info(
            "netbed_ready", link=self.link.describe(), namespaces=list(self.namespaces.values())
        )

    async def _shape(self, namespace: str, veth: str) -> None:
        """netem (delay, loss) at the root, a tbf rate cap under it (or at the root)."""
        link = self.link
        tc = ("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", veth)
        parent: tuple[str, ...] = ("root",)
        if link.needs_netem:
            netem = ["delay", f"{link.delay_ms}ms"] if link.delay_ms else []
            if link.loss_pct:
                netem += ["loss", f"{link.loss_pct}%"]
            # netem's own queue must hold a bandwidth-delay product or it drops.
            await _run(*tc, "root", "handle", "1:", "netem", *netem, "limit", "100000")
            parent = ("parent", "1:1")
        if link.rate_bps is not None:
            rate = link.rate_bps
            # Bursts of at least 1/250 s of line rate (one timer tick) and 64 KiB.
            burst = max(int(rate / 8 / 250), 64 * 1024)
            shape = ("tbf", "rate", f"{int(rate)}bit", "burst", str(burst), "latency", "100ms")
            await _run(*tc, *parent, "handle", "10:", *shape)

    async def set_link(self, up: bool) -> None:
        """Take the link down (both ends) or bring it back: a flap."""
        state = "up" if up else "down"
        for role in ("source", "destination"):
            namespace, veth = self.namespaces[role], self.interfaces[role]
            await _run("ip", "-n", namespace, "link", "set", veth, state)
        log.info("netbed_link", state=state)

    async def close(self) -> None:
        """Remove both namespaces (their veth ends go with them); idempotent."""
        if not self._built:
            return
        self._built = False
        for namespace in self.namespaces.values():
            with contextlib.suppress(NetBedError):
                await _run("ip", "netns", "del", namespace)


class NetBedError(Exception):
    """A command that builds the network failed; the message has its words."""


def check_available(link: LinkSpec) -> None:
    """NetBedUnavailable unless this process can build namespaces and shape ``link``."""
    if os.geteuid() != 0:
        raise NetBedUnavailable("the network test bed needs root (network namespaces, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetBedUnavailable(f"the network test bed needs {tool} (Debian: iproute2)")
    if link.needs_netem and not _has_netem():
        raise NetBedUnavailable(
            "delay and loss need the netem qdisc, which this kernel lacks; they run in the "
            "VFIO lab's guest (rate caps work here)"
        )


def _has_netem() -> bool:
    """Whether the kernel offers sch_netem (built in, loaded, or loadable as a module)."""
    release = os.uname().release
    modules = Path("/lib/modules") / release
    if Path("/sys/module/sch_netem").exists():
        return True
    return any(modules.glob("kernel/net/sched/sch_netem.ko*")) if modules.exists() else False


async def sweep_stale() -> None:
    """Remove namespaces of this bed whose creating process is gone (a killed run)."""
    try:
        listing = await _run("ip", "netns", "list")
    except NetBedError:
        return
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"^{PREFIX}-[sd]-(\d+)-\d+$", name)
        if match and not _process_exists(int(match.group(1))):
            log.warning("netbed_stale_namespace_removed", namespace=name)
            with contextlib.suppress(NetBedError):
                await _run("ip", "netns", "del", name)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _run(*command: str) -> str:
    """Run one command; its stdout, or NetBedError with the command and its stderr."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        words = err.decode(errors="replace").strip()
        raise NetBedError(f"{' '.join(command)}: {words or f'exit {process.returncode}'}")
    return out.decode(errors="replace")


@contextlib.asynccontextmanager
async def netbed(link: LinkSpec | str) -> AsyncIterator[NetBed]:
    """Build the two hosts for the block, removed whatever happens."""
    spec = LinkSpec.parse(link) if isinstance(link, str) else link
    async with NetBed(spec) as bed:
        yield bed

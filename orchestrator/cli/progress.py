"""How ``livemig migrate`` shows a migration going: a live panel on a terminal, lines elsewhere.

Both views take the stats dicts of MIGRATION_PASS events (query-migrate's fields) and
the status changes; neither knows where they come from.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def human_rate(bps: float) -> str:
    """Bytes per second in MB/s (10^6), the unit of the CLI's ``-mbps`` options."""
    return f"{bps / 1e6:.1f} MB/s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


class ProgressView(Protocol):
    """Receives a migration's progress."""

    def status(self, status: str) -> None: ...

    def update(self, stats: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """One line per status change, and at most one progress line per ``interval`` seconds."""

    def __init__(self, out: TextIO = sys.stdout, interval: float = 1.0) -> None:
        self.out = out
        self.interval = interval
        self._last = 0.0

    def status(self, status: str) -> None:
        """Print the new status."""
        print(f"status: {status}", file=self.out, flush=True)

    def update(self, stats: dict[str, Any]) -> None:
        """Print a progress line unless one was printed less than ``interval`` ago."""
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        print(
            f"iteration {stats['iterations']}: "
            f"sent {human_bytes(stats['transferred_bytes'])}, "
            f"remaining {human_bytes(stats['remaining_bytes'])}, "
            f"bandwidth {human_rate(stats['bandwidth_bps'])}, "
            f"expected downtime {_ms(stats['expected_downtime_ms'])}",
            file=self.out,
            flush=True,
        )

    def close(self) -> None:
        """Nothing to tear down."""


class RichProgress:
    """A live panel redrawn in place (rich), for people at a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=False)
        self._status = "setup"
        self._stats: dict[str, Any] | None = None
        self._live = Live(self._render(), console=self.console, refresh_per_second=8)
        self._live.start()

    def status(self, status: str) -> None:
        """Show the new status."""
        self._status = status
        self._live.update(self._render())

    def update(self, stats: dict[str, Any]) -> None:
        """Show the newest figures."""
        self._stats = stats
        self._live.update(self._render())

    def close(self) -> None:
        """Leave the last frame on screen."""
        self._live.stop()

    def _render(self) -> Table:
        table = Table(title=f"migration: {self._status}", show_header=False, min_width=48)
        table.add_column(style="bold")
        table.add_column(justify="right")
        stats = self._stats
        if stats is None:
            table.add_row("", "connecting...")
            return table
        sent, remaining = stats["transferred_bytes"], stats["remaining_bytes"]
        done = sent / (sent + remaining) if sent + remaining else 0.0
        bar_width = 24
        filled = round(done * bar_width)
        table.add_row("progress", f"[green]{'#' * filled}[/]{'.' * (bar_width - filled)}")
        table.add_row("iteration", str(stats["iterations"]))
        table.add_row("sent", human_bytes(sent))
        table.add_row("remaining", human_bytes(remaining))
        table.add_row("bandwidth", human_rate(stats["bandwidth_bps"]))
        table.add_row("dirty rate", human_rate(stats["dirty_rate_bps"]))
        table.add_row("expected downtime", _ms(stats["expected_downtime_ms"]))
        if stats.get("throttle"):
            table.add_row("throttle", f"{stats['throttle']:.0%}")
        return table


def view_for(out: TextIO = sys.stdout) -> ProgressView:
    """The rich panel on a terminal, plain lines otherwise."""
    if out.isatty():
        return RichProgress()
    return PlainProgress(out)


def summary_lines(stats: dict[str, Any]) -> list[str]:
    """The final stats, for people."""
    lines = [f"status: {stats['status']}" + (f" ({stats['error']})" if stats.get("error") else "")]
    if stats.get("downtime_ms") is not None:
        breakdown = ", ".join(
            f"{phase} {value:.2f}" for phase, value in stats["downtime_breakdown_ms"].items()
        )
        lines.append(f"downtime: {stats['downtime_ms']:.2f} ms ({breakdown})")
        if stats.get("window_round_trips"):
            lines.append(
                f"round trips in the window: {stats['window_round_trips']:g} "
                f"(round trip {stats.get('rtt_ms', 0.0):.3f} ms)"
            )
    lines += [
        f"total time: {_ms(stats['total_ms'])} (setup {_ms(stats['setup_ms'])})",
        f"iterations: {stats['iterations']}",
        f"transferred: {human_bytes(stats['transferred_bytes'])}",
        f"bandwidth: {human_rate(stats['bandwidth_bps'])}",
    ]
    if stats.get("cpu_s_per_gb") is not None:
        lines.append(
            f"source CPU: {stats['cpu_s']:.3f} s, {stats['cpu_s_per_gb']:.3f} s per GB moved"
        )
    if stats.get("verified") is not None:
        lines.append(f"verified: {'yes, digests equal' if stats['verified'] else 'NO'}")
    return lines

"""Evacuate a host: move every device of one livemig daemon to two others, live.

What a fleet controller does, through the control API alone (no SSH, no files)::

    python examples/evacuate.py        # three daemons on this machine, made for the run
    python examples/evacuate.py --source tcp:host-a:7079 \\
        --target tcp:host-b:7079 --target tcp:host-c:7079 \\
        --ca ca.pem --cert fleet.pem --key fleet.key    # real hosts, over [control] TLS

1. inventory: ``query-devices`` on every daemon, ``query-daemon`` for the targets'
   migration addresses;
2. plan: each source device goes to a target that can take it, spreading the load;
3. arm each target for its devices (:func:`arm`);
4. start one ``migrate`` per target at once (the source's ``max_total_bandwidth``
   shares its link between them);
5. watch the events (``MIGRATION_PASS`` for progress, ``MIGRATION`` for the end) and
   cancel everything still running on Ctrl-C;
6. check: every migration completed and ``query-digests`` agree on both ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from orchestrator.bench.daemons import DaemonProcess
from orchestrator.service.client import ControlClient
from orchestrator.service.protocol import ControlError
from transport.auth import client_tls_context

#: Devices of the local source: four simulated ones and a RAM device, all running.
LOCAL_DEVICES = ["nic0", "nic1", "gpu0", "gpu1", "ram0"]


async def arm(target: ControlClient, uri: str, source: str, devices: list[str]) -> None:
    """Tell ``target`` to take ``devices`` from daemon ``source`` on ``uri`` (QMP's
    ``migrate-incoming``), so it refuses anything else (consent: DESIGN.md invariant 5)."""
    await target.execute(
        "migrate-incoming", uri=uri, devices=devices, **{"from": source, "timeout-s": 60}
    )


def plan(devices: list[str], targets: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each device to the least loaded target that has a slot of its name."""
    placed: dict[str, list[str]] = {name: [] for name in targets}
    for device in devices:
        able = [name for name, slots in targets.items() if device in slots]
        if not able:
            raise SystemExit(f"no target can take {device!r}")
        placed[min(able, key=lambda name: len(placed[name]))].append(device)
    return {name: chosen for name, chosen in placed.items() if chosen}


async def evacuate(source: ControlClient, targets: list[ControlClient]) -> int:
    """Move every idle device of ``source`` to ``targets``; 0 when all landed byte-exact."""
    source_name = (await source.execute("query-daemon"))["name"]
    devices = [d["name"] for d in await source.execute("query-devices") if not d["migration"]]
    by_name: dict[str, ControlClient] = {}
    slots: dict[str, set[str]] = {}
    address: dict[str, str] = {}
    for target in targets:
        info = await target.execute("query-daemon")
        by_name[info["name"]] = target
        address[info["name"]] = f"tcp:{info['listen'][0].removeprefix('tcp:')}"
        slots[info["name"]] = {d["name"] for d in await target.execute("query-devices")}
    placement = plan(devices, slots)
    for name, chosen in placement.items():
        print(f"{source_name} -> {name}: {', '.join(chosen)}")
        await arm(by_name[name], address[name], source_name, chosen)
    started = {}
    for name, chosen in placement.items():
        reply = await source.execute("migrate", uri=address[name], devices=chosen)
        started[reply["id"]] = name
    finals: dict[str, dict[str, Any]] = {}
    try:
        async for event in source.events():
            data = event["data"]
            if data.get("id") not in started:
                continue
            if event["event"] == "MIGRATION_PASS":
                print(
                    f"  {started[data['id']]}: iteration {data['iterations']}, "
                    f"{data['transferred_bytes'] / 1e6:.1f} MB sent, "
                    f"{data['bandwidth_bps'] / 1e6:.1f} MB/s"
                )
            elif event["event"] == "MIGRATION" and "stats" in data:
                finals[data["id"]] = data
                if len(finals) == len(started):
                    break
    except asyncio.CancelledError:
        for migration_id in set(started) - set(finals):
            with contextlib.suppress(ControlError):
                await source.execute("migrate-cancel", id=migration_id)
        raise
    failed = 0
    digests = await source.execute("query-digests")
    for migration_id, final in finals.items():
        name, stats = started[migration_id], final["stats"]
        landed = await by_name[name].execute("query-digests", devices=placement[name])
        exact = all(landed[d] == digests[d] for d in placement[name])
        ok = final["status"] == "completed" and exact
        failed += not ok
        downtime = stats["downtime_ms"]
        print(
            f"{name}: {final['status']}"
            + (f" ({final['error']})" if final.get("error") else "")
            + (f", downtime {downtime:.1f} ms" if downtime is not None else "")
            + f", {stats['transferred_bytes'] / 1e6:.1f} MB at {stats['bandwidth_bps'] / 1e6:.1f}"
            + f" MB/s, {'byte-exact' if exact else 'DIGESTS DIFFER'}"
        )
    return 1 if failed else 0


# -- three local daemons, for a run on one machine ---------------------------------------


def _config(folder: Path, name: str, devices: list[str], *, source: bool) -> Path:
    lines = [
        f'name = "{name}"',
        f'control_socket = "{name}.sock"',
        f"listen = {[] if source else ['127.0.0.1:0']}".replace("'", '"'),
    ]
    if source:
        lines.append("max_total_bandwidth = 400e6   # both migrations share 400 MB/s")
    lines += ["", "[auth]", 'psk_file = "psk"']
    for index, device in enumerate(devices):
        kind = "ram" if device.startswith("ram") else "simulated"
        size = "size_mib = 32\nworking_set_mib = 8" if kind == "ram" else "state_mib = 16"
        rate = 20 if source else 0
        lines += ["", "[[device]]", f'kind = "{kind}"', f'name = "{device}"', size]
        lines += [f"dirty_mbps = {rate}", f"seed = {index + 1}"]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def local_daemons(folder: Path) -> AsyncIterator[list[ControlClient]]:
    """host-a owning LOCAL_DEVICES; host-b and host-c with idle devices of those names."""
    psk = folder / "psk"
    psk.write_text("evacuation-demo-key-0123456789\n")
    psk.chmod(0o600)
    roles = {"host-a": LOCAL_DEVICES, "host-b": LOCAL_DEVICES[::2], "host-c": LOCAL_DEVICES[1::2]}
    processes = [
        DaemonProcess(_config(folder, name, devices, source=name == "host-a"), name=name)
        for name, devices in roles.items()
    ]
    clients: list[ControlClient] = []
    try:
        await asyncio.gather(*(p.start(folder / f"{p.name}.sock") for p in processes))
        clients = [await p.client() for p in processes]
        yield clients
    finally:
        for client in clients:
            await client.close()
        for process in processes:
            await process.stop()


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help="the control address of the host to empty")
    parser.add_argument("--target", action="append", default=[], help="a receiving daemon")
    parser.add_argument("--ca", help="for tcp: addresses: the CA of the daemons' certificates")
    parser.add_argument("--cert", help="this controller's certificate (on their allow-lists)")
    parser.add_argument("--key", help="its key")
    args = parser.parse_args(argv)
    if args.source is None:
        with tempfile.TemporaryDirectory(prefix="livemig-evacuate-") as folder:
            async with local_daemons(Path(folder)) as (source, *targets):
                return await evacuate(source, targets)
    context: ssl.SSLContext | None = None
    if args.ca is not None:
        context = client_tls_context(args.ca, args.cert, args.key)
    source = await ControlClient.connect(args.source, ssl_context=context)
    targets = [await ControlClient.connect(t, ssl_context=context) for t in args.target]
    try:
        return await evacuate(source, targets)
    finally:
        for client in (source, *targets):
            await client.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

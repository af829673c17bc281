"""The lab's mdevs, checked on the host (no guest boot): they fit what mtty offers."""

from __future__ import annotations

from tests.vm import lab

#: mtty's ports, shared by all its mdevs (MAX_MTTYS in samples/vfio-mdev/mtty.c).
MTTY_PORTS = 24
PORTS = {"mtty-1": 1, "mtty-2": 2}


def test_mdevs_fit_mttys_ports_and_are_distinct() -> None:
    """All mdevs together use at most mtty's 24 ports; names and UUIDs are unique."""
    assert sum(PORTS[kind] for _, _, kind in lab.MDEVS) <= MTTY_PORTS
    assert len({name for name, _, _ in lab.MDEVS}) == len(lab.MDEVS)
    assert len({uuid for _, uuid, _ in lab.MDEVS}) == len(lab.MDEVS)


def test_mdevs_cover_the_p2p_and_overlap_tests() -> None:
    """Four dual-port mdevs (two pairs) and eight single-port pairs, each in the guest's env."""
    kinds = {name: kind for name, _, kind in lab.MDEVS}
    assert [kinds[n] for n in ("src", "dst", "src2", "dst2")] == ["mtty-2"] * 4
    for i in range(lab.PERF_DEVICES):
        assert kinds[f"perf_src{i}"] == kinds[f"perf_dst{i}"] == "mtty-1"
    env = lab.guest_env()
    assert all(env[f"LIVEMIG_MDEV_{name.upper()}"] == uuid for name, uuid, _ in lab.MDEVS)

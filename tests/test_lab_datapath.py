"""Layer 3, datapath only: real traffic through the lab with the map set by hand.

Which lower carried the traffic is proved twice: by the lowers' own kernel
counters and by the datapath's per-slot counters."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from bpfailover import netns
from bpfailover.datapath import layout_gen as L
from bpfailover.datapath.loader import PROGS
from bpfailover_lab import traffic
from bpfailover_lab.topology import Lab
from tests.labutil import Wired, link_stats, neigh, ping, tcp_echo, wired_lab

pytestmark = pytest.mark.root


def _cross_everything(w: Wired) -> None:
    lab, n = w.lab, w.lab.names(0)
    assert ping(lab.guest, n.peer_v4), "ICMP guest -> peer"
    assert ping(lab.peer, n.guest_v4), "ICMP peer -> guest"
    assert ping(lab.guest, n.peer_v6), "ICMPv6 guest -> peer (ND first)"
    assert ping(lab.peer, n.guest_v6), "ICMPv6 peer -> guest"
    v4 = neigh(lab.peer, n.guest_v4)
    v6 = neigh(lab.peer, n.guest_v6)
    assert v4 and v4["lladdr"] == n.mac, "ARP resolved the failover MAC"
    assert v6 and v6["lladdr"] == n.mac, "neighbour discovery resolved the failover MAC"
    assert tcp_echo(lab.peer, n.peer_v4, lab.guest) == 200_000 // 256 * 256
    assert tcp_echo(lab.guest, n.guest_v6, lab.peer, port=9101) == 200_000 // 256 * 256
    rep = traffic.run_stream(
        lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate_pps=1000, duration_s=1.0
    )
    assert rep.total_lost == 0, rep.format()


def _counters_at_rest(w: Wired, role: str, devs: tuple[str, ...]) -> tuple[int, dict[str, int]]:
    """The datapath's tx count for `role` and the lowers' kernel tx counts, taken at one
    instant: BPF is read on both sides of the kernel read and the pair is kept only when no
    packet crossed in between. A stray frame (MLD, a late ND probe) caught between two
    reads would otherwise be counted by one side and not the other."""
    for _ in range(50):
        b = w.stats(0, role, "tx")
        k = {d: link_stats(w.lab.guest, d)["tx"] for d in devs}
        if w.stats(0, role, "tx") == b:
            return b, k
        time.sleep(0.05)
    raise AssertionError(f"{role} never quiet for a counter snapshot")


@pytest.mark.parametrize("rx_path", ["tc", "xdp"])
def test_all_traffic_crosses_via_active_lower(lab: Lab, pin_dir: Path, rx_path: str) -> None:
    with wired_lab(lab, pin_dir, rx_path=rx_path) as w:
        n = lab.names(0)
        for role, dev, other in (
            ("primary", n.primary, n.standby),
            ("standby", n.standby, n.primary),
        ):
            w.flip(0, role)
            b0, k0 = _counters_at_rest(w, role, (dev, other))
            _cross_everything(w)
            b1, k1 = _counters_at_rest(w, role, (dev, other))
            sent_via_active = k1[dev] - k0[dev]
            assert sent_via_active >= 1000, f"{dev} carried the traffic ({k0} -> {k1})"
            assert k1[other] - k0[other] == 0, f"nothing left through inactive {other}"
            assert b1 - b0 == sent_via_active  # BPF agrees with the kernel
            assert w.stats(0, role, "rx") > 0


def test_xdp_path_delivers_through_the_hidden_peer(lab: Lab, pin_dir: Path) -> None:
    with wired_lab(lab, pin_dir, rx_path="xdp") as w:
        n = lab.names(0)
        out = netns.run_in(lab.guest, ["ip", "-d", "link", "show", n.primary]).stdout
        assert "xdp" in out, "native XDP attached on the lower"
        peer = f"{n.failover}_fo"
        before = link_stats(lab.guest, peer)["tx"]
        assert ping(lab.guest, n.peer_v4)
        # XDP_REDIRECT transmits on the hidden peer, so frames enter ens10 through veth's
        # receive path; the TC path would not touch the peer's counters at all.
        assert w.stats(0, "primary", "rx") > 0
        assert link_stats(lab.guest, peer)["tx"] - before >= 3


def test_flipping_under_a_stream_loses_nothing(lab: Lab, pin_dir: Path) -> None:
    with wired_lab(lab, pin_dir) as w:
        n = lab.names(0)
        assert ping(lab.guest, n.peer_v4)  # ARP warmed up both ways
        with traffic.start_stream(
            lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate_pps=5000, duration_s=3.0
        ) as h:
            for k in range(20):
                time.sleep(0.1)
                w.flip(0, "standby" if k % 2 == 0 else "primary")
            rep = h.wait()
        assert rep.total_lost == 0, rep.format()
        assert w.stats(0, "standby", "tx") > 1000 and w.stats(0, "primary", "tx") > 1000


def test_no_active_lower_drops_and_counts(lab: Lab, pin_dir: Path) -> None:
    """With no active lower, every frame the guest sends is dropped at fo_egress and
    counted once, as no_lower there; no other egress drop or transmit counter moves."""
    with wired_lab(lab, pin_dir) as w:
        n = lab.names(0)
        g = w.groups[0]
        assert ping(lab.guest, n.peer_v4)  # the peer's MAC, learned through the primary
        mac = (neigh(lab.guest, n.peer_v4) or {})["lladdr"]
        # the guest sends only what the test sends: a fixed neighbour (no ARP), no IPv6
        # (no ND, no MLD reports) on the failover device
        netns.run_in(lab.guest, ["sysctl", "-qw", f"net.ipv6.conf.{n.failover}.disable_ipv6=1"])
        netns.run_in(
            lab.guest,
            ["ip", "neigh", "replace", n.peer_v4, "lladdr", mac, "dev", n.failover]
            + ["nud", "permanent"],
        )
        w.flip(0, "none")

        def egress() -> dict[tuple[str, str], int]:
            out = {
                ("tc_egress", r): w.dp.drops(g, L.FO_HOOK_TC_EGRESS, reason).packets
                for reason, r in enumerate(L.names("FO_DROP_"))
            }
            out |= {("tx", role): w.stats(0, role, "tx") for role in ("primary", "standby")}
            return out

        before = egress()
        sent = 25
        with netns.entered(lab.guest), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(sent):
                s.sendto(b"no lower", (n.peer_v4, 9))  # dropped: UDP says nothing (no RECVERR)
        after = egress()
        moved = {k: after[k] - before[k] for k in before if after[k] != before[k]}
        assert moved == {("tc_egress", "no_lower"): sent}


def test_inactive_rx_drop_inactive(lab: Lab, pin_dir: Path) -> None:
    with wired_lab(lab, pin_dir, inactive_rx="drop_inactive") as w:
        n = lab.names(0)
        assert ping(lab.peer, n.guest_v4)  # the bridge floods the first ARP to both lowers
        assert w.dp.drops(w.groups[0], L.FO_HOOK_TC_INGRESS, L.FO_DROP_INACTIVE_RX).packets >= 1
        assert w.stats(0, "standby", "rx") == 0


def test_two_groups_do_not_see_each_others_traffic(lab_prefix: str, pin_dir: Path) -> None:
    lab = Lab(lab_prefix, groups=2)
    with wired_lab(lab, pin_dir) as w:
        n0, n1 = lab.names(0), lab.names(1)
        assert ping(lab.guest, n0.peer_v4) and ping(lab.guest, n1.peer_v4)
        rx1 = link_stats(lab.guest, n1.failover)["rx"]
        rep = traffic.run_stream(
            lab.guest, n0.guest_v4, lab.peer, n0.peer_v4, rate_pps=2000, duration_s=1.0
        )
        assert rep.total_lost == 0
        # group 1 sees at most stray broadcasts, never group 0's stream
        assert link_stats(lab.guest, n1.failover)["rx"] - rx1 < 20
        assert w.stats(1, "primary", "tx") < 20 and w.stats(0, "primary", "tx") >= 2000


def _leftovers(lab: Lab, pin_dir: Path, prog_ids: set[int]) -> list[str]:
    """What a run left behind: pins, namespaces, and its programs once the kernel has
    finished destroying the namespaces' devices (asynchronous, so bounded waiting)."""
    found = [f"pins {pin_dir}"] if pin_dir.exists() else []
    found += [ns for ns in lab.namespaces if netns.exists(ns)]
    deadline = time.monotonic() + 15
    while True:
        out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
        alive = {p["id"] for p in json.loads(out.stdout or "[]")} & prog_ids
        if not alive or time.monotonic() > deadline:
            return found + [f"prog {i}" for i in sorted(alive)]
        time.sleep(0.1)


def _prog_ids(w: Wired) -> set[int]:
    return {w.dp.prog_id(p) for p in PROGS}


def test_teardown_of_a_group_removes_filters_xdp_and_device(lab: Lab, pin_dir: Path) -> None:
    from pyroute2 import IPRoute

    from bpfailover.datapath.attach import Wiring, tc_attached, xdp_prog_id

    with wired_lab(lab, pin_dir, rx_path="xdp") as w:
        n = lab.names(0)
        with netns.entered(lab.guest):
            ipr = IPRoute()
            try:
                lower = ipr.link_lookup(ifname=n.primary)[0]
                assert tc_attached(ipr, lower, "ingress") and xdp_prog_id(ipr, lower)
                assert Wiring(w.dp, ipr).teardown_group(n.failover)
                assert not tc_attached(ipr, lower, "ingress")
                assert xdp_prog_id(ipr, lower) == 0
                assert not ipr.link_lookup(ifname=n.failover)
            finally:
                ipr.close()
        assert w.dp.groups() == {}
        ids = _prog_ids(w)
    assert _leftovers(lab, pin_dir, ids) == []


def test_cleanup_holds_when_a_test_fails_half_way(lab: Lab, pin_dir: Path) -> None:
    ids: set[int] = set()
    with pytest.raises(RuntimeError, match="half-way"), wired_lab(lab, pin_dir) as w:
        ids = _prog_ids(w)
        raise RuntimeError("failure half-way through a test")
    assert ids and _leftovers(lab, pin_dir, ids) == []

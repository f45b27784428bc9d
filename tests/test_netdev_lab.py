"""The failover device behaves like a netdev (issue 13), in the lab with failoverd:
its kernel counters against the lowers' own, what a packet tap on it sees, its MAC put back,
its address lists (multicast joins by a socket and by `ip maddr`, with and without
RTM_NEWMULTICAST; a macvlan's unicast address) on both lowers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from bpfailover import netns
from bpfailover_lab import traffic
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab
from tests.faultutil import use_test_switches
from tests.labutil import bring_up, link_stats, ping
from tests.opsutil import ctl

pytestmark = pytest.mark.root

NEW_MAC = "02:00:00:00:12:34"
MV_MAC = "02:00:00:00:aa:01"


@pytest.fixture
def agent_factory(lab: Lab) -> Iterator[list[AgentRun]]:
    runs: list[AgentRun] = []
    yield runs
    for run in runs:
        run.cleanup()


def _up(lab: Lab, runs: list[AgentRun], **overrides: object) -> AgentRun:
    run = bring_up(lab, **overrides)
    runs.append(run)
    return run


def _lowers(lab: Lab) -> tuple[str, str]:
    n = lab.names(0)
    return n.primary, n.standby


# -- counters ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rx_path", "tx_path"), [("tc", "veth"), ("xdp", "veth"), ("tc", "direct")]
)
def test_failover_counters_match_the_lowers_both_ways(
    lab: Lab, agent_factory: list[AgentRun], rx_path: str, tx_path: str
) -> None:
    """ip -s link / /proc/net/dev of the failover device: its rx is what came in through the
    lowers, within the traffic sent; its tx what went out through them with tx_path veth,
    and 0 with direct (the default), where the datapath's per-lower transmit counters
    (failover_lower_transmit_*, `failoverctl status`) are what to read: docs/operators.md."""
    run = _up(lab, agent_factory, rx_path=rx_path, tx_path=tx_path)
    n = lab.names(0)
    devs = (n.failover, n.primary, n.standby)
    before = {d: link_stats(lab.guest, d) for d in devs}
    dp_tx0 = sum(lw["tx_packets"] for lw in run.group()["lowers"])
    rep = traffic.run_stream(lab.guest, n.guest_v4, lab.peer, n.peer_v4, 2000, 1.5)
    after = {d: link_stats(lab.guest, d) for d in devs}
    dp_tx = sum(lw["tx_packets"] for lw in run.group()["lowers"]) - dp_tx0
    d = {dev: {k: after[dev][k] - before[dev][k] for k in ("tx", "rx")} for dev in devs}
    assert rep.b_to_a is not None and rep.total_lost == 0, rep.format()
    sent_tx, sent_rx = rep.a_to_b.sent, rep.b_to_a.sent
    slack = 10  # ARP/ND and GARP around the stream
    lowers_tx = d[n.primary]["tx"] + d[n.standby]["tx"]
    lowers_rx = d[n.primary]["rx"] + d[n.standby]["rx"]
    if tx_path == "veth":
        assert sent_tx <= d[n.failover]["tx"] <= sent_tx + slack, d
        assert abs(d[n.failover]["tx"] - lowers_tx) <= slack, d
    else:
        assert d[n.failover]["tx"] == 0, d
    assert sent_tx <= dp_tx <= sent_tx + slack and abs(dp_tx - lowers_tx) <= slack, (dp_tx, d)
    assert sent_rx <= d[n.failover]["rx"] <= sent_rx + slack, d
    assert abs(d[n.failover]["rx"] - lowers_rx) <= slack, d


# -- tcpdump -----------------------------------------------------------------------------------
_TAP = textwrap.dedent(
    """
    import select, socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
    s.bind((sys.argv[1], 0))
    print("ready", flush=True)
    out = inc = 0
    done = False
    while not done:
        # until stdin closes (the pings are over), then what is queued; bounded
        r, _, _ = select.select([s, sys.stdin], [], [], 60)
        if sys.stdin in r or not r:
            s.setblocking(False)
            done = True
        while True:
            try:
                data, addr = s.recvfrom(2048)
            except BlockingIOError:
                break
            # IPv4 ICMP echo: request (type 8) out, reply (type 0) in
            if data[12:14] == b"\\x08\\x00" and data[23] == 1:
                icmp = data[14 + (data[14] & 15) * 4]
                if addr[2] == 4 and icmp == 8:  # PACKET_OUTGOING
                    out += 1
                elif addr[2] != 4 and icmp == 0:
                    inc += 1
            if not done:
                break
    print(out, inc, flush=True)
    """
)


def _tap_counts(lab: Lab, dev: str, count: int) -> tuple[int, int]:
    """What a packet tap on `dev` (the mechanism tcpdump uses) sees of `count` pings: it
    listens until the pings are over, then reads what it has queued (no time window)."""
    argv = netns.cmd_in(lab.guest, [sys.executable, "-c", _TAP, dev])
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        n = lab.names(0)
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.01", "-W", "5", n.peer_v4]
        netns.run_in(lab.guest, argv, timeout=60)
        out, _ = p.communicate(timeout=60)  # closes its stdin: the pings are over
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    a, b = out.split()
    return int(a), int(b)


@pytest.mark.parametrize(("tx_path", "tx_seen"), [("veth", True), ("direct", False)])
def test_tcpdump_on_the_failover_device(
    lab: Lab, agent_factory: list[AgentRun], tx_path: str, tx_seen: bool
) -> None:
    """Receive is always visible on the failover device; transmit with tx_path veth, not
    with direct (the default: its egress hook redirects before the taps)."""
    _up(lab, agent_factory, tx_path=tx_path)
    out, inc = _tap_counts(lab, lab.names(0).failover, 50)
    assert inc == 50
    assert out == (50 if tx_seen else 0)


# -- qdisc -------------------------------------------------------------------------------------
def _qdisc_sent(lab: Lab, dev: str) -> int:
    out = netns.run_in(lab.guest, ["tc", "-s", "-j", "qdisc", "show", "dev", dev]).stdout
    root = next(q for q in json.loads(out) if q.get("root"))
    return int(root["packets"])


@pytest.mark.parametrize(("tx_path", "queued"), [("veth", True), ("direct", False)])
def test_root_qdisc_on_the_failover_device(
    lab: Lab, agent_factory: list[AgentRun], tx_path: str, queued: bool
) -> None:
    """A root qdisc on the failover device sees what it transmits with tx_path veth; with
    direct the clsact egress redirect runs before it and it is bypassed, which
    `failoverctl doctor` says."""
    run = _up(lab, agent_factory, tx_path=tx_path)
    n = lab.names(0)
    netns.run_in(lab.guest, ["tc", "qdisc", "add", "dev", n.failover, "root", "pfifo"])
    assert ping(lab.guest, n.peer_v4, count=10)
    sent = _qdisc_sent(lab, n.failover)
    assert (sent >= 10) if queued else (sent == 0), sent
    p = ctl("--config", str(run.config_path), "doctor", "--netns", lab.guest, "--json")
    found = {(f["check"], f["subject"]) for f in json.loads(p.stdout)}
    assert (("qdisc-bypassed", n.failover) in found) == (not queued), found


# -- MAC ---------------------------------------------------------------------------------------
def _mac(lab: Lab, dev: str) -> str:
    info = lab.link(lab.guest, dev)
    assert info is not None
    return str(info["mac"])


def _peer_neigh_mac(lab: Lab, addr: str) -> str | None:
    out = netns.run_in(lab.peer, ["ip", "-j", "neigh", "show", "to", addr]).stdout
    entries = json.loads(out or "[]")
    return entries[0].get("lladdr") if entries else None


def test_mac_change_is_undone_at_once_and_at_start(lab: Lab, agent_factory: list[AgentRun]) -> None:
    run = _up(lab, agent_factory)
    n = lab.names(0)
    netns.run_in(lab.guest, ["ip", "link", "set", n.failover, "address", NEW_MAC])
    run.wait_for(lambda: run.events("mac_restored"), what="mac_restored event")
    run.wait_for(lambda: _mac(lab, n.failover) == n.mac, what="group MAC back")
    ev = run.events("mac_restored")
    assert len(ev) == 1 and (ev[0]["found"], ev[0]["mac"]) == (NEW_MAC, n.mac)
    assert run.group()["mac_restored"] == 1
    # the peer still reaches the guest, at the group MAC
    netns.run_in(lab.peer, ["ip", "neigh", "flush", "to", n.guest_v4])
    assert ping(lab.peer, n.guest_v4)
    assert _peer_neigh_mac(lab, n.guest_v4) == n.mac
    # changed while no agent runs: the next one starts anyway and puts it back
    run.stop()
    netns.run_in(lab.guest, ["ip", "link", "set", n.failover, "address", NEW_MAC])
    run.start()
    assert _mac(lab, n.failover) == n.mac
    starts = [e for e in run.events("mac_restored") if e.get("when") == "start"]
    assert len(starts) == 1 and starts[0]["found"] == NEW_MAC


# -- address lists -----------------------------------------------------------------------------
def _maddrs(lab: Lab, dev: str) -> str:
    return netns.run_in(lab.guest, ["ip", "maddr", "show", "dev", dev]).stdout


_JOIN = textwrap.dedent(
    """
    import socket, struct, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ifx = socket.if_nametoindex(sys.argv[2])
    mreqn = struct.pack("4s4si", socket.inet_aton(sys.argv[1]), b"\\0" * 4, ifx)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    print("joined", flush=True)
    sys.stdin.read()  # hold the membership until the test closes stdin
    """
)


@pytest.mark.parametrize("mcast_events", [True, False], ids=["rtm_newmulticast", "as_6.1"])
def test_socket_join_lands_on_both_lowers(
    lab: Lab, agent_factory: list[AgentRun], monkeypatch: pytest.MonkeyPatch, mcast_events: bool
) -> None:
    """An application's IP_ADD_MEMBERSHIP on the failover device: on both lowers at once,
    and gone when it leaves; with RTM_NEWMULTICAST (>= 6.13) and without it (as on 6.1,
    where the IGMP report leaving through the datapath rings the agent's doorbell).  No
    periodic re-read here: address_resync_s 0."""
    if not mcast_events:
        use_test_switches(monkeypatch, BPFAILOVER_TEST_NO_MCAST_EVENTS="1")
    run = _up(lab, agent_factory, address_resync_s=0, tx_path="veth")
    n = lab.names(0)
    mac = "01:00:5e:05:06:07"
    argv = netns.cmd_in(lab.guest, [sys.executable, "-c", _JOIN, "239.5.6.7", n.failover])
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "joined"
        assert mac in _maddrs(lab, n.failover)
        for dev in _lowers(lab):
            run.wait_for(lambda d=dev: mac in _maddrs(lab, d), what=f"{mac} on {dev}")
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=10)
    for dev in _lowers(lab):
        run.wait_for(lambda d=dev: mac not in _maddrs(lab, d), what=f"{mac} gone from {dev}")


@pytest.mark.parametrize("mcast_events", [True, False], ids=["rtm_newmulticast", "as_6.1"])
def test_ip_maddr_lands_on_both_lowers(
    lab: Lab, agent_factory: list[AgentRun], monkeypatch: pytest.MonkeyPatch, mcast_events: bool
) -> None:
    """`ip maddr add` (SIOCADDMULTI) is announced by no kernel (RTM_NEWMULTICAST is about IP
    groups) and sends nothing: the periodic re-read (address_resync_s) carries it."""
    if not mcast_events:
        use_test_switches(monkeypatch, BPFAILOVER_TEST_NO_MCAST_EVENTS="1")
    run = _up(lab, agent_factory, address_resync_s=1)
    n = lab.names(0)
    mac = "01:80:c2:00:00:0e"  # LLDP: a link-layer-only group, as PTP/LLDP daemons join
    netns.run_in(lab.guest, ["ip", "maddr", "add", mac, "dev", n.failover])
    for dev in _lowers(lab):  # a generous wait: the re-read comes every second
        run.wait_for(lambda d=dev: mac in _maddrs(lab, d), 30, f"{mac} on {dev}")
    netns.run_in(lab.guest, ["ip", "maddr", "del", mac, "dev", n.failover])
    for dev in _lowers(lab):
        run.wait_for(lambda d=dev: mac not in _maddrs(lab, d), what=f"{mac} gone from {dev}")


def _uc(lab: Lab, dev: str) -> str:
    return netns.run_in(lab.guest, ["bridge", "fdb", "show", "dev", dev, "self"]).stdout


def test_macvlan_on_top_receives_unicast_through_the_vf(
    lab: Lab, agent_factory: list[AgentRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A macvlan on the failover device puts its MAC on the failover device's unicast list;
    the agent puts it on both lowers' lists (a VF's MAC filter) and the peer reaches it
    through the VF.  Removed with the macvlan.  No periodic re-read: the macvlan's own link
    events drive it."""
    use_test_switches(monkeypatch, BPFAILOVER_TEST_NO_MCAST_EVENTS="1")
    run = _up(lab, agent_factory, address_resync_s=0)
    n = lab.names(0)
    mv_ip = "198.18.0.77"
    g = netns.run_in
    g(
        lab.guest,
        [
            "ip",
            "link",
            "add",
            "link",
            n.failover,
            "name",
            "mv0",
            "address",
            MV_MAC,
            "type",
            "macvlan",
            "mode",
            "bridge",
        ],
    )
    # the failover device must not answer ARP for the macvlan's address (weak host model)
    g(lab.guest, ["sysctl", "-qw", f"net.ipv4.conf.{n.failover}.arp_ignore=1"])
    g(lab.guest, ["ip", "addr", "add", f"{mv_ip}/24", "dev", "mv0"])
    g(lab.guest, ["ip", "link", "set", "mv0", "up"])
    for dev in _lowers(lab):
        run.wait_for(lambda d=dev: MV_MAC in _uc(lab, d), what=f"{MV_MAC} on {dev}'s list")
    assert ping(lab.peer, mv_ip)
    assert run.group()["active_lower"] == n.primary
    assert _peer_neigh_mac(lab, mv_ip) == MV_MAC
    g(lab.guest, ["ip", "link", "del", "mv0"])
    for dev in _lowers(lab):
        run.wait_for(lambda d=dev: MV_MAC not in _uc(lab, d), what=f"{MV_MAC} gone from {dev}")


def test_status_carries_the_lowers_ethtool_speed(lab: Lab, agent_factory: list[AgentRun]) -> None:
    """The real ethtool reader reaches status: every lab lower is a veth (10000/Full, and
    veth takes no `ethtool -s`), so which lower's speed the group shows is checked in
    test_agent_unit with lowers of different speeds."""
    run = _up(lab, agent_factory)
    g = run.group()
    primary = next(lw for lw in g["lowers"] if lw["role"] == "primary")
    assert (primary["speed_mbps"], primary["duplex"]) == (10000, "full")  # veth lowers here
    assert g["active_lower"] == primary["name"] and g["speed_mbps"] == 10000

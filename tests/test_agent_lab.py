"""Layer 3 with the agent: net_failover semantics from link events in the lab."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bpfailover import netns
from bpfailover_lab import traffic
from bpfailover_lab.agent_run import AgentRun, HarnessError
from bpfailover_lab.topology import Lab
from tests import labutil
from tests.faultutil import use_test_switches
from tests.labutil import TcpTicker, link_stats, neigh, ping, start_agent

pytestmark = pytest.mark.root

IFF_LOWER_UP = 0x10000


def stream(lab: Lab, rate: int = 5000, seconds: float = 3.0) -> traffic.StreamHandle:
    return labutil.stream(lab, rate, seconds)


def carrier(lab: Lab, dev: str) -> bool:
    info = lab.link(lab.guest, dev)
    return bool(info and info["flags"] & IFF_LOWER_UP)


def test_unplanned_failover_and_return(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    with stream(lab) as h:
        time.sleep(1.0)
        lab.set_far_end(0, "primary", False)  # the VF loses carrier
        agent.wait_active(n.standby)
        rep = h.wait()
    sw = agent.events("switch")[-1]
    assert (sw["from"], sw["to"], sw["reason"]) == (n.primary, n.standby, "primary_down")
    assert sw["latency_us"] > 0
    # traffic continued through the standby to the end of the stream
    for _name, d in rep.directions:
        assert d.received > 0.9 * d.sent and d.last_arrival_s > 2.5, rep.format()
    print(f"\nunplanned failover: event->map {sw['latency_us']} us\n{rep.format()}")
    lab.set_far_end(0, "primary", True)
    agent.wait_active(n.primary)  # reselect: always
    assert agent.events("switch")[-1]["reason"] == "primary_up"


def test_every_log_line_is_json(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    lab.set_far_end(0, "primary", False)
    agent.wait_active(lab.names(0).standby)
    lines = agent.log_path.read_text().splitlines()
    assert len(lines) >= 4  # started, switches, carrier, notify ...
    for ln in lines:
        rec = json.loads(ln)  # a log pipeline must never meet anything else
        assert isinstance(rec["msg"], (dict, str)) and rec["level"] and rec["ts"], ln


def test_reselect_failure_stays_on_standby(lab: Lab) -> None:
    lab.up()
    agent = start_agent(lab, policy={"reselect": "failure"})
    try:
        n = lab.names(0)
        lab.set_far_end(0, "primary", False)
        agent.wait_active(n.standby)
        lab.set_far_end(0, "primary", True)
        agent.wait_for(
            lambda: any(lw["usable"] for lw in agent.group()["lowers"] if lw["role"] == "primary"),
            what="primary usable",
        )
        time.sleep(0.3)
        assert agent.group()["active_lower"] == n.standby  # no switch back while standby is up
        lab.set_far_end(0, "standby", False)
        agent.wait_active(n.primary)
    finally:
        agent.cleanup()


def test_both_lowers_down_drops_carrier_and_keeps_neighbours(
    running: tuple[Lab, AgentRun],
) -> None:
    lab, agent = running
    n = lab.names(0)
    assert carrier(lab, n.failover)
    assert ping(lab.guest, n.peer_v6)  # both neighbour entries resolved before
    lab.set_far_end(0, "primary", False)
    lab.set_far_end(0, "standby", False)
    agent.wait_active(None)
    agent.wait_for(lambda: not carrier(lab, n.failover), what="failover carrier off")
    agent.wait_for(
        lambda: (lab.link(lab.guest, n.failover) or {}).get("operstate") != "UP",
        what="link-watch ran (it flushes neighbours by default)",
    )
    time.sleep(0.1)
    # The peers are the same through any lower: losing them would leave the next packets
    # waiting ~1 s for the ARP/ND solicit timer once a lower is back.
    for addr in (n.peer_v4, n.peer_v6):
        e = neigh(lab.guest, addr)
        assert e and "lladdr" in e and not {"INCOMPLETE", "FAILED"} & set(e["state"]), e
    lab.set_far_end(0, "standby", True)
    agent.wait_active(n.standby)
    agent.wait_for(lambda: carrier(lab, n.failover), what="failover carrier on")


def test_vf_unplug_switches_on_first_sign(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    with stream(lab, rate=10000, seconds=2.0) as h:
        time.sleep(0.8)
        lab.unplug_vf(0)
        agent.wait_active(n.standby)
        rep = h.wait()
    ev = [e for e in agent.events() if e["event"] in ("switch", "lower_unregistered")]
    kinds = [e["event"] for e in ev[-2:]]
    # the switch is made on the RTM_NEWLINK (admin down / carrier off) that precedes
    # unregister, not on the later RTM_DELLINK
    assert kinds == ["switch", "lower_unregistered"], ev
    assert ev[-2]["cause"] == f"link {n.primary}"
    print(f"\nVF unplug at 10k pps: lost {rep.total_lost}, gap {rep.max_gap_ms:.2f} ms")
    assert rep.a_to_b.received > 0.9 * rep.a_to_b.sent


def test_migration_replay_keeps_tcp_and_ends_on_new_vf(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    old_ifindex = lab.link(lab.guest, n.primary)["ifindex"]  # type: ignore[index]
    tcp = TcpTicker(lab.peer, n.peer_v4, lab.guest, seconds=4.0)
    with stream(lab, rate=2000, seconds=4.0) as h:
        time.sleep(0.5)
        lab.migrate(0, pause_s=0.5, log=lambda *_: None)
        agent.wait_active(n.primary)
        rep = h.wait()
    survived, detail = tcp.wait()
    assert survived, f"TCP stream broke during migration: {detail}"
    new = lab.link(lab.guest, n.primary)
    assert new and new["ifindex"] != old_ifindex
    g = agent.group()
    prim = next(lw for lw in g["lowers"] if lw["role"] == "primary")
    assert prim["ifindex"] == new["ifindex"] and prim["active"]
    print(f"\nmigration: UDP lost {rep.total_lost}, longest gap {rep.max_gap_ms:.1f} ms; {detail}")
    # about one packet per direction here; a VF port that does not forward yet when the
    # standby goes down costs hundreds (a tenth of the stream): 5 % of each way is generous
    assert rep.b_to_a is not None  # both ways
    for name, d in rep.directions:
        assert d.sent > 0 and d.lost <= d.sent * 0.05, f"{name}: {rep.format()}"
    # after the plug the standby carries nothing more, the new VF does
    before = {lw["role"]: lw["tx_packets"] for lw in g["lowers"]}
    with stream(lab, rate=2000, seconds=0.5) as h2:
        h2.wait()
    after = {lw["role"]: lw["tx_packets"] for lw in agent.group()["lowers"]}
    assert after["standby"] == before["standby"]
    assert after["primary"] - before["primary"] >= 900
    assert link_stats(lab.guest, n.primary)["tx"] >= 900


def test_primary_hot_plugged_after_start(lab: Lab) -> None:
    lab.up()
    lab.unplug_vf(0)
    agent = start_agent(lab)
    try:
        n = lab.names(0)
        agent.wait_active(n.standby)
        lab.plug_vf(0)
        agent.wait_active(n.primary)
        reg = agent.events("lower_registered")[-1]
        assert (reg["role"], reg["lower"]) == ("primary", n.primary)
        assert not agent.events("lower_udev_wait")  # no udev here: taken at once
    finally:
        agent.cleanup()


def test_hot_plugged_lower_waits_for_udev(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where udev serves the agent's netdevs (a directory stands in for /run/udev), a VF
    plugged while it runs is not registered until udev's database has it, even up with
    carrier; its entry written, it is registered and traffic moves to it.  The fallback
    timer is pushed out of reach, so only the watch can have let it go."""
    udev = tmp_path / "udev"
    (udev / "data").mkdir(parents=True)
    (udev / "control").touch()
    use_test_switches(
        monkeypatch, BPFAILOVER_TEST_UDEV_DIR=str(udev), BPFAILOVER_TEST_UDEV_HOLD_MS="600000"
    )

    def processed(dev: str) -> int:
        ifindex: int = lab.link(lab.guest, dev)["ifindex"]  # type: ignore[index]
        (udev / "data" / f".#n{ifindex}tmp").write_text("I:1700000000\n")
        os.rename(udev / "data" / f".#n{ifindex}tmp", udev / "data" / f"n{ifindex}")
        return ifindex

    lab.up()
    n = lab.names(0)
    processed(n.standby)
    lab.unplug_vf(0)
    agent = start_agent(lab)
    try:
        agent.wait_active(n.standby)
        lab.plug_vf(0)  # up, carrier on
        held = agent.wait_for(lambda: agent.events("lower_udev_wait"), what="the VF held")
        ifindex = lab.link(lab.guest, n.primary)["ifindex"]  # type: ignore[index]
        assert held[-1]["ifindex"] == ifindex
        assert [lw["role"] for lw in agent.group()["lowers"]] == ["standby"]
        assert agent.group()["active_lower"] == n.standby
        processed(n.primary)
        agent.wait_active(n.primary)
        ready = agent.events("lower_udev_ready")[-1]
        assert (ready["lower"], ready["by"]) == (n.primary, "database"), ready  # the watch
        assert not agent.events("lower_udev_timeout")
    finally:
        agent.cleanup()


def test_renamed_lower_keeps_its_role(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    ifindex = lab.link(lab.guest, n.primary)["ifindex"]  # type: ignore[index]
    netns.run_in(lab.guest, ["ip", "link", "set", n.primary, "down"])
    agent.wait_active(n.standby)
    netns.run_in(lab.guest, ["ip", "link", "set", n.primary, "name", "vf0renamed"])
    netns.run_in(lab.guest, ["ip", "link", "set", "vf0renamed", "up"])
    agent.wait_active("vf0renamed")
    prim = next(lw for lw in agent.group()["lowers"] if lw["role"] == "primary")
    assert (prim["name"], prim["ifindex"]) == ("vf0renamed", ifindex)
    assert agent.events("lower_renamed")[-1]["new"] == "vf0renamed"


def test_peers_learn_the_switch_from_garp_and_na(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    assert ping(lab.guest, n.peer_v6)
    bogus = "52:54:00:ff:ff:ff"
    for addr in (n.guest_v4, n.guest_v6):
        netns.run_in(
            lab.peer,
            ["ip", "neigh", "replace", addr, "lladdr", bogus, "dev", "eth0", "nud", "stale"],
        )
    assert lab.fdb_ports(0) == [n.vfport]
    time.sleep(1.2)  # ARP ignores updates within locktime (1 s) of the last one
    reply = agent.request({"cmd": "set-primary", "group": n.failover, "lower": n.standby})
    assert reply["ok"], reply
    # one GARP through the standby moves the MAC to its port and fixes both caches
    agent.wait_for(lambda: lab.fdb_ports(0) == [n.tap], what="fdb entry on the standby port")
    agent.wait_for(
        lambda: (neigh(lab.peer, n.guest_v4) or {}).get("lladdr") == n.mac,
        what="peer ARP entry updated",
    )
    agent.wait_for(
        lambda: (neigh(lab.peer, n.guest_v6) or {}).get("lladdr") == n.mac,
        what="peer IPv6 neighbour entry updated",
    )


def test_planned_switch_loses_nothing(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    with stream(lab, rate=10000, seconds=2.0) as h:
        for k in range(6):
            time.sleep(0.25)
            lower = n.standby if k % 2 == 0 else None
            assert agent.request({"cmd": "set-primary", "group": n.failover, "lower": lower})["ok"]
        rep = h.wait()
    assert rep.total_lost == 0, rep.format()


@pytest.mark.parametrize(
    ("rule", "vf_frames_up"), [("drop_standby", True), ("drop_inactive", False)]
)
def test_vf_frames_after_set_primary_standby_by_inactive_rx_rule(
    lab: Lab, rule: str, vf_frames_up: bool
) -> None:
    """A planned switch sends through the standby while the hypervisor still delivers the
    guest's MAC to the VF (here br0's fdb entry is pinned to the VF's port): net_failover's
    rule takes the VF's frames whichever lower is active; bonding's drops them."""
    agent = labutil.bring_up(lab, inactive_rx=rule)
    try:
        n = lab.names(0)
        assert agent.request({"cmd": "set-primary", "group": n.failover, "lower": "standby"})["ok"]
        agent.wait_active(n.standby)
        fdb = ["bridge", "fdb", "replace", n.mac, "dev", n.vfport, "master", "static", "sticky"]
        netns.run_in(lab.hv, fdb)  # sticky: the guest's GARP through the standby cannot move it

        def counts() -> tuple[int, int]:
            g = agent.group()
            (vf,) = [lw for lw in g["lowers"] if lw["role"] == "primary"]
            return vf["rx_packets"], g["drops"]["tc_ingress/inactive_rx"]

        rx0, drops0 = counts()
        assert ping(lab.peer, n.guest_v4, count=5) == vf_frames_up
        rx1, drops1 = counts()
        assert agent.group()["active_lower"] == n.standby  # the replies went out there
        if vf_frames_up:
            # (the standby's copies of what the bridge floods, the peer's ARP requests, are
            # dropped under net_failover's rule: only the VF's own frames must all go up)
            assert rx1 - rx0 >= 5
        else:
            assert rx1 == rx0 and drops1 - drops0 >= 5
    finally:
        agent.cleanup()


def test_sigkill_and_restart_lose_nothing_and_adopt(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    switches = len(agent.events("switch"))
    before = agent.group()
    with stream(lab, rate=5000, seconds=3.0) as h:
        time.sleep(0.7)
        agent.kill()  # the pinned datapath keeps forwarding while nobody watches
        time.sleep(1.0)
        agent.start()
        rep = h.wait()
    assert rep.total_lost == 0, rep.format()
    assert len(agent.events("switch")) == switches, "restart adopted: no flap"
    after = agent.group()
    assert after["active_lower"] == n.primary
    tx = {lw["role"]: lw["tx_packets"] for lw in after["lowers"]}
    tx0 = {lw["role"]: lw["tx_packets"] for lw in before["lowers"]}
    assert tx["primary"] >= tx0["primary"] + 14000, "counters continued"
    filters = netns.run_in(lab.guest, ["tc", "filter", "show", "dev", n.primary, "ingress"])
    assert filters.stdout.count("bpfailover:") == 1, "no duplicate filters"


def test_second_agent_on_same_pins_is_refused(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    proc = subprocess.run(
        [*AgentRun.command(lab.guest, agent.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "another agent" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert agent.status()["pid"] == agent.proc.pid  # type: ignore[union-attr]


def test_second_agent_with_other_pins_is_refused(running: tuple[Lab, AgentRun]) -> None:
    """One writer per failover device, whatever the pin directory: a second failoverd for
    the same group with another bpffs is refused before it loads or attaches anything, and
    the first agent's switches still move traffic afterwards."""
    lab, agent = running
    n = lab.names(0)
    second = AgentRun(lab, name=f"{lab.prefix}-b")
    hooks = {
        dev: netns.run_in(lab.guest, ["tc", "filter", "show", "dev", dev, d]).stdout
        for dev, d in ((n.primary, "ingress"), (n.standby, "ingress"), (n.failover, "egress"))
    }
    try:
        proc = subprocess.run(
            AgentRun.command(lab.guest, second.config_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "which a running failoverd holds" in lines[0], proc.stderr
        assert not second.pin_dir.exists(), "refused before loading a datapath"
        assert not os.path.exists(second.socket)
        for dev, d in ((n.primary, "ingress"), (n.standby, "ingress"), (n.failover, "egress")):
            now = netns.run_in(lab.guest, ["tc", "filter", "show", "dev", dev, d]).stdout
            assert now == hooks[dev], f"{dev} {d} hook changed"
    finally:
        second.cleanup()
    assert agent.status()["pid"] == agent.proc.pid  # type: ignore[union-attr]
    reply = agent.request({"cmd": "set-primary", "group": n.failover, "lower": n.standby})
    assert reply["ok"], reply
    agent.wait_active(n.standby)
    before = link_stats(lab.guest, n.standby)["tx"]
    with stream(lab, rate=2000, seconds=1.0) as h:
        rep = h.wait()
    assert link_stats(lab.guest, n.standby)["tx"] >= before + 1800, "traffic on the standby"
    assert rep.total_lost == 0, rep.format()


def test_second_agent_on_same_pins_through_a_bind_mount_is_refused(
    running: tuple[Lab, AgentRun], tmp_path: Path
) -> None:
    """One writer per pin directory by identity, not by path: a second failoverd (for
    another lab's group, so no device of the first one is in its way) whose config names
    the first agent's pin directory through a bind mount of the bpffs (in a mount namespace
    of its own, as a container sees `/host/bpffs`) is refused at start in one line naming
    the first agent's pin directory and lock, and changes nothing: the shared maps are as
    they were, nothing is created in its netns, and the first agent still switches."""
    import yaml

    from bpfailover.datapath.maps import Datapath, lock_path
    from tests.conftest import unique

    lab, agent = running
    n = lab.names(0)

    def maps_now() -> tuple[object, ...]:
        with Datapath.open(agent.pin_dir, load=False, read_only=True) as dp:
            groups = dp.groups()
            return groups, dp.devs(), {g: bytes(dp.group(g)) for g in groups.values()}

    before = maps_now()
    other_lab = Lab(unique("t"))
    second = AgentRun(other_lab)
    mnt = tmp_path / "bpffs"  # the bind mount lives and dies with the second agent's process
    mnt.mkdir()
    second.config_path.write_text(
        yaml.safe_dump({**second.config, "bpffs": str(mnt / agent.pin_dir.name)})
    )
    argv = [
        *("unshare", "--mount", "--propagation", "private", "--", "sh", "-c"),
        'mount --bind /sys/fs/bpf "$0" && exec "$@"',
        str(mnt),
        *AgentRun.command(other_lab.guest, second.config_path),
    ]
    proc: subprocess.Popen[str] | None = None
    try:
        other_lab.up()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        after = maps_now()
        assert proc.returncode == 1, f"the second failoverd ran beside the first: {err[-800:]}"
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert f"another agent holds {agent.pin_dir}, which is {mnt}/" in lines[0], lines[0]
        assert str(lock_path(agent.pin_dir)) in lines[0], lines[0]
        assert after == before, "the first agent's maps were written"
        assert not os.path.exists(second.socket)
        assert other_lab.link(other_lab.guest, other_lab.names(0).failover) is None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        second.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(second.socket)
        other_lab.down()
    assert agent.status()["pid"] == agent.proc.pid  # type: ignore[union-attr]
    assert agent.request({"cmd": "set-primary", "group": n.failover, "lower": n.standby})["ok"]
    agent.wait_active(n.standby)


def _ingress_labels(lab: Lab, dev: str) -> list[str]:
    out = netns.run_in(lab.guest, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
    return [w for w in out.split() if w.startswith("bpfailover:")]


def test_lower_plugged_later_with_another_agents_programs_is_refused(
    running: tuple[Lab, AgentRun],
) -> None:
    """One writer per device, for lowers that come while the agent runs too: a VF plugged
    later whose hooks already carry another running failoverd's programs (that agent has its
    own pin dir and lab; its pinned lower_ingress is on the new VF as that agent would have
    put it) is refused in one line and nothing is changed: not registered, its filter left
    alone, traffic stays on the standby.  Once that agent is gone, the VF's next event
    registers it and its hooks are taken over (said so)."""
    from pyroute2 import IPRoute

    from bpfailover.datapath import bpfsys
    from bpfailover.datapath.attach import attach_tc
    from tests.conftest import unique

    lab, agent = running
    n = lab.names(0)
    other_lab = Lab(unique("t"))
    other = AgentRun(other_lab)
    try:
        other_lab.up()
        other.start()
        lab.unplug_vf(0)
        agent.wait_active(n.standby)
        # Plug a VF with another MAC (not a lower yet), put the other agent's program on its
        # ingress, then give it the group MAC: the event that makes it a candidate lower.
        lab._hv_port(n.vfport, lab.guest, n.primary)
        netns.run_in(lab.hv, ["ip", "link", "set", n.vfport, "up"])
        fd = bpfsys.obj_get(str(other.pin_dir / "prog_lower_ingress"))
        label = f"bpfailover:lower_ingress:{bpfsys.prog_info(fd).id}"
        try:
            with netns.entered(lab.guest), IPRoute() as ipr:
                assert attach_tc(ipr, ipr.link_lookup(ifname=n.primary)[0], "ingress", fd, label)
        finally:
            os.close(fd)
        netns.run_in(lab.guest, ["ip", "link", "set", n.primary, "address", n.mac, "up"])
        agent.wait_for(lambda: agent.events("lower_refused"), what="the VF refused")
        # more events on it (carrier off and on): still refused, still said once
        lab.set_far_end(0, "primary", False)
        lab.set_far_end(0, "primary", True)
        agent.wait_for(lambda: carrier(lab, n.primary), what="the VF's carrier")
        agent.request({"cmd": "status"})  # the loop served those events before answering
        refused = agent.events("lower_refused")
        assert len(refused) == 1, refused
        assert refused[0]["lower"] == n.primary and refused[0]["role"] == "primary"
        assert str(other.pin_dir) in str(refused[0]["why"]), refused
        assert "running failoverd holds" in str(refused[0]["why"])
        assert _ingress_labels(lab, n.primary) == [label], "the other agent's filter kept"
        g = agent.group()
        assert [lw["role"] for lw in g["lowers"]] == ["standby"], g
        assert g["active_lower"] == n.standby
        assert not agent.events("hooks_taken_over")
        # That agent gone (its lock released), the VF's next event makes it ours.
        other.cleanup()
        lab.set_far_end(0, "primary", False)
        lab.set_far_end(0, "primary", True)
        agent.wait_active(n.primary)
        taken = agent.events("hooks_taken_over")
        assert len(taken) == 1 and taken[0]["dev"] == n.primary, taken
        (now,) = _ingress_labels(lab, n.primary)
        assert now != label, "our program replaced the orphaned one"
    finally:
        other.cleanup()
        other_lab.down()


def test_mtu_follows_the_failover_device(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    netns.run_in(lab.guest, ["ip", "link", "set", n.failover, "mtu", "1400"])
    for dev in (n.primary, n.standby, f"{n.failover}_fo"):
        agent.wait_for(lambda d=dev: _mtu(lab, d) == 1400, what=f"{dev} mtu 1400")


def test_mtu_refused_by_a_lower_is_rolled_back(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    # Native XDP (without frags) on a veth caps its *peer's* max MTU at about a page: put
    # a program on the VF's far end and the guest's primary refuses MTU 9000.
    from pyroute2 import IPRoute

    from bpfailover.datapath import bpfsys
    from bpfailover.datapath.attach import attach_xdp

    fd = bpfsys.obj_get(str(agent.pin_dir / "prog_xdp_lower_rx"))
    with netns.entered(lab.hv), IPRoute() as ipr:  # (`ip -n` would hide /sys/fs/bpf)
        assert attach_xdp(ipr, ipr.link_lookup(ifname=n.vfport)[0], fd, bpfsys.prog_info(fd).id)
    os.close(fd)
    netns.run_in(lab.guest, ["ip", "link", "set", n.failover, "mtu", "9000"])
    agent.wait_for(lambda: agent.events("mtu_refused"), what="mtu refused")
    agent.wait_for(lambda: _mtu(lab, n.failover) == 1500, what="failover mtu rolled back")
    for dev in (n.primary, n.standby, f"{n.failover}_fo"):
        assert _mtu(lab, dev) == 1500


def _mtu(lab: Lab, dev: str) -> int:
    out = netns.run_in(lab.guest, ["cat", f"/sys/class/net/{dev}/mtu"], check=False)
    if out.returncode == 0:
        return int(out.stdout)
    import json

    info = json.loads(netns.run_in(lab.guest, ["ip", "-j", "link", "show", dev]).stdout)
    return int(info[0]["mtu"])


def test_multicast_joined_on_failover_is_synced_to_lowers(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    n = lab.names(0)
    netns.run_in(lab.guest, ["ip", "addr", "add", "239.1.2.3/32", "dev", n.failover, "autojoin"])
    mac = "01:00:5e:01:02:03"
    for dev in (n.primary, n.standby):
        agent.wait_for(lambda d=dev: mac in _maddrs(lab, d), what=f"{mac} on {dev}")
    netns.run_in(lab.guest, ["ip", "addr", "del", "239.1.2.3/32", "dev", n.failover])
    for dev in (n.primary, n.standby):
        agent.wait_for(lambda d=dev: mac not in _maddrs(lab, d), what=f"{mac} gone from {dev}")


def test_a_lower_whose_mac_changes_is_let_go_and_taken_back(running: tuple[Lab, AgentRun]) -> None:
    """net_failover_slave_unregister(): the address the agent added to the lower's list
    (a multicast group joined on the failover device) is taken off it and it is closed;
    its MAC put back, it registers again, is opened and gets the address again."""
    lab, agent = running
    n = lab.names(0)
    netns.run_in(lab.guest, ["ip", "addr", "add", "239.1.2.4/32", "dev", n.failover, "autojoin"])
    mac = "01:00:5e:01:02:04"
    agent.wait_for(lambda: mac in _maddrs(lab, n.primary), what=f"{mac} on {n.primary}")
    info = lab.link(lab.guest, n.primary)
    assert info is not None
    group_mac = info["mac"]
    netns.run_in(lab.guest, ["ip", "link", "set", n.primary, "address", "02:00:00:00:0e:01"])
    agent.wait_for(lambda: agent.events("lower_unregistered"), what="primary unregistered")
    (gone,) = agent.events("lower_unregistered")
    assert gone["lower"] == n.primary and gone.get("closed") is True, gone
    assert mac not in _maddrs(lab, n.primary) and mac in _maddrs(lab, n.standby)
    info = lab.link(lab.guest, n.primary)
    assert info is not None and not info["flags"] & 0x1  # closed: IFF_UP off
    agent.wait_active(n.standby)
    netns.run_in(lab.guest, ["ip", "link", "set", n.primary, "address", group_mac])
    agent.wait_for(lambda: mac in _maddrs(lab, n.primary), what=f"{mac} back on {n.primary}")
    agent.wait_active(n.primary)
    assert [e["lower"] for e in agent.events("lower_opened")][-1] == n.primary


def _maddrs(lab: Lab, dev: str) -> str:
    return netns.run_in(lab.guest, ["ip", "maddr", "show", "dev", dev]).stdout


def test_missing_standby_is_one_clear_line_and_creates_nothing(lab: Lab, pin_dir: Path) -> None:
    lab.up()
    cfg = pin_dir.parent / f"{pin_dir.name}.yaml"
    import yaml

    Path(f"/tmp/{pin_dir.name}.yaml").write_text(
        yaml.safe_dump(
            {
                "groups": [{"name": "ens10", "standby": "nosuch0"}],
                "bpffs": str(pin_dir),
                "control": {"socket": f"/run/bpfailover/{pin_dir.name}.sock"},
                "metrics": {"listen": None},
            }
        )
    )
    del cfg
    proc = subprocess.run(
        [*AgentRun.command(lab.guest, Path(f"/tmp/{pin_dir.name}.yaml"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    Path(f"/tmp/{pin_dir.name}.yaml").unlink()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "standby nosuch0 not found" in lines[0]
    assert not pin_dir.exists()
    assert lab.link(lab.guest, "ens10") is None


def test_harness_reports_agent_death(lab: Lab) -> None:
    lab.up()
    agent = AgentRun(lab)
    agent.config["bpffs"] = "/nonexistent/dir/pins"
    import yaml

    agent.config_path.write_text(yaml.safe_dump(agent.config))
    try:
        with pytest.raises(HarnessError, match="bpffs"):
            agent.start()
    finally:
        agent.cleanup()
        shutil.rmtree("/nonexistent", ignore_errors=True)


def test_lowers_found_down_at_start_are_opened(lab: Lab) -> None:
    """A cloud guest boots with the lowers down and the managers kept off them (deploy/):
    failoverd opens them, as net_failover opens the slaves it finds when it is created."""
    lab.up()
    n = lab.names(0)
    for dev in (n.standby, n.primary):
        netns.run_in(lab.guest, ["ip", "link", "set", dev, "down"])
    agent = start_agent(lab)
    try:
        agent.wait_active(n.primary)
        opened = {e["lower"] for e in agent.events("lower_opened") if e.get("at") == "start"}
        assert opened == {n.standby, n.primary}
        for dev in (n.standby, n.primary):
            assert lab.link(lab.guest, dev)["flags"] & 1  # type: ignore[index]  # IFF_UP
    finally:
        agent.cleanup()


@pytest.mark.parametrize(
    ("reselect", "active"),
    [(r, a) for r in ("always", "better", "failure") for a in ("primary", "standby")],
)
def test_no_kind_of_restart_moves_traffic_or_tells_the_peers(
    lab: Lab, reselect: str, active: str
) -> None:
    """SIGKILL, SIGTERM and SIGABRT (systemd's watchdog signal) each followed by a start:
    the new agent adopts the active lower the datapath holds, whichever it is and whatever
    `reselect` says, without a switch, a map write or a GARP/NA.  The standby is active
    while the primary is usable again: under `always` because the primary waits a long
    updelay (a VF inside its updelay at the restart), under `better` (same speed) and
    `failure` because a usable active lower stays."""
    updelay = 600_000 if reselect == "always" else 0
    agent = labutil.bring_up(lab, policy={"reselect": reselect, "updelay_ms": updelay})
    try:
        n = lab.names(0)
        if active == "standby":
            lab.set_far_end(0, "primary", False)
            agent.wait_active(n.standby)
            lab.set_far_end(0, "primary", True)
            agent.wait_for(
                lambda: all(lw["usable"] for lw in agent.group()["lowers"]),
                what="the primary usable again",
            )
        want = n.primary if active == "primary" else n.standby
        assert agent.group()["active_lower"] == want
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGABRT):
            seen = {e: len(agent.events(e)) for e in ("switch", "notify", "renotify", "group")}
            agent.stop(sig)
            agent.start()
            agent.wait_for(
                lambda seen=seen: len(agent.events("group")) > seen["group"],
                what="the group adopted",
            )
            assert agent.group()["active_lower"] == want, signal.Signals(sig).name
            adopted = agent.events("group")[-1]["adopted_active"]
            assert adopted == active, (signal.Signals(sig).name, adopted)
            for e in ("switch", "notify", "renotify"):
                assert len(agent.events(e)) == seen[e], (signal.Signals(sig).name, e, agent.tail())
        assert ping(lab.guest, n.peer_v4)
    finally:
        agent.cleanup()


def _ip_batch(ns: str, lines: list[str]) -> None:
    proc = subprocess.run(
        ["ip", "-n", ns, "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-500:]


def _wait(pred: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_overflow_with_older_state_queued_ends_in_the_kernels_state(
    lab: Lab, pin_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An in-process agent whose event socket has a tiny receive buffer (handed in, not
    read from the environment), its loop paused: both lowers lose carrier (queued), a
    veth flaps 200 times (the buffer fills, the kernel drops the rest: ENOBUFS), then both
    lowers get carrier back (dropped).  Resumed, the agent's view and the datapath map are
    the kernel's (both up, traffic on the primary), not the stale queue's (both down)."""
    from bpfailover.agent.loop import Agent
    from bpfailover.agent.ports import Netlink
    from bpfailover.events.udev import UdevDb
    from bpfailover.model import config as configmod

    caplog.set_level(logging.INFO, logger="bpfailover.events")
    lab.up()
    n = lab.names(0)
    cfg = configmod.parse_config(
        json.dumps(
            {
                "groups": [{"name": n.failover, "standby": n.standby}],
                "bpffs": str(pin_dir),
                "control": {"socket": str(tmp_path / "c.sock")},
            }
        )
    )
    no_udev = UdevDb(tmp_path / "no-udev", check_netns=False)
    agent = Agent(cfg, links=Netlink(rcvbuf=4096), udev=no_udev)

    def turns(k: int = 10) -> None:
        with netns.entered(lab.guest):
            for _ in range(k):
                agent.run_once(wait=False)

    def lower_up(dev: str, up: bool) -> bool:
        info = lab.link(lab.guest, dev)
        return info is not None and bool(info["flags"] & IFF_LOWER_UP) == up

    try:
        with netns.entered(lab.guest):
            agent.start()
        turns()
        grp = agent.groups[n.failover]
        assert grp.active == "primary"
        first = agent.events
        overflows = len([e for e in _events(caplog) if e.get("event") == "netlink_overflow"])
        # the loop paused from here: nothing is read
        _ip_batch(lab.hv, [f"link set {lab.far_end(0, 'primary')} down"])
        _ip_batch(lab.hv, [f"link set {lab.far_end(0, 'standby')} down"])
        _wait(lambda: lower_up(n.primary, False) and lower_up(n.standby, False), "carrier off")
        flaps = ["link add ofl0 type veth peer name ofl1", "link set ofl1 up"]
        flaps += ["link set ofl0 up", "link set ofl0 down"] * 200
        _ip_batch(lab.guest, flaps)
        _ip_batch(lab.hv, [f"link set {lab.far_end(0, r)} up" for r in ("primary", "standby")])
        _wait(lambda: lower_up(n.primary, True) and lower_up(n.standby, True), "carrier on")
        turns()  # resumed: enough turns to read whatever was left queued
        assert len([e for e in _events(caplog) if e.get("event") == "netlink_overflow"]) > overflows
        kernel = {
            role: lab.link(lab.guest, dev)
            for role, dev in (("primary", n.primary), ("standby", n.standby))
        }
        for role, info in kernel.items():
            assert info is not None
            lw = grp.lowers[role]  # type: ignore[index]
            assert (lw.ifindex, lw.carrier) == (info["ifindex"], True), role
        assert agent.dp is not None
        slot = agent.dp.L.FO_SLOT_PRIMARY
        assert grp.active == "primary"
        assert agent.dp.active(grp.gid) == slot
        assert agent.dp.lower(grp.gid, slot) == kernel["primary"]["ifindex"]  # type: ignore[index]
        assert agent.events is not first  # a fresh socket, the queue gone with the old one
        # the fresh socket is the one the loop serves: the next event is acted on
        lab.set_far_end(0, "primary", False)
        _wait(lambda: lower_up(n.primary, False), "primary carrier off")
        deadline = time.monotonic() + 20
        while grp.active != "standby" and time.monotonic() < deadline:
            turns(1)
            time.sleep(0.05)
        assert grp.active == "standby"
        assert agent.dp.active(grp.gid) == agent.dp.L.FO_SLOT_STANDBY
    finally:
        agent.close()


def _events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    out = []
    for rec in caplog.records:
        try:
            ev = json.loads(rec.getMessage())
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out

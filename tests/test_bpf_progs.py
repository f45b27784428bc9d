"""Layer 2: the BPF programs alone, through BPF_PROG_TEST_RUN, as one table of cases.

Each case (as katran's test fixtures do): a description, a program and the device it runs
on, a crafted frame, the map and link state -> the verdict, the redirect target (the test
build's fo_last_redirect) and the exact change of every counter of both groups (any counter
a case does not name must not move).  The netdevs are real veths in a private netns: the
kernel needs their ifindexes in the test context, and the per-packet lower check reads
their real state (a lower is taken down, loses its carrier, or is "gone": an ifindex that
does not exist).  One datapath serves the whole table; each case first puts the maps and
links back to the default below, so every case also shows that a flip takes effect on the
very next frame."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bpfailover import netns
from bpfailover.datapath import bpfsys
from bpfailover.datapath import layout_gen as L
from bpfailover.datapath.maps import Counter, Datapath
from tests import frames
from tests.conftest import bpffs_root, unique

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff); ifindex at offset 40
XDP_CTX_SIZE = 24  # sizeof(struct xdp_md); ingress_ifindex at offset 12
GONE_IFINDEX = 424242  # a lower whose device no longer exists (unplugged)

V4 = frames.ipv4_udp(frames.PEER_MAC, frames.MAC, "198.18.0.1", "198.18.0.2")
V6 = frames.ipv6_udp(frames.PEER_MAC, frames.MAC, "2001:db8::1", "2001:db8::2")
ARP = frames.arp_request(frames.MAC, "198.18.0.1", "198.18.0.2")
# received from the peer: its source MAC is not ours
RX_V4 = frames.ipv4_udp(frames.MAC, frames.PEER_MAC, "198.18.0.2", "198.18.0.1")
RX_V6 = frames.ipv6_udp(frames.MAC, frames.PEER_MAC, "2001:db8::2", "2001:db8::1")
RX_ARP = frames.arp_request(frames.PEER_MAC, "198.18.0.2", "198.18.0.1")
OTHER_MAC = "52:54:00:00:12:54"
# group 1's own frame: not group 0's MAC
G1_OWN = frames.ipv4_udp(frames.PEER_MAC, OTHER_MAC, "198.18.1.1", "198.18.1.2")

DEVS = ("fo0", "sb0", "pr0", "fo1", "sb1", "pr1", "other")
SLOTS = {"none": 0, "standby": 1, "primary": 2}
DIRS = {"tx": 0, "rx": 1}
HOOKS = {"tc_egress": 0, "tc_ingress": 1, "xdp": 2}
REASONS = {"no_lower": 0, "inactive_rx": 1, "loop": 2}
PROGS = {"egress": "prog_fo_egress", "ingress": "prog_lower_ingress", "xdp": "prog_xdp_lower_rx"}

# counter keys: ("stats", group, slot, dir), ("drops", group, hook, reason),
# ("fallback", group, from slot, dir) -> the Counter the case adds
Key = tuple[str, int, str, str]


@dataclass(frozen=True)
class Case:
    desc: str
    prog: str  # egress | ingress | xdp
    dev: str  # the device the frame is on
    frame: bytes
    verdict: int
    redirect: str | None = None  # expected fo_last_redirect (None: not checked)
    counts: dict[Key, int] = field(default_factory=dict)  # key -> packets (bytes = len(frame))
    # map state (defaults: both groups active on primary, deliver mode, no devmap entry)
    active: tuple[str, str] = ("primary", "primary")
    rx_rule: str = "deliver"  # group 0's inactive_rx: deliver | drop_standby | drop_inactive
    hold: bool = False  # group 0: FO_F_DP_HOLD (downdelay_ms > 0: the agent alone moves)
    override: str = "none"  # group 0's override_slot
    xdp_up: bool = False  # group 0's devmap entry
    lowers: tuple[tuple[str, str, int | str], ...] = ()  # (group 0 slot, dev | ifindex)
    dp_check: bool = True  # fo_meta[FO_META_DP_CHECK] is "on"
    # link state: dev -> "down" (admin down: not running) | "nocarrier" (its peer is down)
    links: tuple[tuple[str, str], ...] = ()


def tx(g: int, slot: str, n: int = 1) -> dict[Key, int]:
    return {("stats", g, slot, "tx"): n}


def rx(g: int, slot: str, n: int = 1) -> dict[Key, int]:
    return {("stats", g, slot, "rx"): n}


def drop(g: int, hook: str, reason: str, n: int = 1) -> dict[Key, int]:
    return {("drops", g, hook, reason): n}


def fallback(g: int, from_slot: str, d: str) -> dict[Key, int]:
    return {("fallback", g, from_slot, d): 1}


FRAMES_TX = (("ipv4", V4), ("ipv6", V6), ("arp", ARP))
FRAMES_RX = (("ipv4", RX_V4), ("ipv6", RX_V6), ("arp", RX_ARP))
DEAD = (("down", "admin down"), ("nocarrier", "no carrier"))

RX_RULES = ("deliver", "drop_standby", "drop_inactive")


def _rx_rule_case(hook: str, rule: str, dev: str, active: str, registered: bool) -> Case:
    """One frame from `dev` (pr0 | sb0) under `rule`, every link up: net_failover's
    drop_standby drops the standby's frames while a primary is registered (its slot holds
    it), whichever lower is active, never the primary's; bonding's drop_inactive drops
    whatever does not come from the active lower."""
    slot = "primary" if dev == "pr0" else "standby"
    ok = {
        "deliver": True,
        "drop_standby": slot == "primary" or not registered,
        "drop_inactive": slot == active,
    }[rule]
    xdp = hook == "xdp"
    up, shot = (XDP_REDIRECT, XDP_DROP) if xdp else (TC_ACT_REDIRECT, TC_ACT_SHOT)
    return Case(
        f"{rule} ({hook}): from the {slot}, active {active}, primary "
        f"{'registered' if registered else 'unregistered'}: {'up' if ok else 'dropped'}",
        hook,
        dev,
        RX_V4,
        up if ok else shot,
        "fo0" if ok else None,
        rx(0, slot) if ok else drop(0, "xdp" if xdp else "tc_ingress", "inactive_rx"),
        active=(active, "primary"),
        rx_rule=rule,
        xdp_up=xdp,
        lowers=() if registered else (("primary", 0),),
    )


# Every rule x the lower a frame comes from x the active lower x primary registered or not
# (an unregistered primary is never active and its frames never reach us: fo_dev forgets it).
RX_RULE_TABLE = [
    _rx_rule_case(hook, rule, dev, active, registered)
    for hook in ("ingress", "xdp")
    for rule in RX_RULES
    for registered in (True, False)
    for dev in (("pr0", "sb0") if registered else ("sb0",))
    for active in (("primary", "standby", "none") if registered else ("standby", "none"))
]

CASES: list[Case] = [
    Case(
        "tx_path veth: what fo0 sent, at its hidden peer's ingress -> active primary",
        "egress",
        "fo0p",
        V4,
        TC_ACT_REDIRECT,
        "pr0",
        tx(0, "primary"),
    ),
    # -- transmit: out through the active lower, counted per slot --------------------------
    *(
        Case(
            f"egress {name} -> active {slot}",
            "egress",
            "fo0",
            f,
            TC_ACT_REDIRECT,
            dev,
            tx(0, slot),
            active=(slot, "primary"),
        )
        for name, f in FRAMES_TX
        for slot, dev in (("primary", "pr0"), ("standby", "sb0"))
    ),
    *(
        Case(
            f"no active lower: {name} dropped as no_lower",
            "egress",
            "fo0",
            f,
            TC_ACT_SHOT,
            None,
            drop(0, "tc_egress", "no_lower"),
            active=("none", "primary"),
        )
        for name, f in (("ipv4", V4), ("arp", ARP))
    ),
    Case(
        "active slot's lower unregistered (check off): no_lower",
        "egress",
        "fo0",
        V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_egress", "no_lower"),
        lowers=(("primary", 0),),
        dp_check=False,
    ),
    Case(
        "active slot's lower unregistered, the standby dead too: no_lower",
        "egress",
        "fo0",
        V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_egress", "no_lower"),
        lowers=(("primary", 0),),
        links=(("sb0", "down"),),
    ),
    Case("unknown device: egress left alone", "egress", "other", V4, TC_ACT_OK),
    Case("unknown device: ingress left alone", "ingress", "other", RX_V4, TC_ACT_OK),
    Case("unknown device: xdp passes", "xdp", "other", RX_V4, XDP_PASS),
    Case("a lower's own egress is not redirected", "egress", "pr0", V4, TC_ACT_OK),
    Case(
        "groups isolated: fo1 -> its own standby",
        "egress",
        "fo1",
        V4,
        TC_ACT_REDIRECT,
        "sb1",
        tx(1, "standby"),
        active=("primary", "standby"),
    ),
    Case(
        "groups isolated: pr1 -> fo1",
        "ingress",
        "pr1",
        RX_V4,
        TC_ACT_REDIRECT,
        "fo1",
        rx(1, "primary"),
        active=("primary", "standby"),
    ),
    # -- transmit: the per-packet lower check (net_failover's start_xmit) -------------------
    *(
        Case(
            f"active primary {what}, standby up: datapath falls back to the standby",
            "egress",
            "fo0",
            V4,
            TC_ACT_REDIRECT,
            "sb0",
            {**tx(0, "standby"), **fallback(0, "primary", "tx")},
            links=(("pr0", state),),
        )
        for state, what in DEAD
    ),
    *(
        Case(
            f"active standby {what}, primary up: datapath falls back to the primary",
            "egress",
            "fo0",
            V6,
            TC_ACT_REDIRECT,
            "pr0",
            {**tx(0, "primary"), **fallback(0, "standby", "tx")},
            active=("standby", "primary"),
            links=(("sb0", state),),
        )
        for state, what in DEAD
    ),
    Case(
        "active primary gone (unplugged, agent not told yet): falls back",
        "egress",
        "fo0",
        V4,
        TC_ACT_REDIRECT,
        "sb0",
        {**tx(0, "standby"), **fallback(0, "primary", "tx")},
        lowers=(("primary", GONE_IFINDEX),),
    ),
    Case(
        "active slot's lower unregistered, standby up: falls back",
        "egress",
        "fo0",
        ARP,
        TC_ACT_REDIRECT,
        "sb0",
        {**tx(0, "standby"), **fallback(0, "primary", "tx")},
        lowers=(("primary", 0),),
    ),
    *(
        Case(
            f"both lowers dead ({what} / {what2}): no_lower",
            "egress",
            "fo0",
            V4,
            TC_ACT_SHOT,
            None,
            drop(0, "tc_egress", "no_lower"),
            links=(("pr0", s1), ("sb0", s2)),
        )
        for (s1, what), (s2, what2) in (
            (DEAD[0], DEAD[1]),
            (DEAD[1], DEAD[0]),
            (DEAD[1], DEAD[1]),
        )
    ),
    Case(
        "primary dead, standby unregistered: no_lower",
        "egress",
        "fo0",
        V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_egress", "no_lower"),
        lowers=(("standby", 0),),
        links=(("pr0", "nocarrier"),),
    ),
    Case(
        "primary dead, standby gone: no_lower",
        "egress",
        "fo0",
        V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_egress", "no_lower"),
        lowers=(("standby", GONE_IFINDEX),),
        links=(("pr0", "down"),),
    ),
    *(
        Case(
            f"active primary gone, standby {what}: no_lower (nothing sent to a gone ifindex)",
            "egress",
            "fo0",
            V4,
            TC_ACT_SHOT,
            None,
            drop(0, "tc_egress", "no_lower"),
            lowers=(("primary", GONE_IFINDEX),),
            links=(("sb0", state),),
        )
        for state, what in DEAD
    ),
    Case(
        "active primary gone, standby unregistered: no_lower",
        "egress",
        "fo0",
        V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_egress", "no_lower"),
        lowers=(("primary", GONE_IFINDEX), ("standby", 0)),
    ),
    Case(
        "active standby gone, primary dead: no_lower",
        "egress",
        "fo0",
        V6,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_egress", "no_lower"),
        active=("standby", "primary"),
        lowers=(("standby", GONE_IFINDEX),),
        links=(("pr0", "nocarrier"),),
    ),
    Case(
        "agent says no lower, standby up: the datapath does not override it",
        "egress",
        "fo0",
        V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_egress", "no_lower"),
        active=("none", "primary"),
        links=(("pr0", "nocarrier"),),
    ),
    Case(
        "downdelay (hold): primary dead, sent there as the agent says, no fallback",
        "egress",
        "fo0",
        V4,
        TC_ACT_REDIRECT,
        "pr0",
        tx(0, "primary"),
        hold=True,
        links=(("pr0", "nocarrier"),),
    ),
    Case(
        "downdelay (hold): primary gone, standby up: no_lower, not sent to a gone ifindex",
        "egress",
        "fo0",
        V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_egress", "no_lower"),
        hold=True,
        lowers=(("primary", GONE_IFINDEX),),
    ),
    Case(
        "override to the standby, standby dead: to the primary, as the policy table does",
        "egress",
        "fo0",
        V4,
        TC_ACT_REDIRECT,
        "pr0",
        {**tx(0, "primary"), **fallback(0, "standby", "tx")},
        active=("standby", "primary"),
        override="standby",
        links=(("sb0", "down"),),
    ),
    Case(
        "override to the standby, standby up: stays there (the way back is the agent's)",
        "egress",
        "fo0",
        V4,
        TC_ACT_REDIRECT,
        "sb0",
        tx(0, "standby"),
        active=("standby", "primary"),
        override="standby",
    ),
    Case(
        "check off: primary dead, sent there as before",
        "egress",
        "fo0",
        V4,
        TC_ACT_REDIRECT,
        "pr0",
        tx(0, "primary"),
        dp_check=False,
        links=(("pr0", "nocarrier"),),
    ),
    Case(
        "group 0's dead primary does not move group 1",
        "egress",
        "fo1",
        V4,
        TC_ACT_REDIRECT,
        "pr1",
        tx(1, "primary"),
        links=(("pr0", "down"),),
    ),
    # -- receive ---------------------------------------------------------------------------
    *(
        Case(
            f"deliver mode: {name} from the {slot} goes up",
            "ingress",
            dev,
            f,
            TC_ACT_REDIRECT,
            "fo0",
            rx(0, slot),
        )
        for name, f in FRAMES_RX
        for slot, dev in (("primary", "pr0"), ("standby", "sb0"))
    ),
    *RX_RULE_TABLE,
    *(
        Case(
            f"drop_inactive, active primary {what}: the standby's frame is delivered",
            "ingress",
            "sb0",
            RX_V4,
            TC_ACT_REDIRECT,
            "fo0",
            {**rx(0, "standby"), **fallback(0, "primary", "rx")},
            rx_rule="drop_inactive",
            links=(("pr0", state),),
        )
        for state, what in DEAD
    ),
    Case(
        "drop_inactive, active primary gone: the standby's frame is delivered",
        "ingress",
        "sb0",
        RX_V6,
        TC_ACT_REDIRECT,
        "fo0",
        {**rx(0, "standby"), **fallback(0, "primary", "rx")},
        rx_rule="drop_inactive",
        lowers=(("primary", GONE_IFINDEX),),
    ),
    Case(
        "drop_inactive + downdelay (hold), primary dead: the standby's frame dropped",
        "ingress",
        "sb0",
        RX_V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_ingress", "inactive_rx"),
        rx_rule="drop_inactive",
        hold=True,
        links=(("pr0", "nocarrier"),),
    ),
    # -- receive under drop_standby: "registered" is present, whatever its carrier --------
    *(
        Case(
            f"drop_standby, primary {what} (present: registered), active standby: the "
            "standby's frame dropped",
            "ingress",
            "sb0",
            RX_V4,
            TC_ACT_SHOT,
            None,
            drop(0, "tc_ingress", "inactive_rx"),
            active=("standby", "primary"),
            rx_rule="drop_standby",
            links=(("pr0", state),),
        )
        for state, what in DEAD
    ),
    Case(
        "drop_standby, primary without carrier: its own frame still up",
        "ingress",
        "pr0",
        RX_V6,
        TC_ACT_REDIRECT,
        "fo0",
        rx(0, "primary"),
        active=("standby", "primary"),
        rx_rule="drop_standby",
        links=(("pr0", "nocarrier"),),
    ),
    *(
        Case(
            f"drop_standby, primary gone (agent not told yet), active {act}: the standby's "
            "frame is delivered",
            "ingress",
            "sb0",
            RX_V4,
            TC_ACT_REDIRECT,
            "fo0",
            {**rx(0, "standby"), **fallback(0, "primary", "rx")},
            active=(act, "primary"),
            rx_rule="drop_standby",
            lowers=(("primary", GONE_IFINDEX),),
        )
        for act in ("primary", "standby")
    ),
    Case(
        "drop_standby + downdelay (hold), primary gone: the standby's frame is delivered",
        "ingress",
        "sb0",
        RX_V4,
        TC_ACT_REDIRECT,
        "fo0",
        {**rx(0, "standby"), **fallback(0, "primary", "rx")},
        active=("standby", "primary"),
        rx_rule="drop_standby",
        hold=True,
        lowers=(("primary", GONE_IFINDEX),),
    ),
    Case(
        "drop_standby, check off, primary gone: the standby's frame dropped (cannot tell)",
        "ingress",
        "sb0",
        RX_V4,
        TC_ACT_SHOT,
        None,
        drop(0, "tc_ingress", "inactive_rx"),
        active=("standby", "primary"),
        rx_rule="drop_standby",
        lowers=(("primary", GONE_IFINDEX),),
        dp_check=False,
    ),
    Case(
        "xdp drop_standby, primary gone: the standby's frame is delivered",
        "xdp",
        "sb0",
        RX_V4,
        XDP_REDIRECT,
        "fo0",
        {**rx(0, "standby"), **fallback(0, "primary", "rx")},
        active=("standby", "primary"),
        rx_rule="drop_standby",
        xdp_up=True,
        lowers=(("primary", GONE_IFINDEX),),
    ),
    # -- a planned switch (set-primary GROUP standby): the VF still receives what the switch
    # sends it until the hypervisor moves the MAC --------------------------------------
    *(
        Case(
            f"after set-primary standby, {rule} ({hook}): the VF's frame "
            f"{'up' if ok else 'dropped'}",
            hook,
            "pr0",
            RX_V4,
            (XDP_REDIRECT if hook == "xdp" else TC_ACT_REDIRECT)
            if ok
            else (XDP_DROP if hook == "xdp" else TC_ACT_SHOT),
            "fo0" if ok else None,
            rx(0, "primary")
            if ok
            else drop(0, "tc_ingress" if hook == "ingress" else hook, "inactive_rx"),
            active=("standby", "primary"),
            override="standby",
            rx_rule=rule,
            xdp_up=hook == "xdp",
        )
        for rule, ok in (("drop_standby", True), ("drop_inactive", False))
        for hook in ("ingress", "xdp")
    ),
    *(
        Case(
            f"own {name} flooded back on {dev} ({hook}): loop",
            hook,
            dev,
            f,
            TC_ACT_SHOT if hook == "ingress" else XDP_DROP,
            None,
            drop(0, "tc_ingress" if hook == "ingress" else "xdp", "loop"),
            xdp_up=True,
        )
        for name, f in FRAMES_TX
        for dev in ("sb0", "pr0")
        for hook in ("ingress", "xdp")
    ),
    Case(
        "group 1's MAC is not group 0's: passes group 0's lowers",
        "ingress",
        "pr0",
        G1_OWN,
        TC_ACT_REDIRECT,
        "fo0",
        rx(0, "primary"),
    ),
    Case("xdp without a devmap entry: passes to TC, counts nothing", "xdp", "pr0", RX_V4, XDP_PASS),
    *(
        Case(
            f"xdp {name}: up through the devmap",
            "xdp",
            "pr0",
            f,
            XDP_REDIRECT,
            "fo0",
            rx(0, "primary"),
            xdp_up=True,
        )
        for name, f in FRAMES_RX
    ),
    Case(
        "xdp drop_inactive: the inactive standby's frame dropped",
        "xdp",
        "sb0",
        RX_V4,
        XDP_DROP,
        None,
        drop(0, "xdp", "inactive_rx"),
        rx_rule="drop_inactive",
        xdp_up=True,
    ),
    Case(
        "xdp drop_inactive: the active primary's frame up",
        "xdp",
        "pr0",
        RX_V4,
        XDP_REDIRECT,
        "fo0",
        rx(0, "primary"),
        rx_rule="drop_inactive",
        xdp_up=True,
    ),
    Case(
        "xdp drop_inactive, active primary dead: the standby's frame is delivered",
        "xdp",
        "sb0",
        RX_V4,
        XDP_REDIRECT,
        "fo0",
        {**rx(0, "standby"), **fallback(0, "primary", "rx")},
        rx_rule="drop_inactive",
        xdp_up=True,
        links=(("pr0", "down"),),
    ),
    Case(
        "xdp drop_inactive, primary dead, no devmap entry: passed to TC, counts nothing here",
        "xdp",
        "sb0",
        RX_V4,
        XDP_PASS,
        None,
        rx_rule="drop_inactive",
        links=(("pr0", "down"),),
    ),
]


def skb_ctx(ifindex: int) -> bytes:
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("=I", ctx, 40, ifindex)
    return bytes(ctx)


def xdp_ctx(ifindex: int, frame_len: int) -> bytes:
    ctx = bytearray(XDP_CTX_SIZE)  # data = 0, data_end = the frame's length
    struct.pack_into("=III", ctx, 4, frame_len, 0, ifindex)
    return bytes(ctx)


class Rig:
    """Two groups: g0 = fo0 (sb0 standby, pr0 primary), g1 = fo1 (sb1, pr1)."""

    def __init__(self, dp: Datapath, ns: str, ifx: dict[str, int]) -> None:
        self.dp, self.ns, self.ifx = dp, ns, ifx
        self.links: dict[str, str] = {}  # dev -> state differing from "up"

    def set_links(self, want: dict[str, str]) -> None:
        cmds = []
        for dev in DEVS:
            old, new = self.links.get(dev, "up"), want.get(dev, "up")
            if old == new:
                continue
            cmds.append(f"link set {dev} {'down' if new == 'down' else 'up'}")
            cmds.append(f"link set {dev}p {'down' if new == 'nocarrier' else 'up'}")
        if cmds:
            subprocess.run(
                ["ip", "-n", self.ns, "-batch", "-"], input="\n".join(cmds), text=True, check=True
            )
        self.links = dict(want)

    def apply(self, c: Case) -> None:
        dp = self.dp
        for g in (0, 1):
            for slot, dev in ((L.FO_SLOT_STANDBY, f"sb{g}"), (L.FO_SLOT_PRIMARY, f"pr{g}")):
                dp.set_lower(g, slot, self.ifx[dev])
            dp.flip(g, SLOTS[c.active[g]])
        for slot_name, lower in c.lowers:
            dp.set_lower(0, SLOTS[slot_name], lower if isinstance(lower, int) else self.ifx[lower])
        flags = L.FO_F_DP_HOLD if c.hold else 0
        rule = L.names("FO_IRX_").index(c.rx_rule)
        dp.update_group(0, flags=flags, inactive_rx=rule, override_slot=SLOTS[c.override])
        if c.xdp_up:
            with netns.entered(self.ns):  # a devmap entry's ifindex: the updater's netns
                dp.set_xdp_up(0, self.ifx["fo0p"])
        else:
            bpfsys.map_delete(dp.fds["fo_xdp_up"], struct.pack("=I", 0))
        state = L.FO_DPC_ON if c.dp_check else L.FO_DPC_OFF
        bpfsys.map_update(
            dp.fds["fo_meta"], struct.pack("=I", L.FO_META_DP_CHECK), struct.pack("=I", state)
        )
        dp.update_group(1, flags=0, inactive_rx=0)
        self.set_links(dict(c.links))
        bpfsys.map_update(dp.fds["fo_last_redirect"], struct.pack("=I", 0), struct.pack("=I", 0))

    def run(self, c: Case) -> int:
        fd = self.dp.prog_fd(PROGS[c.prog])
        ifindex = self.ifx[c.dev]
        ctx = xdp_ctx(ifindex, len(c.frame)) if c.prog == "xdp" else skb_ctx(ifindex)
        with netns.entered(self.ns):  # the context's ifindex is looked up in this netns
            return bpfsys.prog_test_run(fd, c.frame, ctx).retval

    def counters(self) -> dict[Key, Counter]:
        out: dict[Key, Counter] = {}
        for g in (0, 1):
            for slot in ("standby", "primary"):
                for d in DIRS:
                    out[("stats", g, slot, d)] = self.dp.stats(g, SLOTS[slot], DIRS[d])
                    out[("fallback", g, slot, d)] = self.dp.fallback(g, SLOTS[slot], DIRS[d])
            for hook in HOOKS:
                for reason in REASONS:
                    out[("drops", g, hook, reason)] = self.dp.drops(g, HOOKS[hook], REASONS[reason])
        return out


def _make_netns() -> str:
    name = unique("fot-")
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


# The per-packet lower check reads two net_device fields with one probe read where they lie
# close together (this kernel: always); "separate reads" compiles the other branch, so that
# every case runs through both.
READS = {"one read": (), "separate reads": ("--layout-override", '{"read_window": 0}')}


@pytest.fixture(scope="module", params=list(READS))
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    pin_dir = bpffs_root() / unique("bpfailover-test-")
    ns = _make_netns()
    dp: Datapath | None = None
    try:
        ifx: dict[str, int] = {}
        for dev in DEVS:
            subprocess.run(
                ["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", f"{dev}p"], check=True
            )
            for name in (dev, f"{dev}p"):
                subprocess.run(["ip", "-n", ns, "link", "set", name, "up"], check=True)
                out = subprocess.run(
                    ["ip", "-n", ns, "-o", "link", "show", name],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                ifx[name] = int(out.split(":", 1)[0])
        dp = Datapath.open(pin_dir, test_hooks=True, loader_args=READS[request.param])
        assert dp.datapath_check() == "on"
        for i in (0, 1):
            g = dp.alloc_group(f"fo{i}")
            assert g == i
            dp.update_group(
                g,
                master_ifindex=ifx[f"fo{i}"],
                peer_ifindex=ifx[f"fo{i}p"],
                mac=(frames.MAC, OTHER_MAC)[i],
            )
            dp.set_dev(ifx[f"fo{i}"], g, L.FO_ROLE_MASTER)
            dp.set_dev(ifx[f"fo{i}p"], g, L.FO_ROLE_MASTER)  # tx_path veth: fo_egress there
            for slot, dev in ((L.FO_SLOT_STANDBY, f"sb{i}"), (L.FO_SLOT_PRIMARY, f"pr{i}")):
                dp.set_dev(ifx[dev], g, slot)
        yield Rig(dp, ns, ifx)
    finally:
        if dp is not None:
            dp.close()
        shutil.rmtree(pin_dir, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_case(rig: Rig, case: Case) -> None:
    rig.apply(case)
    before = rig.counters()
    assert rig.run(case) == case.verdict
    if case.redirect is not None:
        want = case.redirect
        if case.prog != "egress" and want in ("fo0", "fo1"):
            want += "p"  # up into the failover device through its hidden peer's transmit
        assert rig.dp.last_redirect() == rig.ifx[want]
    elif case.verdict in (TC_ACT_SHOT, XDP_DROP, TC_ACT_OK, XDP_PASS):
        assert rig.dp.last_redirect() == 0  # nothing was redirected
    after = rig.counters()
    n = len(case.frame)
    got = {
        k: Counter(after[k].packets - v.packets, after[k].bytes - v.bytes)
        for k, v in before.items()
    }
    want = {k: Counter(case.counts.get(k, 0), case.counts.get(k, 0) * n) for k in before}
    assert {k: v for k, v in got.items() if v != Counter()} == {
        k: v for k, v in want.items() if v != Counter()
    }
    assert rig.dp.datapath_check() == ("on" if case.dp_check else "off")  # never tripped


def test_table_covers_every_verdict_and_counter_kind() -> None:
    """The table itself: every program, verdict and counter family has a case."""
    assert {c.prog for c in CASES} == set(PROGS)
    verdicts = {(c.prog == "xdp", c.verdict) for c in CASES}
    assert verdicts >= {(False, v) for v in (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT)}
    assert verdicts >= {(True, v) for v in (XDP_DROP, XDP_PASS, XDP_REDIRECT)}
    kinds = {(k[0], k[-1]) for c in CASES for k in c.counts}
    assert kinds >= {("stats", "tx"), ("stats", "rx"), ("fallback", "tx"), ("fallback", "rx")}
    assert {k[3] for c in CASES for k in c.counts if k[0] == "drops"} == set(REASONS)


def test_counters_survive_reopen_and_reset_on_new_group(rig: Rig) -> None:
    rig.apply(Case("", "egress", "fo0", V4, TC_ACT_REDIRECT))
    before = rig.dp.stats(0, L.FO_SLOT_PRIMARY, L.FO_DIR_TX).packets
    rig.run(Case("", "egress", "fo0", V4, TC_ACT_REDIRECT))
    again = Datapath.open(rig.dp.pin_dir, load=False, test_hooks=True)  # a restarted agent
    try:
        assert again.groups() == {"fo0": 0, "fo1": 1}
        assert again.active(0) == L.FO_SLOT_PRIMARY
        assert again.stats(0, L.FO_SLOT_PRIMARY, L.FO_DIR_TX).packets == before + 1
        assert again.datapath_check() == "on"
        again.reset_group(0)
        assert again.stats(0, L.FO_SLOT_PRIMARY, L.FO_DIR_TX) == Counter()
        assert again.fallback(0, L.FO_SLOT_PRIMARY, L.FO_DIR_TX) == Counter()
        assert again.active(0) == L.FO_SLOT_NONE
        assert "fo0" not in again.groups()
    finally:
        # put group 0 back for any case that runs after this one
        g = again.alloc_group("fo0")
        again.update_group(g, master_ifindex=rig.ifx["fo0"], peer_ifindex=rig.ifx["fo0p"])
        again.update_group(g, mac=frames.MAC)
        again.set_dev(rig.ifx["fo0"], g, L.FO_ROLE_MASTER)
        again.set_dev(rig.ifx["fo0p"], g, L.FO_ROLE_MASTER)
        again.set_dev(rig.ifx["sb0"], g, L.FO_SLOT_STANDBY)
        again.set_dev(rig.ifx["pr0"], g, L.FO_SLOT_PRIMARY)
        again.close()


def test_wrong_offsets_are_caught_at_load_and_per_packet(rig: Rig) -> None:
    """A datapath built with a wrong net_device.ifindex offset: the load-time probe turns
    the check off; forced on anyway, the first packet whose device reads back another
    ifindex turns it off for good (mismatch) and the packet goes where the agent said."""
    pin_dir = Path("/sys/fs/bpf") / unique("bpfailover-test-")
    try:
        dp = Datapath.open(
            pin_dir, test_hooks=True, loader_args=("--layout-override", '{"dev_ifindex": 228}')
        )
        try:
            assert dp.datapath_check() == "probe_failed"
            g = dp.alloc_group("fo0")
            dp.update_group(
                g, master_ifindex=rig.ifx["fo0"], peer_ifindex=rig.ifx["fo0p"], mac=frames.MAC
            )
            dp.set_dev(rig.ifx["fo0"], g, L.FO_ROLE_MASTER)
            for slot, dev in ((L.FO_SLOT_STANDBY, "sb0"), (L.FO_SLOT_PRIMARY, "pr0")):
                dp.set_dev(rig.ifx[dev], g, slot)
                dp.set_lower(g, slot, rig.ifx[dev])
            dp.flip(g, L.FO_SLOT_PRIMARY)
            rig.set_links({"pr0": "nocarrier"})
            key = struct.pack("=I", L.FO_META_DP_CHECK)
            bpfsys.map_update(dp.fds["fo_meta"], key, struct.pack("=I", L.FO_DPC_ON))
            with netns.entered(rig.ns):
                res = bpfsys.prog_test_run(
                    dp.prog_fd("prog_fo_egress"), V4, skb_ctx(rig.ifx["fo0"])
                )
            assert res.retval == TC_ACT_REDIRECT
            assert dp.last_redirect() == rig.ifx["pr0"]  # no fallback on a wrong reading
            assert dp.datapath_check() == "mismatch"
            assert dp.fallback(g, L.FO_SLOT_PRIMARY, L.FO_DIR_TX) == Counter()
        finally:
            dp.close()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def test_without_kernel_btf_the_datapath_loads_without_the_check(rig: Rig) -> None:
    """No BTF: the check is off (and says so), everything else works as before: a dead
    active lower is still sent to, as the agent said; the inactive_rx rules apply."""
    pin_dir = Path("/sys/fs/bpf") / unique("bpfailover-test-")
    try:
        dp = Datapath.open(pin_dir, test_hooks=True, loader_args=("--btf", "/nonexistent"))
        try:
            assert dp.datapath_check() == "off"
            g = dp.alloc_group("fo0")
            dp.update_group(
                g, master_ifindex=rig.ifx["fo0"], peer_ifindex=rig.ifx["fo0p"], mac=frames.MAC
            )
            dp.set_dev(rig.ifx["fo0"], g, L.FO_ROLE_MASTER)
            for slot, dev in ((L.FO_SLOT_STANDBY, "sb0"), (L.FO_SLOT_PRIMARY, "pr0")):
                dp.set_dev(rig.ifx[dev], g, slot)
                dp.set_lower(g, slot, rig.ifx[dev])
            dp.flip(g, L.FO_SLOT_PRIMARY)
            rig.set_links({"pr0": "nocarrier"})
            with netns.entered(rig.ns):
                res = bpfsys.prog_test_run(
                    dp.prog_fd("prog_fo_egress"), V4, skb_ctx(rig.ifx["fo0"])
                )
            assert res.retval == TC_ACT_REDIRECT
            assert dp.last_redirect() == rig.ifx["pr0"]
            assert dp.stats(g, L.FO_SLOT_PRIMARY, L.FO_DIR_TX) == Counter(1, len(V4))
            # the receive rules need no check: drop_standby, the primary without carrier
            # (registered), the standby active
            dp.update_group(g, inactive_rx=L.FO_IRX_DROP_STANDBY)
            dp.flip(g, L.FO_SLOT_STANDBY)
            prog = dp.prog_fd("prog_lower_ingress")
            with netns.entered(rig.ns):
                from_sb = bpfsys.prog_test_run(prog, RX_V4, skb_ctx(rig.ifx["sb0"])).retval
                from_pr = bpfsys.prog_test_run(prog, RX_V4, skb_ctx(rig.ifx["pr0"])).retval
            assert (from_sb, from_pr) == (TC_ACT_SHOT, TC_ACT_REDIRECT)
            drops = dp.drops(g, L.FO_HOOK_TC_INGRESS, L.FO_DROP_INACTIVE_RX)
            assert drops == Counter(1, len(RX_V4))
        finally:
            dp.close()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


TUNSETIFF, TUNSETCARRIER = 0x400454CA, 0x400454E2
IFF_TAP, IFF_NO_PI, IFF_LOWER_UP = 0x0002, 0x1000, 0x10000


def test_tap_carrier_loss_moves_the_datapath_before_netlink_tells(rig: Rig) -> None:
    """A tap device's carrier events are not urgent for link-watch (its ifindex is its
    iflink): after a flap, the next carrier-off RTM_NEWLINK waits for link-watch's next run
    (up to 1 s).  The carrier bit flips at once, and that is what the datapath reads: the
    very next frame goes to the standby, and netlink has not said anything yet."""
    import fcntl
    import os
    import select
    import socket
    import time

    rig.apply(Case("", "egress", "fo0", V4, TC_ACT_REDIRECT))
    with netns.entered(rig.ns):
        tun = os.open("/dev/net/tun", os.O_RDWR)
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    nl.setblocking(False)

    def carrier_off_told(tap: int) -> bool:
        """Has a carrier-off RTM_NEWLINK of the tap arrived (reads what is queued)?"""
        told = False
        while True:
            try:
                data = nl.recv(65536)
            except BlockingIOError:
                return told
            off = 0
            while off + 32 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                _fam, _pad, _typ, index, flags = struct.unpack_from("=BBHiI", data, off + 16)
                if mtype == 16 and index == tap and not flags & IFF_LOWER_UP:  # RTM_NEWLINK
                    told = True
                off += (length + 3) & ~3

    try:
        fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", b"fotap0", IFF_TAP | IFF_NO_PI))
        subprocess.run(["ip", "-n", rig.ns, "link", "set", "fotap0", "up"], check=True)
        out = subprocess.run(
            ["ip", "-n", rig.ns, "-o", "link", "show", "fotap0"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        tap = int(out.split(":", 1)[0])
        rig.dp.set_dev(tap, 0, L.FO_SLOT_PRIMARY)
        rig.dp.set_lower(0, L.FO_SLOT_PRIMARY, tap)
        nl.bind((0, 1))  # RTMGRP_LINK
        # The order holds unless this process stalls past link-watch's next run between
        # the flap and the frame: a busy machine gets two more tries, the datapath's verdict
        # is checked every time.
        netlink_first = []
        for _ in range(3):
            # the flap: off, then on (an urgent event: link-watch runs now)
            fcntl.ioctl(tun, TUNSETCARRIER, struct.pack("i", 0))
            fcntl.ioctl(tun, TUNSETCARRIER, struct.pack("i", 1))
            time.sleep(0.05)
            carrier_off_told(tap)  # the flap's own events
            fallback0 = rig.dp.fallback(0, L.FO_SLOT_PRIMARY, L.FO_DIR_TX).packets
            fcntl.ioctl(tun, TUNSETCARRIER, struct.pack("i", 0))  # the loss
            with netns.entered(rig.ns):
                verdict = bpfsys.prog_test_run(
                    rig.dp.prog_fd("prog_fo_egress"), V4, skb_ctx(rig.ifx["fo0"])
                ).retval
            netlink_first.append(carrier_off_told(tap))
            assert verdict == TC_ACT_REDIRECT
            assert rig.dp.last_redirect() == rig.ifx["sb0"]
            assert rig.dp.fallback(0, L.FO_SLOT_PRIMARY, L.FO_DIR_TX).packets == fallback0 + 1
            # and netlink does tell, once link-watch runs (a generous wait)
            told = netlink_first[-1]
            for _ in range(100):
                if told:
                    break
                select.select([nl], [], [], 0.1)
                told = carrier_off_told(tap)
            assert told, "no carrier-off RTM_NEWLINK within 10 s"
            if not netlink_first[-1]:
                break
        assert not netlink_first[-1], f"netlink told before the datapath moved: {netlink_first}"
    finally:
        nl.close()
        os.close(tun)  # the tap goes with its last fd
        for ifindex in [i for i, (g, _r) in rig.dp.devs().items() if g == 0]:
            if ifindex not in rig.ifx.values():
                rig.dp.del_dev(ifindex)


def _igmp_report() -> bytes:
    ip = bytearray(frames.ipv4_udp("01:00:5e:00:00:16", frames.MAC, "198.18.0.1", "224.0.0.22"))
    ip[14 + 9] = 2  # protocol IGMP (the rest does not matter to the check)
    return bytes(ip)


def _mld_report() -> bytes:
    f = bytearray(frames.ipv6_udp("33:33:00:00:00:16", frames.MAC, "fe80::1", "ff02::16"))
    f[14 + 6] = 0  # next header hop-by-hop, as every MLD message has
    return bytes(f)


def test_igmp_and_mld_leaving_ring_the_doorbell_nothing_else_does(rig: Rig) -> None:
    """The kernel changes the failover device's address lists, then reports the join or
    leave: the report passing fo_egress is the agent's cue to sync the lowers (kernels
    before 6.13 have no RTM_NEWMULTICAST).  Ordinary traffic never rings."""
    from bpfailover.datapath.doorbell import Doorbell

    bell = Doorbell(rig.dp.fds["fo_events"])
    try:
        bell.drain()
        rig.apply(Case("", "egress", "fo0", V4, TC_ACT_REDIRECT))
        for frame in (V4, V6, ARP):
            assert rig.run(Case("", "egress", "fo0p", frame, TC_ACT_REDIRECT)) == TC_ACT_REDIRECT
        assert bell.drain() == 0
        for frame in (_igmp_report(), _mld_report()):
            assert rig.run(Case("", "egress", "fo0p", frame, TC_ACT_REDIRECT)) == TC_ACT_REDIRECT
            assert bell.drain() == 16  # one record: rung once, and the frame still went out
        # not one of our failover devices: hands off, no ring
        assert rig.run(Case("", "egress", "other", _igmp_report(), TC_ACT_OK)) == TC_ACT_OK
        assert bell.drain() == 0
    finally:
        bell.close()


@pytest.fixture
def kallsyms_hidden_without_cap_syslog() -> Iterator[None]:
    """/proc/kallsyms hides addresses from a process without CAP_SYSLOG unless
    kernel.kptr_restrict is 0 and kernel.perf_event_paranoid <= 1 (Debian's default is 2,
    other machines set 1 or less): raised to 2 for the test, put back after."""
    knob = Path("/proc/sys/kernel/perf_event_paranoid")
    old = knob.read_text().strip()
    if int(old) < 2:
        knob.write_text("2\n")
    try:
        yield
    finally:
        if knob.read_text().strip() != old:
            knob.write_text(f"{old}\n")


@pytest.mark.usefixtures("kallsyms_hidden_without_cap_syslog")
def test_the_check_compiles_without_cap_syslog(bpffs: Path) -> None:
    """The shipped unit has no CAP_SYSLOG (ProtectKernelLogs=yes drops it), and /proc/kallsyms
    then shows no addresses: bcc took bpf_probe_read_kernel() for missing and compiled
    bpf_probe_read() instead, which TC programs may not call, so the per-packet check was
    refused under systemd.  The loader with every capability but CAP_SYSLOG: the check on."""
    import json
    import sys

    pin_dir = bpffs / unique("bpfailover-test-")
    argv = ["setpriv", "--bounding-set=-syslog", "--inh-caps=-syslog", "--"]
    # the condition itself: /proc/kallsyms shows that child no address (the fixture makes
    # it so where kernel.perf_event_paranoid <= 1 would show them: then this could not fail)
    head = subprocess.run([*argv, "head", "-1", "/proc/kallsyms"], capture_output=True, text=True)
    assert head.stdout.startswith("0000000000000000 "), head.stdout
    argv += [sys.executable, "-P", "-m", "bpfailover.datapath.loader", str(pin_dir)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd="/")
        assert p.returncode == 0, p.stderr[-2000:]
        info = json.loads(p.stdout.strip().splitlines()[-1])
        assert info["datapath_check"] == "on", info
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)

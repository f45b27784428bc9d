"""Wiring the pinned datapath to netdevs: clsact filters and XDP attached with rtnetlink,
the failover device (a veth pair) created, lowers registered and unregistered.

Works on a `Datapath` (maps.py); knows nothing of policy."""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

from bpfailover.datapath.layout_gen import (
    FO_F_DP_HOLD,
    FO_F_TOLD_MASK,
    FO_ROLE_MASTER,
    FO_SLOT_NONE,
    names,
)
from bpfailover.datapath.loader import PEER_PASS, PROGS
from bpfailover.datapath.maps import Datapath, DatapathError
from bpfailover.effects import sysctl
from bpfailover.effects.ethtool import set_gro
from bpfailover.model.config import peer_name  # the config validates the names it makes

log = logging.getLogger("bpfailover.datapath")

TC_PRIO = 0xFA11  # our filters' priority and handle on clsact: found again on adoption
TC_HANDLE = 0xFA11
CLSACT_INGRESS = "ffff:fff2"
CLSACT_EGRESS = "ffff:fff3"
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
_DRV = ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)
IFF_UP = 0x1


# -- attaching with rtnetlink ----------------------------------------------------------------
def _ignore_exists(fn: Any, *args: Any, **kwargs: Any) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        fn(*args, **kwargs)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def _our_filters(ipr: Any, ifindex: int, parent: str) -> Iterator[Any]:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        for f in ipr.get_filters(index=ifindex, parent=int(parent.replace(":", ""), 16)):
            if f.get_attr("TCA_KIND") == "bpf" and (f["info"] >> 16) == TC_PRIO:
                yield f
    except NetlinkError as e:
        if e.code not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            raise


def attach_tc(ipr: Any, ifindex: int, direction: str, prog_fd: int, label: str) -> bool:
    """Attach (or atomically replace) our clsact filter; no-op if `label` is already there.

    The label carries the program id, so adoption after a restart finds the same
    program attached and changes nothing.  Returns True when it wrote."""
    parent = CLSACT_EGRESS if direction == "egress" else CLSACT_INGRESS
    for f in _our_filters(ipr, ifindex, parent):
        opts = f.get_attr("TCA_OPTIONS")
        if opts is not None and opts.get_attr("TCA_BPF_NAME") == label:
            return False
    _ignore_exists(ipr.tc, "add", "clsact", ifindex)
    ipr.tc(
        "replace-filter",
        "bpf",
        ifindex,
        TC_HANDLE,
        fd=prog_fd,
        name=label,
        parent=parent,
        prio=TC_PRIO,
        direct_action=True,
        classid=1,
    )
    return True


def detach_tc(ipr: Any, ifindex: int, direction: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    parent = CLSACT_EGRESS if direction == "egress" else CLSACT_INGRESS
    with suppress(NetlinkError):
        ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=parent, prio=TC_PRIO)


def tc_attached(ipr: Any, ifindex: int, direction: str, prog_id: int | None = None) -> bool:
    """Our filter is on the hook; with prog_id, the one whose label names that program (a
    filter of another datapath, e.g. a second failoverd with another pin directory, at our
    priority is not ours)."""
    parent = CLSACT_EGRESS if direction == "egress" else CLSACT_INGRESS
    for f in _our_filters(ipr, ifindex, parent):
        if prog_id is None:
            return True
        opts = f.get_attr("TCA_OPTIONS")
        label = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if isinstance(label, str) and label.endswith(f":{prog_id}"):
            return True
    return False


def label_prog_id(label: object) -> int | None:
    """The program id our label ("bpfailover:<function>:<id>") carries, or None."""
    if not isinstance(label, str) or not label.startswith("bpfailover:"):
        return None
    tail = label.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def foreign_programs(
    ipr: Any, ifindex: int, ours: set[int], xdp: bool = False
) -> list[tuple[str, int | None]]:
    """What on this netdev's hooks is another datapath's, as (description, program id): a
    bpf filter at our clsact priority (ingress or egress) whose program id is not one of
    `ours` (another failoverd with another pin directory, or a stale one whose pins are
    gone) and, with `xdp` (the group's rx_path puts our program there), an XDP program that
    is not ours.  Filters of other tools at other priorities are not ours to judge.  An
    empty list: we may attach."""
    found: list[tuple[str, int | None]] = []
    for direction, parent in (("ingress", CLSACT_INGRESS), ("egress", CLSACT_EGRESS)):
        for f in _our_filters(ipr, ifindex, parent):
            opts = f.get_attr("TCA_OPTIONS")
            if opts is None:
                continue  # the dump's entry for the priority itself (no handle, no program)
            label = opts.get_attr("TCA_BPF_NAME")
            pid = label_prog_id(label)
            if pid not in ours:
                found.append((f"tc {direction} {label or 'bpf filter'}", pid))
    if xdp:
        xid = xdp_prog_id(ipr, ifindex)
        if xid and xid not in ours:
            found.append((f"xdp program {xid}", xid))
    return found


def xdp_prog_id(ipr: Any, ifindex: int) -> int:
    link = ipr.get_links(ifindex)[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return 0
    return int(xdp.get_attr("IFLA_XDP_PROG_ID") or 0)


def xdp_native(ipr: Any, ifindex: int) -> bool:
    """The netdev has an XDP program in native (driver) mode."""
    xdp = ipr.get_links(ifindex)[0].get_attr("IFLA_XDP")
    if xdp is None:
        return False
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")
    return mode in ("xdp", 1) or (
        mode in ("xdpmulti", 4) and bool(xdp.get_attr("IFLA_XDP_DRV_PROG_ID"))
    )


def attach_xdp(ipr: Any, ifindex: int, prog_fd: int, prog_id: int) -> bool:
    """Native XDP on a lower; False when the driver has none (the TC path serves it)."""
    from pyroute2.netlink.exceptions import NetlinkError

    if xdp_prog_id(ipr, ifindex) == prog_id:
        return True
    try:
        ipr.link(
            "set",
            index=ifindex,
            xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]},
        )
    except NetlinkError as e:
        log.warning(
            "%s",
            json.dumps(
                {"event": "xdp_refused", "ifindex": ifindex, "error": str(e), "rx_path": "tc"}
            ),
        )
        return False
    return True


def detach_xdp(ipr: Any, ifindex: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    with suppress(NetlinkError):
        ipr.link(
            "set",
            index=ifindex,
            xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]},
        )


def disable_ipv6(ifname: str) -> None:
    """A lower or the hidden peer must not speak for itself (no link-local, no DAD/RS)."""
    with suppress(OSError):  # a kernel or device without IPv6: nothing to silence
        sysctl.set_net(f"ipv6/conf/{ifname}/disable_ipv6", "1")


def keep_neighbours_without_carrier(ifname: str) -> None:
    """The failover device's carrier drops while no lower is usable, often only for the
    moment a new VF takes to come up. By default the kernel then flushes the device's ARP
    and ND entries, and the next packets wait in INCOMPLETE for the 1 s solicit timer: in
    the lab a 50 ms carrier gap cost ~1 s of guest->peer traffic. The peers are the same
    L2 neighbours through either lower, so keep them (what the knobs exist for: Wi-Fi
    roaming). net_failover hides the flush behind link-watch's delay for non-urgent
    devices; a veth's carrier events are urgent. Kernels before 5.16 lack the knobs."""
    for knob in (
        f"ipv4/conf/{ifname}/arp_evict_nocarrier",
        f"ipv6/conf/{ifname}/ndisc_evict_nocarrier",
    ):
        try:
            if not sysctl.set_net(knob, "0"):
                return  # /proc/sys/net read-only: said once
        except OSError as e:
            log.warning(
                "%s",
                json.dumps(
                    {
                        "event": "neighbour_knob_unavailable",
                        "knob": knob,
                        "error": e.strerror,
                        "effect": "neighbours are flushed when carrier drops",
                    }
                ),
            )


# -- a group's netdevs -----------------------------------------------------------------------
def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def restore_mac(ipr: Any, ifindex: int, mac: str) -> str | None:
    """Put the group MAC back on the failover device if someone changed it (veth accepts a
    new address where net_failover, which has no ndo_set_mac_address, refuses it).
    Returns the address that was found instead, or None when it was right."""
    found = ipr.get_links(ifindex)[0].get_attr("IFLA_ADDRESS")
    if found == mac:
        return None
    ipr.link("set", index=ifindex, address=mac)
    return str(found)


def create_failover_dev(
    ipr: Any, name: str, mac: str, mtu: int | None = None
) -> tuple[int, int, str | None]:
    """The failover netdev as a veth pair (name, hidden peer); adopted if it exists.

    Returns (ifindex, peer ifindex, the MAC it had if that was not the group MAC and has
    been put back: someone changed it while no agent ran)."""
    peer = peer_name(name)
    master = _index(ipr, name)
    if master is not None:
        # The kernel resolves alternative names like names: systemd's AlternativeNamesPolicy
        # leaves a renamed standby (enp1s0nsby) the altname enp1s0 (docs/cloud-guest.md).
        owner = ipr.get_links(master)[0].get_attr("IFLA_IFNAME")
        if owner != name:
            raise DatapathError(
                f"{name} is an alternative name of {owner}: install "
                "deploy/networkd/10-bpfailover-standby.link (no altnames on the standby) or "
                f"`ip link property del dev {owner} altname {name}`"
            )
    if master is None:
        # The MAC in the same message: udev's "add" event (NetworkManager's unmanaged rules,
        # deploy/udev/86-bpfailover-nm-managed.rules) then already sees the group MAC.
        ipr.link("add", ifname=name, kind="veth", address=mac, peer={"ifname": peer})
        master = _index(ipr, name)
        assert master is not None
    peer_ifx = _index(ipr, peer)
    link = ipr.get_links(master)[0]
    if peer_ifx is None or link.get_attr("IFLA_LINK") != peer_ifx:
        raise DatapathError(
            f"{name} exists but is not a bpfailover failover device (veth + {peer})"
        )
    restored = restore_mac(ipr, master, mac)
    if mtu:
        ipr.link("set", index=peer_ifx, mtu=mtu)
        ipr.link("set", index=master, mtu=mtu)
    disable_ipv6(peer)
    ipr.link("set", index=master, state="up")
    return master, peer_ifx, restored


def peer_napi(peer: str) -> None:
    """GRO on the hidden peer: veth then gives it NAPI, without which the failover
    device is no XDP redirect target (a user's XDP program on it redirecting out of it
    loses the frames); with it those frames enter the peer and its clsact ingress sends
    them to the active lower like any other transmit.  (XDP_TX needs more: Wiring.peer_pass.)"""
    try:
        set_gro(peer, True)
    except OSError as e:
        log.warning(
            "%s",
            json.dumps(
                {
                    "event": "peer_gro_refused",
                    "dev": peer,
                    "error": e.strerror,
                    "effect": "XDP redirects out of the failover device are lost",
                }
            ),
        )


def set_carrier(ipr: Any, peer_ifindex: int, on: bool) -> None:
    """The failover device has carrier iff its veth peer is admin up."""
    link = ipr.get_links(peer_ifindex)[0] if on else None
    ipr.link("set", index=peer_ifindex, state="up" if on else "down")
    if link is not None and not link["flags"] & IFF_UP:
        # GRO set while the peer was down gives it NAPI on open, but the failover device
        # does not become an XDP redirect target: set it again now that it is up.
        name = str(link.get_attr("IFLA_IFNAME"))
        with suppress(OSError):
            set_gro(name, False)
        peer_napi(name)


class Wiring:
    """Wires groups, lowers and programs together (maps + rtnetlink)."""

    def __init__(self, dp: Datapath, ipr: Any) -> None:
        self.dp = dp
        self.ipr = ipr
        # group name -> the foreign MAC setup_group() found on its failover device and undid
        self.mac_restored: dict[str, str] = {}

    def _label(self, pin_name: str) -> str:
        return f"bpfailover:{PROGS[pin_name][0]}:{self.dp.prog_id(pin_name)}"

    def setup_group(
        self,
        name: str,
        mac: str,
        inactive_rx: str = "deliver",
        rx_path: str = "tc",
        mtu: int | None = None,
        tx_path: str = "direct",
        dp_hold: bool = False,
    ) -> int:
        """Create/adopt the failover device and its group; returns the group id.
        `inactive_rx`: the config's rule, by the datapath's FO_IRX_* name.  `dp_hold`: the
        datapath never moves this group's traffic on its own (downdelay_ms > 0)."""
        rules = names("FO_IRX_")
        if inactive_rx not in rules:
            raise DatapathError(f"inactive_rx {inactive_rx!r}: not one of {', '.join(rules)}")
        g = self.dp.alloc_group(name)
        master, peer, restored = create_failover_dev(self.ipr, name, mac, mtu)
        if restored is not None:
            self.mac_restored[name] = restored
        keep_neighbours_without_carrier(name)
        flags = FO_F_DP_HOLD if dp_hold else 0
        flags |= self.dp.group(g).flags & FO_F_TOLD_MASK  # the agent's, kept
        self.dp.update_group(
            g,
            master_ifindex=master,
            peer_ifindex=peer,
            flags=flags,
            inactive_rx=rules.index(inactive_rx),
            mac=mac,
        )  # (override_slot is kept: it survives restarts)
        self.dp.set_dev(master, g, FO_ROLE_MASTER)
        self.dp.set_dev(peer, g, FO_ROLE_MASTER)  # fo_egress sees what it transmits
        if rx_path == "xdp":
            # veth needs NAPI (GRO) on the failover device for frames XDP-redirected
            # into its peer to be received at all.
            set_gro(name, True)
            self.dp.set_xdp_up(g, peer)
        self.attach_tx(master, peer, tx_path)
        peer_napi(peer_name(name))
        return g

    def set_dp_hold(self, g: int, hold: bool) -> None:
        """FO_F_DP_HOLD of group g: the datapath never moves its traffic on its own."""
        flags = self.dp.group(g).flags & ~FO_F_DP_HOLD
        self.dp.update_group(g, flags=flags | (FO_F_DP_HOLD if hold else 0))

    def attach_tx(self, master: int, peer: int, tx_path: str) -> bool:
        """fo_egress where the failover device's transmit passes: its hidden peer's clsact
        ingress always, and with `direct` its own clsact egress too.  `direct`: redirected
        at egress before veth counts it (taps or a qdisc never see it); what skips egress
        (dev_direct_xmit: PACKET_QDISC_BYPASS, AF_XDP copy mode; netpoll) enters the peer
        and is redirected there, so every sender reaches a lower and no frame is handled
        twice.  `veth`: the device transmits for real, so veth counts it, packet taps see it
        and a root qdisc on it works, for one backlog trip more.  The egress filter goes
        when `veth` is chosen (after the peer's is on: no frame goes out unredirected)."""
        pin = "prog_fo_egress"
        fd, label = self.dp.prog_fd(pin), self._label(pin)
        wrote = attach_tc(self.ipr, peer, "ingress", fd, label)
        if tx_path == "direct":
            wrote = attach_tc(self.ipr, master, "egress", fd, label) or wrote
        else:
            detach_tc(self.ipr, master, "egress")
        return wrote

    def xdp_native(self, ifindex: int) -> bool:
        return xdp_native(self.ipr, ifindex)

    def peer_pass(self, peer: int, on: bool) -> bool:
        """Our pass-through XDP program on the hidden peer (native), or not.  veth wakes the
        peer after a user's XDP program on the failover device returned XDP_TX only when
        the peer has an XDP program of its own; without one those frames wait in its ring.
        With it they pass into the peer's clsact ingress and on to the active lower.  Its
        price: veth takes the GSO offloads off the failover device while the peer has a
        program, so only while the failover device has a native one.  Another program
        found on the peer is left there (it wakes the peer all the same).  Returns whether
        it wrote; raises NetlinkError when the kernel refuses."""
        ours = self.dp.prog_id(PEER_PASS)
        found = xdp_prog_id(self.ipr, peer)
        if on and not found:
            attrs = [("IFLA_XDP_FD", self.dp.prog_fd(PEER_PASS))]
            self.ipr.link("set", index=peer, xdp={"attrs": attrs + [_DRV]})
            return True
        if not on and found == ours:
            self.ipr.link("set", index=peer, xdp={"attrs": [("IFLA_XDP_FD", -1), _DRV]})
            return True
        return False

    def register_lower(self, g: int, slot: int, ifindex: int, rx_path: str = "tc") -> None:
        """Make ifindex the group's lower in `slot`.  The active slot is left as it is: only
        a flip makes a device the one traffic goes to (the Switcher fills the slot first).
        A running agent flips away before a lower goes, so this matters at start-up, when
        a lower re-plugged while no agent ran registers into the slot the pins left active."""
        disable_ipv6(self.ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME"))
        self.dp.set_dev(ifindex, g, slot)
        if self.dp.active(g) != slot and self.dp.lower(g, slot) != ifindex:
            self.dp.set_lower(g, slot, ifindex)
        pin = "prog_lower_ingress"
        attach_tc(self.ipr, ifindex, "ingress", self.dp.prog_fd(pin), self._label(pin))
        if rx_path == "xdp":
            xpin = "prog_xdp_lower_rx"
            attach_xdp(self.ipr, ifindex, self.dp.prog_fd(xpin), self.dp.prog_id(xpin))

    def unregister_lower(self, g: int, slot: int, ifindex: int, gone: bool = False) -> None:
        if self.dp.lower(g, slot) == ifindex:
            self.dp.set_lower(g, slot, 0)
        self.dp.del_dev(ifindex)
        if not gone:
            detach_tc(self.ipr, ifindex, "ingress")
            detach_xdp(self.ipr, ifindex)

    def close(self) -> None:
        self.ipr.close()

    def set_carrier(self, peer_ifindex: int, on: bool) -> None:
        set_carrier(self.ipr, peer_ifindex, on)

    def set_mtu(self, ifindex: int, mtu: int) -> None:
        """Raises pyroute2's NetlinkError when the device refuses."""
        self.ipr.link("set", index=ifindex, mtu=mtu)

    def restore_mac(self, ifindex: int, mac: str) -> str | None:
        """The group MAC back on the failover device; the address found instead, or None."""
        return restore_mac(self.ipr, ifindex, mac)

    def set_up(self, ifindex: int) -> None:
        """Admin up; raises pyroute2's NetlinkError when the device refuses."""
        self.ipr.link("set", index=ifindex, state="up")

    def remove_moved_pair(self, name: str, peer_ifindex: int) -> bool:
        """Failover device `name` is gone from this netns: if its hidden peer is still
        here, the device was moved to another netns; the pair is deleted (both ends,
        wherever they are).  True when it was."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            link = self.ipr.get_links(peer_ifindex)[0]
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False  # deleted with the device: nothing moved
            raise
        if link.get_attr("IFLA_IFNAME") != peer_name(name):
            return False  # (its ifindex taken by another netdev since)
        self.ipr.link("del", index=peer_ifindex)
        return True

    def set_down(self, ifindex: int) -> None:
        """Admin down; raises pyroute2's NetlinkError when the device refuses."""
        self.ipr.link("set", index=ifindex, state="down")

    def teardown_group(self, name: str) -> bool:
        """Remove a group's datapath: filters, XDP, the failover device, map state."""
        g = self.dp.groups().get(name)
        if g is None:
            return False
        rec = self.dp.group(g)
        self.dp.flip(g, FO_SLOT_NONE)
        for ifindex, (grp, role) in self.dp.devs().items():
            if grp != g or role == FO_ROLE_MASTER:
                continue
            with suppress(Exception):
                detach_tc(self.ipr, ifindex, "ingress")
                detach_xdp(self.ipr, ifindex)
        if rec.master_ifindex:
            from pyroute2.netlink.exceptions import NetlinkError

            with suppress(NetlinkError):  # deleting one veth end deletes both
                self.ipr.link("del", index=rec.master_ifindex)
        self.dp.reset_group(g)
        return True

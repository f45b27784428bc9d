"""Each group's lowers and failover device, kept in step with the kernel's link events.

Registration by MAC (net_failover's failover_slave_register), unregistration, updates
(renames, flags, MTU), opening hot-plugged lowers, re-creating a failover device deleted by
hand, MTU propagation from the failover device to its peer and lowers, the failover device's
MAC (put back when changed), and what the lowers must carry for what is on top of the failover
device: its multicast and unicast address lists and its VLANs' ids.  Every change that can
move traffic goes through the Switcher.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from bpfailover.agent import uppers
from bpfailover.agent.addrlists import sync_mc, unsync_lower
from bpfailover.agent.ports import Clock, SpeedReader
from bpfailover.agent.switch import Switcher
from bpfailover.agent.udevwait import Held, UdevWait
from bpfailover.datapath.attach import Wiring
from bpfailover.datapath.layout import ROLE_SLOTS
from bpfailover.datapath.maps import Datapath, DatapathError
from bpfailover.effects import vlans
from bpfailover.effects.ethtool import driver_of
from bpfailover.events import netlink
from bpfailover.model.groups import Group, Lower
from bpfailover.model.lowers import lower_role, not_a_lower, shares_mac
from bpfailover.ops.eventlog import event
from bpfailover.policy import Role

log = logging.getLogger("bpfailover.agent")

# Why a lower about to register is refused because of what its hooks carry, else None
# (setup.lower_hooks: another running agent's programs; one writer per device).
LowerHooks = Callable[[Datapath, Wiring, Group, netlink.Link], str | None]


class Lowers:
    def __init__(
        self,
        groups: dict[str, Group],
        dp: Datapath,
        wiring: Wiring,
        switch: Switcher,
        addrs: dict[int, set[tuple[int, str]]],
        clock: Clock,
        speed: SpeedReader,
        udev: UdevWait,
        hooks: LowerHooks | None = None,
    ) -> None:
        self.groups = groups
        self.dp = dp
        self.wiring = wiring
        self.switch = switch
        self.addrs = addrs
        self.clock = clock
        self.speed = speed  # (Mb/s, duplex) by name, None where unknown
        self.udev = udev  # new lowers wait until udev has named them
        self.hooks = hooks
        # (group, ifindex) -> why: a lower refused for its hooks is said once, not at each
        # of its events; forgotten when it goes away or registers.
        self.hooks_refused: dict[tuple[str, int], str] = {}
        # (group, ifindex) -> why a netdev with the group MAC is not a lower (permanent
        # address, not Ethernet, enslaved): said once, as above
        self.not_lowers: dict[tuple[str, int], str] = {}

    # -- link events ------------------------------------------------------------------------
    def on_link(self, link: netlink.Link, t_ns: int) -> None:
        if link.deleted:
            self.udev.forget(link.ifindex)
        for grp in self.groups.values():
            lower = grp.lower_by_ifindex(link.ifindex)
            if lower is not None:
                if link.deleted:
                    self.unregister(grp, lower.role, gone=True)
                    came_up = False
                elif link.mac and link.mac != grp.mac:
                    event("lower_mac_changed", group=grp.name, lower=lower.name, mac=link.mac)
                    self.unregister(grp, lower.role)
                    came_up = False
                elif link.master:
                    # a netdev has one master (net_failover's is its failover device): the
                    # new one owns it now, so it is left open
                    event("lower_enslaved", group=grp.name, lower=lower.name, master=link.master)
                    self.unregister(grp, lower.role, close=False)
                    came_up = False
                else:
                    came_up = self.update(grp, link)
                self.switch.decide(grp, t_ns, f"link {link.ifname}")
                if came_up and grp.pcfg.reselect != "better":
                    self.refresh_speed(grp, lower)  # after the map write: off the fast path
                return
            if link.ifindex == grp.master:
                self._on_master(grp, link)
                return
            if link.ifindex == grp.peer:
                if not link.deleted:  # (the failover device goes with it: its own event)
                    self.recheck_xdp(grp)
                return
            if link.link == grp.master and link.ifindex != grp.peer:
                uppers.on_upper(grp, link, self.wiring)
                return
            if link.deleted:
                self.hooks_refused.pop((grp.name, link.ifindex), None)
                self.not_lowers.pop((grp.name, link.ifindex), None)
                continue
            if self._held(grp, link, t_ns):
                return
            if self.maybe_register(grp, link):
                self._registered(grp, link, t_ns)
                return

    def _registered(self, grp: Group, link: netlink.Link, t_ns: int) -> None:
        """A lower registered while we run: traffic decided, its lists synced, opened."""
        self.switch.decide(grp, t_ns, f"registered {link.ifname}")
        sync_mc(grp)
        uppers.sync_vlans(grp, self.wiring)
        self._open_plugged(grp, link)

    def _candidate(self, grp: Group, link: netlink.Link) -> bool:
        """Could become one of grp's lowers, whatever its name turns out to be."""
        return (
            shares_mac(grp.mac, link.mac, link.kind)
            and link.ifindex not in (grp.master, grp.peer)
            and vlans.parse_name(link.ifname) is None
            and not_a_lower(grp.mac, link.perm_mac, link.arphrd, link.master) is None
        )

    def _held(self, grp: Group, link: netlink.Link, t_ns: int) -> bool:
        """True while a new lower waits for udev (udevwait.py); nothing is done with it
        meanwhile, not even matching its name, which is still the kernel's."""
        if not self._candidate(grp, link):
            held = self.udev.held.get(link.ifindex)
            if held is not None and held.group == grp.name:
                self.udev.forget(link.ifindex)  # (its MAC changed while it waited)
            return False
        return self.udev.holds(grp.name, link, t_ns // 1_000_000)

    def released(self, held: Held, t_ns: int) -> None:
        """udev has named a held lower (or its time is up): registered as if it had just
        appeared, under the name it now has."""
        grp = self.groups.get(held.group)
        link = held.link
        if grp is None or grp.lower_by_ifindex(link.ifindex) is not None:
            return  # its group went (reload), or it registered meanwhile
        if self._candidate(grp, link) and self.maybe_register(grp, link):
            self._registered(grp, link, t_ns)

    def reconcile_group(self, grp: Group, links: dict[int, netlink.Link], t_ns: int) -> None:
        """Bring one group in line with a full dump of the links."""
        for role, lower in list(grp.lowers.items()):
            link = links.get(lower.ifindex)
            if link is None or link.mac != grp.mac:
                self.unregister(grp, role, gone=link is None)
            elif link.master:
                self.unregister(grp, role, close=False)  # enslaved: its master's now
        master = links.get(grp.master)
        if master is None:  # its RTM_DELLINK was among the events the kernel dropped
            self._recreate_master(grp)
        else:
            grp.mtu = master.mtu
            self.peer_xdp(grp, master.xdp_native)
            if master.mac and master.mac != grp.mac:
                self._restore_mac(grp, master.mac)
        for link in links.values():
            if grp.lower_by_ifindex(link.ifindex) is None:
                if not self._held(grp, link, t_ns):
                    self.maybe_register(grp, link)
            else:
                self.update(grp, link)
        self.switch.decide(grp, t_ns, "reconcile")
        sync_mc(grp)
        grp.vlans = {
            lk.ifindex: lk.vlan
            for lk in links.values()
            if lk.link == grp.master and lk.vlan is not None and lk.ifindex != grp.peer
        }
        grp.vlan_filters = {}
        for lk in links.values():
            ours = vlans.parse_name(lk.ifname)
            if ours is not None and lk.kind == "vlan" and lk.link == ours[0]:
                grp.vlan_filters.setdefault(ours[0], set()).add(ours[1])
        uppers.sync_vlans(grp, self.wiring)
        for lower in grp.lowers.values():
            self.refresh_speed(grp, lower)

    def _open_plugged(self, grp: Group, link: netlink.Link) -> None:
        """A lower hot-plugged while we run comes up admin down (a re-plugged VF), and the
        lowers are unmanaged (deploy/): open it, as net_failover_slave_register() does with
        dev_open().  Found by the proving ground (docs/proving-ground.md).  Lowers present at
        start-up: open_at_start."""
        if link.admin_up:
            return
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.wiring.set_up(link.ifindex)
            event("lower_opened", group=grp.name, lower=link.ifname)
        except NetlinkError as e:
            event("lower_open_error", group=grp.name, lower=link.ifname, error=str(e))

    def open_at_start(self, grp: Group) -> None:
        """Lowers found down at start-up are opened too, as net_failover does for the slaves
        it finds when it is created: at boot nobody else opens them (the shipped networkd,
        NetworkManager and udev snippets keep the managers off the lowers)."""
        from pyroute2.netlink.exceptions import NetlinkError

        for lower in list(grp.lowers.values()):
            if lower.admin_up:
                continue
            try:
                self.wiring.set_up(lower.ifindex)
                event("lower_opened", group=grp.name, lower=lower.name, at="start")
            except NetlinkError as e:
                event("lower_open_error", group=grp.name, lower=lower.name, error=str(e))

    def update(self, grp: Group, link: netlink.Link) -> bool:
        """Take in a lower's link event; True when its carrier came up."""
        lower = grp.lower_by_ifindex(link.ifindex)
        assert lower is not None
        if link.ifname and link.ifname != lower.name:
            # udev renames keep the role: everything is keyed by ifindex + MAC
            event("lower_renamed", group=grp.name, role=lower.role, old=lower.name, new=link.ifname)
            lower.name = link.ifname
        came_up = link.carrier and not lower.carrier
        lower.admin_up, lower.carrier = link.admin_up, link.carrier
        if link.mtu:
            lower.mtu = link.mtu
            lower.min_mtu, lower.max_mtu = link.min_mtu, link.max_mtu
        if came_up and grp.pcfg.reselect == "better":
            self.refresh_speed(grp, lower)  # the policy compares it: read before deciding
        return came_up

    def refresh_speed(self, grp: Group, lower: Lower) -> None:
        """The lower's ethtool speed and duplex (a driver call under the RTNL lock: read when
        its carrier comes up or it registers, not per event).  What `ethtool ens10` cannot
        show (veth reports a fixed 10000/Full): status and metrics report this instead."""
        speed, duplex = self.speed(lower.name)
        if (speed, duplex) != (lower.speed_mbps, lower.duplex):
            lower.speed_mbps, lower.duplex = speed, duplex
            event("lower_speed", group=grp.name, lower=lower.name, mbps=speed, duplex=duplex)

    # -- registration -------------------------------------------------------------------------
    def _role_for(self, grp: Group, link: netlink.Link) -> Role | None:
        if link.ifindex in (grp.master, grp.peer):
            return None
        if vlans.parse_name(link.ifname) is not None:
            return None  # our own VLAN filter devices (events may lack their kind)
        key = (grp.name, link.ifindex)
        if shares_mac(grp.mac, link.mac, link.kind):
            why = not_a_lower(grp.mac, link.perm_mac, link.arphrd, link.master)
            if why is not None:
                if self.not_lowers.get(key) != why:
                    self.not_lowers[key] = why
                    event("lower_ignored", group=grp.name, lower=link.ifname, why=why)
                return None
        self.not_lowers.pop(key, None)
        return lower_role(
            grp.cfg,
            grp.mac,
            link.ifname,
            link.mac,
            link.kind,
            driver_of,
            perm_mac=link.perm_mac,
            arphrd=link.arphrd,
            master=link.master,
        )

    def maybe_register(self, grp: Group, link: netlink.Link) -> bool:
        role = self._role_for(grp, link)
        if role is None:
            self.hooks_refused.pop((grp.name, link.ifindex), None)
            return False
        if role in grp.lowers:
            why = f"{grp.lowers[role].name} is already the {role}"
            event("lower_ignored", group=grp.name, lower=link.ifname, role=role, why=why)
            return False
        if self._hooks_refused(grp, link, role):
            return False  # before the MTU below: another running agent's device is not ours
        refused = _out_of_range(grp.mtu, link.min_mtu, link.max_mtu)
        if (
            refused is None
            and grp.mtu
            and link.mtu
            and link.mtu < grp.mtu
            and not self._set_mtu(link.ifindex, grp.mtu)
        ):
            refused = f"MTU {link.mtu} < {grp.mtu} and cannot be raised"
        if refused is not None:  # net_failover_slave_register(): dev_set_mtu() failed
            event("lower_refused", group=grp.name, lower=link.ifname, role=role, why=refused)
            return False
        try:
            self.wiring.register_lower(grp.gid, ROLE_SLOTS[role], link.ifindex, grp.cfg.rx_path)
        except Exception:
            # gone meanwhile (its RTM_DELLINK is still queued): no half registration left
            with contextlib.suppress(Exception):
                self.wiring.unregister_lower(grp.gid, ROLE_SLOTS[role], link.ifindex, gone=True)
            raise
        grp.lowers[role] = Lower(
            role,
            link.ifindex,
            link.ifname,
            link.admin_up,
            link.carrier,
            max(link.mtu, grp.mtu),
            min_mtu=link.min_mtu,
            max_mtu=link.max_mtu,
        )
        self.refresh_speed(grp, grp.lowers[role])
        event(
            "lower_registered",
            group=grp.name,
            role=role,
            lower=link.ifname,
            ifindex=link.ifindex,
            usable=grp.lowers[role].usable,
        )
        return True

    def _hooks_refused(self, grp: Group, link: netlink.Link, role: Role) -> bool:
        """One writer per device for lowers that come while we run, as for those found at
        start-up (setup.check_hooks): a lower whose hooks carry the programs of a datapath
        another running agent holds is not registered (nothing attached, no map written),
        said in one line.  It is looked at again at its next event and, while refused, every
        REFUSED_RECHECK_MS (loop.py): taken once that agent is gone and its programs are ours
        to take over."""
        if self.hooks is None:
            return False
        why = self.hooks(self.dp, self.wiring, grp, link)
        key = (grp.name, link.ifindex)
        if why is None:
            self.hooks_refused.pop(key, None)
            return False
        if self.hooks_refused.get(key) != why:
            self.hooks_refused[key] = why
            event("lower_refused", group=grp.name, lower=link.ifname, role=role, why=why)
        return True

    def unregister(self, grp: Group, role: Role, gone: bool = False, close: bool = True) -> None:
        """Forget a lower.  If it is active the policy moves traffic away first.  One that
        leaves while still present (its MAC changed, enslaved) is left as
        net_failover_slave_unregister() leaves it: our VLAN filters and the addresses we
        added to its lists taken off, and closed (`close`: unless another master took it).
        A deleted one took all that with it."""
        lower = grp.lowers.pop(role)
        self.switch.decide(grp, self.clock.monotonic_ns(), f"unregister {lower.name}")
        self.wiring.unregister_lower(grp.gid, ROLE_SLOTS[role], lower.ifindex, gone=gone)
        closed = self._let_go(grp, lower, close=close and not gone, gone=gone)
        event(
            "lower_unregistered",
            group=grp.name,
            role=role,
            lower=lower.name,
            gone=gone,
            closed=closed,
        )

    def _let_go(self, grp: Group, lower: Lower, close: bool, gone: bool = False) -> bool:
        """What we put on a lower taken off it: our VLAN filters, the addresses we added to
        its lists (dev_uc_unsync/dev_mc_unsync), then closed if `close` (dev_close).
        True when it was closed."""
        mc = grp.mc_added.pop(lower.ifindex, set())
        uc = grp.uc_added.pop(lower.ifindex, set())
        filters = grp.vlan_filters.pop(lower.ifindex, set())
        if gone:
            return False  # a deleted lower took all that with it
        for v in filters:
            with contextlib.suppress(Exception):
                vlans.remove(self.wiring.ipr, lower.ifindex, v)
        unsync_lower(grp.name, lower.ifindex, lower.name, mc, uc)
        if not close:
            return False
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.wiring.set_down(lower.ifindex)
        except NetlinkError as e:
            event("lower_close_error", group=grp.name, lower=lower.name, error=str(e))
            return False
        return True

    def let_go_all(self, grp: Group) -> None:
        """Teardown: every lower let go as net_failover_destroy() does (after the datapath
        is gone: no switch is decided for a group that is going away)."""
        for lower in list(grp.lowers.values()):
            closed = self._let_go(grp, lower, close=True)
            event(
                "lower_unregistered",
                group=grp.name,
                role=lower.role,
                lower=lower.name,
                gone=False,
                closed=closed,
            )
        grp.lowers.clear()

    # -- the failover device ------------------------------------------------------------------
    def _on_master(self, grp: Group, link: netlink.Link) -> None:
        if link.deleted:
            self._recreate_master(grp)
            return
        if link.mac and link.mac != grp.mac:
            self._restore_mac(grp, link.mac)
        if link.mtu and link.mtu != grp.mtu:
            self._propagate_mtu(grp, link.mtu)
        self.peer_xdp(grp, link.xdp_native)
        sync_mc(grp)

    def recheck_xdp(self, grp: Group) -> None:
        """The failover device's XDP read from the kernel: at an event of its peer (an XDP
        program attached through a bpf_link announces itself only there, by the features
        veth takes off the peer) and at each address_resync_s."""
        self.peer_xdp(grp, self.wiring.xdp_native(grp.master))

    def peer_xdp(self, grp: Group, user_xdp: bool) -> None:
        """While the failover device has a native XDP program, our pass program sits on its
        hidden peer, so what that program sends back (XDP_TX) reaches the active lower
        (Wiring.peer_pass); without one it goes, and with it the GSO cost it brings."""
        if grp.user_xdp == user_xdp:
            return
        from pyroute2.netlink.exceptions import NetlinkError

        grp.user_xdp = user_xdp  # tried once per change, whatever the outcome
        try:
            wrote = self.wiring.peer_pass(grp.peer, user_xdp)
        except NetlinkError as e:
            effect = "XDP_TX from the failover device's XDP program is not sent"
            event("peer_pass_refused", group=grp.name, error=str(e), effect=effect)
            return
        if wrote:
            event("peer_pass", group=grp.name, attached=user_xdp)

    def _restore_mac(self, grp: Group, found: str) -> None:
        """net_failover has no ndo_set_mac_address: its MAC cannot change.  veth takes a new
        one (NetworkManager's cloned MAC, udev's MACAddressPolicy), after which the lowers'
        frames carry a MAC the switch does not expect for this port.  Put it back at once."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            now = self.wiring.restore_mac(grp.master, grp.mac)
        except NetlinkError as e:
            event("mac_restore_error", group=grp.name, found=found, mac=grp.mac, error=str(e))
            return
        if now is None:
            return  # a stale event (the device's creation, or already put back)
        found = now
        grp.mac_restored += 1
        event("mac_restored", group=grp.name, found=found, mac=grp.mac)

    def _recreate_master(self, grp: Group) -> None:
        """The failover device was deleted by hand (`failoverctl teardown` is the way to
        remove a group): put it back as it was, same name, MAC and MTU, and carry on.  The
        lowers' filters find the new device through the group map.  Its addresses belong to
        the OS's network configuration (networkd/NM/DHCP bring them back on a new netdev).
        Moved to another netns (`ip link set ens10 netns X`; net_failover's device is
        netns-local, a veth is not), it is gone from ours as if deleted, but its hidden
        peer is still here: the pair is deleted (the device with it, there) and re-created
        here, said so."""
        from pyroute2.netlink.exceptions import NetlinkError

        old = grp.master
        try:
            moved = self.wiring.remove_moved_pair(grp.name, grp.peer)
        except NetlinkError as e:
            moved = False
            event("failover_device_moved_error", group=grp.name, error=str(e))
        if moved:
            event(
                "failover_device_moved",
                group=grp.name,
                ifindex=old,
                action="deleted there and re-created here: a failover device stays in "
                "failoverd's netns",
            )
        else:
            event("failover_device_deleted", group=grp.name, ifindex=old, action="re-creating it")
        try:
            gid = self.wiring.setup_group(
                grp.cfg.name,
                grp.mac,
                grp.cfg.inactive_rx,
                grp.cfg.rx_path,
                mtu=grp.mtu or None,
                tx_path=grp.cfg.tx_path,
                dp_hold=grp.cfg.policy.downdelay_ms > 0,
            )
        except (DatapathError, NetlinkError, OSError) as e:
            action = f"cannot re-create it: failoverctl teardown {grp.name}, then restart failoverd"
            event("failover_device_lost", group=grp.name, error=str(e), action=action)
            return
        rec = self.dp.group(gid)
        old_peer = grp.peer
        grp.master, grp.peer = rec.master_ifindex, rec.peer_ifindex
        if old != grp.master:
            self.dp.del_dev(old)
        if old_peer not in (grp.peer, grp.master):
            self.dp.del_dev(old_peer)
        self.addrs.pop(old, None)
        grp.carrier = None  # the new peer starts down: decide() sets it
        grp.user_xdp = None  # a new pair: nothing on it
        note = "addresses are the OS network config's to restore"
        event(
            "failover_device_recreated",
            group=grp.name,
            old_ifindex=old,
            ifindex=grp.master,
            note=note,
        )
        self.switch.decide(grp, self.clock.monotonic_ns(), "failover device re-created")
        sync_mc(grp)

    def _propagate_mtu(self, grp: Group, mtu: int) -> None:
        """MTU set on the failover device goes to its peer and both lowers, all or none.
        The failover device's MTU range is its lowers' (net_failover's is the primary's,
        and its ndo_change_mtu needs the standby to take it too): an MTU outside it is
        rolled back before any device is touched."""
        old = grp.mtu
        for lw in grp.lowers.values():
            why = _out_of_range(mtu, lw.min_mtu, lw.max_mtu)
            if why is not None:
                self._set_mtu(grp.master, old)
                event(
                    "mtu_refused",
                    group=grp.name,
                    mtu=mtu,
                    rolled_back_to=old,
                    refused_by=lw.ifindex,
                    why=f"{lw.name} ({lw.role}): {why}",
                )
                return
        done: list[tuple[int, int]] = []
        targets = [(grp.peer, old)] + [(lw.ifindex, lw.mtu) for lw in grp.lowers.values()]
        for ifindex, prev in targets:
            if not self._set_mtu(ifindex, mtu):
                for ifx, prev_mtu in done:
                    self._set_mtu(ifx, prev_mtu)
                self._set_mtu(grp.master, old)
                event(
                    "mtu_refused", group=grp.name, mtu=mtu, rolled_back_to=old, refused_by=ifindex
                )
                return
            done.append((ifindex, prev))
        grp.mtu = mtu
        for lower in grp.lowers.values():
            lower.mtu = mtu
        event("mtu", group=grp.name, mtu=mtu)

    def _set_mtu(self, ifindex: int, mtu: int) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.wiring.set_mtu(ifindex, mtu)
        except NetlinkError as e:
            log.debug("mtu %d on %d: %s", mtu, ifindex, e)
            return False
        return True


def _out_of_range(mtu: int, min_mtu: int, max_mtu: int) -> str | None:
    """Why a lower with MTU range [min_mtu, max_mtu] (0: not known / no limit) cannot
    take `mtu` (0: none asked), else None."""
    if mtu and max_mtu and mtu > max_mtu:
        return f"its max MTU {max_mtu} < the failover device's MTU {mtu}"
    if mtu and min_mtu and mtu < min_mtu:
        return f"its min MTU {min_mtu} > the failover device's MTU {mtu}"
    return None

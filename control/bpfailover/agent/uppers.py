"""Devices stacked on a group's failover device (VLANs, macvlans, ...) and what the lowers
must carry for them: each VLAN id on each lower's receive filter (net_failover's
vlan_rx_add_vid/kill_vid), their addresses on the lowers' lists (sync_mc).
"""

from __future__ import annotations

import contextlib
import errno

from bpfailover.agent.addrlists import sync_mc
from bpfailover.datapath.attach import Wiring
from bpfailover.effects import vlans
from bpfailover.events import netlink
from bpfailover.model.groups import Group
from bpfailover.ops.eventlog import event


def on_upper(grp: Group, link: netlink.Link, wiring: Wiring) -> None:
    """A netdev stacked on the failover device (VLAN, macvlan, ...) came, changed or went:
    a VLAN's id goes to the lowers' filters, and its address lists (a macvlan's MAC on
    the failover device's unicast list) to the lowers' lists."""
    if link.deleted:
        if grp.vlans.pop(link.ifindex, None) is not None:
            sync_vlans(grp, wiring)
    elif link.vlan is not None and grp.vlans.get(link.ifindex) != link.vlan:
        grp.vlans[link.ifindex] = link.vlan
        sync_vlans(grp, wiring)
    sync_mc(grp)


def sync_vlans(grp: Group, wiring: Wiring) -> None:
    """Each VLAN id on the failover device on each lower's filter, as net_failover's
    vlan_rx_add_vid/kill_vid; ids no longer on the failover device removed (only ours)."""
    from pyroute2.netlink.exceptions import NetlinkError

    want = set(grp.vlans.values())
    for lower in grp.lowers.values():
        have = grp.vlan_filters.setdefault(lower.ifindex, set())
        add, remove = vlans.plan(want, have)
        for v in add:
            try:
                name = vlans.add(wiring.ipr, lower.ifindex, v)
            except (NetlinkError, ValueError) as e:
                if getattr(e, "code", None) == errno.ENODEV:
                    continue  # the lower is gone; its RTM_DELLINK is on its way
                if grp.vlan_error != str(e):  # once per kind of failure, not per id
                    event(
                        "vlan_filter_error",
                        group=grp.name,
                        lower=lower.name,
                        vlan=v[1],
                        error=str(e),
                        hint="the 8021q module must be loadable",
                    )
                grp.vlan_error = str(e)
                continue
            have.add(v)
            event(
                "vlan_filter",
                group=grp.name,
                lower=lower.name,
                vlan=v[1],
                protocol=f"0x{v[0]:04x}",
                device=name,
            )
        for v in remove:
            with contextlib.suppress(NetlinkError):
                vlans.remove(wiring.ipr, lower.ifindex, v)
            have.discard(v)
            event("vlan_filter_removed", group=grp.name, lower=lower.name, vlan=v[1])

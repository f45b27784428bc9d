"""VLAN filters of the lowers: a VLAN on the failover device gets its VLAN id on both lowers.

net_failover's ndo_vlan_rx_add_vid/kill_vid pass each id to both lowers, because VFs filter
VLANs (iavf, ixgbevf, mlx5, e1000e; virtio_net too once VIRTIO_NET_F_CTRL_VLAN is
negotiated, and QEMU then drops the ids it was not told about).  User space has exactly one
way to reach a driver's ndo_vlan_rx_add_vid: a VLAN device on it.  register_vlan_dev()
calls vlan_vid_add() at registration, before and whatever the new device's admin state
(net/8021q/vlan.c), and unregistering it calls vlan_vid_del().  So per lower and VLAN we
keep one VLAN device, admin down, never addressed: its only job is the filter entry.  Our
own TC/XDP hooks on the lower see every frame before the kernel's VLAN receive would hand
it to that device (tc ingress runs before vlan_do_receive), so it never receives anything.

Names are ``fo<lower ifindex>.<vid>`` (``fo<ifindex>s<vid>`` for 802.1ad): a re-plugged VF
has a new ifindex, and its old VLAN devices went with it.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from bpfailover.effects import sysctl

ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
# VLAN_FLAG_LOOSE_BINDING: the VLAN device does not follow its lower's admin state (else the
# kernel brings it up with the lower: found in the proving ground, a re-plugged VF opened by
# failoverd took its filter device up with it)
VLAN_FLAG_LOOSE_BINDING = 0x4
_NAME = re.compile(r"^fo(\d+)([.s])(\d+)$")

Vlan = tuple[int, int]  # (protocol, VLAN id)


def filter_name(lower_ifindex: int, vlan: Vlan) -> str:
    proto, vid = vlan
    name = f"fo{lower_ifindex}{'.' if proto == ETH_P_8021Q else 's'}{vid}"
    if len(name) > 15:
        raise ValueError(f"ifindex {lower_ifindex} too large for a VLAN filter device name")
    return name


def parse_name(name: str) -> tuple[int, Vlan] | None:
    """(lower ifindex, vlan) of one of our filter devices, else None."""
    m = _NAME.match(name)
    if m is None:
        return None
    proto = ETH_P_8021Q if m.group(2) == "." else ETH_P_8021AD
    return int(m.group(1)), (proto, int(m.group(3)))


def plan(want: set[Vlan], have: set[Vlan]) -> tuple[list[Vlan], list[Vlan]]:
    """(to add, to remove) for one lower."""
    return sorted(want - have), sorted(have - want)


def add(ipr: Any, lower_ifindex: int, vlan: Vlan) -> str:
    """The filter device for `vlan` on the lower (admin down, loosely bound, no IPv6: it
    must never speak for itself); raises NetlinkError."""
    name = filter_name(lower_ifindex, vlan)
    ipr.link(
        "add",
        ifname=name,
        kind="vlan",
        link=lower_ifindex,
        vlan_id=vlan[1],
        vlan_protocol=vlan[0],
        vlan_flags={"flags": VLAN_FLAG_LOOSE_BINDING, "mask": VLAN_FLAG_LOOSE_BINDING},
    )
    with contextlib.suppress(OSError):  # no IPv6 here: nothing to silence
        sysctl.set_net(f"ipv6/conf/{name}/disable_ipv6", "1")
    return name


def remove(ipr: Any, lower_ifindex: int, vlan: Vlan) -> None:
    found = ipr.link_lookup(ifname=filter_name(lower_ifindex, vlan))
    if found:
        ipr.link("del", index=found[0])

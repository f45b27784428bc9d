"""Which netdevs are a group's lowers: the one rule, for the agent and for doctor.

Registration by MAC, as net_failover's failover_slave_register: an Ethernet netdev whose
permanent address is the group's MAC is one of its lowers, except devices stacked on a
lower (they share its MAC), a netdev enslaved to another master, and the group's own
failover device and hidden peer (the caller leaves those out, by ifindex or by name).
Where a netdev has no permanent address (veth: the kernel reports none) its current MAC
stands in; where it has one, its current MAC must be the group's too (a lower whose MAC
is changed leaves the group).  The standby is found by name (`standby: NAME`) or by driver
(`standby: {driver: D}`); every other netdev with the MAC is the primary, or only the one
named `primary: NAME`.
"""

from __future__ import annotations

from collections.abc import Callable

from bpfailover.model import config
from bpfailover.policy import Role

ARPHRD_ETHER = 1  # failover_slave_register() takes Ethernet devices only

# Netdev kinds stacked on top of a lower (they share its MAC) that must never be
# taken for a primary: net_failover likewise registers only real Ethernet lowers.
UPPER_KINDS = frozenset(
    {
        "vlan",
        "macsec",
        "hsr",
        "virt_wifi",
        "macvlan",
        "macvtap",
        "ipvlan",
        "ipvtap",
        "bridge",
        "bond",
        "team",
        "vxlan",
        "geneve",
        "netkit",
        "ifb",
        "dummy",
    }
)


def shares_mac(group_mac: str, mac: str, kind: str | None) -> bool:
    """Carries the group's MAC and is not stacked on a lower: worth a closer look."""
    return mac == group_mac and kind not in UPPER_KINDS


def not_a_lower(
    group_mac: str, perm_mac: str = "", arphrd: int = ARPHRD_ETHER, master: int = 0
) -> str | None:
    """Why a netdev that shares the group's MAC cannot be one of its lowers, else None:
    failover_get_bymac() matches the permanent address, failover_slave_register() takes
    Ethernet only and links the lower to its master (a netdev has one)."""
    if perm_mac and perm_mac != group_mac:
        return f"its permanent address is {perm_mac}: the group MAC is only set on it"
    if arphrd != ARPHRD_ETHER:
        return f"not Ethernet (ARPHRD type {arphrd})"
    if master:
        return f"enslaved to ifindex {master}"
    return None


def lower_role(
    gcfg: config.Group,
    group_mac: str,
    name: str,
    mac: str,
    kind: str | None,
    driver_of: Callable[[str], str | None],
    perm_mac: str = "",
    arphrd: int = ARPHRD_ETHER,
    master: int = 0,
) -> Role | None:
    """The role netdev `name` (with `mac`, link kind `kind`, permanent address `perm_mac`
    or "" where it has none, ARPHRD type, IFLA_MASTER) takes in group `gcfg`, or None.
    `driver_of(name)` is asked only when the standby is configured by driver."""
    if not shares_mac(group_mac, mac, kind):
        return None
    if not_a_lower(group_mac, perm_mac, arphrd, master) is not None:
        return None
    if gcfg.standby_name is not None:
        if name == gcfg.standby_name:
            return "standby"
    elif driver_of(name) == getattr(gcfg.standby, "driver", None):
        return "standby"
    if gcfg.primary_name is not None and name != gcfg.primary_name:
        return None
    return "primary"

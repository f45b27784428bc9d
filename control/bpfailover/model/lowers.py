"""Which netdevs are a group's lowers: the one rule, for the agent and for doctor.

Registration by MAC, as net_failover's failover_slave_register: a netdev carrying the
group's MAC is one of its lowers, except devices stacked on a lower (they share its MAC)
and the group's own failover device and hidden peer (the caller leaves those out, by
ifindex or by name).  The standby is found by name (`standby: NAME`) or by driver
(`standby: {driver: D}`); every other netdev with the MAC is the primary, or only the one
named `primary: NAME`.
"""

from __future__ import annotations

from collections.abc import Callable

from bpfailover.model import config
from bpfailover.policy import Role

# Netdev kinds stacked on top of a lower (they share its MAC) that must never be
# taken for a primary: net_failover likewise registers only real Ethernet lowers.
UPPER_KINDS = frozenset(
    {
        "vlan",
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


def lower_role(
    gcfg: config.Group,
    group_mac: str,
    name: str,
    mac: str,
    kind: str | None,
    driver_of: Callable[[str], str | None],
) -> Role | None:
    """The role netdev `name` (with `mac`, link kind `kind`) takes in group `gcfg`, or None.
    `driver_of(name)` is asked only when the standby is configured by driver."""
    if mac != group_mac or kind in UPPER_KINDS:
        return None
    if gcfg.standby_name is not None:
        if name == gcfg.standby_name:
            return "standby"
    elif driver_of(name) == getattr(gcfg.standby, "driver", None):
        return "standby"
    if gcfg.primary_name is not None and name != gcfg.primary_name:
        return None
    return "primary"

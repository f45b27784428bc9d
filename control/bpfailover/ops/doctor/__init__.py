"""failoverctl doctor: the known net_failover pains, each finding with its fix.

Checks (each a function of a `Host`, whose paths tests point at fixtures):
addresses or IPv6 on a lower; DHCP clients or ifupdown stanzas for a lower;
lowers managed by NetworkManager or systemd-networkd; a lower enslaved to
another master (the kernel's own net_failover, a bond, a bridge); bpffs not
mounted; no kernel headers for bcc; missing root/capabilities; a second
agent (two failoverd in one netns, or a pin lock held by an agent that does
not answer); orphaned pin directories (a datapath no running agent holds);
cloud guests (docs/cloud-guest.md): the hypervisor's `failover=on`,
cloud-init without the duplicate-MAC shim, the failover device unmanaged by NetworkManager,
its hidden peer managed by NetworkManager or systemd-networkd, a netplan MAC match (which
never matches the failover device).
Exit code 0: nothing found; 4: findings (printed with fixes).

By job: `host` (what the checks look at), `lowers`, `system`, `agents` (agents and pins),
`cloud`, `report` (running and printing). Import this package, not its modules.
"""

from __future__ import annotations

# the modules the checks call through (tests patch api.request, netns.path_of)
from bpfailover import netns
from bpfailover.ops import api
from bpfailover.ops.doctor.agents import (
    AGENT_MODULES,
    AGENT_PROGRAM,
    check_agent_netns,
    check_agents,
    check_datapath_check,
    check_orphaned_pins,
    is_agent,
)
from bpfailover.ops.doctor.cloud import (
    CLOUD_INIT_SHIM,
    CLOUD_INIT_UNITS,
    SNIPPETS,
    VIRTIO_NET_F_STANDBY,
    check_cloud_init,
    check_failover_devices,
    check_kernel_failover,
    check_netplan_mac_match,
)
from bpfailover.ops.doctor.host import (
    PERMISSION_FIX,
    ROOT_FIX,
    Finding,
    Host,
    LinkInfo,
    Lower,
    describe_netns,
    dump_links,
    find_lowers,
    host_for,
    is_init_netns,
    netns_name,
)
from bpfailover.ops.doctor.lowers import (
    DHCP_CLIENTS,
    check_addresses,
    check_bypassed_qdisc,
    check_dhcp,
    check_managers,
    check_masters,
)
from bpfailover.ops.doctor.report import format_findings, main_for_cli, run_checks
from bpfailover.ops.doctor.system import (
    CAPS,
    NEIGH_KNOBS,
    check_bpffs,
    check_headers,
    check_neighbour_knobs,
    check_privileges,
    check_realtime,
    check_sysctl_net,
)

__all__ = [
    "AGENT_MODULES",
    "AGENT_PROGRAM",
    "CAPS",
    "CLOUD_INIT_SHIM",
    "CLOUD_INIT_UNITS",
    "DHCP_CLIENTS",
    "NEIGH_KNOBS",
    "PERMISSION_FIX",
    "ROOT_FIX",
    "SNIPPETS",
    "VIRTIO_NET_F_STANDBY",
    "Finding",
    "Host",
    "LinkInfo",
    "Lower",
    "api",
    "check_addresses",
    "check_agent_netns",
    "check_agents",
    "check_bpffs",
    "check_bypassed_qdisc",
    "check_cloud_init",
    "check_datapath_check",
    "check_dhcp",
    "check_failover_devices",
    "check_headers",
    "check_kernel_failover",
    "check_managers",
    "check_masters",
    "check_neighbour_knobs",
    "check_netplan_mac_match",
    "check_orphaned_pins",
    "check_privileges",
    "check_realtime",
    "check_sysctl_net",
    "describe_netns",
    "dump_links",
    "find_lowers",
    "format_findings",
    "host_for",
    "is_agent",
    "is_init_netns",
    "main_for_cli",
    "netns",
    "netns_name",
    "run_checks",
]

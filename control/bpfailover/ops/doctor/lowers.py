"""The lowers and the failover devices: addresses, DHCP clients and ifupdown stanzas,
network managers, foreign masters, a qdisc the datapath bypasses."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from bpfailover.model import config as configmod
from bpfailover.ops.doctor.host import Finding, Host, LinkInfo, Lower, procs, same_netns

DHCP_CLIENTS = {"dhclient", "dhcpcd", "dhcpcd5", "udhcpc", "pump", "dhcpcd-bin"}


def check_addresses(lowers: list[Lower]) -> Iterator[Finding]:
    for lw in lowers:
        for addr, scope in lw.link.addrs:
            what = "IPv6 link-local address" if scope == "link" else "address"
            yield Finding(
                "lower-address",
                lw.link.name,
                f"{what} {addr} on {lw.group}'s {lw.role} lower: traffic sourced from a lower "
                "bypasses the failover device and is lost when it goes away",
                f"ip addr flush dev {lw.link.name}; sysctl -w net.ipv6.conf.{lw.link.name}."
                f"disable_ipv6=1; configure addresses on {lw.group} only",
            )


def check_dhcp(host: Host, lowers: list[Lower]) -> Iterator[Finding]:
    names = {lw.link.name: lw for lw in lowers}
    for pid, argv in procs(host):
        prog = os.path.basename(argv[0])
        if prog not in DHCP_CLIENTS or not same_netns(host, pid):
            continue
        hit = [a for a in argv[1:] if a in names]
        ifaces = [a for a in argv[1:] if not a.startswith("-") and "/" not in a and "." not in a]
        if not hit and prog == "dhclient" and not ifaces and names:
            hit = sorted(names)  # dhclient without interfaces runs on all of them
        for name in hit:
            yield Finding(
                "lower-dhcp",
                name,
                f"DHCP client {prog} (pid {pid}) runs on lower {name}",
                f"stop it (kill {pid}) and run DHCP on {names[name].group} instead; "
                "make sure nothing starts it again (ifupdown, NetworkManager, networkd)",
            )
    for path in [
        host.etc / "network" / "interfaces",
        *sorted((host.etc / "network" / "interfaces.d").glob("*")),
    ]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for name, lw in names.items():
            m = re.search(rf"^\s*iface\s+{re.escape(name)}\s+inet6?\s+(\w+)", text, re.M)
            if m and m.group(1) not in ("manual",):
                yield Finding(
                    "lower-ifupdown",
                    name,
                    f"{path} configures lower {name} ({m.group(0).strip()})",
                    f"change it to `iface {name} inet manual` (or remove it) and configure "
                    f"{lw.group} instead",
                )


def keyfile_value(text: str, key: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(key)}\s*=\s*(.*?)\s*$", text, re.M)
    return m.group(1) if m else None


def networkd_managed(host: Host, ifindex: int) -> tuple[str, str] | None:
    """(state, .network file) when systemd-networkd manages netdev `ifindex` (its state file
    under /run/systemd/netif/links says so), None when it does not or there is none."""
    try:
        text = (host.run / "systemd" / "netif" / "links" / str(ifindex)).read_text(errors="replace")
    except OSError:
        return None
    state = keyfile_value(text, "ADMIN_STATE")
    if state is None or state in ("unmanaged", "linger"):
        return None
    return state, keyfile_value(text, "NETWORK_FILE") or "a .network file"


def check_managers(host: Host, lowers: list[Lower]) -> Iterator[Finding]:
    if not host.check_managers:
        return
    for lw in lowers:
        nm = host.run / "NetworkManager" / "devices" / str(lw.link.ifindex)
        try:
            managed = keyfile_value(nm.read_text(errors="replace"), "managed")
        except OSError:
            managed = None
        if managed is not None and managed.lower() in ("true", "1", "yes"):
            yield Finding(
                "lower-networkmanager",
                lw.link.name,
                f"NetworkManager manages lower {lw.link.name} (it may add addresses, DHCP, "
                "or take it down)",
                "install deploy/networkmanager/90-bpfailover-lowers.conf (or the udev rule "
                f"deploy/udev/80-bpfailover-lowers.rules) and `nmcli device set {lw.link.name} "
                "managed no`",
            )
        by_networkd = networkd_managed(host, lw.link.ifindex)
        if by_networkd is not None:
            state, net = by_networkd
            yield Finding(
                "lower-networkd",
                lw.link.name,
                f"systemd-networkd manages lower {lw.link.name} (state {state}, from {net})",
                "install deploy/networkd/00-bpfailover-lowers.network in /etc/systemd/network "
                "(match the failover device by Name=, never by MAC) and `networkctl reload`",
            )


def check_masters(lowers: list[Lower], links: dict[int, LinkInfo]) -> Iterator[Finding]:
    for lw in lowers:
        if lw.link.master:
            m = links.get(lw.link.master)
            mname = m.name if m else f"ifindex {lw.link.master}"
            kind = (m.kind if m else None) or "a master device (the kernel's net_failover?)"
            yield Finding(
                "lower-enslaved",
                lw.link.name,
                f"lower {lw.link.name} is enslaved to {mname} ({kind}): two failover "
                "mechanisms fight over it",
                "boot the guest without the kernel's failover: virtio-net `failover=off` on "
                "the hypervisor side (see the hypervisor-failover-on finding; net_failover "
                f"cannot be blacklisted), or release it: ip link set {lw.link.name} nomaster",
            )


def check_bypassed_qdisc(
    cfg: configmod.Config | None, links: dict[int, LinkInfo]
) -> Iterator[Finding]:
    """A root qdisc on a failover device with tx_path direct: its transmit never reaches it
    (the datapath redirects at clsact egress, before the qdisc and the taps)."""
    if cfg is None:
        return
    names = {lk.name: lk for lk in links.values()}
    for g in cfg.groups:
        dev = names.get(g.name)
        if g.tx_path != "direct" or dev is None or dev.root_qdisc in (None, "noqueue"):
            continue
        yield Finding(
            "qdisc-bypassed",
            g.name,
            f"root qdisc {dev.root_qdisc} on failover device {g.name} never sees its transmit: "
            "with tx_path direct the datapath redirects at clsact egress, before any qdisc",
            f"put the qdisc on the lowers (`tc qdisc add dev LOWER root ...`), or set "
            f"`tx_path: veth` for group {g.name} (one backlog trip more per packet)",
        )

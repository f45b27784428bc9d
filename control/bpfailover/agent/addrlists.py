"""The failover device's link-layer address lists (multicast and unicast) on its lowers.

As net_failover's dev_mc_sync_multiple()/dev_uc_sync_multiple(): synced when a lower
registers, when the failover device or an address on it changes, when the kernel announces
a multicast change (6.13+), when the datapath rings the doorbell (an IGMP/MLD report left
the failover device) and, for what no event announces, every address_resync_s.
"""

from __future__ import annotations

from bpfailover.datapath.doorbell import Doorbell
from bpfailover.datapath.maps import Datapath
from bpfailover.effects import mcsync
from bpfailover.events import netlink
from bpfailover.model.groups import Group
from bpfailover.ops.eventlog import event


def sync_mc(grp: Group) -> None:
    """The failover device's link-layer address lists (multicast and unicast) onto each
    lower, as net_failover's dev_mc_sync_multiple()/dev_uc_sync_multiple()."""
    lowers = {lw.ifindex: lw.name for lw in grp.lowers.values()}
    try:
        grp.mc_added = mcsync.sync(grp.cfg.name, lowers, grp.mc_added)
    except OSError as e:
        event("mc_sync_error", group=grp.name, error=str(e))
    try:
        grp.uc_added = mcsync.sync_uc(grp.master, lowers, grp.uc_added)
    except OSError as e:
        event("uc_sync_error", group=grp.name, error=str(e))


def unsync_lower(group: str, ifindex: int, name: str, mc: set[str], uc: set[str]) -> None:
    """A lower leaves its group while still present: the addresses we added to its lists
    are taken off (net_failover's dev_uc_unsync()/dev_mc_unsync()); what others put there
    stays."""
    try:
        mcsync.remove(name, mc)
    except OSError as e:
        event("mc_unsync_error", group=group, lower=name, error=str(e))
    try:
        mcsync.remove_uc(ifindex, uc)
    except OSError as e:
        event("uc_unsync_error", group=group, lower=name, error=str(e))


def on_addr(
    groups: dict[str, Group], addrs: dict[int, set[tuple[int, str]]], addr: netlink.Addr
) -> None:
    """An IP address came or went: kept for GARP/NA; on a failover device, its lists."""
    entry = (addr.family, addr.address)
    have = addrs.setdefault(addr.ifindex, set())
    if addr.deleted:
        have.discard(entry)
    else:
        have.add(entry)
    for grp in groups.values():
        if addr.ifindex == grp.master:
            sync_mc(grp)  # a new IPv6 address joins its solicited-node group


def on_mcast(groups: dict[str, Group], ifindex: int) -> None:
    for grp in groups.values():
        if ifindex in (0, grp.master):
            sync_mc(grp)


def open_doorbell(dp: Datapath) -> Doorbell | None:
    """The datapath rings fo_events when an IGMP/MLD message leaves a failover device:
    its address lists changed (kernels before 6.13 announce no multicast change)."""
    fd = dp.fds.get("fo_events")
    if fd is None:
        return None
    try:
        return Doorbell(fd)
    except OSError as e:
        event("doorbell_error", error=str(e), action="address lists synced on other events")
        return None


def on_doorbell(doorbell: Doorbell | None, groups: dict[str, Group]) -> None:
    assert doorbell is not None
    if doorbell.drain():
        for grp in groups.values():
            sync_mc(grp)

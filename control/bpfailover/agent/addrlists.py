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


def on_mcast(groups: dict[str, Group], ifindices: set[int], pacer: SyncPacer, now_ms: int) -> None:
    """The kernel announced multicast changes (a batch of them: one sync at most)."""
    mine = any(i in (0, grp.master) for grp in groups.values() for i in ifindices)
    if mine and pacer.ring(now_ms):
        sync_all(groups)


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


# Any local process may join a multicast group (no privilege needed), and each join or
# leave rings the doorbell (its report) and, on 6.13+, brings a multicast notification:
# a join/leave loop must not turn the real-time loop into a full address-list re-read per
# report.  The first change syncs at once, later ones within the window are served once
# at its end.
SYNC_WINDOW_MS = 50


class SyncPacer:
    """At most one sync for multicast changes per SYNC_WINDOW_MS; no change is ever lost
    (one inside the window leaves a sync due at the window's end)."""

    def __init__(self, window_ms: int = SYNC_WINDOW_MS) -> None:
        self.window_ms = window_ms
        self.last_ms: int | None = None  # when the last sync ran
        self.due_ms: int | None = None  # a change waits for the window's end

    def ring(self, now_ms: int) -> bool:
        """True: sync now; False: one sync is (or already was) left due."""
        if self.last_ms is None or now_ms - self.last_ms >= self.window_ms:
            self.last_ms, self.due_ms = now_ms, None
            return True
        if self.due_ms is None:
            self.due_ms = self.last_ms + self.window_ms
        return False

    def take_due(self, now_ms: int) -> bool:
        """True once when the deferred sync is due (then it counts as the last sync)."""
        if self.due_ms is None or self.due_ms > now_ms:
            return False
        self.last_ms, self.due_ms = now_ms, None
        return True


def on_doorbell(
    doorbell: Doorbell | None, groups: dict[str, Group], pacer: SyncPacer, now_ms: int
) -> None:
    assert doorbell is not None
    if doorbell.drain() and pacer.ring(now_ms):
        sync_all(groups)


def sync_all(groups: dict[str, Group]) -> None:
    for grp in groups.values():
        sync_mc(grp)

"""A datapath whose agent is gone: found (doctor) and removed (`failoverctl teardown --pins`).

Pins outlive failoverd on purpose (the datapath keeps forwarding across restarts), so after
an agent is stopped for good its pins, filters and failover devices stay until removed. The
removal works without an agent, but never beside one: it takes the pin directory's
single-instance lock first, and holds it until it is done."""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfailover.datapath.loader import PROGS
from bpfailover.datapath.maps import Datapath, DatapathError, lock_held, remove_pins

DATAPATH_MARK = "fo_meta"  # a directory holding this pin is a bpfailover datapath


def held(pin_dir: Path) -> bool:
    """A running agent holds pin_dir's single-instance lock (probed without waiting)."""
    return lock_held(pin_dir)  # PermissionError: we cannot tell, never call it unheld


def find(bpffs: Path, denied: list[Path] | None = None) -> list[Path]:
    """bpfailover pin directories directly under the bpffs mount `bpffs` that no running
    agent holds (orphaned).  A directory or lock we may not read is not reported as one:
    it goes to `denied`, so the caller can say what it did not check."""
    try:
        entries = sorted(bpffs.iterdir())
    except PermissionError:
        if denied is not None:
            denied.append(bpffs)
        return []
    except OSError:
        return []
    out = []
    for d in entries:
        try:
            if d.is_dir() and not d.is_symlink() and (d / DATAPATH_MARK).exists() and not held(d):
                out.append(d)
        except PermissionError:
            if denied is not None:
                denied.append(d)
        except OSError:
            continue
    return out


class TeardownError(Exception):
    pass


@dataclass
class Removed:
    group: str
    device: str | None  # None: the failover device was already gone
    peer: str | None
    addresses: list[str] = field(default_factory=list)
    lowers: list[str] = field(default_factory=list)


def _link(ipr: Any, ifindex: int) -> Any | None:
    from pyroute2.netlink.exceptions import NetlinkError

    if not ifindex:
        return None
    try:
        return ipr.get_links(ifindex)[0]
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            return None
        raise


def _addresses(ipr: Any, ifindex: int) -> list[str]:
    """Configured addresses (an IPv6 link-local comes with every carrier: guards nothing)."""
    out = []
    for a in ipr.get_addr(index=ifindex):
        addr = a.get_attr("IFA_ADDRESS")
        if addr and not str(addr).lower().startswith("fe80:"):
            out.append(f"{addr}/{a['prefixlen']}")
    return sorted(out)


def teardown(pin_dir: Path, groups: list[str] | None, yes: bool) -> tuple[list[Removed], bool]:
    """Remove the named groups (None: all) of the datapath pinned at pin_dir in the current
    network namespace: our filters and XDP programs on the netdevs registered in fo_dev,
    the failover veth pairs, the groups' map state; the pins too once no group is left.
    Refused, changing nothing, while an agent holds pin_dir or (without `yes`) while a
    failover device has carrier and addresses.  Returns (what was removed, pins removed)."""
    from pyroute2 import IPRoute

    from bpfailover.datapath.attach import detach_tc, detach_xdp, tc_attached, xdp_prog_id

    if not os.path.lexists(pin_dir):
        raise TeardownError(f"{pin_dir}: no such pin directory")
    try:
        dp = Datapath.open(pin_dir, load=False)
    except OSError as e:
        raise TeardownError(f"{pin_dir}: {e.strerror or e}") from None
    except DatapathError as e:
        raise TeardownError(str(e)) from None
    with dp:
        try:
            dp.lock()
        except DatapathError as e:
            raise TeardownError(
                f"{e}; remove its groups through it: failoverctl teardown GROUP"
            ) from None
        L = dp.L
        present = dp.groups()
        names = sorted(present) if groups is None else groups
        unknown = [n for n in names if n not in present]
        if unknown:
            have = ", ".join(sorted(present)) or "none"
            raise TeardownError(f"{pin_dir} has no group {unknown[0]} (groups: {have})")
        ours = {dp.prog_id(p) for p in PROGS}
        devs = dp.devs()
        with IPRoute() as ipr:
            plan = []
            for name in names:
                g = present[name]
                rec = dp.group(g)
                master = _link(ipr, rec.master_ifindex)
                peer = _link(ipr, rec.peer_ifindex)
                # the ifindex may be another netdev's by now (another netns, a re-created one)
                if master is None or master.get_attr("IFLA_IFNAME") != name:
                    master = None
                elif peer is None or master.get_attr("IFLA_LINK") != rec.peer_ifindex:
                    master = peer = None
                addrs = _addresses(ipr, rec.master_ifindex) if master is not None else []
                carrier = master is not None and bool(master.get_attr("IFLA_CARRIER"))
                if carrier and addrs and not yes:
                    raise TeardownError(
                        f"{name} has carrier and addresses ({', '.join(addrs)}): teardown "
                        "deletes the device with them and its traffic stops; refused without "
                        "--yes"
                    )
                plan.append((name, g, rec, master, peer, addrs))
            removed = []
            for name, g, rec, master, peer, addrs in plan:
                lowers = []
                for ifindex, (grp, role) in sorted(devs.items()):
                    link = _link(ipr, ifindex)
                    if grp != g or link is None or role == L.FO_ROLE_MASTER:
                        continue
                    if any(tc_attached(ipr, ifindex, "ingress", pid) for pid in ours):
                        detach_tc(ipr, ifindex, "ingress")
                    if xdp_prog_id(ipr, ifindex) in ours:
                        detach_xdp(ipr, ifindex)
                    lowers.append(str(link.get_attr("IFLA_IFNAME")))
                if master is not None:
                    from pyroute2.netlink.exceptions import NetlinkError

                    with suppress(NetlinkError):  # deleting one veth end deletes both
                        ipr.link("del", index=rec.master_ifindex)
                dp.reset_group(g)
                removed.append(
                    Removed(
                        name,
                        name if master is not None else None,
                        peer.get_attr("IFLA_IFNAME") if peer is not None else None,
                        addrs,
                        sorted(lowers),
                    )
                )
        pins_gone = not dp.groups()
        if pins_gone:
            remove_pins(pin_dir)  # the lock (under /run) is ours until dp closes, and
            # its file goes then (release_lock): none piles up
    return removed, pins_gone

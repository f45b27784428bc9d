"""A datapath whose agent is gone: found (doctor) and removed (`failoverctl teardown --pins`).

Pins outlive failoverd on purpose (the datapath keeps forwarding across restarts), so after
an agent is stopped for good its pins, filters and failover devices stay until removed. The
removal works without an agent, but never beside one: it takes the pin directory's
single-instance lock first, and holds it until it is done.  Nor does it take what a running
agent serves: a failover device another agent adopted (its hooks carry that agent's
programs) is that agent's, whatever stale pins still name it."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfailover.datapath.loader import PROGS, LoadError
from bpfailover.datapath.maps import (
    Datapath,
    DatapathError,
    held_pin_dirs,
    live_programs,
    lock_held,
    lock_holder,
    pinned_prog_ids,
    remove_pins,
)

DATAPATH_MARK = "fo_meta"  # a directory holding this pin is a bpfailover datapath


def held(pin_dir: Path) -> bool:
    """A running agent holds pin_dir's single-instance lock (probed without waiting)."""
    return lock_held(pin_dir)  # PermissionError: we cannot tell, never call it unheld


def find(bpffs: Path, denied: list[Path] | None = None) -> list[Path]:
    """bpfailover pin directories directly under the bpffs mount `bpffs` that no running
    agent holds (orphaned), nor serves (served_by, in the current network namespace).  A
    directory or lock we may not read is not reported as one: it goes to `denied`, so the
    caller can say what it did not check."""
    try:
        entries = sorted(bpffs.iterdir())
    except PermissionError:
        if denied is not None:
            denied.append(bpffs)
        return []
    except OSError:
        return []
    out = []
    live: dict[int, Path] | None = None  # read once: every running agent's programs
    for d in entries:
        try:
            pins = d.is_dir() and not d.is_symlink() and (d / DATAPATH_MARK).exists()
            if pins and not held(d):
                if live is None:
                    live = _live()
                if served_by(d, live) is None:
                    out.append(d)
        except PermissionError:
            if denied is not None:
                denied.append(d)
        except OSError:
            continue
    return out


def _live() -> dict[int, Path]:
    """Program id -> pin directory, for every datapath a running agent holds."""
    try:
        return {p: d for d in held_pin_dirs() for p in pinned_prog_ids(d)}
    except (OSError, DatapathError):
        return {}


def _serving(ipr: Any, ifindexes: list[int], live: dict[int, Path]) -> Path | None:
    """The pin directory of the running agent whose programs these netdevs' hooks carry."""
    from bpfailover.datapath.attach import foreign_programs

    for ifindex in ifindexes:
        for _, pid in foreign_programs(ipr, ifindex, set(), xdp=True):
            if pid is not None and pid in live:
                return live[pid]
    return None


def _device(ipr: Any, name: str, rec: Any) -> tuple[Any | None, Any | None]:
    """The group's failover device and hidden peer, if the ifindexes its record holds are
    still that veth pair here (the ifindex may be another netdev's by now: another netns,
    a re-created one); else (None, None) or (None, peer)."""
    master = _link(ipr, rec.master_ifindex)
    peer = _link(ipr, rec.peer_ifindex)
    if master is None or master.get_attr("IFLA_IFNAME") != name:
        return None, peer
    if peer is None or master.get_attr("IFLA_LINK") != rec.peer_ifindex:
        return None, None
    return master, peer


def served_by(pin_dir: Path, live: dict[int, Path] | None = None) -> Path | None:
    """The pin directory of a running agent that serves a failover device pin_dir's groups
    name (in the current network namespace: the device's hooks carry its programs); None
    when none does, or when that cannot be read (not root).  live: the running agents'
    programs (live_programs), when already read."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        if live is None:
            live = live_programs(pin_dir)
        if not live:
            return None
        with Datapath.open(pin_dir, load=False, read_only=True) as dp, IPRoute() as ipr:
            for name, g in dp.groups().items():
                rec = dp.group(g)
                master, _ = _device(ipr, name, rec)
                if master is not None:
                    found = _serving(ipr, [rec.master_ifindex, rec.peer_ifindex], live)
                    if found is not None:
                        return found
    except (OSError, DatapathError, LoadError, NetlinkError):
        return None  # (not a datapath it could open, e.g. not on a bpffs: no agent serves it)
    return None


class TeardownError(Exception):
    pass


@dataclass
class Removed:
    group: str
    device: str | None  # None: the failover device was already gone
    peer: str | None
    addresses: list[str] = field(default_factory=list)
    lowers: list[str] = field(default_factory=list)  # those our programs were detached from
    error: str | None = None  # why the failover device could not be deleted (it is kept)


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


def _detach_ours(ipr: Any, ifindex: int, ours: set[int]) -> bool:
    """Detach our programs (ids in `ours`) from a lower's hooks; True if one was there and
    is gone now (another datapath's programs are not ours to touch)."""
    from bpfailover.datapath.attach import detach_tc, detach_xdp, tc_attached, xdp_prog_id

    done = False
    if any(tc_attached(ipr, ifindex, "ingress", pid) for pid in ours):
        detach_tc(ipr, ifindex, "ingress")
        done = not any(tc_attached(ipr, ifindex, "ingress", pid) for pid in ours)
    if xdp_prog_id(ipr, ifindex) in ours:
        detach_xdp(ipr, ifindex)
        done = xdp_prog_id(ipr, ifindex) not in ours or done
    return done


def _delete(ipr: Any, ifindex: int) -> tuple[bool, str | None]:
    """Delete the failover device (its veth peer goes with it): (deleted, why not)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.link("del", index=ifindex)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False, None  # gone meanwhile
        return False, os.strerror(e.code) if e.code else str(e)
    return True, None


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
    Refused, changing nothing, while an agent holds pin_dir, while a running agent serves
    a group's failover device (its hooks carry that agent's programs: it adopted the device
    with pins of its own) or (without `yes`) while a failover device has carrier and
    addresses.  Returns (what was really removed, pins removed)."""
    from pyroute2 import IPRoute

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
        live = live_programs(pin_dir)  # other running agents' (our own lock is held)
        devs = dp.devs()
        with IPRoute() as ipr:
            plan = []
            for name in names:
                g = present[name]
                rec = dp.group(g)
                master, peer = _device(ipr, name, rec)
                if master is not None:
                    theirs = _serving(ipr, [rec.master_ifindex, rec.peer_ifindex], live)
                    if theirs is not None:
                        pid = lock_holder(theirs)
                        agent = f"failoverd (pid {pid})" if pid is not None else "failoverd"
                        raise TeardownError(
                            f"{name} is served by the running {agent} that holds {theirs} "
                            f"(its programs are on {name}'s hooks; {pin_dir} is stale): "
                            "refused, nothing changed; remove it through that agent"
                        )
                else:
                    peer = None
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
                    if _detach_ours(ipr, ifindex, ours):
                        lowers.append(str(link.get_attr("IFLA_IFNAME")))
                deleted, error = False, None
                if master is not None:
                    deleted, error = _delete(ipr, rec.master_ifindex)
                if error is None:  # a device kept keeps the group that describes it
                    dp.reset_group(g)
                removed.append(
                    Removed(
                        name,
                        name if deleted else None,
                        peer.get_attr("IFLA_IFNAME") if deleted and peer is not None else None,
                        addrs if deleted else [],
                        sorted(lowers),
                        error,
                    )
                )
        pins_gone = not dp.groups()
        if pins_gone:
            remove_pins(pin_dir)  # the lock (under /run) is ours until dp closes, and
            # its file goes then (release_lock): none piles up
    return removed, pins_gone

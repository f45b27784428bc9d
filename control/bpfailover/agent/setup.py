"""Start-up: each configured group's failover device created or adopted, checked first.

Bad input fails before anything is created: every group's MAC must be knowable and its
failover device's names free (or held by our own veth pair from an earlier run).
"""

from __future__ import annotations

from pathlib import Path

from bpfailover import policy
from bpfailover.datapath.attach import Wiring, foreign_programs, peer_name
from bpfailover.datapath.layout import SLOT_NAMES
from bpfailover.datapath.loader import PROGS
from bpfailover.datapath.maps import Datapath, DatapathError, live_programs, pinned_prog_ids
from bpfailover.effects.ethtool import driver_of
from bpfailover.events import netlink
from bpfailover.model import config as configmod
from bpfailover.model.groups import Adopted, Group
from bpfailover.ops.eventlog import event


class AgentError(RuntimeError):
    pass


def check_groups(cfg: configmod.Config, links: dict[int, netlink.Link]) -> None:
    """Raise AgentError for the first group that cannot be set up."""
    for gcfg in cfg.groups:
        if gcfg.mac == "auto" and resolve_standby(gcfg, links) is None:
            raise _no_standby(gcfg)
        check_failover_name(gcfg.name, links)


def _no_standby(gcfg: configmod.Group) -> AgentError:
    return AgentError(
        f"group {gcfg.name}: standby {gcfg.standby_name or gcfg.standby} not found "
        "(mac: auto needs it to learn the MAC; or set mac: in the config)"
    )


def resolve_standby(gcfg: configmod.Group, links: dict[int, netlink.Link]) -> int | None:
    if gcfg.standby_name is not None:
        return next((i for i, lk in links.items() if lk.ifname == gcfg.standby_name), None)
    driver = getattr(gcfg.standby, "driver", "")
    for i, lk in links.items():
        if lk.ifname != gcfg.name and driver_of(lk.ifname) == driver:
            return i
    return None


def check_failover_name(name: str, links: dict[int, netlink.Link]) -> None:
    """The failover device `name` and its hidden peer are ours to create or adopt: a netdev
    already there under either name that is not that veth pair fails start-up before the
    datapath is loaded or anything is created."""
    by_name = {lk.ifname: lk for lk in links.values()}
    peer = peer_name(name)
    master, hidden = by_name.get(name), by_name.get(peer)
    if master is None and hidden is None:
        return
    if master is not None and hidden is not None and master.link == hidden.ifindex:
        return  # our veth pair from an earlier run: adopted
    taken = name if master is not None else peer
    raise AgentError(
        f"group {name}: netdev {taken} exists and is not a bpfailover failover device "
        f"(veth {name} + {peer}): rename the group or remove {taken}"
    )


def _served_by(found: list[tuple[str, int | None]], live: dict[int, Path]) -> list[str]:
    return sorted({str(live[pid]) for _, pid in found if pid is not None and pid in live})


def _refusal(dev: str, served: list[str], found: list[tuple[str, int | None]]) -> str:
    return (
        f"{dev} carries the programs of the datapath in {', '.join(served)} "
        f"({', '.join(d for d, _ in found)}), which a running failoverd holds: stop it first "
        "(one writer per device)"
    )


def _taken_over(group: str, dev: str, found: list[tuple[str, int | None]]) -> None:
    event(
        "hooks_taken_over",
        group=group,
        dev=dev,
        programs=[d for d, _ in found],
        why="no running agent holds their datapath",
    )


def check_hooks(cfg: configmod.Config, links: dict[int, netlink.Link]) -> None:
    """One writer per failover device, whatever the pin directory: raise AgentError when a
    group's failover device, its hidden peer or a lower (a netdev with the group's MAC)
    carries the programs of a datapath that a running agent holds (pinned in a pin
    directory whose single-instance lock is taken).  Programs of an earlier run of our own
    pin directory are adopted; those of a datapath no agent holds any more (its agent gone,
    its pins removed or its bpffs unmounted) are taken over in place, and said so (for a
    lower when it registers: lower_hooks).  Runs before the datapath is loaded: a refusal
    changes nothing.  Lowers that come later are checked as they register (lower_hooks)."""
    from pyroute2 import IPRoute

    ours = pinned_prog_ids(cfg.bpffs)
    live = live_programs(cfg.bpffs)
    with IPRoute() as ipr:
        for gcfg in cfg.groups:
            mac = gcfg.mac
            if mac == "auto":
                standby = resolve_standby(gcfg, links)
                mac = links[standby].mac if standby is not None else ""
            names = {gcfg.name, peer_name(gcfg.name)}
            devs = [lk for lk in links.values() if lk.ifname in names or (mac and lk.mac == mac)]
            for lk in sorted(devs, key=lambda lk: lk.ifindex):
                found = foreign_programs(ipr, lk.ifindex, ours, xdp=gcfg.rx_path == "xdp")
                served = _served_by(found, live)
                if served:
                    raise AgentError(f"group {gcfg.name}: {_refusal(lk.ifname, served, found)}")
                if found and lk.ifname in names:
                    _taken_over(gcfg.name, lk.ifname, found)


def lower_hooks(dp: Datapath, wiring: Wiring, grp: Group, link: netlink.Link) -> str | None:
    """The same rule for a lower about to be registered (at start-up or plugged later):
    why it is refused when its hooks carry the programs of a datapath another running
    agent holds, else None (foreign programs no agent holds are taken over, said so).
    Nothing is changed here; the caller registers the lower only on None."""
    ours = {dp.prog_id(pin) for pin in PROGS}
    found = foreign_programs(wiring.ipr, link.ifindex, ours, xdp=grp.cfg.rx_path == "xdp")
    if not found:
        return None  # the usual case: one filter dump, no pin directory read
    served = _served_by(found, live_programs(dp.pin_dir))
    if served:
        return _refusal(link.ifname, served, found)
    _taken_over(grp.name, link.ifname, found)
    return None


def setup_group(
    gcfg: configmod.Group, links: dict[int, netlink.Link], dp: Datapath, wiring: Wiring
) -> Group:
    """Create or adopt the group's failover device; the active lower and override the
    datapath already holds (from an earlier run) are adopted too."""
    standby = resolve_standby(gcfg, links)
    mac = gcfg.mac
    if mac == "auto":
        if standby is None:
            raise _no_standby(gcfg)
        mac = links[standby].mac
    existed = gcfg.name in dp.groups()  # an earlier run's datapath: adopted, not created
    try:
        gid = wiring.setup_group(
            gcfg.name,
            mac,
            gcfg.inactive_rx,
            gcfg.rx_path,
            mtu=links[standby].mtu if standby is not None else None,
            tx_path=gcfg.tx_path,
            dp_hold=gcfg.policy.downdelay_ms > 0,  # the operator asked to wait
        )
    except DatapathError as e:
        raise AgentError(f"group {gcfg.name}: {e}") from e
    rec = dp.group(gid)
    grp = Group(
        cfg=gcfg,
        gid=gid,
        mac=mac,
        master=rec.master_ifindex,
        peer=rec.peer_ifindex,
        pcfg=policy.PolicyConfig.from_settings(gcfg.policy),
    )
    found = wiring.mac_restored.pop(gcfg.name, None)
    if found is not None:  # changed while no agent ran (or by a previous one's crash)
        grp.mac_restored += 1
        event("mac_restored", group=gcfg.name, found=found, mac=mac, when="start")
    grp.override = SLOT_NAMES.get(rec.override_slot)  # type: ignore[assignment]
    slot = dp.active(gid)
    grp.active = SLOT_NAMES.get(slot)  # type: ignore[assignment]
    if existed:
        grp.adopted = Adopted(grp.active, dp.lower(gid, slot) if slot else 0)
    grp.told = SLOT_NAMES.get(dp.told(gid))  # type: ignore[assignment]
    event(
        "group",
        group=gcfg.name,
        gid=gid,
        mac=mac,
        master=grp.master,
        adopted_active=grp.active,
        override=grp.override,
    )
    return grp

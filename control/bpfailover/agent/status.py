"""The agent's status: the frozen snapshot built from its groups (model/status.py has the
types and their JSON; datapath/counters.py adds the counters when a request asks)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from bpfailover.model.groups import Group
from bpfailover.model.status import (
    AgentStatus,
    GroupStatus,
    LastSwitch,
    LowerStatus,
)


def group_status(grp: Group, waiting_for_udev: Sequence[str] = ()) -> GroupStatus:
    sw = grp.last_switch
    return GroupStatus(
        name=grp.name,
        gid=grp.gid,
        ifindex=grp.master,
        mac=grp.mac,
        mtu=grp.mtu,
        carrier=bool(grp.carrier),
        active=grp.active,
        active_lower=grp.lowers[grp.active].name if grp.active in grp.lowers else None,
        override=grp.override,
        reselect=grp.pcfg.reselect,
        inactive_rx=grp.cfg.inactive_rx,
        rx_path=grp.cfg.rx_path,
        tx_path=grp.cfg.tx_path,
        speed_mbps=grp.lowers[grp.active].speed_mbps if grp.active in grp.lowers else None,
        mac_restored=grp.mac_restored,
        vlans=tuple(sorted({v[1] for v in grp.vlans.values()})),
        waiting_for_udev=tuple(sorted(waiting_for_udev)),
        single_since=grp.single_since,
        redundancy_grace_s=grp.cfg.redundancy_grace_s,
        lowers=tuple(
            LowerStatus(
                name=lw.name,
                ifindex=lw.ifindex,
                role=role,
                usable=lw.usable,
                admin_up=lw.admin_up,
                carrier=lw.carrier,
                mtu=lw.mtu,
                speed_mbps=lw.speed_mbps,
                duplex=lw.duplex,
                active=grp.active == role,
            )
            for role, lw in sorted(grp.lowers.items())
        ),
        switches=MappingProxyType(dict(grp.switches)),  # read-only, like the rest
        last_switch=None
        if sw is None
        else LastSwitch(
            time=sw.wall_time,
            from_lower=sw.from_lower,
            to_lower=sw.to_lower,
            reason=sw.reason,
            latency_s=sw.latency_s,
        ),
    )


def snapshot(
    groups: Iterable[Group],
    started_at: float,
    scheduling: str,
    errors: Mapping[str, int] | None = None,
    waiting_for_udev: Mapping[str, Sequence[str]] | None = None,
) -> AgentStatus:
    """Built in the agent thread, which alone changes the groups and the error counts.
    waiting_for_udev: group name -> the new lowers held for udev (agent/udevwait.py)."""
    held = waiting_for_udev or {}
    return AgentStatus(
        pid=os.getpid(),
        started_at=started_at,
        scheduling=scheduling,
        groups=tuple(group_status(g, held.get(g.name, ())) for g in groups),
        errors=MappingProxyType(dict(errors or {})),
    )

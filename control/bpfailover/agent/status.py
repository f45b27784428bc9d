"""The agent's status: the frozen snapshot built from its groups, and the counters read at
request time (model/status.py has the types and their JSON)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from bpfailover.datapath.layout import ROLE_SLOTS
from bpfailover.datapath.maps import Datapath
from bpfailover.model.groups import Group
from bpfailover.model.status import (
    AgentStatus,
    GroupStatus,
    LastSwitch,
    LowerCounters,
    LowerStatus,
)


def group_status(grp: Group) -> GroupStatus:
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
        lowers=tuple(
            LowerStatus(
                name=lw.name,
                ifindex=lw.ifindex,
                role=role,
                usable=lw.usable,
                admin_up=lw.admin_up,
                carrier=lw.carrier,
                mtu=lw.mtu,
                active=grp.active == role,
            )
            for role, lw in sorted(grp.lowers.items())
        ),
        switches=dict(grp.switches),
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


def snapshot(groups: Iterable[Group], started_at: float, scheduling: str) -> AgentStatus:
    """Built in the agent thread, which alone changes the groups."""
    return AgentStatus(
        pid=os.getpid(),
        started_at=started_at,
        scheduling=scheduling,
        groups=tuple(group_status(g) for g in groups),
    )


def with_counters(st: AgentStatus, dp: Datapath) -> AgentStatus:
    """`st` with the datapath's counters as they are now (any thread: reads only)."""
    L = dp.L

    def lower(g: GroupStatus, lw: LowerStatus) -> LowerCounters:
        assert g.gid is not None
        slot = ROLE_SLOTS[lw.role]
        tx = dp.stats(g.gid, slot, L.FO_DIR_TX)
        rx = dp.stats(g.gid, slot, L.FO_DIR_RX)
        return LowerCounters(
            tx_packets=tx.packets, tx_bytes=tx.bytes, rx_packets=rx.packets, rx_bytes=rx.bytes
        )

    def drops(g: GroupStatus) -> dict[str, int]:
        assert g.gid is not None
        return {
            f"{hook}/{reason}": dp.drops(g.gid, h, r).packets
            for h, hook in enumerate(L.hooks)
            for r, reason in enumerate(L.drop_reasons)
        }

    return st.with_counters(lower, drops)

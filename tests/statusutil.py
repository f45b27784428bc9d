"""Typed status objects for the unit tests of the status' consumers."""

from __future__ import annotations

from bpfailover import policy
from bpfailover.model.status import (
    AgentStatus,
    Fallback,
    GroupStatus,
    LastSwitch,
    LowerCounters,
    LowerStatus,
)


def lower(name: str, role: policy.Role, usable: bool = True, active: bool = False) -> LowerStatus:
    return LowerStatus(
        name=name,
        ifindex=3 if role == "primary" else 4,
        role=role,
        usable=usable,
        admin_up=True,
        carrier=usable,
        mtu=1500,
        active=active,
    )


def group(
    active: policy.Role | None = "primary",
    primary_usable: bool = True,
    standby_usable: bool = True,
    override: policy.Role | None = None,
) -> GroupStatus:
    names = {"primary": "ens11", "standby": "ens10nsby"}
    return GroupStatus(
        name="ens10",
        gid=0,
        ifindex=5,
        mac="52:54:00:00:12:53",
        mtu=1500,
        carrier=primary_usable or standby_usable,
        active=active,
        active_lower=names[active] if active else None,
        override=override,
        reselect="always",
        inactive_rx="deliver",
        rx_path="tc",
        lowers=(
            lower("ens11", "primary", primary_usable, active == "primary"),
            lower("ens10nsby", "standby", standby_usable, active == "standby"),
        ),
        switches={"initial": 1},
        last_switch=LastSwitch(
            time=1.7e9, from_lower=None, to_lower="ens11", reason="initial", latency_s=0.0001
        ),
    )


def agent(*groups: GroupStatus) -> AgentStatus:
    return AgentStatus(pid=42, started_at=1.7e9, scheduling="fifo:10", groups=groups)


def counted(st: AgentStatus) -> AgentStatus:
    return st.with_counters(
        lambda g, lw: LowerCounters(tx_packets=7, tx_bytes=700, rx_packets=9, rx_bytes=900),
        lambda g: {"tc_egress/no_lower": 2, "xdp/inactive": 0},
        lambda g: (
            Fallback(from_role="primary", to_role="standby", tx_packets=3, rx_packets=1),
            Fallback(from_role="standby", to_role="primary"),
        ),
        datapath_check="on",
    )

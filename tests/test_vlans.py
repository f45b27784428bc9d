"""VLAN filter devices on the lowers: names, parsing back, the add/remove plan, and the
rtnetlink request (the lab kernel has no 8021q: the proving ground's Debian guest proves
the filter itself)."""

from __future__ import annotations

from typing import Any

import pytest

from bpfailover.effects import vlans

Q, AD = vlans.ETH_P_8021Q, vlans.ETH_P_8021AD


def test_names_round_trip() -> None:
    assert vlans.filter_name(5, (Q, 100)) == "fo5.100"
    assert vlans.filter_name(123456, (AD, 4094)) == "fo123456s4094"
    for ifx, v in [(5, (Q, 100)), (77, (AD, 1)), (1, (Q, 4094))]:
        assert vlans.parse_name(vlans.filter_name(ifx, v)) == (ifx, v)
    for other in ("ens10.100", "fo5", "fo.100", "xfo5.100", "fo5.100x"):
        assert vlans.parse_name(other) is None
    with pytest.raises(ValueError):
        vlans.filter_name(10**12, (AD, 4094))


def test_plan_adds_missing_removes_stale() -> None:
    assert vlans.plan({(Q, 10), (Q, 20)}, {(Q, 20), (AD, 30)}) == ([(Q, 10)], [(AD, 30)])
    assert vlans.plan(set(), set()) == ([], [])


class FakeIpr:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.links: dict[str, int] = {}

    def link(self, cmd: str, **kw: Any) -> None:
        self.calls.append((cmd, kw))
        if cmd == "add":
            self.links[kw["ifname"]] = 100 + len(self.links)

    def link_lookup(self, ifname: str) -> list[int]:
        return [self.links[ifname]] if ifname in self.links else []


def test_add_and_remove_requests() -> None:
    ipr = FakeIpr()
    assert vlans.add(ipr, 7, (AD, 42)) == "fo7s42"
    assert ipr.calls[-1] == (
        "add",
        {
            "ifname": "fo7s42",
            "kind": "vlan",
            "link": 7,
            "vlan_id": 42,
            "vlan_protocol": AD,
            "vlan_flags": {"flags": 4, "mask": 4},  # loose binding: stays down with the lower
        },
    )
    vlans.remove(ipr, 7, (AD, 42))
    assert ipr.calls[-1] == ("del", {"index": 100})
    n = len(ipr.calls)
    vlans.remove(ipr, 7, (Q, 1))  # not there: nothing asked
    assert len(ipr.calls) == n

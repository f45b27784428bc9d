"""The agent's event -> decision -> map-write path in-process, without root.

The Agent runs with a fake datapath (maps as dicts, every write logged), a fake wiring
(no tc, no devices), a fake kernel (link dumps and an event source fed with
`events.netlink.Link` objects) and a fake clock.  What it writes to the maps, and in which
order, is what these tests check.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import selectors
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from bpfailover.agent.loop import REFUSED_RECHECK_MS, Agent
from bpfailover.datapath.layout import ROLE_SLOTS
from bpfailover.effects import notify
from bpfailover.events import netlink
from bpfailover.events.netlink import IFF_LOWER_UP, IFF_UP, Link
from bpfailover.events.udev import UdevDb
from bpfailover.model import config as configmod
from bpfailover.ops import cli, sdnotify

MAC = "02:00:00:00:0a:01"
UP = IFF_UP | IFF_LOWER_UP
PRIMARY, STANDBY = ROLE_SLOTS["primary"], ROLE_SLOTS["standby"]


@dataclass
class GroupRec:
    master_ifindex: int = 0
    peer_ifindex: int = 0
    override_slot: int = 0
    name: str = ""
    told: int = 0  # the real one keeps it in flags' bits


_CREATED = itertools.count()  # failover devices the fakes created: each gets new ifindexes


def _kept(rec: GroupRec | None) -> dict[str, int]:
    """What a re-created group keeps of its record (the override, the told slot)."""
    return {} if rec is None else {"override_slot": rec.override_slot, "told": rec.told}


class FakeDatapath:
    """The maps the agent writes, with a log of every write in order."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self.fds: dict[str, int] = {}  # no fo_events ring: no doorbell
        self.recs: dict[int, GroupRec] = {}
        self.lowers: dict[tuple[int, int], int] = {}
        self.active_slot: dict[int, int] = {}
        self.writes: list[tuple[Any, ...]] = []

    def lock(self) -> None:
        pass

    def close(self) -> None:
        pass

    def group(self, g: int) -> GroupRec:
        return self.recs[g]

    def update_group(self, g: int, **fields: Any) -> None:
        self.writes.append(("update_group", g, fields))
        for k, v in fields.items():
            if hasattr(self.recs[g], k):
                setattr(self.recs[g], k, v)

    def groups(self) -> dict[str, int]:
        return {rec.name: g for g, rec in self.recs.items()}

    def told(self, g: int) -> int:
        return self.recs[g].told

    def set_told(self, g: int, slot: int) -> None:
        self.writes.append(("set_told", g, slot))
        self.recs[g].told = slot

    def active(self, g: int) -> int:
        return self.active_slot.get(g, 0)

    def lower(self, g: int, slot: int) -> int:
        return self.lowers.get((g, slot), 0)

    def set_lower(self, g: int, slot: int, ifindex: int) -> None:
        self.writes.append(("set_lower", g, slot, ifindex))
        self.lowers[(g, slot)] = ifindex

    def flip(self, g: int, slot: int) -> None:
        # what the slot held when traffic moved to it: the datapath redirects there at once
        self.writes.append(("flip", g, slot, self.lower(g, slot)))
        self.active_slot[g] = slot

    def del_dev(self, ifindex: int) -> None:
        self.writes.append(("del_dev", ifindex))

    def flips(self) -> list[tuple[int, int]]:
        return [(w[2], w[3]) for w in self.writes if w[0] == "flip"]


class FakeKernel:
    """Links by ifindex; events queued for the agent's event source (a socketpair makes it
    readable for the selector, as the netlink socket is)."""

    def __init__(self, *links: Link) -> None:
        self.links = {lk.ifindex: lk for lk in links}
        self.queue: list[netlink.Event] = []
        self.rx, self.tx = socket.socketpair()
        self.rx.setblocking(False)

    def send(self, link: Link) -> None:
        """The kernel changes a link and says so."""
        if link.deleted:
            self.links.pop(link.ifindex, None)
        else:
            self.links[link.ifindex] = link
        self.queue.append(link)
        self.tx.send(b"!")

    # LinkSource
    def subscribe(self) -> FakeKernel:
        return self

    def dump_links(self) -> list[Link]:
        return list(self.links.values())

    def dump_addrs(self) -> list[netlink.Addr]:
        return []

    # EventSource
    def fileno(self) -> int:
        return self.rx.fileno()

    def read(self) -> list[netlink.Event]:
        with contextlib.suppress(BlockingIOError):
            self.rx.recv(4096)
        out, self.queue = self.queue, []
        return out

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        self.rx.close()
        self.tx.close()


class FakeWiring:
    """Group and lower set-up without devices: as the real Wiring, registering a lower
    fills its slot and creating a group makes the failover device and its peer appear."""

    def __init__(self, dp: FakeDatapath, kernel: FakeKernel) -> None:
        self.dp, self.kernel = dp, kernel
        self.carrier: dict[int, bool] = {}
        self.opened: list[int] = []
        self.closed: list[int] = []
        self.moved: set[int] = set()  # hidden peers whose failover device left the netns
        self.mac_restored: dict[str, str] = {}
        self.peer_passes: list[tuple[int, bool]] = []  # (peer, pass program on)

    def setup_group(
        self, name: str, mac: str, inactive_rx: str = "deliver", rx_path: str = "tc", **kw: Any
    ) -> int:
        g = self.dp.groups().get(name) or len(self.dp.recs) + 1  # an earlier run's: adopted
        rec = self.dp.recs.get(g)
        if rec is not None and rec.master_ifindex in self.kernel.links:
            master, peer = rec.master_ifindex, rec.peer_ifindex  # its device is there: adopted
        else:  # created (again): new ifindexes, as the kernel gives (none such on the host)
            n = next(_CREATED)
            master, peer = 1_000_100 + 1000 * n + g, 1_000_200 + 1000 * n + g
            self.dp.recs[g] = GroupRec(master, peer, name=name, **_kept(rec))
        mtu = kw.get("mtu") or 1500
        self.kernel.links[master] = Link(master, name, UP, mac, mtu, peer, "veth")
        self.kernel.links[peer] = Link(peer, f"{name[:12]}_fo", 0, "", mtu, master, "veth")
        return g

    def register_lower(self, g: int, slot: int, ifindex: int, rx_path: str = "tc") -> None:
        # as the real one: only a flip fills the active slot; an adopted slot is not rewritten
        if self.dp.active(g) != slot and self.dp.lower(g, slot) != ifindex:
            self.dp.set_lower(g, slot, ifindex)

    def unregister_lower(self, g: int, slot: int, ifindex: int, gone: bool = False) -> None:
        if self.dp.lower(g, slot) == ifindex:
            self.dp.set_lower(g, slot, 0)

    def teardown_group(self, name: str) -> bool:
        return True

    def set_carrier(self, peer: int, on: bool) -> None:
        self.carrier[peer] = on

    def set_mtu(self, ifindex: int, mtu: int) -> None:
        pass

    def restore_mac(self, ifindex: int, mac: str) -> str | None:
        return None

    def set_up(self, ifindex: int) -> None:
        self.opened.append(ifindex)

    def set_down(self, ifindex: int) -> None:
        self.closed.append(ifindex)

    def remove_moved_pair(self, name: str, peer: int) -> bool:
        if peer not in self.moved:
            return False
        del self.kernel.links[peer]  # (the moved end went with it, in its netns)
        return True

    def xdp_native(self, ifindex: int) -> bool:
        link = self.kernel.links.get(ifindex)
        return link is not None and link.xdp_native

    def peer_pass(self, peer: int, on: bool) -> bool:
        self.peer_passes.append((peer, on))
        return True

    def close(self) -> None:
        pass


class FakeClock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000_000

    def monotonic_ns(self) -> int:
        return self.ns

    def time(self) -> float:
        return self.ns / 1e9

    def advance_ms(self, ms: int) -> None:
        self.ns += ms * 1_000_000


@dataclass
class Harness:
    agent: Agent
    dp: FakeDatapath
    kernel: FakeKernel
    clock: FakeClock
    wiring: list[FakeWiring]
    speeds: dict[str, int]
    new_agent: Any = None  # () -> a started Agent on the same datapath, kernel and clock

    def restart(self) -> list[tuple[Any, ...]]:
        """The agent stops (or dies: nothing of it survives but the maps) and a new one
        adopts the datapath; returns the maps written by the new one's start-up."""
        self.agent.close()
        n = len(self.dp.writes)
        self.agent = self.new_agent()
        return self.dp.writes[n:]

    def send(self, link: Link) -> None:
        """The kernel says something; the agent serves it (one loop turn, no waiting)."""
        self.kernel.send(link)
        self.agent.run_once(wait=False)

    def tick(self, ms: int) -> None:
        self.clock.advance_ms(ms)
        self.agent.run_once(wait=False)

    @property
    def active(self) -> str | None:
        return self.agent.groups["fo0"].active

    def carrier(self) -> bool:
        return self.wiring[0].carrier[self.agent.groups["fo0"].peer]


def primary(ifindex: int = 10, flags: int = UP, **kw: Any) -> Link:
    return Link(ifindex, "ens10p", flags, MAC, 1500, **kw)


def standby(flags: int = UP) -> Link:
    return Link(11, "ens10s", flags, MAC, 1500)


def config(tmp_path: Path, policy: str = "{}", garp_count: int = 0) -> configmod.Config:
    return configmod.parse_config(
        f"groups: [{{name: fo0, standby: ens10s, mac: '{MAC}', policy: {policy},"
        f" notify: {{garp_count: {garp_count}}}}}]\n"
        f"bpffs: {tmp_path / 'pins'}\ncontrol: {{socket: {tmp_path / 'c.sock'}}}\n"
    )


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Any]:
    made: list[Harness] = []

    def build(
        *links: Link,
        policy: str = "{}",
        speeds: dict[str, int] | None = None,
        udev: UdevDb | None = None,
        lower_hooks: Any = None,
        garp_count: int = 0,
        kernel_type: type[FakeKernel] | None = None,
    ) -> Harness:
        (tmp_path / "pins").mkdir(exist_ok=True)
        dp = FakeDatapath(tmp_path / "pins")
        kernel = (kernel_type or FakeKernel)(*links)
        clock = FakeClock()
        wirings: list[FakeWiring] = []
        speed_table = dict(speeds or {})

        def wiring(d: Any) -> FakeWiring:
            wirings.append(FakeWiring(d, kernel))
            return wirings[-1]

        def new_agent() -> Agent:
            agent = Agent(
                config(tmp_path, policy, garp_count),
                datapath=lambda _pin_dir: dp,  # type: ignore[arg-type,return-value]
                wiring=wiring,  # type: ignore[arg-type]
                links=kernel,
                clock=clock,
                speed=lambda name: (speed_table.get(name), "full"),
                hooks=lambda _cfg, _links: None,  # no kernel hooks to read
                udev=udev or UdevDb(tmp_path / "no-udev", check_netns=False),  # no udev here
                lower_hooks=lower_hooks,
            )
            agent.start()
            return agent

        h = Harness(new_agent(), dp, kernel, clock, wirings, speed_table, new_agent)
        made.append(h)
        return h

    yield build
    for h in made:
        h.agent.close()
        h.kernel.shutdown()


def test_start_registers_by_mac_and_flips_to_the_primary(make: Any) -> None:
    other = Link(12, "ens12", UP, "02:00:00:00:0b:01", 1500)
    vlan = Link(13, "ens10p.5", UP, MAC, 1500, kind="vlan")  # shares the MAC: never a lower
    h = make(primary(), standby(), other, vlan)
    grp = h.agent.groups["fo0"]
    assert {r: lw.ifindex for r, lw in grp.lowers.items()} == {"primary": 10, "standby": 11}
    assert h.dp.flips() == [(PRIMARY, 10)]
    assert h.active == "primary" and h.carrier()


def test_the_peer_pass_program_follows_the_failover_devices_native_xdp(make: Any) -> None:
    """Our pass program goes on the hidden peer when the failover device's link event says
    it has a native XDP program, once however many events say so, and comes off when it
    is gone; the peer's own events (a bpf_link attachment shows only there) re-read it."""
    h = make(primary(), standby())
    grp = h.agent.groups["fo0"]
    passes = h.wiring[0].peer_passes
    assert passes == [(grp.peer, False)], "start-up: none on the failover device, none put"
    fo = h.kernel.links[grp.master]
    with_xdp = replace(fo, xdp_native=True)
    h.send(with_xdp)
    h.send(with_xdp)  # (veth's feature change on the failover device: the same state)
    assert passes[1:] == [(grp.peer, True)]
    h.kernel.links[grp.master] = fo  # gone; told only by the peer's event
    h.send(h.kernel.links[grp.peer])
    assert passes[1:] == [(grp.peer, True), (grp.peer, False)]


def test_primary_carrier_off_flips_to_the_standby(make: Any) -> None:
    h = make(primary(), standby())
    h.send(primary(flags=IFF_UP))  # carrier off
    assert h.dp.flips()[-1] == (STANDBY, 11)
    assert h.active == "standby" and h.carrier()
    sw = h.agent.groups["fo0"].last_switch
    assert sw is not None and (sw.from_lower, sw.to_lower, sw.reason) == (
        "ens10p",
        "ens10s",
        "primary_down",
    )
    h.send(primary())  # carrier back: reselect always moves back
    assert h.dp.flips()[-1] == (PRIMARY, 10) and h.active == "primary"


def test_both_down_flips_to_no_lower_and_drops_carrier(make: Any) -> None:
    h = make(primary(), standby())
    h.send(primary(flags=IFF_UP))
    h.send(standby(flags=IFF_UP))
    assert h.dp.flips()[-1] == (0, 0) and h.active is None and not h.carrier()


def test_override_moves_traffic_and_persists_and_auto_moves_it_back(make: Any) -> None:
    h = make(primary(), standby())
    reply = h.agent.handle_request({"cmd": "set-primary", "group": "fo0", "lower": "ens10s"})
    assert reply == {"ok": True, "active": "standby", "override": "standby"}
    assert h.dp.flips()[-1] == (STANDBY, 11)
    assert h.dp.group(1).override_slot == STANDBY  # in the maps: survives a restart
    h.send(primary(flags=UP))  # a primary event does not undo the override
    assert h.active == "standby"
    h.agent.handle_request({"cmd": "set-primary", "group": "fo0", "lower": None})
    assert h.dp.flips()[-1] == (PRIMARY, 10) and h.dp.group(1).override_slot == 0


def test_override_to_an_unusable_lower_is_refused_and_changes_nothing(make: Any) -> None:
    h = make(primary(), standby(flags=IFF_UP))
    writes = list(h.dp.writes)
    with pytest.raises(ValueError, match="ens10s is not usable"):
        h.agent.handle_request({"cmd": "set-primary", "group": "fo0", "lower": "standby"})
    assert h.dp.writes == writes and h.active == "primary"


def test_hold_down_waits_downdelay_on_the_fake_clock(make: Any) -> None:
    h = make(primary(), standby(), policy="{downdelay_ms: 200}")
    h.send(primary(flags=IFF_UP))
    assert h.active == "primary" and h.dp.flips() == [(PRIMARY, 10)]  # held down
    assert h.agent._next_timeout() == pytest.approx(0.2)  # the loop sleeps until then
    h.tick(199)
    assert h.dp.flips() == [(PRIMARY, 10)]
    h.tick(1)
    assert h.dp.flips()[-1] == (STANDBY, 11) and h.active == "standby"


def test_hold_down_cancelled_when_the_carrier_returns_in_time(make: Any) -> None:
    h = make(primary(), standby(), policy="{downdelay_ms: 200}")
    h.send(primary(flags=IFF_UP))
    h.tick(100)
    h.send(primary())  # back before downdelay
    h.tick(500)
    assert h.dp.flips() == [(PRIMARY, 10)] and h.active == "primary"


def test_vf_replugged_with_a_new_ifindex_fills_its_slot_before_the_flip(make: Any) -> None:
    h = make(primary(), standby())
    h.send(primary(deleted=True))  # the VF is unplugged
    assert h.dp.flips()[-1] == (STANDBY, 11)
    assert h.dp.lower(1, PRIMARY) == 0  # the stale ifindex is gone from the slot
    h.send(primary(ifindex=20, flags=0))  # re-plugged: a new netdev, admin down
    assert h.wiring[0].opened == [20]  # the agent opens it, as net_failover does
    assert h.active == "standby"
    h.send(primary(ifindex=20))  # up with carrier
    assert h.dp.flips()[-1] == (PRIMARY, 20)  # the slot held the new ifindex at the flip
    assert h.agent.groups["fo0"].lowers["primary"].ifindex == 20


def test_a_lower_plugged_later_with_another_agents_programs_is_refused_once(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One writer per device for lowers that come while the agent runs: a re-plugged VF
    whose hooks carry another running agent's programs (the hooks check says why) is not
    registered (slot empty, not opened, no flip), said once over all its events, and taken
    at its next event once the check lets it (that agent gone)."""
    other: dict[int, str] = {}  # ifindex -> why (the kernel's hooks, as setup.lower_hooks)
    seen: list[int] = []

    def hooks(dp: Any, wiring: Any, grp: Any, link: Link) -> str | None:
        seen.append(link.ifindex)
        return other.get(link.ifindex)

    h = make(primary(), standby(), lower_hooks=hooks)
    assert sorted(seen) == [10, 11]  # asked for the lowers found at start-up too
    mtus: list[tuple[int, int]] = []
    h.wiring[0].set_mtu = lambda ifindex, mtu: mtus.append((ifindex, mtu))
    h.send(primary(deleted=True))
    assert h.active == "standby"
    flips = h.dp.flips()
    other[20] = "ens10p carries the programs of the datapath in /x, which a running ..."
    caplog.set_level("INFO", logger="bpfailover.events")
    h.send(Link(20, "ens10p", 0, MAC, 1400))  # re-plugged, admin down, a smaller MTU
    assert mtus == []  # that agent's device: not even its MTU is raised
    h.send(primary(ifindex=20, flags=0))  # admin down
    h.send(primary(ifindex=20))  # up with carrier
    h.send(primary(ifindex=20, flags=IFF_UP))  # carrier off again
    refused = [r.getMessage() for r in caplog.records if '"lower_refused"' in r.getMessage()]
    assert len(refused) == 1 and "running" in refused[0], refused
    assert h.dp.lower(1, PRIMARY) == 0 and h.wiring[0].opened == []
    assert "primary" not in h.agent.groups["fo0"].lowers
    assert h.dp.flips() == flips and h.active == "standby"
    assert mtus == []
    del other[20]  # that agent is gone
    h.send(Link(20, "ens10p", UP, MAC, 1400))
    assert mtus == [(20, 1500)]  # ours now: raised to the failover device's
    assert h.agent.groups["fo0"].lowers["primary"].ifindex == 20
    assert h.dp.flips()[-1] == (PRIMARY, 20)


def test_a_refused_lower_is_taken_once_that_agent_is_gone_without_an_event(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The other agent may just stop: nothing happens to the lower then, no link event.
    While a lower is refused it is looked at again every REFUSED_RECHECK_MS (silently while
    still refused), and taken through its own event's path (opened, traffic moved back)."""
    other: dict[int, str] = {}

    def hooks(dp: Any, wiring: Any, grp: Any, link: Link) -> str | None:
        return other.get(link.ifindex)

    h = make(primary(), standby(), lower_hooks=hooks)
    h.send(primary(deleted=True))
    other[20] = "ens10p carries the programs of the datapath in /x, which a running ..."
    caplog.set_level("INFO", logger="bpfailover.events")
    h.send(Link(20, "ens10p", 0, MAC, 1500))  # re-plugged, admin down
    assert "primary" not in h.agent.groups["fo0"].lowers
    assert h.agent.refused_due_ms is not None  # a recheck is due
    h.clock.advance_ms(REFUSED_RECHECK_MS)
    h.agent.run_once(wait=False)  # still that agent's: still refused, not said again
    assert "primary" not in h.agent.groups["fo0"].lowers
    refused = [r.getMessage() for r in caplog.records if '"lower_refused"' in r.getMessage()]
    assert len(refused) == 1
    del other[20]  # that agent stopped: no event about the lower
    h.clock.advance_ms(REFUSED_RECHECK_MS)
    h.agent.run_once(wait=False)
    assert h.agent.groups["fo0"].lowers["primary"].ifindex == 20
    assert h.wiring[0].opened == [20]  # as at its own event: brought up
    h.send(primary(ifindex=20))  # up with carrier: traffic back on it
    assert h.dp.flips()[-1] == (PRIMARY, 20)
    h.agent.run_once(wait=False)
    assert h.agent.refused_due_ms is None  # nothing refused: no timer left


def test_reselect_better_the_faster_lower_wins(make: Any) -> None:
    h = make(
        primary(),
        standby(),
        policy="{reselect: better}",
        speeds={"ens10p": 25_000, "ens10s": 1_000},
    )
    h.send(primary(flags=IFF_UP))
    assert h.active == "standby"
    h.send(primary())  # back at 25G against the standby's 1G: it wins
    assert h.dp.flips()[-1] == (PRIMARY, 10) and h.active == "primary"
    assert h.agent.groups["fo0"].last_switch.reason == "primary_up"  # type: ignore[union-attr]


def test_reselect_better_a_slower_lower_never_displaces_the_faster(make: Any) -> None:
    h = make(
        primary(),
        standby(),
        policy="{reselect: better}",
        speeds={"ens10p": 1_000, "ens10s": 25_000},
    )
    h.send(primary(flags=IFF_UP))
    assert h.active == "standby"
    for _ in range(3):  # the slower primary flaps back up, again and again
        h.send(primary())
        assert h.active == "standby"
        h.send(primary(flags=IFF_UP))
    h.send(primary())
    assert h.dp.flips()[-1] == (STANDBY, 11) and h.active == "standby"
    # it renegotiates faster: read when its link comes up again, and now it wins
    h.speeds["ens10p"] = 100_000
    h.send(primary(flags=IFF_UP))
    h.send(primary())
    assert h.active == "primary"


def test_reselect_better_reads_speeds_only_at_registration_and_on_the_way_up(make: Any) -> None:
    asked: list[str] = []
    h = make(primary(), standby(), policy="{reselect: better}")
    h.agent.lowers.speed = lambda name: asked.append(name) or (None, None)  # type: ignore[union-attr]
    h.send(primary(flags=IFF_UP))  # going down: no read
    h.send(replace(standby(), mtu=1500))  # no change of state: no read
    assert asked == []
    h.send(primary())
    assert asked == ["ens10p"]


def test_status_reports_the_active_lowers_speed(make: Any) -> None:
    """Status says the speed of the lower that carries the traffic (what `ethtool` on the
    failover device cannot say), and follows a switch; each lower says its own."""
    h = make(primary(), standby(), speeds={"ens10p": 25_000, "ens10s": 1_000})
    (st,) = h.agent.publish().groups
    assert (st.active_lower, st.speed_mbps) == ("ens10p", 25_000)
    assert {lw.name: (lw.speed_mbps, lw.duplex) for lw in st.lowers} == {
        "ens10p": (25_000, "full"),
        "ens10s": (1_000, "full"),
    }
    h.send(primary(flags=IFF_UP))  # carrier off: the standby carries it
    (st,) = h.agent.publish().groups
    assert (st.active_lower, st.speed_mbps) == ("ens10s", 1_000)


@pytest.mark.parametrize(("reselect", "flips_before_read"), [("always", 3), ("better", 2)])
def test_speed_is_read_before_the_flip_only_when_the_policy_compares_it(
    make: Any, reselect: str, flips_before_read: int
) -> None:
    h = make(primary(), standby(), policy=f"{{reselect: {reselect}}}", speeds={"ens10p": 25_000})
    h.send(primary(flags=IFF_UP))  # flips to the standby: 2 flips so far
    flips_at_read: list[int] = []

    def speed(name: str) -> tuple[int | None, str | None]:
        flips_at_read.append(len(h.dp.flips()))
        return h.speeds.get(name), "full"

    h.agent.lowers.speed = speed  # type: ignore[union-attr]
    h.send(primary())  # comes up: both modes move back to it (faster for better)
    assert h.active == "primary" and flips_at_read == [flips_before_read]


# -- udev: a new lower is left alone until udev has named it (agent/udevwait.py) ------------


@pytest.fixture
def udev_dir(tmp_path: Path) -> Path:
    """Stands in for /run/udev: entries for the lowers present at start, no control socket
    yet (udev not running until a test creates it)."""
    root = tmp_path / "udev"
    (root / "data").mkdir(parents=True)
    for ifindex in (10, 11):
        udev_entry(root, ifindex)
    return root


def udev_entry(root: Path, ifindex: int, text: str = "I:1700000000\n") -> None:
    """udev processed netdev `ifindex`: its entry written as udev does (renamed into place)."""
    tmp = root / "data" / f".#n{ifindex}tmp"
    tmp.write_text(text)
    tmp.rename(root / "data" / f"n{ifindex}")


def replugged(h: Harness) -> None:
    """The VF unplugged; its successor appears, admin down, under the kernel's name."""
    h.send(primary(deleted=True))
    h.send(Link(20, "eth0", 0, MAC, 1500))


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    out = []
    for rec in caplog.records:
        with contextlib.suppress(ValueError, TypeError):
            ev = json.loads(rec.getMessage())
            if isinstance(ev, dict) and ev.get("event") == name:
                out.append(ev)
    return out


def test_without_udev_a_replugged_vf_is_taken_in_the_same_turn(make: Any, udev_dir: Path) -> None:
    """No udev for our netdevs (the lab, containers): no wait at all.  The event that
    announces the VF registers and opens it, no timer is set, no watch armed."""
    h = make(primary(), standby(), udev=UdevDb(udev_dir, check_netns=False))
    replugged(h)
    assert h.wiring[0].opened == [20]
    assert h.agent.groups["fo0"].lowers["primary"].ifindex == 20
    assert h.agent.udev.held == {} and h.agent.udev.next_due_ms() is None
    assert not h.agent.udev.registered  # the watch was never even created


def test_with_udev_a_replugged_vf_waits_for_its_name(
    make: Any, udev_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (udev_dir / "control").touch()  # udev runs
    db = UdevDb(udev_dir, check_netns=False)
    h = make(primary(), standby(), udev=db)
    assert set(h.agent.groups["fo0"].lowers) == {"primary", "standby"}  # present: processed
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    replugged(h)
    grp = h.agent.groups["fo0"]
    assert h.wiring[0].opened == [] and "primary" not in grp.lowers  # untouched
    assert h.dp.lower(1, PRIMARY) == 0
    h.send(Link(20, "eth0", IFF_LOWER_UP, MAC, 1500))  # more news, still the kernel's name
    assert h.wiring[0].opened == [] and "primary" not in grp.lowers
    assert [e["ifindex"] for e in events(caplog, "lower_udev_wait")] == [20]  # said once
    (st,) = h.agent.publish().groups  # what failoverctl status shows meanwhile
    assert st.waiting_for_udev == ("eth0",) and [lw.role for lw in st.lowers] == ["standby"]
    assert "  waiting for udev to name it (not a lower yet): eth0" in cli.format_group(st)
    h.send(Link(20, "enp2s0", 0, MAC, 1500))  # udev renames it: what it waited for
    assert h.wiring[0].opened == [20]
    assert h.agent.publish().groups[0].waiting_for_udev == ()
    assert grp.lowers["primary"].ifindex == 20 and grp.lowers["primary"].name == "enp2s0"
    assert [e["lower"] for e in events(caplog, "lower_registered")] == ["enp2s0"]
    (ready,) = events(caplog, "lower_udev_ready")
    assert ready["by"] == "rename" and not events(caplog, "lower_udev_timeout")
    assert h.agent.udev.held == {} and db.wd == -1  # nothing held: the watch is off
    h.send(primary(ifindex=20))
    assert h.active == "primary"


def test_a_name_udev_keeps_waits_for_the_database_entry(
    make: Any, udev_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No rename (udev's policy keeps the name, or the rename came before we looked): the
    database entry, written, wakes the loop through the watch."""
    (udev_dir / "control").touch()
    db = UdevDb(udev_dir, check_netns=False)
    h = make(primary(), standby(), udev=db)
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h.send(primary(deleted=True))
    h.send(Link(20, "enp2s0", 0, MAC, 1500))
    assert h.wiring[0].opened == [] and 20 in h.agent.udev.held
    h.agent.run_once(wait=False)  # nothing written: nothing changes
    assert h.wiring[0].opened == []
    udev_entry(udev_dir, 20)
    h.agent.run_once(wait=False)  # the watch wakes the loop
    assert h.wiring[0].opened == [20]
    assert h.agent.groups["fo0"].lowers["primary"].name == "enp2s0"
    assert events(caplog, "lower_udev_ready")[0]["by"] == "database"
    assert h.agent.udev.held == {} and db.wd == -1


def test_the_rename_and_the_entry_in_one_turn_register_the_new_name(
    make: Any, udev_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """udev renames (an RTM_NEWLINK) before it writes the entry: when both are ready in one
    turn, the link events are served first, whichever fd the selector reports first (here
    the watch's), so the lower registers under its new name."""
    (udev_dir / "control").touch()
    h = make(primary(), standby(), udev=UdevDb(udev_dir, check_netns=False))
    replugged(h)
    select = h.agent.sel.select
    monkeypatch.setattr(
        h.agent.sel,
        "select",
        lambda timeout=None: sorted(select(timeout), key=lambda kv: kv[0].data != "udev"),
    )
    udev_entry(udev_dir, 20)  # neither served yet
    h.kernel.send(Link(20, "enp2s0", 0, MAC, 1500))
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h.agent.run_once(wait=False)
    # matched (driver, configured name) and registered under udev's name, not the kernel's
    assert [e["lower"] for e in events(caplog, "lower_registered")] == ["enp2s0"]
    assert h.agent.groups["fo0"].lowers["primary"].name == "enp2s0"
    assert h.wiring[0].opened == [20]


def test_ready_waits_while_a_lower_found_at_start_is_held_for_udev(
    make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd hears READY=1 only with every lower start found in the datapath: a VF udev
    has not processed yet (its coldplug unfinished) holds READY back until udev names it."""
    root = tmp_path / "udev-start"
    (root / "data").mkdir(parents=True)
    udev_entry(root, 11)  # the standby processed, the VF not yet
    (root / "control").touch()
    sent: list[str] = []
    monkeypatch.setattr(sdnotify, "notify", lambda msg: sent.append(msg) or True)

    def readies() -> int:
        return sum(m.startswith("READY=1") for m in sent)

    h = make(primary(), standby(), udev=UdevDb(root, check_netns=False))
    assert 10 in h.agent.udev.held and "primary" not in h.agent.groups["fo0"].lowers
    h.agent.ready()
    h.agent.run_once(wait=False)
    assert readies() == 0  # still held: not ready
    udev_entry(root, 10)
    h.agent.run_once(wait=False)
    assert h.agent.groups["fo0"].lowers["primary"].ifindex == 10
    assert readies() == 1
    h.agent.run_once(wait=False)
    assert readies() == 1  # once


def test_ready_at_once_when_nothing_is_held(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(sdnotify, "notify", lambda msg: sent.append(msg) or True)
    h = make(primary(), standby())
    h.agent.ready()
    assert sum(m.startswith("READY=1") for m in sent) == 1


def test_an_entry_marked_renaming_keeps_it_waiting(make: Any, udev_dir: Path) -> None:
    (udev_dir / "control").touch()
    h = make(primary(), standby(), udev=UdevDb(udev_dir, check_netns=False))
    replugged(h)
    udev_entry(udev_dir, 20, "I:1\nE:ID_RENAMING=1\n")  # systemd >= 254, mid-rename
    h.agent.run_once(wait=False)
    assert h.wiring[0].opened == [] and 20 in h.agent.udev.held
    udev_entry(udev_dir, 20, "I:1\nE:ID_NET_NAME_PATH=enp2s0\n")
    h.agent.run_once(wait=False)
    assert h.wiring[0].opened == [20]


def test_already_processed_when_it_appears_no_wait(make: Any, udev_dir: Path) -> None:
    (udev_dir / "control").touch()
    h = make(primary(), standby(), udev=UdevDb(udev_dir, check_netns=False))
    h.send(primary(deleted=True))
    udev_entry(udev_dir, 20)
    h.send(Link(20, "enp2s0", 0, MAC, 1500))
    assert h.wiring[0].opened == [20] and h.agent.udev.held == {}
    # looked at once, before any watch: no inotify watch added and removed (each removal
    # queues an IN_IGNORED that would wake the loop for nothing)
    assert not h.agent.udev.registered


def test_udev_silent_the_timer_lets_it_go_and_says_so(
    make: Any, udev_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bpfailover.agent.udevwait import HOLD_MS

    (udev_dir / "control").touch()  # udev "runs" but never processes the VF
    h = make(primary(), standby(), udev=UdevDb(udev_dir, check_netns=False))
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    replugged(h)
    assert h.agent.udev.next_due_ms() == h.agent.now_ms() + HOLD_MS  # the loop wakes then
    h.tick(HOLD_MS - 1)
    assert h.wiring[0].opened == []
    h.tick(1)
    assert h.wiring[0].opened == [20]
    assert h.agent.groups["fo0"].lowers["primary"].name == "eth0"  # as the kernel named it
    (timeout,) = events(caplog, "lower_udev_timeout")
    assert (timeout["lower"], timeout["waited_ms"]) == ("eth0", HOLD_MS)
    assert h.agent.udev.next_due_ms() is None


def test_a_held_lower_unplugged_is_forgotten(make: Any, udev_dir: Path) -> None:
    (udev_dir / "control").touch()
    db = UdevDb(udev_dir, check_netns=False)
    h = make(primary(), standby(), udev=db)
    replugged(h)
    h.send(Link(20, "eth0", 0, MAC, 1500, deleted=True))
    assert h.agent.udev.held == {} and h.agent.udev.next_due_ms() is None and db.wd == -1
    h.tick(10_000)
    assert h.wiring[0].opened == [] and "primary" not in h.agent.groups["fo0"].lowers


def test_other_netdevs_are_never_held(make: Any, udev_dir: Path) -> None:
    """Only a netdev with the group's MAC waits; an unrelated NIC or a VLAN on a lower
    costs nothing."""
    (udev_dir / "control").touch()
    h = make(primary(), standby(), udev=UdevDb(udev_dir, check_netns=False))
    h.send(Link(30, "eth1", 0, "02:00:00:00:0b:01", 1500))
    h.send(Link(31, "ens10p.7", 0, MAC, 1500, kind="vlan", link=10))
    assert h.agent.udev.held == {}


# -- a restart adopts what the datapath does and moves no traffic ---------------------------
def _no_traffic_moved(writes: list[tuple[Any, ...]]) -> None:
    moved = [w for w in writes if w[0] in ("flip", "set_lower", "set_told")]
    assert moved == [], f"the restart wrote {moved}"


def _standby_active(h: Harness, reselect: str) -> None:
    """The standby carries traffic while the primary is usable again: under `always` only
    while the primary waits its updelay, under failure/better because it stays."""
    h.send(primary(flags=IFF_UP))  # carrier off: to the standby
    h.send(primary())  # back
    assert h.active == "standby", reselect


@pytest.mark.parametrize("reselect", ["always", "better", "failure"])
@pytest.mark.parametrize("active", ["primary", "standby"])
def test_a_restart_moves_no_traffic_and_tells_nobody(
    make: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reselect: str,
    active: str,
) -> None:
    sent: list[str] = []
    monkeypatch.setattr(notify, "send", lambda dev, frames: sent.append(dev) or len(frames))
    updelay = 60_000 if reselect == "always" else 0
    h = make(
        primary(),
        standby(),
        garp_count=1,
        policy=f"{{reselect: {reselect}, updelay_ms: {updelay}}}",
    )
    if active == "standby":
        _standby_active(h, reselect)
    assert h.active == active
    n_sent, n_switch = len(sent), len(events(caplog, "switch"))
    h.clock.advance_ms(1000)
    writes = h.restart()
    _no_traffic_moved(writes)
    assert h.active == active and h.carrier()
    assert sent[n_sent:] == [], "peers told again"
    assert len(events(caplog, "switch")) == n_switch
    assert events(caplog, "renotify") == []
    if reselect == "always" and active == "standby":
        # the VF inside its updelay at the restart waits a full updelay from there
        h.tick(updelay - 1)
        assert h.active == "standby"
        h.tick(1)
        assert h.active == "primary" and h.dp.flips()[-1] == (PRIMARY, 10)


def test_a_restart_keeps_the_override(make: Any) -> None:
    h = make(primary(), standby())
    assert h.agent.handle_request({"cmd": "set-primary", "group": "fo0", "lower": "ens10s"})["ok"]
    assert h.active == "standby"
    _no_traffic_moved(h.restart())
    assert h.active == "standby" and h.agent.groups["fo0"].override == "standby"
    h.send(standby(flags=IFF_UP))  # the override's lower fails: to the primary
    assert h.active == "primary"
    h.send(standby())  # ... and back when it returns: the override still holds
    assert h.active == "standby"


def test_a_switch_whose_peers_were_never_told_is_told_after_the_restart(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    monkeypatch.setattr(notify, "send", lambda dev, frames: sent.append(dev) or len(frames))
    h = make(primary(), standby(), garp_count=1)
    assert sent == ["ens10p"]

    def dies(dev: str, frames: Any) -> int:
        raise OSError("the agent died before its GARP went out")

    monkeypatch.setattr(notify, "send", dies)
    h.send(primary(flags=IFF_UP))  # to the standby: flipped, peers not told
    assert h.active == "standby"
    monkeypatch.setattr(notify, "send", lambda dev, frames: sent.append(dev) or len(frames))
    writes = h.restart()
    assert sent == ["ens10p", "ens10s"], "the restart told the peers of the standby"
    assert [w for w in writes if w[0] == "flip"] == []
    assert ("set_told", 1, STANDBY) in writes
    sent.clear()
    h.restart()
    assert sent == [], "told once: the next restart says nothing"


@pytest.mark.parametrize("updelay", [0, 5000])
def test_a_vf_replugged_while_no_agent_ran_takes_no_traffic_before_the_decision(
    make: Any, updelay: int
) -> None:
    h = make(primary(), standby(), policy=f"{{updelay_ms: {updelay}}}")
    assert h.active == "primary" and h.dp.lower(1, PRIMARY) == 10
    h.agent.close()
    h.kernel.links.pop(10)  # unplugged and plugged back while no agent ran
    h.kernel.links[20] = primary(ifindex=20)
    n = len(h.dp.writes)
    h.agent = h.new_agent()
    writes = h.dp.writes[n:]
    # the new ifindex lands in the primary slot only once that slot is no longer active
    # (traffic went to the standby first, as a running agent's unplug would have done)
    first_fill = writes.index(("set_lower", 1, PRIMARY, 20))
    assert ("flip", 1, STANDBY, 11) in writes[:first_fill], writes
    if updelay:
        assert h.active == "standby", "the new VF waits its updelay"
        h.tick(updelay)
    assert h.active == "primary" and h.dp.flips()[-1] == (PRIMARY, 20)


class QueuedSocket:
    """One subscribed socket of OverflowKernel: its own queue; on overflow, as the kernel
    does, ENOBUFS first (the newest events dropped) and the older events still queued."""

    def __init__(self) -> None:
        self.rx, self.tx = socket.socketpair()
        self.rx.setblocking(False)
        self.queue: list[netlink.Event] = []
        self.overflowed = self.closed = False

    def fileno(self) -> int:
        return self.rx.fileno()

    def read(self) -> list[netlink.Event]:
        if self.overflowed:
            self.overflowed = False
            raise netlink.Overflow()  # the socket stays readable: its queue is still there
        with contextlib.suppress(BlockingIOError):
            self.rx.recv(4096)
        out, self.queue = self.queue, []
        return out

    def close(self) -> None:
        self.closed = True
        self.rx.close()
        self.tx.close()


class OverflowKernel(FakeKernel):
    """A socket per subscription; the kernel can change a link or an address without
    queuing the event (dropped: the socket overflowed)."""

    def __init__(self, *links: Link) -> None:
        super().__init__(*links)
        self.socks: list[QueuedSocket] = []
        self.addrs: set[netlink.Addr] = set()

    def subscribe(self) -> QueuedSocket:  # type: ignore[override]
        self.socks.append(QueuedSocket())
        return self.socks[-1]

    def dump_addrs(self) -> list[netlink.Addr]:
        return sorted(self.addrs, key=lambda a: a.address)

    def change(self, ev: netlink.Event, dropped: bool = False) -> None:
        if isinstance(ev, netlink.Addr):
            (self.addrs.discard if ev.deleted else self.addrs.add)(replace(ev, deleted=False))
        elif ev.deleted:
            self.links.pop(ev.ifindex, None)
        else:
            self.links[ev.ifindex] = ev
        for sock in self.socks:
            if sock.closed:
                continue
            if dropped:
                sock.overflowed = True
            else:
                sock.queue.append(ev)
            sock.tx.send(b"!")

    def send(self, link: Link) -> None:
        self.change(link)

    def shutdown(self) -> None:
        for sock in self.socks:
            if not sock.closed:
                sock.close()
        super().shutdown()


def test_after_an_overflow_the_older_queued_events_are_never_applied(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOBUFS with older events queued behind it: the agent ends with the kernel's state
    (both lowers up, the address gone), not the stale queue's (both down, the address)."""
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h = make(primary(), standby(), kernel_type=OverflowKernel)
    k = h.kernel
    assert isinstance(k, OverflowKernel)
    first = k.socks[-1]
    addr = netlink.Addr(10, socket.AF_INET, "198.18.0.7", 24)
    k.change(primary(flags=IFF_UP))  # queued while the agent is busy elsewhere
    k.change(standby(flags=IFF_UP))
    k.change(addr)
    k.change(primary(), dropped=True)  # the buffer is full: the newest are lost
    k.change(standby(), dropped=True)
    k.change(replace(addr, deleted=True), dropped=True)
    flips_before = len(h.dp.flips())
    for _ in range(3):  # enough turns for a queue left behind to be read
        h.agent.run_once(wait=False)
    assert events(caplog, "netlink_overflow")
    assert h.dp.flips()[flips_before:] == []  # neither the stale "both down" nor a way back
    assert h.active == "primary" and h.dp.active(1) == PRIMARY and h.carrier()
    grp = h.agent.groups["fo0"]
    assert all(lw.carrier and lw.admin_up for lw in grp.lowers.values())
    assert h.agent.addrs.get(10, set()) == set()
    # the old socket and its queue are gone; the fresh one is the one served
    assert first.closed and len(k.socks) == 2 and h.agent.events is k.socks[1]
    h.send(primary(flags=IFF_UP))
    assert h.dp.flips()[-1] == (STANDBY, 11) and h.active == "standby"


def test_a_dump_interrupted_on_every_try_is_read_again_later(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """After an overflow the dump keeps being interrupted (NLM_F_DUMP_INTR each try): the
    agent logs it, keeps the fresh socket, and reads everything again shortly."""
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h = make(primary(), standby(), kernel_type=OverflowKernel)
    k = h.kernel
    assert isinstance(k, OverflowKernel)
    k.change(primary(flags=IFF_UP), dropped=True)
    real_dump, busy = k.dump_links, [True]

    def dump_links() -> list[Link]:
        if busy[0]:
            raise netlink.DumpInterrupted(11, "rtnetlink dump interrupted by changes")
        return real_dump()

    k.dump_links = dump_links  # type: ignore[method-assign]
    h.agent.run_once(wait=False)
    err = events(caplog, "agent_error")[-1]
    assert err["where"] == "reconcile" and "interrupted" in err["error"]
    assert h.agent.reconcile_due_ms is not None and h.active == "primary"
    busy[0] = False
    h.tick(1000)
    assert h.active == "standby" and h.dp.flips()[-1] == (STANDBY, 11)
    assert h.agent.reconcile_due_ms is None


class FakeBell:
    """The doorbell as the loop sees it: readable once rung, emptied by drain()."""

    def __init__(self) -> None:
        self.rx, self.tx = socket.socketpair()
        self.rx.setblocking(False)

    def ring(self) -> None:
        self.tx.send(b"!")

    def fileno(self) -> int:
        return self.rx.fileno()

    def drain(self) -> int:
        n = 0
        with contextlib.suppress(BlockingIOError):
            n = len(self.rx.recv(4096))
        return n

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


def test_doorbell_rings_are_coalesced_and_none_is_lost(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any user can ring the doorbell (each multicast join or leave): 100 rings within one
    window cost one sync at once and one at the window's end; a ring after the window is
    synced at once again."""
    from bpfailover.agent import addrlists

    h = make(primary(), standby())
    synced: list[int] = []
    monkeypatch.setattr(addrlists, "sync_mc", lambda grp: synced.append(h.agent.now_ms()))
    bell = FakeBell()
    h.agent.doorbell = bell
    h.agent.sel.register(bell, selectors.EVENT_READ, "doorbell")
    window = addrlists.SYNC_WINDOW_MS
    start = h.agent.now_ms()
    for _ in range(100):
        bell.ring()
        h.agent.run_once(wait=False)
        h.clock.ns += window * 1_000_000 // 200  # 100 rings in half a window
    assert synced == [start]  # the first at once, the rest deferred
    assert h.agent._next_timeout() is not None  # the loop wakes for the deferred one
    h.tick(window)
    assert len(synced) == 2 and synced[1] - start >= window
    h.tick(window)
    assert len(synced) == 2  # nothing rang since: nothing more
    bell.ring()  # a join after the window: synced at once
    h.agent.run_once(wait=False)
    assert len(synced) == 3
    h.agent.sel.unregister(bell)
    h.agent.doorbell = None
    bell.close()


def test_multicast_notifications_are_coalesced_and_none_is_lost(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's multicast notifications (6.13+, one per join or leave of any user):
    a batch of 100 costs one sync, batches within one window one more at its end."""
    from bpfailover.agent import addrlists

    h = make(primary(), standby())
    synced: list[int] = []
    monkeypatch.setattr(addrlists, "sync_mc", lambda grp: synced.append(h.agent.now_ms()))
    master = h.agent.groups["fo0"].master

    def notify(n: int) -> None:
        h.kernel.queue.extend(netlink.McastChange(master) for _ in range(n))
        h.kernel.tx.send(b"!")
        h.agent.run_once(wait=False)

    notify(100)
    assert len(synced) == 1
    for _ in range(20):
        h.clock.advance_ms(1)
        notify(5)
    assert len(synced) == 1
    h.tick(addrlists.SYNC_WINDOW_MS)
    assert len(synced) == 2  # what came within the window, synced at its end
    h.tick(addrlists.SYNC_WINDOW_MS)
    notify(1)  # after the window: at once
    assert len(synced) == 3
    h.kernel.queue.append(netlink.McastChange(master + 12345))  # not a failover device
    h.kernel.tx.send(b"!")
    h.tick(addrlists.SYNC_WINDOW_MS * 2)
    assert len(synced) == 3


# -- registration as failover_get_bymac()/failover_slave_register() ------------------------


def registered(h: Harness) -> dict[str, int]:
    return {r: lw.ifindex for r, lw in h.agent.groups["fo0"].lowers.items()}


@pytest.mark.parametrize(
    ("perm", "taken"),
    [
        ("02:00:00:00:00:99", False),  # the group MAC only set on it: not a lower
        (MAC, True),  # a VF: its permanent address is the MAC the PF gave it
        ("", True),  # none (veth): the current MAC stands in
    ],
)
def test_a_lower_is_matched_by_its_permanent_address(
    make: Any, caplog: pytest.LogCaptureFixture, perm: str, taken: bool
) -> None:
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h = make(primary(perm_mac=perm), standby())
    assert registered(h) == ({"primary": 10, "standby": 11} if taken else {"standby": 11})
    h.send(primary(perm_mac=perm, flags=IFF_UP))  # more of its events
    h.send(primary(perm_mac=perm))
    h.send(primary(ifindex=20, perm_mac=perm, flags=0))  # another (taken: slot is full)
    why = [e["why"] for e in events(caplog, "lower_ignored") if e.get("lower") == "ens10p"]
    if taken:
        assert h.active == "primary" and "permanent" not in " ".join(why)
    else:
        assert "primary" not in registered(h) and h.active == "standby"
        assert h.dp.lower(1, PRIMARY) == 0 and h.wiring[0].opened == []
        # one line for each netdev, not one at each of its events
        assert len(why) == 2 and all(perm in w and "permanent address" in w for w in why)


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"arphrd": 32}, "not Ethernet (ARPHRD type 32)"),  # an IPoIB netdev
        ({"master": 42}, "enslaved to ifindex 42"),  # a bond's, a bridge's port
    ],
)
def test_not_ethernet_or_enslaved_is_not_a_lower(
    make: Any, caplog: pytest.LogCaptureFixture, kw: dict[str, int], what: str
) -> None:
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h = make(primary(**kw), standby())
    assert registered(h) == {"standby": 11}
    h.send(primary(deleted=True))
    h.send(primary(ifindex=20, flags=0, **kw))  # plugged later: neither opened nor held
    assert registered(h) == {"standby": 11} and h.wiring[0].opened == []
    assert [e["why"] for e in events(caplog, "lower_ignored")] == [what, what]
    h.send(primary(ifindex=20))  # released by its master (or now Ethernet): taken
    assert registered(h) == {"primary": 20, "standby": 11} and h.active == "primary"


@pytest.mark.parametrize(
    "kind", ["macsec", "hsr", "vlan", "macvlan", "ipvlan", "bond", "team", "bridge"]
)
def test_stacked_kinds_sharing_the_mac_are_not_lowers(make: Any, kind: str) -> None:
    h = make(standby(), Link(12, f"{kind}0", UP, MAC, 1500, kind=kind))
    assert registered(h) == {"standby": 11}
    h.send(Link(13, f"{kind}1", 0, MAC, 1500, kind=kind))
    assert registered(h) == {"standby": 11} and h.wiring[0].opened == []


def test_a_lower_enslaved_later_leaves_the_group_open(make: Any) -> None:
    h = make(primary(), standby())
    h.send(primary(master=42))  # `ip link set ens10p master br0`
    assert registered(h) == {"standby": 11} and h.active == "standby"
    assert h.dp.lower(1, PRIMARY) == 0 and h.wiring[0].closed == []  # br0's port now


@pytest.fixture
def lists(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, str]]:
    """What the agent takes off (or puts on) the lowers' address lists."""
    from bpfailover.effects import mcsync

    done: list[tuple[str, Any, str]] = []
    monkeypatch.setattr(
        mcsync, "_ioctl", lambda req, name, mac: done.append((f"ioctl {req:#x}", name, mac))
    )
    monkeypatch.setattr(
        mcsync, "uc_del", lambda ifindex, mac: done.append(("uc_del", ifindex, mac))
    )
    return done


MC, UC = "01:00:5e:01:02:03", "02:00:00:00:0c:01"


def test_a_lower_that_leaves_has_our_addresses_taken_off_and_is_closed(
    make: Any, lists: list[tuple[str, Any, str]]
) -> None:
    """net_failover_slave_unregister(): dev_uc_unsync, dev_mc_unsync, dev_close."""
    h = make(primary(), standby())
    grp = h.agent.groups["fo0"]
    grp.mc_added[10], grp.uc_added[10] = {MC}, {UC}  # what the agent had added to it
    grp.mc_added[11], grp.uc_added[11] = {MC}, {UC}
    lists.clear()
    h.send(Link(10, "ens10p", UP, "02:00:00:00:0d:01", 1500))  # its MAC changed: it leaves
    assert registered(h) == {"standby": 11} and h.active == "standby"
    assert lists == [("ioctl 0x8932", "ens10p", MC), ("uc_del", 10, UC)]  # SIOCDELMULTI
    assert h.wiring[0].closed == [10]
    assert grp.mc_added == {11: {MC}} and grp.uc_added == {11: {UC}}


def test_a_lower_unplugged_needs_nothing_taken_off(
    make: Any, lists: list[tuple[str, Any, str]]
) -> None:
    h = make(primary(), standby())
    grp = h.agent.groups["fo0"]
    grp.mc_added[10], grp.uc_added[10] = {MC}, {UC}
    lists.clear()
    h.send(primary(deleted=True))
    assert lists == [] and h.wiring[0].closed == [] and 10 not in grp.mc_added


def test_teardown_lets_go_of_the_lowers(make: Any, lists: list[tuple[str, Any, str]]) -> None:
    """net_failover_destroy() unregisters both lowers: our addresses off, closed."""
    h = make(primary(), standby())
    grp = h.agent.groups["fo0"]
    grp.mc_added[10], grp.uc_added[11] = {MC}, {UC}
    lists.clear()
    assert h.agent.handle_request({"cmd": "teardown", "group": "fo0"})["ok"]
    assert sorted(h.wiring[0].closed) == [10, 11]
    assert sorted(lists) == [("ioctl 0x8932", "ens10p", MC), ("uc_del", 11, UC)]


# -- MTU range: the failover device's is its lowers' (net_failover: the primary's) ----------


def test_an_mtu_beyond_the_primarys_max_is_rolled_back_before_anything_changes(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = make(primary(max_mtu=9000, min_mtu=68), standby())
    grp = h.agent.groups["fo0"]
    mtus: list[tuple[int, int]] = []
    h.wiring[0].set_mtu = lambda ifindex, mtu: mtus.append((ifindex, mtu))
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h.send(Link(grp.master, "fo0", UP, MAC, 9200, grp.peer, "veth"))  # ip link set fo0 mtu 9200
    assert mtus == [(grp.master, 1500)]  # only the failover device, put back
    (refused,) = events(caplog, "mtu_refused")
    assert refused["rolled_back_to"] == 1500 and refused["refused_by"] == 10
    assert refused["why"] == "ens10p (primary): its max MTU 9000 < the failover device's MTU 9200"
    assert grp.mtu == 1500 and grp.lowers["primary"].mtu == 1500
    h.send(Link(grp.master, "fo0", UP, MAC, 9000, grp.peer, "veth"))  # within its range
    assert mtus[1:] == [(grp.peer, 9000), (10, 9000), (11, 9000)] and grp.mtu == 9000


def test_a_lower_whose_max_mtu_is_below_the_failover_devices_is_refused(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """net_failover_slave_register() fails when dev_set_mtu() to the failover device's MTU
    does: a VF re-plugged on a host whose max MTU is smaller is not registered, said so."""
    h = make(primary(), standby())
    grp = h.agent.groups["fo0"]
    h.send(Link(grp.master, "fo0", UP, MAC, 9000, grp.peer, "veth"))
    assert grp.mtu == 9000
    h.send(primary(deleted=True))
    mtus: list[tuple[int, int]] = []
    h.wiring[0].set_mtu = lambda ifindex, mtu: mtus.append((ifindex, mtu))
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h.send(Link(20, "ens10p", 0, MAC, 1500, max_mtu=1500))
    assert mtus == [] and "primary" not in grp.lowers and h.wiring[0].opened == []
    (refused,) = events(caplog, "lower_refused")
    assert refused["why"] == "its max MTU 1500 < the failover device's MTU 9000"
    h.send(Link(21, "ens10p", 0, MAC, 1500, max_mtu=9216))  # one that can: raised, taken
    assert mtus == [(21, 9000)] and grp.lowers["primary"].ifindex == 21


# -- the failover device gone from our netns -------------------------------------------------


def test_failover_device_moved_to_another_netns_is_taken_back(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """`ip link set fo0 netns X`: an RTM_DELLINK here, its hidden peer still here.  The pair
    is deleted and the device re-created here, said so (net_failover's is netns-local)."""
    h = make(primary(), standby())
    grp = h.agent.groups["fo0"]
    old, old_peer = grp.master, grp.peer
    h.wiring[0].moved.add(old_peer)
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    h.send(Link(old, "fo0", UP, MAC, 1500, old_peer, "veth", deleted=True))
    (moved,) = events(caplog, "failover_device_moved")
    assert moved["ifindex"] == old and "re-created here" in moved["action"]
    assert not events(caplog, "failover_device_deleted") and events(
        caplog, "failover_device_recreated"
    )
    assert grp.master not in (old, 0) and grp.peer != old_peer
    assert ("del_dev", old) in h.dp.writes and ("del_dev", old_peer) in h.dp.writes
    assert h.active == "primary" and h.carrier()


def test_failover_device_missing_from_a_full_reread_is_recreated(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Its RTM_DELLINK lost (the kernel dropped events: ENOBUFS): the re-read finds it
    missing and re-creates it, as if the event had come."""
    from bpfailover.agent import kernel

    h = make(primary(), standby())
    grp = h.agent.groups["fo0"]
    old = grp.master
    del h.kernel.links[old], h.kernel.links[grp.peer]  # gone, and no event said so
    caplog.set_level(logging.INFO, logger="bpfailover.events")
    kernel.reconcile(h.agent)
    assert events(caplog, "failover_device_recreated")[0]["old_ifindex"] == old
    assert grp.master != old and grp.master in h.kernel.links
    assert h.active == "primary" and h.carrier()

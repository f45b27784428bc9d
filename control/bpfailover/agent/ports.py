"""What the agent takes from outside, and the real ones it builds when given nothing.

The Agent is handed its collaborators so the event -> decision -> map-write path runs
in-process with fakes (tests/test_agent_unit.py) or with traced ones (bench/traced_agent.py):
- datapath: opens the pinned maps (`Datapath.open`), called by start() after the config
  checked out against the links, so bad input creates nothing;
- wiring: builds the Wiring (filters, failover devices, link settings) over that datapath;
- links: the kernel's link and address state, dumped and as events (`Netlink`);
- clock: monotonic and wall time (`SystemClock`);
- speed: a lower's link speed (Mb/s) and duplex (`ethtool.link_speed`; `reselect: better`).
- udev: udev's database and its watch (`events.udev.UdevDb`; new lowers wait for its name).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from bpfailover.datapath.attach import Wiring
from bpfailover.datapath.maps import Datapath
from bpfailover.events import netlink


class EventSource(Protocol):
    """Link, address and multicast events, readable when its fd is (a selector's)."""

    def fileno(self) -> int: ...
    def read(self) -> list[netlink.Event]: ...
    def close(self) -> None: ...


class LinkSource(Protocol):
    def subscribe(self) -> EventSource: ...
    def dump_links(self) -> list[netlink.Link]: ...
    def dump_addrs(self) -> list[netlink.Addr]: ...


class Netlink:
    """The kernel's rtnetlink: the event socket and the dumps.

    TEST-ONLY arguments (tests/fault_agent.py passes them; failoverd never does): mcast=False
    leaves RTM_NEWMULTICAST unsubscribed, standing in for kernels before 6.13 (Debian 12's
    6.1), so the lab proves the other triggers; rcvbuf shrinks the event socket's receive
    buffer (default 8 MiB) so the fault suite can make the kernel drop events (ENOBUFS)."""

    def __init__(self, mcast: bool = True, rcvbuf: int | None = None) -> None:
        self.mcast, self.rcvbuf = mcast, rcvbuf

    def subscribe(self) -> EventSource:
        return netlink.EventSocket(mcast=self.mcast, rcvbuf=self.rcvbuf)

    def dump_links(self) -> list[netlink.Link]:
        return netlink.dump_links()

    def dump_addrs(self) -> list[netlink.Addr]:
        return netlink.dump_addrs()


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...
    def time(self) -> float: ...


class SystemClock:
    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def time(self) -> float:
        return time.time()


def rtnetlink_wiring(dp: Datapath) -> Wiring:
    from pyroute2 import IPRoute

    return Wiring(dp, IPRoute())


SpeedReader = Callable[[str], tuple[int | None, str | None]]
DatapathOpener = Callable[[str], Datapath]
WiringFactory = Callable[[Datapath], Wiring]

"""failoverd: keeps each group's active lower right, from rtnetlink events, with no polling.

One thread runs everything that writes: link events, hold-down timers, peer
notifications and control requests are served from one selector loop, so the
maps have a single writer and no locks.  On a switch the map is written first;
logging, carrier, GARP come after.  The metrics endpoint only reads.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import selectors
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from bpfailover import netns, policy
from bpfailover.agent import status as statusmod
from bpfailover.agent.fault import Fault, FaultSpecError
from bpfailover.datapath import counters
from bpfailover.datapath.attach import Wiring, peer_name, set_carrier
from bpfailover.datapath.layout import ROLE_SLOTS, SLOT_NAMES
from bpfailover.datapath.loader import LoadError
from bpfailover.datapath.maps import Datapath, DatapathError
from bpfailover.effects import mcsync, notify, sched
from bpfailover.effects.ethtool import driver_of
from bpfailover.events import netlink
from bpfailover.events.pinwatch import PinWatch
from bpfailover.model import config as configmod
from bpfailover.model.groups import Group, Lower, Switch
from bpfailover.model.status import AgentStatus
from bpfailover.ops.api import ControlServer, RequestError, SocketInUse
from bpfailover.ops.eventlog import event, fatal, setup_logging
from bpfailover.policy import Role

log = logging.getLogger("bpfailover.agent")

# Netdev kinds stacked on top of a lower (they share its MAC) that must never be
# taken for a primary: net_failover likewise registers only real Ethernet lowers.
UPPER_KINDS = {
    "vlan",
    "macvlan",
    "macvtap",
    "ipvlan",
    "ipvtap",
    "bridge",
    "bond",
    "team",
    "vxlan",
    "geneve",
    "netkit",
    "ifb",
    "dummy",
}


class AgentError(RuntimeError):
    pass


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Agent:
    def __init__(self, cfg: configmod.Config) -> None:
        self.cfg = cfg
        self.groups: dict[str, Group] = {}
        self.dp: Datapath | None = None
        self.wiring: Wiring | None = None
        self.events: netlink.EventSocket | None = None
        self.control: ControlServer | None = None
        self.addrs: dict[int, set[tuple[int, str]]] = {}  # ifindex -> {(family, address)}
        self.sel = selectors.DefaultSelector()
        # stop() wakes the loop through this pipe: a signal alone does not end a select()
        # with no timers (PEP 475 retries it), so SIGTERM after the last group's teardown hung
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wakeup")
        self.latencies: deque[float] = deque(maxlen=4096)  # switch latencies, seconds
        self.stopping = False
        self.started_at = time.time()
        self.scheduling = "other"  # the event loop's policy, for status
        self.ipr: Any = None
        self.on_switch: Callable[[Group, Switch], None] | None = None  # metrics hook
        self.pinwatch: PinWatch | None = None
        self.repin_due_ms: int | None = None
        self.fault = Fault.from_env()  # TEST-ONLY: None outside the fault suite
        # The latest status, frozen: replaced whole (one assignment) after every change, so
        # readers in other threads (metrics) see a consistent picture without locks.
        self.snapshot: AgentStatus = statusmod.snapshot((), self.started_at, self.scheduling)

    def _fault(self, point: str) -> None:
        """TEST-ONLY: fire the injected fault if this is its point and turn."""
        f = self.fault
        if f is None or f.point != point:
            return
        f.hits += 1
        if f.hits != f.nth:
            return
        event("fault_injected", point=point, action=f.action)
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "close-netlink" and self.events is not None:
            self.events.sock.close()
        elif f.action == "stall":
            deadline = time.monotonic() + 30
            while f.gate and not os.path.exists(f.gate) and time.monotonic() < deadline:
                time.sleep(0.01)

    # -- start-up ---------------------------------------------------------------------
    def start(self) -> None:
        from pyroute2 import IPRoute

        # Subscribe before dumping: an event between the two is then seen twice, never lost.
        self.events = netlink.EventSocket()
        links = {link.ifindex: link for link in netlink.dump_links()}
        # Bad input fails before anything is created: every group's MAC must be knowable.
        for gcfg in self.cfg.groups:
            if gcfg.mac == "auto" and self._resolve_standby(gcfg, links) is None:
                raise AgentError(
                    f"group {gcfg.name}: standby {gcfg.standby_name or gcfg.standby} not found "
                    "(mac: auto needs it to learn the MAC; or set mac: in the config)"
                )
            _check_failover_name(gcfg.name, links)
        try:
            self.dp = Datapath.open(self.cfg.bpffs)
            self.dp.lock()
            self.pinwatch = PinWatch(self.dp.pin_dir)
            # Before any device: a live agent on the socket path stops us here.
            self.control = ControlServer(
                self.cfg.control.socket,
                self.handle_request,
                self.cfg.control.group,
                admin_group=self.cfg.control.admin_group,
            )
        except (DatapathError, LoadError, SocketInUse) as e:
            raise AgentError(str(e)) from e
        self.ipr = IPRoute()
        self.wiring = Wiring(self.dp, self.ipr)
        self._load_addrs()
        for gcfg in self.cfg.groups:
            self.groups[gcfg.name] = self._setup_group(gcfg, links)
        if self.fault is not None:
            self._fault("adopt")  # TEST-ONLY: adopted, not yet reconciled
        links = {link.ifindex: link for link in netlink.dump_links()}  # with the new devices
        for grp in self.groups.values():
            self._reconcile_group(grp, links, time.monotonic_ns())
            if grp.last_switch is None:
                self._renotify(grp)
        self.sel.register(self.events, selectors.EVENT_READ, "netlink")
        self.sel.register(self.pinwatch, selectors.EVENT_READ, "pins")
        self.control.register(self.sel)
        self.publish()
        event("started", groups=list(self.groups), pin_dir=self.cfg.bpffs, pid=os.getpid())

    def go_realtime(self) -> None:
        """The event loop (the calling thread) under SCHED_FIFO as configured; a refusal
        (no CAP_SYS_NICE, e.g. a container without it) is logged and the agent goes on."""
        prio = self.cfg.scheduling.realtime_priority
        try:
            self.scheduling = sched.go_realtime(prio)
        except OSError as e:
            self.scheduling = sched.current()
            event(
                "scheduling_refused",
                priority=prio,
                error=e.strerror,
                policy=self.scheduling,
                hint="needs CAP_SYS_NICE",
            )
            return
        event("scheduling", policy=self.scheduling)

    def _renotify(self, grp: Group) -> None:
        """Adopted an active lower without switching: the run that switched to it may have
        died before its GARP/NA went out (peers still send to the old port), so tell them
        again.  Harmless when they already knew."""
        if grp.active is None or grp.cfg.notify.garp_count <= 0:
            return
        event("renotify", group=grp.name, via=grp.lowers[grp.active].name, why="adopted")
        grp.notify_due = [(now_ms(), grp.active, grp.cfg.notify.garp_count)]
        self._notify_peers(grp, now_ms())

    def _resolve_standby(self, gcfg: configmod.Group, links: dict[int, netlink.Link]) -> int | None:
        if gcfg.standby_name is not None:
            return next((i for i, lk in links.items() if lk.ifname == gcfg.standby_name), None)
        driver = getattr(gcfg.standby, "driver", "")
        for i, lk in links.items():
            if lk.ifname != gcfg.name and driver_of(lk.ifname) == driver:
                return i
        return None

    def _setup_group(self, gcfg: configmod.Group, links: dict[int, netlink.Link]) -> Group:
        assert self.dp is not None and self.wiring is not None
        standby = self._resolve_standby(gcfg, links)
        mac = gcfg.mac
        if mac == "auto":
            if standby is None:
                raise AgentError(
                    f"group {gcfg.name}: standby {gcfg.standby_name or gcfg.standby} not found "
                    "(mac: auto needs it to learn the MAC; or set mac: in the config)"
                )
            mac = links[standby].mac
        try:
            gid = self.wiring.setup_group(
                gcfg.name,
                mac,
                gcfg.inactive_rx == "drop",
                gcfg.rx_path,
                mtu=links[standby].mtu if standby is not None else None,
            )
        except DatapathError as e:
            raise AgentError(f"group {gcfg.name}: {e}") from e
        rec = self.dp.group(gid)
        grp = Group(
            cfg=gcfg,
            gid=gid,
            mac=mac,
            master=rec.master_ifindex,
            peer=rec.peer_ifindex,
            pcfg=policy.PolicyConfig.from_settings(gcfg.policy),
        )
        grp.override = SLOT_NAMES.get(rec.override_slot)  # type: ignore[assignment]
        grp.active = SLOT_NAMES.get(self.dp.active(gid))  # type: ignore[assignment]
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

    def _load_addrs(self) -> None:
        self.addrs = {}
        for a in netlink.dump_addrs():
            self.addrs.setdefault(a.ifindex, set()).add((a.family, a.address))

    # -- the loop -------------------------------------------------------------------------
    def publish(self) -> AgentStatus:
        """A new snapshot of what the agent knows now, swapped in for the readers."""
        self.snapshot = statusmod.snapshot(self.groups.values(), self.started_at, self.scheduling)
        return self.snapshot

    def run(self) -> None:
        self.publish()  # with the scheduling go_realtime() set
        while not self.stopping:
            timeout = self._next_timeout()
            for key, _mask in self.sel.select(timeout):
                if key.data == "netlink":
                    self._on_netlink()
                elif key.data == "pins":
                    self._on_pins()
                elif key.data == "wakeup":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                elif self.control is not None:
                    self.control.on_ready(key)
            self._run_timers()
            self.publish()  # after the switch and its effects: never on the event -> map path

    def stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):  # full (already woken) or closed
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        """Stop serving; the pinned datapath keeps forwarding."""
        started = self.control is not None
        if self.control is not None:
            self.control.close()
        if self.events is not None:
            self.events.close()
        if self.pinwatch is not None:
            self.pinwatch.close()
        if self.ipr is not None:
            self.ipr.close()
        if self.dp is not None:
            self.dp.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if started:
            event("stopped", datapath="left forwarding")

    def _next_timeout(self) -> float | None:
        due = [g.deadline_ms for g in self.groups.values() if g.deadline_ms is not None]
        due += [n[0] for g in self.groups.values() for n in g.notify_due]
        if self.repin_due_ms is not None:
            due.append(self.repin_due_ms)
        if not due:
            return None  # event driven: nothing to do until the kernel says something
        return max(0.0, (min(due) - now_ms()) / 1000)

    def _run_timers(self) -> None:
        t = now_ms()
        if self.repin_due_ms is not None and self.repin_due_ms <= t:
            self._repin()
        for grp in self.groups.values():
            if grp.deadline_ms is not None and grp.deadline_ms <= t:
                self._decide(grp, time.monotonic_ns(), "hold-down")
            if any(n[0] <= t for n in grp.notify_due):
                self._notify_peers(grp, t)

    def _on_netlink(self) -> None:
        assert self.events is not None
        t_ns = time.monotonic_ns()
        if self.fault is not None:
            self._fault("netlink-read")  # TEST-ONLY
        try:
            batch = self.events.read()
        except netlink.Overflow:
            event("netlink_overflow", action="re-dump and reconcile")
            self.reconcile()
            return
        except OSError as e:  # the socket itself failed: a new one, then a full re-read
            self._reconnect_netlink(e)
            return
        for ev in batch:
            try:
                if isinstance(ev, netlink.Link):
                    self._on_link(ev, t_ns)
                elif isinstance(ev, netlink.Addr):
                    self._on_addr(ev)
                else:
                    self._on_mcast(ev.ifindex)
            except Exception as e:  # one bad event (a device gone meanwhile) must not kill us
                event("event_error", error=str(e), ifindex=getattr(ev, "ifindex", None))

    # -- pins removed by hand ------------------------------------------------------------------
    def _on_pins(self) -> None:
        assert self.pinwatch is not None
        pin_gone, dir_gone = self.pinwatch.read()
        if dir_gone:
            self._repin()  # `rm -r` is done: put everything back now
        elif pin_gone and self.repin_due_ms is None:
            # a pin went: maybe the start of an `rm -r`; let it finish rather than fight it
            self.repin_due_ms = now_ms() + 500

    def _repin(self) -> None:
        assert self.dp is not None and self.pinwatch is not None
        self.repin_due_ms = None
        dir_gone = not self.dp.pin_dir.is_dir()
        try:
            done = self.dp.repin()
            if dir_gone:
                self.pinwatch.watch()
        except (OSError, DatapathError) as e:
            event(
                "pins_restore_error",
                pin_dir=self.dp.pin_dir,
                error=str(e),
                action="forwarding goes on; restart failoverd to re-pin",
            )
            return
        if done:
            event("pins_restored", pin_dir=self.dp.pin_dir, pins=done, relocked=dir_gone)

    def _reconnect_netlink(self, err: OSError) -> None:
        old = self.events
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(old)  # type: ignore[arg-type]
        if old is not None:
            old.close()
        self.events = netlink.EventSocket()  # subscribe before the dump, as at start
        self.sel.register(self.events, selectors.EVENT_READ, "netlink")
        event("netlink_reconnected", error=str(err), action="re-dump and reconcile")
        self.reconcile()

    def reconcile(self) -> None:
        """Full re-read of links and addresses; never trust a missed event."""
        links = {link.ifindex: link for link in netlink.dump_links()}
        self._load_addrs()
        for grp in self.groups.values():
            self._reconcile_group(grp, links, time.monotonic_ns())

    def _reconcile_group(self, grp: Group, links: dict[int, netlink.Link], t_ns: int) -> None:
        for role, lower in list(grp.lowers.items()):
            link = links.get(lower.ifindex)
            if link is None or link.mac != grp.mac:
                self._unregister(grp, role, gone=link is None)
        master = links.get(grp.master)
        if master is not None:
            grp.mtu = master.mtu
        for link in links.values():
            if grp.lower_by_ifindex(link.ifindex) is None:
                self._maybe_register(grp, link)
            else:
                self._update_lower(grp, link)
        self._decide(grp, t_ns, "reconcile")
        self._sync_mc(grp)

    # -- link events ------------------------------------------------------------------------
    def _on_link(self, link: netlink.Link, t_ns: int) -> None:
        for grp in self.groups.values():
            lower = grp.lower_by_ifindex(link.ifindex)
            if lower is not None:
                if link.deleted:
                    self._unregister(grp, lower.role, gone=True)
                elif link.mac and link.mac != grp.mac:
                    event("lower_mac_changed", group=grp.name, lower=lower.name, mac=link.mac)
                    self._unregister(grp, lower.role)
                else:
                    self._update_lower(grp, link)
                self._decide(grp, t_ns, f"link {link.ifname}")
                return
            if link.ifindex == grp.master:
                self._on_master(grp, link)
                return
            if not link.deleted and self._maybe_register(grp, link):
                self._decide(grp, t_ns, f"registered {link.ifname}")
                self._sync_mc(grp)
                self._open_plugged(grp, link)
                return

    def _open_plugged(self, grp: Group, link: netlink.Link) -> None:
        """A lower hot-plugged while we run comes up admin down (a re-plugged VF), and the
        lowers are unmanaged (deploy/): open it, as net_failover_slave_register() does with
        dev_open().  Found by the proving ground (docs/proving-ground.md).  Lowers present at
        start-up are left as the operator set them."""
        if link.admin_up:
            return
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.ipr.link("set", index=link.ifindex, state="up")
            event("lower_opened", group=grp.name, lower=link.ifname)
        except NetlinkError as e:
            event("lower_open_error", group=grp.name, lower=link.ifname, error=str(e))

    def _update_lower(self, grp: Group, link: netlink.Link) -> None:
        lower = grp.lower_by_ifindex(link.ifindex)
        assert lower is not None
        if link.ifname and link.ifname != lower.name:
            # udev renames keep the role: everything is keyed by ifindex + MAC
            event("lower_renamed", group=grp.name, role=lower.role, old=lower.name, new=link.ifname)
            lower.name = link.ifname
        lower.admin_up, lower.carrier = link.admin_up, link.carrier
        if link.mtu:
            lower.mtu = link.mtu

    def _role_for(self, grp: Group, link: netlink.Link) -> Role | None:
        """Registration by MAC (net_failover's failover_slave_register)."""
        if link.mac != grp.mac or link.ifindex in (grp.master, grp.peer):
            return None
        if link.kind in UPPER_KINDS:
            return None
        gcfg = grp.cfg
        if gcfg.standby_name is not None:
            if link.ifname == gcfg.standby_name:
                return "standby"
        elif driver_of(link.ifname) == getattr(gcfg.standby, "driver", None):
            return "standby"
        if gcfg.primary_name is not None and link.ifname != gcfg.primary_name:
            return None
        return "primary"

    def _maybe_register(self, grp: Group, link: netlink.Link) -> bool:
        assert self.wiring is not None
        role = self._role_for(grp, link)
        if role is None:
            return False
        if role in grp.lowers:
            event(
                "lower_ignored",
                group=grp.name,
                lower=link.ifname,
                role=role,
                why=f"{grp.lowers[role].name} is already the {role}",
            )
            return False
        if grp.mtu and link.mtu and link.mtu < grp.mtu and not self._set_mtu(link.ifindex, grp.mtu):
            event(
                "lower_refused",
                group=grp.name,
                lower=link.ifname,
                role=role,
                why=f"MTU {link.mtu} < {grp.mtu} and cannot be raised",
            )
            return False
        try:
            self.wiring.register_lower(grp.gid, ROLE_SLOTS[role], link.ifindex, grp.cfg.rx_path)
        except Exception:
            # gone meanwhile (its RTM_DELLINK is still queued): no half registration left
            with contextlib.suppress(Exception):
                self.wiring.unregister_lower(grp.gid, ROLE_SLOTS[role], link.ifindex, gone=True)
            raise
        grp.lowers[role] = Lower(
            role, link.ifindex, link.ifname, link.admin_up, link.carrier, max(link.mtu, grp.mtu)
        )
        event(
            "lower_registered",
            group=grp.name,
            role=role,
            lower=link.ifname,
            ifindex=link.ifindex,
            usable=grp.lowers[role].usable,
        )
        return True

    def _unregister(self, grp: Group, role: Role, gone: bool = False) -> None:
        """Forget a lower.  If it is active the policy moves traffic away first."""
        assert self.wiring is not None
        lower = grp.lowers.pop(role)
        self._decide(grp, time.monotonic_ns(), f"unregister {lower.name}")
        self.wiring.unregister_lower(grp.gid, ROLE_SLOTS[role], lower.ifindex, gone=gone)
        grp.mc_added.pop(lower.ifindex, None)
        event("lower_unregistered", group=grp.name, role=role, lower=lower.name, gone=gone)

    def _on_master(self, grp: Group, link: netlink.Link) -> None:
        if link.deleted:
            self._recreate_master(grp)
            return
        if link.mtu and link.mtu != grp.mtu:
            self._propagate_mtu(grp, link.mtu)
        self._sync_mc(grp)

    def _recreate_master(self, grp: Group) -> None:
        """The failover device was deleted by hand (`failoverctl teardown` is the way to
        remove a group): put it back as it was, same name, MAC and MTU, and carry on.  The
        lowers' filters find the new device through the group map.  Its addresses belong to
        the OS's network configuration (networkd/NM/DHCP bring them back on a new netdev)."""
        from pyroute2.netlink.exceptions import NetlinkError

        assert self.wiring is not None and self.dp is not None
        old = grp.master
        event("failover_device_deleted", group=grp.name, ifindex=old, action="re-creating it")
        try:
            gid = self.wiring.setup_group(
                grp.cfg.name,
                grp.mac,
                grp.cfg.inactive_rx == "drop",
                grp.cfg.rx_path,
                mtu=grp.mtu or None,
            )
        except (DatapathError, NetlinkError, OSError) as e:
            event(
                "failover_device_lost",
                group=grp.name,
                error=str(e),
                action="cannot re-create it: failoverctl teardown "
                f"{grp.name}, then restart failoverd",
            )
            return
        rec = self.dp.group(gid)
        grp.master, grp.peer = rec.master_ifindex, rec.peer_ifindex
        if old != grp.master:
            self.dp.del_dev(old)
        self.addrs.pop(old, None)
        grp.carrier = None  # the new peer starts down: _decide sets it
        note = "addresses are the OS network config's to restore"
        event(
            "failover_device_recreated",
            group=grp.name,
            old_ifindex=old,
            ifindex=grp.master,
            note=note,
        )
        self._decide(grp, time.monotonic_ns(), "failover device re-created")
        self._sync_mc(grp)

    def _propagate_mtu(self, grp: Group, mtu: int) -> None:
        """MTU set on the failover device goes to its peer and both lowers, all or none."""
        old = grp.mtu
        done: list[tuple[int, int]] = []
        targets = [(grp.peer, old)] + [(lw.ifindex, lw.mtu) for lw in grp.lowers.values()]
        for ifindex, prev in targets:
            if not self._set_mtu(ifindex, mtu):
                for ifx, prev_mtu in done:
                    self._set_mtu(ifx, prev_mtu)
                self._set_mtu(grp.master, old)
                event(
                    "mtu_refused", group=grp.name, mtu=mtu, rolled_back_to=old, refused_by=ifindex
                )
                return
            done.append((ifindex, prev))
        grp.mtu = mtu
        for lower in grp.lowers.values():
            lower.mtu = mtu
        event("mtu", group=grp.name, mtu=mtu)

    def _set_mtu(self, ifindex: int, mtu: int) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self.ipr.link("set", index=ifindex, mtu=mtu)
        except NetlinkError as e:
            log.debug("mtu %d on %d: %s", mtu, ifindex, e)
            return False
        return True

    # -- addresses, multicast -----------------------------------------------------------------
    def _on_addr(self, addr: netlink.Addr) -> None:
        entry = (addr.family, addr.address)
        addrs = self.addrs.setdefault(addr.ifindex, set())
        if addr.deleted:
            addrs.discard(entry)
        else:
            addrs.add(entry)
        for grp in self.groups.values():
            if addr.ifindex == grp.master:
                self._sync_mc(grp)  # a new IPv6 address joins its solicited-node group

    def _on_mcast(self, ifindex: int) -> None:
        for grp in self.groups.values():
            if ifindex in (0, grp.master):
                self._sync_mc(grp)

    def _sync_mc(self, grp: Group) -> None:
        lowers = {lw.ifindex: lw.name for lw in grp.lowers.values()}
        try:
            grp.mc_added = mcsync.sync(grp.cfg.name, lowers, grp.mc_added)
        except OSError as e:
            event("mc_sync_error", group=grp.name, error=str(e))

    # -- decisions ------------------------------------------------------------------------
    def _decide(self, grp: Group, t_event_ns: int, cause: str) -> None:
        assert self.dp is not None
        lowers = {role: lw.state() for role, lw in grp.lowers.items()}
        d = policy.decide(grp.pstate, lowers, grp.override, grp.pcfg, now_ms())
        grp.pstate = d.state
        grp.deadline_ms = d.next_deadline_ms
        if d.active != grp.active:
            slot = ROLE_SLOTS[d.active] if d.active else 0
            if d.active is not None:
                ifindex = grp.lowers[d.active].ifindex
                if self.dp.lower(grp.gid, slot) != ifindex:  # (re)plugged: fill its slot first
                    self.dp.set_lower(grp.gid, slot, ifindex)
            if self.fault is not None:
                self._fault("before-flip")  # TEST-ONLY: decided, map not written
            self.dp.flip(grp.gid, slot)  # the switch itself: everything else comes after
            if self.fault is not None:
                self._fault("after-flip")  # TEST-ONLY: map written, nothing else yet
            latency = (time.monotonic_ns() - t_event_ns) / 1e9
            old = grp.active
            sw = Switch(
                wall_time=time.time(),
                from_role=old,
                to_role=d.active,
                from_lower=grp.lowers[old].name if old in grp.lowers else None,
                to_lower=grp.lowers[d.active].name if d.active else None,
                reason=d.reason or cause,
                latency_s=latency,
            )
            grp.active = d.active
            grp.last_switch = sw
            grp.switches[sw.reason] += 1
            self.latencies.append(latency)
            event(
                "switch",
                group=grp.name,
                **{"from": sw.from_lower, "to": sw.to_lower},
                reason=sw.reason,
                cause=cause,
                latency_us=round(latency * 1e6, 1),
            )
            if self.on_switch is not None:
                self.on_switch(grp, sw)
            if d.active is not None and grp.cfg.notify.garp_count > 0:
                grp.notify_due = [(now_ms(), d.active, grp.cfg.notify.garp_count)]
                self._notify_peers(grp, now_ms())
        if d.carrier != grp.carrier:
            set_carrier(self.ipr, grp.peer, d.carrier)
            grp.carrier = d.carrier
            event("carrier", group=grp.name, on=d.carrier)

    def _notify_peers(self, grp: Group, t: int) -> None:
        keep = []
        for due, role, left in grp.notify_due:
            if due > t:
                keep.append((due, role, left))
                continue
            lower = grp.lowers.get(role)
            if lower is None or grp.active != role:
                continue  # switched again meanwhile: the newer switch notifies
            addrs = sorted(self.addrs.get(grp.master, set()))
            if self.fault is not None:
                self._fault("garp")  # TEST-ONLY: switched, peers not told yet
            try:
                n = notify.send(lower.name, notify.frames_for(grp.mac, addrs))
                event("notify", group=grp.name, via=lower.name, frames=n)
            except OSError as e:
                event("notify_error", group=grp.name, via=lower.name, error=str(e))
            if left > 1:
                keep.append((t + grp.cfg.notify.garp_interval_ms, role, left - 1))
        grp.notify_due = keep

    # -- control requests -----------------------------------------------------------------
    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "set-primary":
            return self._set_primary(req)
        if cmd == "teardown":
            return self._teardown(req)
        raise RequestError(f"unknown command {cmd!r} (status, set-primary, teardown)")

    def _group_arg(self, req: dict[str, Any]) -> Group:
        name = req.get("group")
        if not isinstance(name, str) or name not in self.groups:
            raise RequestError(f"unknown group {name!r} (groups: {', '.join(self.groups)})")
        return self.groups[name]

    def _set_primary(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.dp is not None
        grp = self._group_arg(req)
        lower = req.get("lower")
        target: Role | None
        if lower is None:
            target = None  # --auto: back to the configured preference
        else:
            if not isinstance(lower, str):
                raise RequestError("lower must be a name")
            found = [lw for lw in grp.lowers.values() if lower in (lw.name, lw.role)]
            if not found:
                names = ", ".join(f"{lw.name} ({lw.role})" for lw in grp.lowers.values())
                raise RequestError(f"{lower!r} is not a lower of {grp.name} (lowers: {names})")
            if not found[0].usable:
                raise RequestError(f"{found[0].name} is not usable (down or no carrier): refused")
            target = found[0].role
        grp.override = target
        # persisted with the pins: survives a restart
        self.dp.update_group(grp.gid, override_slot=ROLE_SLOTS[target] if target else 0)
        self._decide(grp, time.monotonic_ns(), "set-primary")
        event("override", group=grp.name, lower=lower, role=target)
        return {"ok": True, "active": grp.active, "override": grp.override}

    def _teardown(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.wiring is not None
        grp = self._group_arg(req)
        force = req.get("force", False)
        if not isinstance(force, bool):
            raise RequestError("force must be true or false")
        # configured addresses: an IPv6 link-local comes with every carrier, guards nothing
        addrs = sorted(
            a for _, a in self.addrs.get(grp.master, set()) if not a.lower().startswith("fe80:")
        )
        if grp.carrier and addrs and not force:
            raise RequestError(
                f"{grp.name} has carrier and addresses ({', '.join(addrs)}): teardown deletes "
                "the device with them and its traffic stops; refused without --yes"
            )
        removed = {
            "device": grp.name,
            "peer": peer_name(grp.name),
            "addresses": addrs,
            "lowers": sorted(lw.name for lw in grp.lowers.values()),
        }
        self.wiring.teardown_group(grp.name)
        del self.groups[grp.name]
        event("teardown", group=grp.name, **{k: v for k, v in removed.items() if k != "device"})
        return {"ok": True, "removed": removed}

    def status(self) -> dict[str, Any]:
        """The control socket's status: the snapshot as of this request, counters read now."""
        assert self.dp is not None
        return counters.read(self.publish(), self.dp).to_json()


def _check_failover_name(name: str, links: dict[int, netlink.Link]) -> None:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="failoverd", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", help="YAML config (default: $BPFAILOVER_CONFIG or /etc/bpfailover/config.yaml)"
    )
    ap.add_argument(
        "--lab",
        action="store_true",
        help="use the built-in config for `failover-lab up` (socket "
        "/run/bpfailover/lab-PREFIX.sock, pins /sys/fs/bpf/bpfailover-lab-PREFIX; in netns "
        "PREFIX-guest unless --netns says otherwise)",
    )
    ap.add_argument(
        "--prefix",
        help="with --lab: the lab's prefix (failover-lab --prefix; default "
        f"{configmod.LAB_PREFIX})",
    )
    ap.add_argument(
        "--netns",
        help="run in this named network namespace (labs, tests); unlike `ip netns exec` "
        "it keeps the host's /sys/fs/bpf and its pins",
    )
    args = ap.parse_args(argv)
    if args.lab and args.config:
        ap.error("--lab and --config: give one")
    if args.prefix is not None and not args.lab:
        ap.error("--prefix goes with --lab")
    args.prefix = args.prefix or configmod.LAB_PREFIX
    if args.lab and not args.netns:
        args.netns = configmod.lab_netns(args.prefix)
    try:
        source = configmod.config_path(args.config)
        cfg = configmod.lab_config(args.prefix) if args.lab else configmod.load_config(source)
        configmod.check_host(cfg, f"<lab {args.prefix}>" if args.lab else str(source))
    except configmod.ConfigError as e:
        for line in str(e).splitlines():  # one line per problem
            print(f"failoverd: {line}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level)
    if os.geteuid() != 0:
        return fatal("needs root (CAP_BPF, CAP_NET_ADMIN)", 1)
    if args.netns:
        try:
            netns.enter_for_good(args.netns)
        except OSError as e:
            return fatal(f"netns {args.netns}: {e.strerror}", 1)
    try:
        agent = Agent(cfg)
    except FaultSpecError as e:
        return fatal(str(e), 2)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    try:
        agent.start()
        from bpfailover.ops import metrics

        metrics.serve(agent, cfg.metrics.address)  # its thread keeps normal scheduling
        agent.go_realtime()
        agent.run()
    except (AgentError, DatapathError, LoadError) as e:
        return fatal(str(e), 1)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return fatal(f"address in use: {e}", 1)
        raise
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""failoverd: keeps each group's active lower right, from rtnetlink events, with no polling.

One thread runs everything that writes: link events, hold-down timers, peer
notifications and control requests are served from one selector loop, so the
maps have a single writer and no locks.  On a switch the map is written first;
logging, carrier, GARP come after.  The metrics endpoint only reads.

This module is the loop: start-up, the selector, its timers, errors survived, shutdown.
What it dispatches to: kernel.py (the kernel's events and full re-reads) -> lowers.py
(lowers and failover devices) -> switch.py (decisions, the map write, what follows);
addrlists.py and uppers.py (what the lowers carry for the failover device), pins.py,
requests.py (the control socket), reload.py (SIGHUP), lifecycle.py (signals, systemd).
Its collaborators come from ports.py, so tests and the bench can hand it their own.
"""

from __future__ import annotations

import os
import selectors
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

from bpfailover import policy
from bpfailover.agent import addrlists, kernel, setup
from bpfailover.agent import status as statusmod
from bpfailover.agent.addrlists import sync_mc
from bpfailover.agent.fault import Fault
from bpfailover.agent.lifecycle import Lifecycle
from bpfailover.agent.lowers import LowerHooks, Lowers
from bpfailover.agent.pins import Pins
from bpfailover.agent.ports import (
    Clock,
    DatapathOpener,
    EventSource,
    LinkSource,
    Netlink,
    SpeedReader,
    SystemClock,
    WiringFactory,
    rtnetlink_wiring,
)
from bpfailover.agent.reload import reload as reload_config
from bpfailover.agent.requests import Requests
from bpfailover.agent.switch import Decide, Switcher
from bpfailover.agent.udevwait import HOLD_MS, UdevWait
from bpfailover.datapath import counters
from bpfailover.datapath.attach import Wiring
from bpfailover.datapath.doorbell import Doorbell
from bpfailover.datapath.loader import LoadError
from bpfailover.datapath.maps import Datapath, DatapathError
from bpfailover.effects import sched
from bpfailover.effects.ethtool import link_speed
from bpfailover.events.udev import UdevDb
from bpfailover.model import config as configmod
from bpfailover.model.groups import Group, Switch
from bpfailover.model.status import AgentStatus
from bpfailover.ops.api import ControlServer, SocketInUse
from bpfailover.ops.eventlog import event, flush

AgentError = setup.AgentError

REFUSED_RECHECK_MS = 2000


class Agent:
    """failoverd.  Its collaborators (ports.py) default to the real ones."""

    def __init__(
        self,
        cfg: configmod.Config,
        *,
        datapath: DatapathOpener = Datapath.open,
        wiring: WiringFactory = rtnetlink_wiring,
        links: LinkSource | None = None,
        clock: Clock | None = None,
        speed: SpeedReader = link_speed,
        decide: Decide = policy.decide,
        hooks: Callable[[configmod.Config, dict[int, Any]], None] = setup.check_hooks,
        udev: UdevDb | None = None,
        lower_hooks: LowerHooks | None = setup.lower_hooks,
        fault: Fault | None = None,
        udev_hold_ms: int = HOLD_MS,
    ) -> None:
        self.cfg = cfg
        self.open_datapath, self.make_wiring = datapath, wiring
        self.links: LinkSource = links or Netlink()
        self.clock: Clock = clock or SystemClock()
        self.speed, self.decide = speed, decide
        self.check_hooks = hooks  # another datapath's programs on our devices: refused
        self.lower_hooks = lower_hooks  # ... and on a lower as it registers, later too
        self.groups: dict[str, Group] = {}
        self.dp: Datapath | None = None
        self.wiring: Wiring | None = None
        self.events: EventSource | None = None
        self.control: ControlServer | None = None
        self.addrs: dict[int, set[tuple[int, str]]] = {}  # ifindex -> {(family, address)}
        self.sel = selectors.DefaultSelector()
        self.life = Lifecycle()  # signals, stop(), systemd
        self.sel.register(self.life, selectors.EVENT_READ, "wakeup")
        # new lowers wait for udev's name where udev runs for our netdevs (udevwait.py)
        self.udev = UdevWait(udev if udev is not None else UdevDb(), self.sel, udev_hold_ms)
        # SIGHUP: where the new config comes from (None: nothing to reload, e.g. --lab)
        self.load_config: Callable[[], configmod.Config] | None = None
        self.exporter: Any = None  # the metrics exporter, restarted when metrics.listen changes
        # Errors the loop survived, by where they happened: failover_agent_errors_total.
        self.errors: Counter[str] = Counter()
        self.reconcile_due_ms: int | None = None  # a failed full re-read, tried again
        # a lower refused for another running agent's programs is looked at again every
        # REFUSED_RECHECK_MS while it is refused (that agent may stop without any link event)
        self.refused_due_ms: int | None = None
        self.netlink_retry_ms: int | None = None  # a failed re-subscription, tried again
        self.stopping = False
        # READY=1 waits while a lower found at start is held for udev (at most its timer)
        self.ready_pending = False
        self.started_at = self.clock.time()
        self.scheduling = "other"  # the event loop's policy, for status
        self.pins: Pins | None = None  # pins removed by hand are put back
        self.doorbell: Doorbell | None = None  # the datapath rings it: address lists changed
        # multicast changes (doorbell, kernel notifications): one sync per window at most
        self.mc_pacer = addrlists.SyncPacer()
        self.resync_due_ms: dict[str, int] = {}  # group -> next re-read of its address lists
        # TEST-ONLY: the fault suite passes one (tests/fault_agent.py); failoverd never does
        self.fault = fault
        if self.fault is not None:
            self.fault.close_netlink = self._close_netlink
        # the jobs, built by start() once the datapath is open
        self.switch: Switcher | None = None
        self.lowers: Lowers | None = None
        self.requests: Requests | None = None
        self._on_switch: Callable[[Group, Switch], None] | None = None
        self.on_batch: Callable[[], None] | None = None  # after each batch of kernel events
        # The latest status, frozen: replaced whole (one assignment) after every change, so
        # readers in other threads (metrics) see a consistent picture without locks.
        self.snapshot: AgentStatus = statusmod.snapshot((), self.started_at, self.scheduling)

    @property
    def on_switch(self) -> Callable[[Group, Switch], None] | None:
        """Called after each switch (the metrics hook)."""
        return self._on_switch

    @on_switch.setter
    def on_switch(self, hook: Callable[[Group, Switch], None] | None) -> None:
        self._on_switch = hook
        if self.switch is not None:
            self.switch.on_switch = hook

    def _close_netlink(self) -> None:  # TEST-ONLY: the close-netlink fault
        if self.events is not None:
            self.events.close()

    # -- start-up ---------------------------------------------------------------------
    def start(self) -> None:
        # Subscribe before dumping: an event between the two is then seen twice, never lost.
        self.events = self.links.subscribe()
        links = {link.ifindex: link for link in self.links.dump_links()}
        setup.check_groups(self.cfg, links)  # bad input fails before anything is created
        self.check_hooks(self.cfg, links)  # so does a device another datapath serves
        self._open_datapath()
        assert self.dp is not None and self.wiring is not None
        kernel.load_addrs(self)
        self._build_jobs(self.dp, self.wiring)
        for gcfg in self.cfg.groups:
            self.groups[gcfg.name] = setup.setup_group(gcfg, links, self.dp, self.wiring)
        if self.fault is not None:
            self.fault.fire("adopt")  # TEST-ONLY: adopted, not yet reconciled
        links = {link.ifindex: link for link in self.links.dump_links()}  # with the new devices
        assert self.lowers is not None and self.switch is not None
        for grp in self.groups.values():
            self.lowers.reconcile_group(grp, links, self.clock.monotonic_ns())
            self.lowers.open_at_start(grp)
            if grp.last_switch is None:
                self.switch.renotify(grp)
        self.sel.register(self.events, selectors.EVENT_READ, "netlink")
        self.doorbell = addrlists.open_doorbell(self.dp)
        if self.doorbell is not None:
            self.sel.register(self.doorbell, selectors.EVENT_READ, "doorbell")
        for grp in self.groups.values():
            if grp.cfg.address_resync_s:
                self.resync_due_ms[grp.name] = self.now_ms() + grp.cfg.address_resync_s * 1000
        if self.pins is not None:
            self.sel.register(self.pins, selectors.EVENT_READ, "pins")
        assert self.control is not None
        self.control.register(self.sel)
        self.publish()
        event("started", groups=list(self.groups), pin_dir=self.cfg.bpffs, pid=os.getpid())

    def _build_jobs(self, dp: Datapath, wiring: Wiring) -> None:
        self.switch = Switcher(dp, wiring, self.addrs, self.clock, self.fault, self.decide)
        self.switch.on_switch = self._on_switch
        self.lowers = Lowers(
            self.groups,
            dp,
            wiring,
            self.switch,
            self.addrs,
            self.clock,
            self.speed,
            self.udev,
            hooks=self.lower_hooks,
        )
        self.requests = Requests(
            self.groups,
            dp,
            wiring,
            self.switch,
            self.addrs,
            self.status,
            self.clock,
            let_go=self.lowers.let_go_all,
        )

    def _open_datapath(self) -> None:
        try:
            self.dp = self.open_datapath(self.cfg.bpffs)
            self.dp.lock()
            self.pins = Pins(self.dp)
            # Before any device: a live agent on the socket path stops us here.
            self.control = ControlServer(
                self.cfg.control.socket,
                self.handle_request,
                self.cfg.control.group,
                admin_group=self.cfg.control.admin_group,
            )
        except (DatapathError, LoadError, SocketInUse) as e:
            raise AgentError(str(e)) from e
        self.wiring = self.make_wiring(self.dp)

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

    # -- the loop -------------------------------------------------------------------------
    def publish(self) -> AgentStatus:
        """A new snapshot of what the agent knows now, swapped in for the readers."""
        held: dict[str, list[str]] = {}
        for h in self.udev.held.values():
            held.setdefault(h.group, []).append(h.link.ifname)
        self.snapshot = statusmod.snapshot(
            self.groups.values(), self.started_at, self.scheduling, self.errors, held
        )
        return self.snapshot

    def run(self) -> None:
        """Until stopped.  One failing event, timer or group never ends it: each is
        guarded, logged once (`agent_error`) and counted by where it happened.  Only the
        selector itself failing (nothing left to wait on) propagates."""
        self.publish()  # with the scheduling go_realtime() set
        while not self.stopping:
            self.run_once()

    def run_once(self, wait: bool = True) -> None:
        """One turn: wait for an fd or the next timer (wait=False: do not wait), serve what
        is ready, run the timers that are due, publish."""
        timeout = self._next_timeout() if wait else 0
        udev = False
        for key, _mask in self.sel.select(timeout):
            if key.data == "netlink":
                self.guard("netlink", kernel.on_netlink, self)
                if self.on_batch is not None:
                    self.on_batch()
            elif key.data == "pins" and self.pins is not None:
                self.guard("pins", self.pins.on_ready, self.now_ms())
            elif key.data == "doorbell":
                self.guard(
                    "doorbell",
                    addrlists.on_doorbell,
                    self.doorbell,
                    self.groups,
                    self.mc_pacer,
                    self.now_ms(),
                )
            elif key.data == "wakeup":
                self._on_wakeup()
            elif key.data == "udev":
                udev = True  # after the link events of this turn: the rename came first
            elif self.control is not None:
                self.guard("control", self.control.on_ready, key)
        if udev:
            self.guard("udev", self._on_udev)
        self._run_timers()
        if self.ready_pending and not self.udev.held:
            self._ready_now()
        if self.lowers is not None and self.lowers.hooks_refused and self.refused_due_ms is None:
            self.refused_due_ms = self.now_ms() + REFUSED_RECHECK_MS
        self.guard("publish", self.publish)  # after the switch and its effects

    def _recheck_refused(self) -> None:
        """Each refused lower, as it is now, through the path of its own link event: taken
        if the agent whose programs it carried has gone, still refused (silently) if not."""
        assert self.lowers is not None
        links = {link.ifindex: link for link in self.links.dump_links()}
        for gname, ifindex in list(self.lowers.hooks_refused):
            link = links.get(ifindex)
            if link is None or gname not in self.groups:
                self.lowers.hooks_refused.pop((gname, ifindex), None)
            else:
                self.lowers.on_link(link, self.clock.monotonic_ns())

    def _on_udev(self) -> None:
        """udev wrote database entries: the held lowers it has named are registered."""
        assert self.lowers is not None
        for held in self.udev.on_ready(self.now_ms()):
            self.guard("udev", self.lowers.released, held, self.clock.monotonic_ns())

    def guard(self, where: str, fn: Callable[..., Any], *args: Any, group: str = "") -> bool:
        """Run one unit of work; an exception is logged, counted, and the loop goes on."""
        try:
            fn(*args)
        except Exception as e:
            self.error(where, e, group)
            return False
        return True

    def error(self, where: str, exc: BaseException, group: str = "") -> None:
        self.errors[where] += 1
        fields = {"group": group} if group else {}
        event(
            "agent_error",
            where=where,
            **fields,
            error=f"{type(exc).__name__}: {exc}",
            count=self.errors[where],
        )

    def ready(self) -> None:
        """Tell systemd (Type=notify) we are up: called once start() has every group's
        failover device created or adopted, reconciled and forwarding.  A lower that start
        found but holds for udev (its coldplug not done: `udevadm settle` timed out) is not
        in the datapath yet: READY=1 then waits until udev names it or its timer lets it go,
        so that the network managers never see a failover device with a lower missing."""
        if self.udev.held:
            self.ready_pending = True
            event(
                "ready_waits_for_udev",
                lowers=sorted(h.link.ifname for h in self.udev.held.values()),
            )
            return
        self._ready_now()

    def _ready_now(self) -> None:
        self.ready_pending = False
        self.life.ready(len(self.groups), self.now_ms())

    def signal_fd(self) -> int:
        """For signal.set_wakeup_fd: the write end of the loop's wake-up pipe."""
        return self.life.wake_w

    def _on_wakeup(self) -> None:
        for signum in self.life.signals():
            if signum in (signal.SIGTERM, signal.SIGINT):
                event("signal", signal=signal.Signals(signum).name, action="stopping")
                self.life.stopping()
                self.stopping = True
            elif signum == signal.SIGHUP:
                self.guard("reload", self.reload)
            elif signum == 0:
                self.stopping = True  # stop()

    def reload(self) -> None:
        """SIGHUP: the config read again, what can change applied live (reload.py)."""
        reload_config(self)

    def stop(self) -> None:
        self.stopping = True
        self.life.wake()

    def close(self) -> None:
        """Stop serving; the pinned datapath keeps forwarding."""
        started = self.control is not None
        if self.control is not None:
            self.control.close()
        if self.events is not None:
            self.events.close()
        if self.pins is not None:
            self.pins.close()
        if self.doorbell is not None:
            self.doorbell.close()
        self.udev.close()
        if self.wiring is not None:
            self.wiring.close()
        if self.dp is not None:
            self.dp.close()
        self.life.close()
        if started:
            event("stopped", datapath="left forwarding")

    def _next_timeout(self) -> float | None:
        due = [g.deadline_ms for g in self.groups.values() if g.deadline_ms is not None]
        due += [n[0] for g in self.groups.values() for n in g.notify_due]
        if self.pins is not None and self.pins.due_ms is not None:
            due.append(self.pins.due_ms)
        due += self.resync_due_ms.values()
        if self.reconcile_due_ms is not None:
            due.append(self.reconcile_due_ms)
        if self.netlink_retry_ms is not None:
            due.append(self.netlink_retry_ms)
        if self.life.watchdog_due_ms is not None:
            due.append(self.life.watchdog_due_ms)
        udev_due = self.udev.next_due_ms()
        if udev_due is not None:
            due.append(udev_due)
        if self.refused_due_ms is not None:
            due.append(self.refused_due_ms)
        if self.mc_pacer.due_ms is not None:
            due.append(self.mc_pacer.due_ms)
        if not due:
            return None  # event driven: nothing to do until the kernel says something
        return max(0.0, (min(due) - self.now_ms()) / 1000)

    def _run_timers(self) -> None:
        assert self.switch is not None
        t = self.now_ms()
        if self.pins is not None and self.pins.due_ms is not None and self.pins.due_ms <= t:
            self.guard("pins", self.pins.repin)
            self.pins.due_ms = None
        if self.netlink_retry_ms is not None and self.netlink_retry_ms <= t:
            self.guard("netlink", kernel.reconnect, self, OSError("re-subscribing"))
        if self.reconcile_due_ms is not None and self.reconcile_due_ms <= t:
            self.reconcile()
        self.life.tick(t)
        if self.lowers is not None:
            for held in self.udev.due(t):  # udev did not name it in time: taken as it is
                self.guard("udev", self.lowers.released, held, self.clock.monotonic_ns())
        if self.refused_due_ms is not None and self.refused_due_ms <= t:
            self.refused_due_ms = None
            self.guard("lowers", self._recheck_refused)
        for grp in list(self.groups.values()):
            if grp.deadline_ms is not None and grp.deadline_ms <= t:
                ok = self.guard(
                    "timer",
                    self.switch.decide,
                    grp,
                    self.clock.monotonic_ns(),
                    "hold-down",
                    group=grp.name,
                )
                if not ok:
                    grp.deadline_ms = t + 1000  # decide again in a second, not in a busy loop
            due = any(n[0] <= t for n in grp.notify_due)
            if due and not self.guard("notify", self.switch.notify_peers, grp, t, group=grp.name):
                grp.notify_due = []  # a notification that fails this way is dropped
            resync = self.resync_due_ms.get(grp.name)
            if resync is not None and resync <= t:
                # what no event announces: `ip maddr add`, packet sockets
                self.guard("timer", sync_mc, grp, group=grp.name)
                if self.lowers is not None:  # nor an XDP program attached through a bpf_link
                    self.guard("timer", self.lowers.recheck_xdp, grp, group=grp.name)
                self.resync_due_ms[grp.name] = t + grp.cfg.address_resync_s * 1000
        if self.mc_pacer.take_due(t):  # changes coalesced since the last sync
            self.guard("timer", addrlists.sync_all, self.groups)

    def now_ms(self) -> int:
        return self.clock.monotonic_ns() // 1_000_000

    # -- control requests ---------------------------------------------------------------------
    def reconcile(self) -> None:
        """Full re-read of links and addresses; never trust a missed event (kernel.py)."""
        kernel.reconcile(self)

    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.requests is not None
        reply = self.requests.handle(req)
        # What was logged before a reply is in the log when the reply arrives (the writer
        # thread may lag the loop); a stuck stderr delays a request at most 50 ms, no switch.
        flush(0.05)
        return reply

    def status(self) -> dict[str, Any]:
        """The control socket's status: the snapshot as of this request, counters read now."""
        assert self.dp is not None
        return counters.read(self.publish(), self.dp).to_json()

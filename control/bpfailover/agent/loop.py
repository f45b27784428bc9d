"""failoverd: keeps each group's active lower right, from rtnetlink events, with no polling.

One thread runs everything that writes: link events, hold-down timers, peer
notifications and control requests are served from one selector loop, so the
maps have a single writer and no locks.  On a switch the map is written first;
logging, carrier, GARP come after.  The metrics endpoint only reads.

This module is the loop: start-up, the selector, timers, the netlink socket (reconnected
and everything re-read when it fails), pins removed by hand, shutdown.  What it dispatches
to: lowers.py (link events), switch.py (decisions and what follows), requests.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

from bpfailover import policy
from bpfailover.agent import setup
from bpfailover.agent import status as statusmod
from bpfailover.agent.fault import Fault
from bpfailover.agent.lowers import Lowers, sync_mc
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
from bpfailover.agent.requests import Requests
from bpfailover.agent.switch import Decide, Switcher
from bpfailover.datapath import counters
from bpfailover.datapath.attach import Wiring
from bpfailover.datapath.doorbell import Doorbell
from bpfailover.datapath.loader import LoadError
from bpfailover.datapath.maps import Datapath, DatapathError
from bpfailover.effects import sched
from bpfailover.effects.ethtool import link_speed
from bpfailover.events import netlink
from bpfailover.events.pinwatch import PinWatch
from bpfailover.model import config as configmod
from bpfailover.model.groups import Group, Switch
from bpfailover.model.status import AgentStatus
from bpfailover.ops import sdnotify
from bpfailover.ops.api import ControlServer, SocketInUse
from bpfailover.ops.eventlog import event

AgentError = setup.AgentError


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
    ) -> None:
        self.cfg = cfg
        self.open_datapath, self.make_wiring = datapath, wiring
        self.links: LinkSource = links or Netlink()
        self.clock: Clock = clock or SystemClock()
        self.speed, self.decide = speed, decide
        self.groups: dict[str, Group] = {}
        self.dp: Datapath | None = None
        self.wiring: Wiring | None = None
        self.events: EventSource | None = None
        self.control: ControlServer | None = None
        self.addrs: dict[int, set[tuple[int, str]]] = {}  # ifindex -> {(family, address)}
        self.sel = selectors.DefaultSelector()
        # Signals come in through this pipe (signal.set_wakeup_fd: the C handler writes the
        # signal's number), and stop() writes a 0: the loop acts on them between events, not
        # in a handler that interrupts a switch half done.  A handler alone would not end a
        # select() with no timers either (PEP 475 retries it).
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wakeup")
        # SIGHUP: where the new config comes from (None: nothing to reload, e.g. --lab)
        self.load_config: Callable[[], configmod.Config] | None = None
        self.exporter: Any = None  # the metrics exporter, restarted when metrics.listen changes
        # Errors the loop survived, by where they happened: failover_agent_errors_total.
        self.errors: Counter[str] = Counter()
        self.reconcile_due_ms: int | None = None  # a failed full re-read, tried again
        # systemd's watchdog, kept alive from this loop (a stalled loop stops the pings)
        self.watchdog_ms = sdnotify.watchdog_interval_ms()
        self.watchdog_due_ms: int | None = None
        self.stopping = False
        self.started_at = self.clock.time()
        self.scheduling = "other"  # the event loop's policy, for status
        self.pinwatch: PinWatch | None = None
        self.repin_due_ms: int | None = None
        self.doorbell: Doorbell | None = None  # the datapath rings it: address lists changed
        self.resync_due_ms: dict[str, int] = {}  # group -> next re-read of its address lists
        self.fault = Fault.from_env()  # TEST-ONLY: None outside the fault suite
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
        self._open_datapath()
        assert self.dp is not None and self.wiring is not None
        self._load_addrs()
        self._build_jobs(self.dp, self.wiring)
        for gcfg in self.cfg.groups:
            self.groups[gcfg.name] = setup.setup_group(gcfg, links, self.dp, self.wiring)
        if self.fault is not None:
            self.fault.fire("adopt")  # TEST-ONLY: adopted, not yet reconciled
        links = {link.ifindex: link for link in self.links.dump_links()}  # with the new devices
        assert self.lowers is not None and self.switch is not None
        for grp in self.groups.values():
            self.lowers.reconcile_group(grp, links, self.clock.monotonic_ns())
            if grp.last_switch is None:
                self.switch.renotify(grp)
        self.sel.register(self.events, selectors.EVENT_READ, "netlink")
        self._open_doorbell()
        for grp in self.groups.values():
            if grp.cfg.address_resync_s:
                self.resync_due_ms[grp.name] = self._now_ms() + grp.cfg.address_resync_s * 1000
        if self.pinwatch is not None:
            self.sel.register(self.pinwatch, selectors.EVENT_READ, "pins")
        assert self.control is not None
        self.control.register(self.sel)
        self.publish()
        event("started", groups=list(self.groups), pin_dir=self.cfg.bpffs, pid=os.getpid())

    def _build_jobs(self, dp: Datapath, wiring: Wiring) -> None:
        self.switch = Switcher(dp, wiring, self.addrs, self.clock, self.fault, self.decide)
        self.switch.on_switch = self._on_switch
        self.lowers = Lowers(
            self.groups, dp, wiring, self.switch, self.addrs, self.clock, self.speed
        )
        self.requests = Requests(
            self.groups, dp, wiring, self.switch, self.addrs, self.status, self.clock
        )

    def _open_datapath(self) -> None:
        try:
            self.dp = self.open_datapath(self.cfg.bpffs)
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
        self.wiring = self.make_wiring(self.dp)

    def _open_doorbell(self) -> None:
        """The datapath rings fo_events when an IGMP/MLD message leaves a failover device:
        its address lists changed (kernels before 6.13 announce no multicast change)."""
        assert self.dp is not None
        fd = self.dp.fds.get("fo_events")
        if fd is None:
            return
        try:
            self.doorbell = Doorbell(fd)
        except OSError as e:
            event("doorbell_error", error=str(e), action="address lists synced on other events")
            return
        self.sel.register(self.doorbell, selectors.EVENT_READ, "doorbell")

    def _on_doorbell(self) -> None:
        assert self.doorbell is not None
        if self.doorbell.drain():
            for grp in self.groups.values():
                sync_mc(grp)

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

    def _load_addrs(self) -> None:
        self.addrs.clear()  # in place: the jobs hold this dict
        for a in self.links.dump_addrs():
            self.addrs.setdefault(a.ifindex, set()).add((a.family, a.address))

    # -- the loop -------------------------------------------------------------------------
    def publish(self) -> AgentStatus:
        """A new snapshot of what the agent knows now, swapped in for the readers."""
        self.snapshot = statusmod.snapshot(self.groups.values(), self.started_at, self.scheduling)
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
        for key, _mask in self.sel.select(timeout):
            if key.data == "netlink":
                self._guard("netlink", self._on_netlink)
                if self.on_batch is not None:
                    self.on_batch()
            elif key.data == "pins":
                self._guard("pins", self._on_pins)
            elif key.data == "doorbell":
                self._guard("doorbell", self._on_doorbell)
            elif key.data == "wakeup":
                self._on_wakeup()
            elif self.control is not None:
                self._guard("control", self.control.on_ready, key)
        self._run_timers()
        self._guard("publish", self.publish)  # after the switch and its effects

    def _guard(self, where: str, fn: Callable[..., Any], *args: Any, group: str = "") -> bool:
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
        failover device created or adopted, reconciled and forwarding."""
        sdnotify.notify(
            f"READY=1\nSTATUS=serving {len(self.groups)} group(s)\nMAINPID={os.getpid()}"
        )
        if self.watchdog_ms is not None:
            sdnotify.notify("WATCHDOG=1")
            self.watchdog_due_ms = self._now_ms() + self.watchdog_ms

    def signal_fd(self) -> int:
        """For signal.set_wakeup_fd: the write end of the loop's wake-up pipe."""
        return self._wake_w

    def _on_wakeup(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                event("signal", signal=signal.Signals(signum).name, action="stopping")
                sdnotify.notify("STOPPING=1")
                self.stopping = True
            elif signum == signal.SIGHUP:
                self._guard("reload", self.reload)
            elif signum == 0:
                self.stopping = True  # stop()

    def stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):  # full (already woken) or closed
            os.write(self._wake_w, b"\0")

    # -- SIGHUP ---------------------------------------------------------------------------
    def reload(self) -> None:
        """Read the config again and apply what can change live: each group's policy and
        notify settings, metrics.listen, log.level.  Anything else changed refuses the whole
        reload with one line naming the keys (restart failoverd for those); a config that
        does not load is refused the same way.  Never stops the agent."""
        if self.load_config is None:
            event("reload_refused", why="no config file to read again (--lab)")
            return
        try:
            new = self.load_config()
            configmod.check_host(new)
        except configmod.ConfigError as e:
            event("reload_refused", error=str(e).replace("\n", "; "), action="config unchanged")
            return
        fixed = configmod.fixed_changes(self.cfg, new)
        if fixed:
            event(
                "reload_refused",
                keys=fixed,
                why="cannot change while running: restart failoverd",
                action="config unchanged",
            )
            return
        old, self.cfg = self.cfg, new
        changed = configmod.live_changes(old, new)
        assert self.switch is not None
        for gnew in new.groups:
            grp = self.groups.get(gnew.name)
            if grp is None:  # torn down meanwhile
                continue
            grp.cfg = gnew
            grp.pcfg = policy.PolicyConfig.from_settings(gnew.policy)
            assert self.wiring is not None
            self.wiring.set_dp_hold(grp.gid, gnew.policy.downdelay_ms > 0)
            self._guard(
                "reload",
                self.switch.decide,
                grp,
                self.clock.monotonic_ns(),
                "reload",
                group=grp.name,
            )
        if new.log.level != old.log.level:
            logging.getLogger().setLevel(new.log.level.upper())
        if new.metrics.listen != old.metrics.listen:
            self._restart_metrics(new.metrics.address)
        event("reloaded", changed=changed)

    def _restart_metrics(self, address: tuple[str, int] | None) -> None:
        from bpfailover.ops import metrics

        if self.exporter is not None:
            self.exporter.stop()
            self.on_switch = self.exporter.prev_on_switch
            self.exporter = None
        self.exporter = metrics.serve(self, address)

    def close(self) -> None:
        """Stop serving; the pinned datapath keeps forwarding."""
        started = self.control is not None
        if self.control is not None:
            self.control.close()
        if self.events is not None:
            self.events.close()
        if self.pinwatch is not None:
            self.pinwatch.close()
        if self.doorbell is not None:
            self.doorbell.close()
        if self.wiring is not None:
            self.wiring.close()
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
        due += self.resync_due_ms.values()
        if self.reconcile_due_ms is not None:
            due.append(self.reconcile_due_ms)
        if self.watchdog_due_ms is not None:
            due.append(self.watchdog_due_ms)
        if not due:
            return None  # event driven: nothing to do until the kernel says something
        return max(0.0, (min(due) - self._now_ms()) / 1000)

    def _run_timers(self) -> None:
        assert self.switch is not None
        t = self._now_ms()
        if self.repin_due_ms is not None and self.repin_due_ms <= t:
            self._guard("pins", self._repin)
            self.repin_due_ms = None
        if self.reconcile_due_ms is not None and self.reconcile_due_ms <= t:
            self.reconcile()
        if self.watchdog_due_ms is not None and self.watchdog_due_ms <= t:
            assert self.watchdog_ms is not None
            sdnotify.notify("WATCHDOG=1")
            self.watchdog_due_ms = t + self.watchdog_ms
        for grp in list(self.groups.values()):
            if grp.deadline_ms is not None and grp.deadline_ms <= t:
                ok = self._guard(
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
            if due and not self._guard("notify", self.switch.notify_peers, grp, t, group=grp.name):
                grp.notify_due = []  # a notification that fails this way is dropped
            resync = self.resync_due_ms.get(grp.name)
            if resync is not None and resync <= t:
                # what no event announces: `ip maddr add`, packet sockets
                self._guard("timer", sync_mc, grp, group=grp.name)
                self.resync_due_ms[grp.name] = t + grp.cfg.address_resync_s * 1000

    def _on_netlink(self) -> None:
        assert self.events is not None and self.lowers is not None
        t_ns = self.clock.monotonic_ns()
        if self.fault is not None:
            self.fault.fire("netlink-read")  # TEST-ONLY
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
                    self.lowers.on_link(ev, t_ns)
                elif isinstance(ev, netlink.Addr):
                    self.lowers.on_addr(ev)
                else:
                    self.lowers.on_mcast(ev.ifindex)
            except Exception as e:  # one bad event (a device gone meanwhile) must not kill us
                self.errors["event"] += 1
                event(
                    "event_error",
                    error=f"{type(e).__name__}: {e}",
                    ifindex=getattr(ev, "ifindex", None),
                    count=self.errors["event"],
                    action="full re-read in 1 s",
                )
                if self.reconcile_due_ms is None:  # what that event should have done
                    self.reconcile_due_ms = self._now_ms() + 1000

    def _now_ms(self) -> int:
        return self.clock.monotonic_ns() // 1_000_000

    # -- pins removed by hand ------------------------------------------------------------------
    def _on_pins(self) -> None:
        assert self.pinwatch is not None
        pin_gone, dir_gone = self.pinwatch.read()
        if dir_gone:
            self._repin()  # `rm -r` is done: put everything back now
        elif pin_gone and self.repin_due_ms is None:
            # a pin went: maybe the start of an `rm -r`; let it finish rather than fight it
            self.repin_due_ms = self._now_ms() + 500

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

    # -- netlink lost -------------------------------------------------------------------------
    def _reconnect_netlink(self, err: OSError) -> None:
        old = self.events
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(old)  # type: ignore[arg-type]
        if old is not None:
            old.close()
        self.events = self.links.subscribe()  # subscribe before the dump, as at start
        self.sel.register(self.events, selectors.EVENT_READ, "netlink")
        event("netlink_reconnected", error=str(err), action="re-dump and reconcile")
        self.reconcile()

    def reconcile(self) -> None:
        """Full re-read of links and addresses; never trust a missed event.  If the dump
        itself fails (devices vanishing under a link storm), it is tried again shortly; a
        group that fails does not stop the others."""
        assert self.lowers is not None
        self.reconcile_due_ms = None
        try:
            links = {link.ifindex: link for link in self.links.dump_links()}
            self._load_addrs()
        except Exception as e:
            self.error("reconcile", e)
            self.reconcile_due_ms = self._now_ms() + 200
            return
        for grp in list(self.groups.values()):
            self._guard(
                "reconcile",
                self.lowers.reconcile_group,
                grp,
                links,
                self.clock.monotonic_ns(),
                group=grp.name,
            )

    # -- control requests ---------------------------------------------------------------------
    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.requests is not None
        return self.requests.handle(req)

    def status(self) -> dict[str, Any]:
        """The control socket's status: the snapshot as of this request, counters read now."""
        assert self.dp is not None
        return counters.read(self.publish(), self.dp).to_json()

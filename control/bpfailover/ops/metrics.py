"""Prometheus exporter of failoverd (metric names: docs/operators.md).

Every scrape builds the metrics fresh: counters are summed from the per-CPU
maps through the exporter's *own* file descriptors of the pinned maps; lowers
and switches come from the agent's latest status snapshot (`agent.snapshot`,
frozen, replaced whole by the agent thread: one reference read, no lock, no
copy).  The agent thread is the single writer; the exporter only reads, so a
scrape never blocks a switch.  Switch latencies come from the agent's `on_switch` hook, which only
appends to a deque (atomic under the GIL) that the scrape drains into the
histogram.

If the listen address cannot be bound, the exporter logs one
`metrics_unavailable` event and the agent keeps forwarding without it:
failover matters more than its metrics (and `failover_build_info` missing
from Prometheus, `up == 0`, says so).

The HTTP side is bounded: at most MAX_CONNECTIONS connections (threads) at once,
each with CONN_TIMEOUT_S per socket operation and as its whole lifetime (a client
trickling one byte a second is cut at the deadline, not kept alive by each byte);
a connection over the cap is closed at once.  It listens on 127.0.0.1 unless
`metrics.listen` says otherwise.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from prometheus_client import exposition as ex
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bpfailover.datapath import counters
from bpfailover.datapath.layout import ROLE_SLOTS
from bpfailover.model.status import AgentStatus, GroupStatus, LowerCounters
from bpfailover.policy import SWITCH_REASONS

log = logging.getLogger("bpfailover.metrics")

# Where the agent counts the errors it survives (agent.errors), exported from 0.
ERROR_PLACES = (
    "event",
    "netlink",
    "timer",
    "notify",
    "reconcile",
    "control",
    "pins",
    "doorbell",
    "reload",
)
MAX_CONNECTIONS = 16  # scrapes in flight (one thread each); Prometheus needs one or two
CONN_TIMEOUT_S = 5.0  # per socket operation, and the whole life of a connection

# link event -> map written: tens of microseconds on the raw-netlink path, ms with pyroute2
BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


def build_version() -> str:
    try:
        return version("bpfailover")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Histogram:
    """Cumulative histogram of switch latencies per device (counts never go down)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, v: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if v <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += v

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip((*[repr(b) for b in BUCKETS], "+Inf"), self.counts, strict=True):
            acc += n
            out.append((bound, float(acc)))
        return out


class StatusSource(Protocol):
    """What the exporter reads of the agent (the Agent has it)."""

    @property
    def snapshot(self) -> AgentStatus: ...
    @property
    def dp(self) -> Any: ...


class FailoverCollector(Collector):
    """Reads the agent's status snapshot and its own handle on the pinned maps at each
    scrape."""

    def __init__(self, agent: StatusSource, dp: Any = None) -> None:
        self.agent = agent
        self.dp = dp  # a Datapath of our own (own fds); None: the agent's (tests)
        self.pending: deque[tuple[str, float]] = deque()
        self.hist: dict[str, Histogram] = {}
        self.lock = threading.Lock()  # scrapes among themselves; the agent never takes it
        self.version = build_version()
        for grp_name, lat in _initial_latencies(agent):
            self.pending.append((grp_name, lat))

    # called in the agent thread on every switch: O(1), no lock, no I/O
    def on_switch(self, grp: Any, sw: Any) -> None:
        self.pending.append((grp.name, sw.latency_s))

    def _drain(self) -> None:
        while True:
            try:
                name, lat = self.pending.popleft()
            except IndexError:
                return
            self.hist.setdefault(name, Histogram()).observe(lat)

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            yield from self._collect()

    def _collect(self) -> Iterator[Metric]:
        self._drain()
        dp = self.dp or self.agent.dp
        # one reference read (a consistent picture), then the counters as they are now
        groups = counters.read(self.agent.snapshot, dp).groups
        info = GaugeMetricFamily("failover_build_info", "bpfailover build", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        errors = CounterMetricFamily(
            "failover_agent_errors",
            "errors the event loop survived (logged as agent_error/event_error), by where: "
            + ", ".join(ERROR_PLACES),
            labels=["where"],
        )
        seen = self.agent.snapshot.errors  # published by the agent thread, read-only here
        for where in sorted({*ERROR_PLACES, *seen}):
            errors.add_metric([where], seen.get(where, 0))
        yield errors

        active = GaugeMetricFamily(
            "failover_lower_active",
            "1 for the lower the datapath transmits through (lower=none: no usable lower); "
            "exactly one is 1 per device",
            labels=["device", "lower", "role"],
        )
        up = GaugeMetricFamily(
            "failover_lower_up",
            "1 if the lower is usable (admin up, running, carrier)",
            labels=["device", "lower", "role"],
        )
        switches = CounterMetricFamily(
            "failover_switches", "switches of the active lower", labels=["device", "reason"]
        )
        last = GaugeMetricFamily(
            "failover_last_switch_timestamp_seconds",
            "wall time of the last switch",
            labels=["device"],
        )
        dur = HistogramMetricFamily(
            "failover_switch_duration_seconds",
            "link event received -> active-lower map written",
            labels=["device"],
        )
        ctr = {
            (d, k): CounterMetricFamily(
                f"failover_lower_{d}_{k}",
                f"{k} {d} through the lower by the datapath (summed over CPUs)",
                labels=["device", "lower"],
            )
            for d in ("transmit", "receive")
            for k in ("packets", "bytes")
        }
        drops = CounterMetricFamily(
            "failover_datapath_drops",
            "frames dropped by the datapath",
            labels=["device", "hook", "reason"],
        )
        attached = GaugeMetricFamily(
            "failover_datapath_attached",
            "1 if the program of the hook is attached where it must be (lower: the lower "
            "whose hook it is; empty for tc_egress, on the failover device or its peer)",
            labels=["device", "hook", "lower"],
        )
        speed = GaugeMetricFamily(
            "failover_lower_speed_mbps",
            "link speed of the lower as ethtool reports it (absent: unknown); `ethtool` on the "
            "failover device itself (a veth) always says 10000",
            labels=["device", "lower", "role"],
        )
        mac_restored = CounterMetricFamily(
            "failover_mac_restored",
            "times the failover device's MAC was changed by someone and put back",
            labels=["device"],
        )
        fallback = CounterMetricFamily(
            "failover_datapath_fallback_packets",
            "packets the datapath moved on its own while the active lower (from) was dead, "
            "before the agent switched (transmit: sent through `to`; receive: taken from it)",
            labels=["device", "from", "to", "direction"],
        )
        check = GaugeMetricFamily(
            "failover_datapath_check",
            "1 for the state of the per-packet lower check, 0 for the others (on; off/"
            "refused/probe_failed/mismatch: failover waits for the agent)",
            labels=["state"],
        )
        state = dp.datapath_check()
        # every state, the current one 1: `{state="on"} == 0` can fire
        for name in dict.fromkeys((*dp.L.names("FO_DPC_"), state)):
            check.add_metric([name], 1 if name == state else 0)
        lost = GaugeMetricFamily(
            "failover_redundancy_lost",
            "1 once fewer than two lowers have been usable for longer than the group's "
            "redundancy_grace_s: traffic flows, but the next failure cuts the guest off",
            labels=["device"],
        )
        now = time.time()
        attach_state = _attachments(groups, _our_prog_ids(self.agent))
        for g in groups:
            gid = g.gid
            assert gid is not None  # the agent's own snapshot always has it
            act_slot = dp.active(gid)
            found = False
            for lw in g.lowers:
                is_active = ROLE_SLOTS.get(lw.role) == act_slot
                found = found or is_active
                active.add_metric([g.name, lw.name, lw.role], 1 if is_active else 0)
                up.add_metric([g.name, lw.name, lw.role], 1 if lw.usable else 0)
                if lw.speed_mbps is not None:
                    speed.add_metric([g.name, lw.name, lw.role], lw.speed_mbps)
                c = lw.counters or LowerCounters()
                for (d, k), n in (
                    (("transmit", "packets"), c.tx_packets),
                    (("transmit", "bytes"), c.tx_bytes),
                    (("receive", "packets"), c.rx_packets),
                    (("receive", "bytes"), c.rx_bytes),
                ):
                    ctr[(d, k)].add_metric([g.name, lw.name], n)
            active.add_metric([g.name, "none", "none"], 0 if found else 1)
            mac_restored.add_metric([g.name], g.mac_restored)
            lost.add_metric([g.name], 1 if g.redundancy_lost(now) else 0)
            # every reason from 0: increase() then sees the first switch of each kind
            counts: dict[str, int] = {**dict.fromkeys(SWITCH_REASONS, 0), **g.switches}
            for reason, n in sorted(counts.items()):
                switches.add_metric([g.name, reason], n)
            if g.last_switch is not None:
                last.add_metric([g.name], g.last_switch.time)
            h = self.hist.get(g.name)
            if h is not None:
                dur.add_metric([g.name], h.buckets(), h.total)
            for key, n in (g.drops or {}).items():
                hook, reason = key.split("/", 1)
                drops.add_metric([g.name, hook, reason], n)
            for f in dp.fallback_summary(gid):
                for d, n in (("transmit", f["tx_packets"]), ("receive", f["rx_packets"])):
                    fallback.add_metric([g.name, f["from"], f["to"], d], n)
            for (hook, lower), ok in attach_state.get(g.name, {}).items():
                attached.add_metric([g.name, hook, lower], 1 if ok else 0)
        yield from (active, up, switches, last, dur, *ctr.values(), drops, fallback, check)
        yield from (attached, speed, mac_restored, lost)


def _initial_latencies(agent: StatusSource) -> Iterable[tuple[str, float]]:
    """Switches made before the exporter started (the start-up reconcile)."""
    for g in agent.snapshot.groups:
        if g.last_switch is not None:
            yield g.name, g.last_switch.latency_s


def _our_prog_ids(agent: Any) -> dict[str, int] | None:
    """The agent's own programs (by pin name): what must be attached, not just anything at
    our priority.  None if unknown (then any filter of ours counts)."""
    from bpfailover.datapath.loader import PROGS

    try:
        return {name: agent.dp.prog_id(name) for name in PROGS}
    except Exception:
        return None


def _attachments(
    groups: Iterable[GroupStatus], progs: dict[str, int] | None = None
) -> dict[str, dict[tuple[str, str], bool]]:
    """Whether our programs sit where they must: the transmit filter (hook `tc_egress`: on
    the hidden peer's ingress, and for tx_path direct on the failover device's egress too),
    ingress filter (and XDP, on the xdp receive path) on every registered lower.  "Our":
    the agent's own program ids, so another datapath's programs there count as 0.  Keyed
    by (hook, lower name): "" for the transmit filter, which is on no lower."""
    p = progs or {}
    tx_id, rx_id = p.get("prog_fo_egress"), p.get("prog_lower_ingress")
    xdp_id = p.get("prog_xdp_lower_rx")
    from pyroute2 import IPRoute

    from bpfailover.datapath import attach

    out: dict[str, dict[tuple[str, str], bool]] = {}
    try:
        with IPRoute() as ipr:  # our own netlink socket: the agent's is not shared
            for g in groups:
                peer = ipr.link_lookup(ifname=attach.peer_name(g.name))
                tx_ok = bool(peer) and attach.tc_attached(ipr, peer[0], "ingress", tx_id)
                if g.tx_path == "direct":
                    tx_ok = tx_ok and attach.tc_attached(ipr, g.ifindex, "egress", tx_id)
                st = {("tc_egress", ""): tx_ok}
                for lw in g.lowers:
                    st["tc_ingress", lw.name] = attach.tc_attached(
                        ipr, lw.ifindex, "ingress", rx_id
                    )
                    if g.rx_path == "xdp":
                        xid = attach.xdp_prog_id(ipr, lw.ifindex)
                        st["xdp", lw.name] = xid != 0 and (xdp_id is None or xid == xdp_id)
                out[g.name] = st
    except Exception as e:  # a device gone mid-scrape: report what we have
        log.debug("attachment check: %s", e)
    return out


class _Handler(ex._SilentHandler):
    timeout = CONN_TIMEOUT_S  # every recv/send (StreamRequestHandler.setup)


class _BoundedServer(ex.ThreadingWSGIServer):
    """A thread per connection, but at most MAX_CONNECTIONS of them, none older than
    CONN_TIMEOUT_S: the accepting thread shuts down the overdue ones (their thread's read
    fails and it ends) and closes a connection over the cap at once."""

    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._active: dict[Any, float] = {}
        self._mu = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        now = time.monotonic()
        with self._mu:
            for conn, t0 in list(self._active.items()):
                if now - t0 > CONN_TIMEOUT_S:
                    with suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
            full = len(self._active) >= self.max_connections
            if not full:
                self._active[request] = now
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._mu:
                self._active.pop(request, None)


class Exporter:
    """The running exporter: registry, collector, HTTP server thread."""

    def __init__(self, agent: Any, address: tuple[str, int], dp: Any = None) -> None:
        from prometheus_client import ProcessCollector

        self.collector = FailoverCollector(agent, dp)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self.address = address
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.prev_on_switch: Any = None

    def start(self) -> None:
        from wsgiref.simple_server import make_server

        class Server(_BoundedServer):
            pass

        host, port = self.address
        Server.address_family, host = ex._get_best_family(host, port)
        self.server = make_server(
            host, port, ex.make_wsgi_app(self.registry), Server, handler_class=_Handler
        )
        self.server.timeout = None
        self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        # handle_request() waits in select() with no timeout, so an idle agent is never
        # woken; prometheus_client's serve_forever() polls twice a second.
        with suppress(OSError, ValueError):
            while self.server is not None:
                self.server.handle_request()

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.server_close()


def serve(agent: Any, address: tuple[str, int] | None) -> Exporter | None:
    """Start the exporter in a daemon thread and return; never stops the agent."""
    if address is None:
        return None
    dp = None
    try:
        from bpfailover.datapath.maps import Datapath

        # our own fds, read-only: the exporter cannot write a map even by mistake
        dp = Datapath.open(agent.dp.pin_dir, load=False, read_only=True)
    except Exception as e:
        log.debug("own map handles failed (%s): sharing the agent's", e)
    exp = Exporter(agent, address, dp)
    try:
        exp.start()
    except (OSError, socket.gaierror) as e:
        log.error(
            "%s",
            json.dumps(
                {
                    "event": "metrics_unavailable",
                    "listen": list(address),
                    "error": str(e),
                    "action": "agent continues without metrics; fix metrics.listen",
                }
            ),
        )
        if dp is not None:
            with suppress(Exception):
                dp.close()
        return None
    prev = agent.on_switch
    exp.prev_on_switch = prev  # what a restarted exporter puts back

    def hook(grp: Any, sw: Any) -> None:
        exp.collector.on_switch(grp, sw)
        if prev is not None:
            prev(grp, sw)

    agent.on_switch = hook
    # A scrape thread holding the GIL delays the agent thread by up to the switch
    # interval (5 ms by default); 0.5 ms keeps a scrape from adding to a switch.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    log.info("%s", json.dumps({"event": "metrics", "listen": f"{address[0]}:{address[1]}"}))
    return exp

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

The HTTP side (HttpServer) is bounded and quiet: one selector thread reads and writes
every connection, a fixed pool of WORKERS threads builds responses; a connection has
CONN_TIMEOUT_S for its request head (a client trickling one byte a second is cut at the
deadline, not kept alive by each byte) and again for taking its response; at most
MAX_PENDING wait at once, the oldest making room for a new one.  Idle or resetting
clients cannot crowd a scrape out, and what goes wrong with a client is one JSON line
now and then, never a traceback.  It listens on 127.0.0.1 unless `metrics.listen` says
otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import socket
import sys
import threading
import time
from collections import Counter, deque
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
WORKERS = 2  # threads building responses (scrapes are serialised by the collector anyway)
MAX_PENDING = 128  # connections waiting for their request head; one more: the oldest goes
MAX_HEAD = 8192  # bytes of a request head (Prometheus sends a few hundred)
CONN_TIMEOUT_S = 5.0  # to send the request head; again, to take the response
LOG_EVERY_S = 60.0  # at most one line about dropped connections per this many seconds

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


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None  # the response, while it is being sent
    busy: bool = False  # a worker is building its response


class HttpServer:
    """The exporter's HTTP side: one selector thread does every read and write, WORKERS
    threads only build responses, so no client can hold a thread.

    A connection has CONN_TIMEOUT_S to send its request head and again to take the
    response (however slowly it trickles); at most MAX_PENDING wait for their head at
    once, and when one more comes the oldest of them makes room (served if its request
    is complete, else closed).  An idle connection costs a file descriptor, nothing else,
    and scrapes get in past any number of them.  A reset, a timeout, a request that is
    not HTTP: counted, and reported in one JSON line at most every LOG_EVERY_S, never a
    traceback."""

    def __init__(
        self,
        host: str,
        port: int,
        app: Any,
        *,
        workers: int = WORKERS,
        max_pending: int = MAX_PENDING,
        timeout: float = CONN_TIMEOUT_S,
    ) -> None:
        family, host = ex._get_best_family(host, port)
        self.app = app
        self.max_pending = max_pending
        self.timeout = timeout
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, "listen")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.conns: dict[socket.socket, _Conn] = {}  # in order of accept
        self.jobs: queue.Queue[tuple[_Conn, dict[str, str]] | None] = queue.Queue(max_pending)
        self.done: deque[tuple[_Conn, bytes]] = deque()  # workers' responses, to send
        self.closed = False
        self.dropped: Counter[str] = Counter()  # since the last log line
        self.last_error = ""
        self.logged_at = self.error_logged_at = -LOG_EVERY_S
        self.threads = [
            threading.Thread(target=self._worker, name=f"metrics-{i}", daemon=True)
            for i in range(workers)
        ]

    # -- the selector thread ------------------------------------------------------------
    def serve(self) -> None:
        for t in self.threads:
            t.start()
        try:
            while not self.closed:
                for key, _mask in self.sel.select(self._next_timeout()):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._take_responses()
                    elif key.data.sock not in self.conns:
                        continue  # dropped earlier in this round
                    elif key.data.out is not None:
                        self._write(key.data)
                    else:
                        self._read(key.data)
                self._expire()
        except (OSError, ValueError):
            if not self.closed:
                raise
        finally:
            for c in list(self.conns.values()):
                self._close(c)
            for _ in self.threads:
                self.jobs.put(None)  # never full for long: the workers are taking jobs
            for t in self.threads:
                t.join(2 * self.timeout)
            self.sel.close()
            if not any(t.is_alive() for t in self.threads):  # else a worker may still wake
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _next_timeout(self) -> float | None:
        due = [c.deadline for c in self.conns.values() if not c.busy]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _accept(self) -> None:
        for _ in range(64):  # a burst at a time: the connections already here get read too
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: make room, the client sees a reset
                self._note("accept", e)
                self._evict_oldest()
                return
            sock.setblocking(False)
            waiting = sum(1 for c in self.conns.values() if not c.busy and c.out is None)
            if waiting >= self.max_pending:
                self._evict_oldest()
            if len(self.conns) >= 2 * self.max_pending:  # the rest are taking responses
                sock.close()
                self._note("over_cap")
                continue
            c = _Conn(sock, time.monotonic() + self.timeout)
            self.conns[sock] = c
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _evict_oldest(self) -> None:
        oldest = next((c for c in self.conns.values() if not c.busy and c.out is None), None)
        if oldest is None:
            return
        self._read(oldest)  # a complete request is served, not dropped
        if oldest.sock in self.conns and not oldest.busy and oldest.out is None:
            self._drop(oldest, "evicted")

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(c, "reset", e)
            return
        if not data:
            self._drop(c, "no_request")
            return
        c.inbuf += data
        end = c.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = c.inbuf.find(b"\n\n")
        if end < 0:
            if len(c.inbuf) > MAX_HEAD:
                self._reply(c, "431 Request Header Fields Too Large", [], b"")
                self._note("bad_request")
            return
        environ = _environ(bytes(c.inbuf[:end]))
        if environ is None:
            self._reply(c, "400 Bad Request", [], b"")
            self._note("bad_request")
            return
        c.busy = True
        self.sel.unregister(c.sock)
        try:
            self.jobs.put_nowait((c, environ))
        except queue.Full:
            c.busy = False
            self._reply(c, "503 Service Unavailable", [], b"")
            self._note("busy")

    def _take_responses(self) -> None:
        with suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while self.done:
            c, response = self.done.popleft()
            c.busy = False
            if c.sock in self.conns:
                self._send(c, response)

    def _reply(self, c: _Conn, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        with suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        self._send(c, _response(status, headers, body))

    def _send(self, c: _Conn, response: bytes) -> None:
        c.out = memoryview(response)
        c.deadline = time.monotonic() + self.timeout
        self.sel.register(c.sock, selectors.EVENT_WRITE, c)
        self._write(c)

    def _write(self, c: _Conn) -> None:
        assert c.out is not None
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(c, "reset", e)
            return
        c.out = c.out[n:]
        if not c.out:
            # what the client sent beyond its head, read away: closing on unread bytes
            # would reset the connection, and the client could lose the response
            with suppress(OSError):
                for _ in range(16):
                    if not c.sock.recv(65536):
                        break
            self._close(c)

    def _expire(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.conns.values() if not c.busy and c.deadline <= now]:
            self._drop(c, "timeout")

    def _drop(self, c: _Conn, reason: str, error: BaseException | None = None) -> None:
        self._close(c)
        self._note(reason, error)

    def _close(self, c: _Conn) -> None:
        if self.conns.pop(c.sock, None) is not None:
            with suppress(KeyError, ValueError):
                self.sel.unregister(c.sock)
        c.sock.close()

    def _note(self, reason: str, error: BaseException | None = None) -> None:
        """Count a connection we gave up on; one line now and then, never one per client
        (a local user can open thousands a second; the journal has a rate limit)."""
        self.dropped[reason] += 1
        if error is not None:
            self.last_error = f"{type(error).__name__}: {error}"
        now = time.monotonic()
        if now - self.logged_at < LOG_EVERY_S:
            return
        self.logged_at = now
        line = {"event": "metrics_connections_dropped", **dict(sorted(self.dropped.items()))}
        if self.last_error:
            line["last_error"] = self.last_error
        line["next_report_within_s"] = LOG_EVERY_S
        log.warning("%s", json.dumps(line))
        self.dropped.clear()
        self.last_error = ""

    # -- workers: build responses, never touch a client's socket ------------------------
    def _worker(self) -> None:
        while (job := self.jobs.get()) is not None:
            c, environ = job
            self.done.append((c, self._call(environ)))
            with suppress(OSError):
                os.write(self._wake_w, b"x")

    def _call(self, environ: dict[str, str]) -> bytes:
        got: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> None:
            got[:] = [status, headers]

        try:
            body = b"".join(self.app(environ, start_response))
            status, headers = got
        except Exception as e:  # a scrape failing must not end the exporter, nor spam the log
            now = time.monotonic()
            if now - self.error_logged_at >= LOG_EVERY_S:
                self.error_logged_at = now
                error = f"{type(e).__name__}: {e}"
                log.error("%s", json.dumps({"event": "metrics_error", "error": error}))
            return _response("500 Internal Server Error", [], b"")
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""
        return _response(status, headers, body)

    def close(self) -> None:
        self.closed = True
        with suppress(OSError):
            os.write(self._wake_w, b"x")
        self.sock.close()


def _environ(head: bytes) -> dict[str, str] | None:
    """The WSGI environ prometheus_client's app reads, from a request head; None if it is
    not an HTTP request."""
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split() if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    method, target, _proto = parts
    path, _, query = target.partition("?")
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return None
        key = "HTTP_" + name.strip().upper().replace("-", "_")
        if key in ("HTTP_ACCEPT", "HTTP_ACCEPT_ENCODING"):
            env[key] = value.strip()
    return env


def _response(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = [f"HTTP/1.0 {status}"]
    head += [f"{k}: {v}" for k, v in headers if k.lower() not in ("content-length", "connection")]
    head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


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
        host, port = self.address
        self.server = HttpServer(host, port, ex.make_wsgi_app(self.registry))
        self.thread = threading.Thread(target=self.server.serve, name="metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()


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

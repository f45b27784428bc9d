"""Metrics under load: does a busy or abused metrics port slow a switch?

One group, failoverd with metrics on 127.0.0.1:9617 in the guest. Two phases in the same
run, each a paced flap storm of the primary (its far end down/up, `toggles` changes, one
every `interval` s):
  quiet  nothing else;
  load   2,000 TCP connections to the metrics port kept open (re-opened when the agent
         closes them: it serves at most 16 and cuts each after 5 s), and 50 threads
         scraping /metrics back to back.
Measured per phase: the agent's own event -> map-write latency of every switch (p50, p99,
max), the agent's thread count (sampled every 20 ms, max), scrapes answered / refused.
The figure of merit is p99(load) / p99(quiet), measured in the same run.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.common import LinkSetter, lab_run, log, summary, table
from bpfailover import netns

PORT = 9617
IDLE_CONNECTIONS = 2000
SCRAPERS = 50


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """The agent's thread count every 20 ms until stopped; keeps the max."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.max, self.stop_ = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop_.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.max = max(self.max, threads_of(self.pid))
            self.stop_.wait(0.02)


class Load:
    """2,000 idle connections kept open and 50 scrapers, all inside the guest netns."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.stop_ = threading.Event()
        self.ok = self.failed = self.reopened = 0
        self.mu = threading.Lock()
        self.threads = [threading.Thread(target=self._idlers, daemon=True)]
        self.threads += [
            threading.Thread(target=self._scrape, daemon=True) for _ in range(SCRAPERS)
        ]
        self.open_at_end = 0

    def __enter__(self) -> Load:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = IDLE_CONNECTIONS + SCRAPERS + 256
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_.set()
        for t in self.threads:
            t.join(15)

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", PORT))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(err, "connect")
        return s

    def _idlers(self) -> None:
        with netns.entered(self.ns):
            conns: list[socket.socket | None] = [None] * IDLE_CONNECTIONS
            while not self.stop_.is_set():
                for i, s in enumerate(conns):
                    if s is not None:
                        try:
                            if s.recv(1) != b"":
                                continue  # (the agent never sends unasked)
                        except BlockingIOError:
                            continue  # still open, nothing to read: idle as meant
                        except OSError:
                            pass
                        s.close()
                        self.reopened += 1
                    try:
                        conns[i] = self._connect()
                    except OSError:
                        conns[i] = None
                self.stop_.wait(0.2)
            self.open_at_end = sum(1 for s in conns if s is not None)
            for s in conns:
                if s is not None:
                    s.close()

    def _scrape(self) -> None:
        with netns.entered(self.ns):
            while not self.stop_.is_set():
                c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
                try:
                    c.request("GET", "/metrics")
                    r = c.getresponse()
                    good = r.status == 200 and b"failover_" in r.read()
                except (OSError, http.client.HTTPException):
                    good = False
                finally:
                    c.close()
                with self.mu:
                    if good:
                        self.ok += 1
                    else:
                        self.failed += 1
                if not good:
                    self.stop_.wait(0.01)  # refused at the cap: try again soon


def storm(lab: Any, agent: Any, toggles: int, interval: float) -> dict[str, Any]:
    n = lab.names(0)
    far = LinkSetter(lab.hv)
    n0 = len(agent.events("switch"))
    sampler = Sampler(agent.pid)
    sampler.start()
    t0 = time.monotonic()
    try:
        for k in range(toggles):
            far.set(n.vfport, k % 2 == 1)  # down, up, down, ...
            time.sleep(interval)
        if toggles % 2:
            far.set(n.vfport, True)
        agent.wait_active(n.primary)
        time.sleep(0.3)
    finally:
        far.close()
        sampler.stop_.set()
        sampler.join()
    lat = [e["latency_us"] for e in agent.events("switch")[n0:]]
    return {
        "toggles": toggles,
        "seconds": time.monotonic() - t0,
        "switches": len(lat),
        "latency_us": summary(lat),
        "latency_samples_us": lat,
        "threads_max": sampler.max,
    }


def run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    toggles, interval = (100, 0.02) if quick else (300, 0.02)
    with lab_run("ml") as lr:
        agent = lr.agent(settings={"metrics": {"listen": f"127.0.0.1:{PORT}"}}).start()
        lr.lab.address_failover(0)
        time.sleep(0.5)
        threads_idle = threads_of(agent.pid)
        quiet = storm(lr.lab, agent, toggles, interval)
        with Load(lr.lab.guest) as load:
            time.sleep(2.0)  # the connections are up, the scrapers going
            loaded = storm(lr.lab, agent, toggles, interval)
        loaded["scrapes_ok"], loaded["scrapes_refused"] = load.ok, load.failed
        loaded["idle_connections_reopened"] = load.reopened
        loaded["idle_connections_open_at_end"] = load.open_at_end
        alive = agent.proc is not None and agent.proc.poll() is None
    p99q, p99l = quiet["latency_us"].get("p99"), loaded["latency_us"].get("p99")
    out = {
        "toggles": toggles,
        "interval_s": interval,
        "idle_connections": IDLE_CONNECTIONS,
        "scrapers": SCRAPERS,
        "threads_idle": threads_idle,
        "quiet": quiet,
        "load": loaded,
        "p99_ratio": (p99l / p99q) if p99q and p99l else None,
        "agent_alive": alive,
    }
    rows = [
        [
            name,
            r["switches"],
            r["latency_us"].get("p50"),
            r["latency_us"].get("p99"),
            r["latency_us"].get("max"),
            r["threads_max"],
            r.get("scrapes_ok", "-"),
            r.get("scrapes_refused", "-"),
        ]
        for name, r in (("quiet", quiet), ("load", loaded))
    ]
    print(
        f"\n== metrics under load: {IDLE_CONNECTIONS} idle connections + {SCRAPERS} scrapers "
        f"during a flap storm ({toggles} toggles, {interval * 1e3:g} ms apart)"
    )
    print(
        table(
            [
                "phase",
                "switches",
                "agent us p50",
                "agent us p99",
                "agent us max",
                "threads max",
                "scrapes ok",
                "scrapes refused",
            ],
            rows,
        )
    )
    ratio = out["p99_ratio"]
    log(f"  p99 load/quiet {ratio:.2f}" if ratio else "  p99 ratio n/a")
    common.save("metrics_load", out, meta)
    return out

"""What failoverd costs: start-up, memory, CPU at idle, memory after many events.

cold start   no pins: spawn -> first UDP packet from the guest's failover address seen
             by the peer (bcc compile in the loader child included; the address is added
             the moment the failover device appears, as networkd would), and -> ready
             (control socket answers with every group)
warm start   pins present (after SIGTERM): spawn -> ready (forwarding never stopped)
RSS          after start; after E carrier events (1 h at 1 event/s, compressed)
idle CPU     utime+stime and context switches over a quiet interval, without and with
             the Prometheus endpoint
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

from bench import common
from bench.common import (
    LinkSetter,
    lab_run,
    log,
    proc_cpu_s,
    proc_ctxsw,
    proc_rss_kb,
    summary,
    table,
)
from bench.stream import Stream
from bpfailover import netns
from bpfailover.events import netlink

EVENT_GAP_S = 0.02  # 50 events/s: what the agent keeps up with (each GARP costs ~16 ms)


def _wait_settled(agent: Any, lower: str, timeout: float) -> None:
    """Until the agent answers again and the primary is active (it may lag a storm)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if agent.group(0)["active_lower"] == lower:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"agent did not settle within {timeout}s")


def _address_when_created(lab: Any, stop: threading.Event) -> threading.Thread:
    """Add the guest address as soon as the failover device appears (event driven)."""
    name = lab.names(0).failover
    with netns.entered(lab.guest):
        sock = netlink.EventSocket()

    def run() -> None:
        try:
            while not stop.is_set():
                r, _, _ = select.select([sock], [], [], 0.1)
                if r and any(
                    isinstance(e, netlink.Link) and e.ifname == name and not e.deleted
                    for e in sock.read()
                ):
                    lab.address_failover(0)
                    return
        finally:
            sock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def cold_start(tag: str) -> dict[str, Any]:
    with lab_run(tag) as lr:
        lab, n = lr.lab, lr.lab.names(0)
        stop = threading.Event()
        watcher = _address_when_created(lab, stop)
        st = Stream(lab.guest, n.guest_v4, lab.peer, n.peer_v4, 1000, 5.0)
        try:
            agent = lr.agent()
            time.sleep(max(0.0, (st.t0 - time.monotonic_ns()) / 1e9))
            agent.start()
            rss = proc_rss_kb(agent.pid)
            res = st.result()
        finally:
            stop.set()
            st.close()
            watcher.join(timeout=1)
        spawn_ns = int(agent.t_spawn * 1e9)
        arr = res.a_to_b.arr_t
        first = next((t for t in arr if t >= spawn_ns), None)
        return {
            "to_ready_s": agent.t_ready - agent.t_spawn,
            "to_first_packet_s": None if first is None else (first - spawn_ns) / 1e9,
            "rss_kb": rss,
        }


def run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    colds, warms = (1, 1) if quick else (3, 5)
    idle_s = 10.0 if quick else 60.0
    n_events = 300 if quick else 3600
    out: dict[str, Any] = {"idle_s": idle_s, "events": n_events}
    out["cold"] = [cold_start("ac") for _ in range(colds)]
    log(f"  cold starts: {[round(c['to_first_packet_s'] or -1, 2) for c in out['cold']]} s")
    with lab_run("aw") as lr:
        lab, n = lr.lab, lr.lab.names(0)
        agent = lr.agent().start()
        lab.address_failover(0)
        warm = []
        for _ in range(warms):
            agent.stop()
            agent.start()
            warm.append(agent.t_ready - agent.t_spawn)
        out["warm_to_ready_s"] = summary(warm)
        time.sleep(1.0)
        pid = agent.pid
        out["rss_after_start_kb"] = proc_rss_kb(pid)
        # idle
        c0, x0 = proc_cpu_s(pid), proc_ctxsw(pid)
        time.sleep(idle_s)
        out["idle"] = {
            "cpu_s": proc_cpu_s(pid) - c0,
            "ctxsw": proc_ctxsw(pid) - x0,
            "cpu_pct": (proc_cpu_s(pid) - c0) / idle_s * 100,
        }
        log(f"  idle {idle_s:g}s: {out['idle']}")
        # events: carrier flaps of the primary, each one a switch + GARP
        hv = LinkSetter(lab.hv)
        c0 = proc_cpu_s(pid)
        t0 = time.monotonic()
        try:
            for i in range(n_events):
                hv.set(n.vfport, i % 2 == 1)
                time.sleep(EVENT_GAP_S)
            hv.set(n.vfport, True)
        finally:
            hv.close()
        _wait_settled(agent, n.primary, timeout=120)
        time.sleep(0.5)
        out["events_wall_s"] = time.monotonic() - t0
        out["events_cpu_s"] = proc_cpu_s(pid) - c0
        out["cpu_us_per_event"] = out["events_cpu_s"] / n_events * 1e6
        out["rss_after_events_kb"] = proc_rss_kb(pid)
        out["switches_logged"] = len(agent.events("switch"))
        # idle with the metrics endpoint on
        agent.stop()
        lr.agents.remove(agent)
        m = lr.agent(name=agent.name)
        m.config["metrics"] = {"listen": "127.0.0.1:9617"}
        import yaml

        m.config_path.write_text(yaml.safe_dump(m.config))
        m.start()
        time.sleep(1.0)
        pid = m.pid
        c0, x0 = proc_cpu_s(pid), proc_ctxsw(pid)
        time.sleep(idle_s)
        out["idle_with_metrics"] = {
            "cpu_s": proc_cpu_s(pid) - c0,
            "ctxsw": proc_ctxsw(pid) - x0,
            "cpu_pct": (proc_cpu_s(pid) - c0) / idle_s * 100,
        }
        out["rss_with_metrics_kb"] = proc_rss_kb(pid)
    cold_fp = [c["to_first_packet_s"] for c in out["cold"] if c["to_first_packet_s"] is not None]
    out["cold_summary"] = {
        "to_first_packet_s": summary(cold_fp),
        "to_ready_s": summary([c["to_ready_s"] for c in out["cold"]]),
    }
    rows = [
        [
            "cold start -> first forwarded packet (s, p50)",
            out["cold_summary"]["to_first_packet_s"].get("p50"),
        ],
        ["cold start -> ready (s, p50)", out["cold_summary"]["to_ready_s"].get("p50")],
        ["warm start (pins present) -> ready (s, p50)", out["warm_to_ready_s"].get("p50")],
        ["RSS after start (MiB)", out["rss_after_start_kb"] / 1024],
        [f"RSS after {n_events} events (MiB)", out["rss_after_events_kb"] / 1024],
        ["CPU per carrier event (us)", out["cpu_us_per_event"]],
        [f"idle CPU over {idle_s:g}s (%)", out["idle"]["cpu_pct"]],
        [f"idle context switches over {idle_s:g}s", out["idle"]["ctxsw"]],
        ["idle CPU with metrics endpoint (%)", out["idle_with_metrics"]["cpu_pct"]],
        ["idle ctx switches with metrics endpoint", out["idle_with_metrics"]["ctxsw"]],
    ]
    print("\n== agent cost (failoverd, 1 group)")
    print(table(["what", "value"], rows))
    common.save("agent_cost", out, meta)
    return out

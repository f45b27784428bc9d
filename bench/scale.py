"""Scale: 1, 8, 32 groups in one guest, one failoverd.

Per size: lab set-up time, agent cold start -> ready, RSS, and a flap storm: every
group's primary carrier dropped at once (all requests sent back to back on one rtnetlink
socket), then raised at once, R rounds. Measured: the agent's own event -> map-write
latency for every switch, and, from outside, request -> map written for each group (the
bench polls the pinned fo_active map every ~50 us), i.e. how long the last group waits.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from bench import common, plots
from bench.common import LinkSetter, lab_run, log, median, proc_rss_kb, summary, table
from bpfailover.datapath import bpfsys


def _storm(lab: Any, agent: Any, gids: list[int], fo_active: int, up: bool) -> list[float]:
    hv = LinkSetter(lab.hv)
    want = 2 if up else 1  # FO_SLOT_PRIMARY / FO_SLOT_STANDBY
    try:
        t0 = time.monotonic_ns()
        for i in range(lab.groups):
            hv.send(lab.names(i).vfport, up)
        pending = set(gids)
        done: dict[int, int] = {}
        deadline = t0 + 10 * 10**9
        while pending and time.monotonic_ns() < deadline:
            for g in list(pending):
                raw = bpfsys.map_lookup(fo_active, struct.pack("=I", g), 4)
                if raw and struct.unpack("=I", raw)[0] == want:
                    done[g] = time.monotonic_ns()
                    pending.discard(g)
            time.sleep(50e-6)
        hv.wait_acks(lab.groups)
    finally:
        hv.close()
    if pending:
        raise RuntimeError(f"{len(pending)} groups did not switch within 10 s")
    return [(t - t0) / 1e6 for t in done.values()]


def one_size(groups: int, rounds: int) -> dict[str, Any]:
    with lab_run("sc", groups=groups, up=False) as lr:
        t = time.monotonic()
        lr.lab.up()
        lab_s = time.monotonic() - t
        agent = lr.agent().start(timeout=180)
        ready_s = agent.t_ready - agent.t_spawn
        for i in range(groups):  # addresses, so every switch also sends its GARP/NA
            lr.lab.address_failover(i)
        time.sleep(0.5)
        rss = proc_rss_kb(agent.pid)
        from bpfailover.datapath.maps import Datapath

        dp = Datapath.open(agent.pin_dir, load=False)
        try:
            names = dp.groups()
            gids = [names[lr.lab.names(i).failover] for i in range(groups)]
            n0 = len(agent.events("switch"))
            to_map: list[float] = []
            for _ in range(rounds):
                to_map += _storm(lr.lab, agent, gids, dp.fds["fo_active"], up=False)
                to_map += _storm(lr.lab, agent, gids, dp.fds["fo_active"], up=True)
            time.sleep(0.3)
            lat = [e["latency_us"] for e in agent.events("switch")[n0:]]
            rss_after = proc_rss_kb(agent.pid)
        finally:
            dp.close()
    return {
        "groups": groups,
        "lab_up_s": lab_s,
        "agent_cold_to_ready_s": ready_s,
        "rss_kb": rss,
        "rss_after_storms_kb": rss_after,
        "flap": {
            "rounds": rounds,
            "switches": len(lat),
            "agent_latency_us": summary(lat),
            "agent_latency_samples_us": lat,
            "to_map_ms": summary(to_map),
            "to_map_samples_ms": to_map,
        },
    }


def run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    sizes, rounds = ([1, 8], 3) if quick else ([1, 8, 32], 10)
    out: dict[str, Any] = {"runs": []}
    for g in sizes:
        r = one_size(g, rounds)
        out["runs"].append(r)
        log(
            f"  {g} groups: ready {r['agent_cold_to_ready_s']:.2f}s, "
            f"to-map p50 {median(r['flap']['to_map_samples_ms']):.2f} ms"
        )
    rows = []
    for r in out["runs"]:
        f = r["flap"]
        rows.append(
            [
                r["groups"],
                r["lab_up_s"],
                r["agent_cold_to_ready_s"],
                r["rss_kb"] / 1024,
                r["rss_after_storms_kb"] / 1024,
                f["switches"],
                f["agent_latency_us"]["p50"],
                f["agent_latency_us"]["p99"],
                f["to_map_ms"]["p50"],
                f["to_map_ms"]["max"],
            ]
        )
    print("\n== scale: N groups, one agent; storms flap every group's primary at once")
    print(
        table(
            [
                "groups",
                "lab up s",
                "agent ready s",
                "RSS MiB",
                "RSS after MiB",
                "switches",
                "agent us p50",
                "agent us p99",
                "req->map ms p50",
                "req->map ms max",
            ],
            rows,
        )
    )
    common.save("scale", out, meta)
    plots.scale(out)
    return out

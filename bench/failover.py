"""Unplanned failover: the primary's carrier drops under a fixed-rate UDP stream both ways.

Trials run inside long streams (25 a stream): the primary's far end (vfport in hv) goes
admin down, `hold` later up again (reselect: always fails back), `hold` later the next
trial. Losses are attributed to a trial by the send time of each lost packet:
  down window = [t_down - 2 ms, t_up), failback window = [t_up, next t_down - 2 ms);
lost window = lost / rate. Loss outside every window is reported as background.

Alongside, per trial: how long the `ip link set vfport down` request took (kernel close
path), when a plain netlink listener in the guest heard of the carrier loss (kernel
notification + delivery), and the agent's own event -> map-write latency with its
breakdown (bench.traced_agent: read+parse, policy, map write).
"""

from __future__ import annotations

import time
from typing import Any

from bench import common, plots
from bench.common import LinkSetter, NetlinkProbe, lab_run, log, summary, table
from bench.stream import Direction, Stream

MS = 1_000_000
PER_STREAM = 25


def find_lossless_rate(lab: Any, candidates: list[int], seconds: float) -> dict[str, Any]:
    """Highest candidate rate (pps per direction) a steady stream delivers with 0 loss."""
    n = lab.names(0)
    tried: list[dict[str, Any]] = []
    best = 0
    for rate in candidates:
        res = Stream(lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate, seconds).result()
        lost = res.a_to_b.lost + res.b_to_a.lost
        tried.append({"rate_pps": rate, "lost": lost})
        log(f"  rate probe {rate:>7} pps/dir x {seconds:g}s: lost {lost}")
        if lost:
            break
        best = rate
    return {"rate_pps": best, "tried": tried}


def run_trials(lab: Any, agent: Any, rate: int, trials: int, hold: float) -> dict[str, Any]:
    n = lab.names(0)
    hv = LinkSetter(lab.hv)
    probe = NetlinkProbe(lab.guest)
    rows: list[dict[str, Any]] = []
    background = {"g2p": 0, "p2g": 0}
    n_events0 = len(agent.events("switch"))
    n_trace0 = len(agent.events("bx_trace"))
    try:
        done = 0
        while done < trials:
            k = min(PER_STREAM, trials - done)
            dur = 0.4 + k * 2 * hold + 0.2
            st = Stream(lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate, dur)
            marks: list[tuple[int, int, int]] = []
            try:
                time.sleep(max(0.0, (st.t0 - time.monotonic_ns()) / 1e9) + 0.4)
                for _ in range(k):
                    t_down = time.monotonic_ns()
                    hv.set(n.vfport, False)
                    t_ack = time.monotonic_ns()
                    time.sleep(hold)
                    t_up = time.monotonic_ns()
                    hv.set(n.vfport, True)
                    time.sleep(hold)
                    marks.append((t_down, t_ack, t_up))
                res = st.result()
            finally:
                st.close()
            for i, (t_down, t_ack, t_up) in enumerate(marks):
                t_next = marks[i + 1][0] if i + 1 < len(marks) else t_up + int(hold * 1e9)
                row: dict[str, Any] = {
                    "set_call_us": (t_ack - t_down) / 1e3,
                    "probe_us": _us(probe.first_after(t_down, n.primary, False), t_down),
                }
                for key, d in (("g2p", res.a_to_b), ("p2g", res.b_to_a)):
                    lost = d.lost_between(t_down - 2 * MS, t_up)
                    back = d.lost_between(t_up, t_next - 2 * MS)
                    gap, _ = d.max_gap_between(t_down - 2 * MS, t_up)
                    row[f"{key}_lost"] = lost
                    row[f"{key}_window_ms"] = lost / rate * 1e3
                    row[f"{key}_gap_ms"] = gap
                    row[f"{key}_failback_lost"] = back
                    row[f"{key}_sender_stall_ms"] = _send_stall(d, t_down - 2 * MS, t_up)
                rows.append(row)
            for key, d in (("g2p", res.a_to_b), ("p2g", res.b_to_a)):
                attributed = sum(
                    d.lost_between(
                        m[0] - 2 * MS,
                        (marks[i + 1][0] - 2 * MS)
                        if i + 1 < len(marks)
                        else m[2] + int(hold * 1e9),
                    )
                    for i, m in enumerate(marks)
                )
                background[key] += d.lost - attributed
            done += k
            log(f"  {rate} pps: {done}/{trials} trials")
    finally:
        probe.close()
        hv.close()
    # Let the last switch land in the log before reading it.
    agent.wait_active(n.primary, timeout=5)
    time.sleep(0.1)
    sw = agent.events("switch")[n_events0:]
    traces = agent.events("bx_trace")[n_trace0:]
    down_lat = [e["latency_us"] for e in sw if e.get("reason") == "primary_down"]
    up_lat = [e["latency_us"] for e in sw if e.get("reason") == "primary_up"]
    return {
        "rate_pps": rate,
        "trials": len(rows),
        "hold_s": hold,
        "rows": rows,
        "background_lost": background,
        "agent_latency_us": {"primary_down": summary(down_lat), "primary_up": summary(up_lat)},
        "agent_latency_samples_us": {"primary_down": down_lat, "primary_up": up_lat},
        "breakdown_us": _breakdown(traces),
        "stats": {
            k: summary([r[k] for r in rows if r.get(k) is not None])
            for k in (
                "g2p_window_ms",
                "p2g_window_ms",
                "g2p_gap_ms",
                "p2g_gap_ms",
                "g2p_failback_lost",
                "p2g_failback_lost",
                "set_call_us",
                "probe_us",
                "g2p_sender_stall_ms",
            )
        },
    }


def _us(t: int | None, base: int) -> float | None:
    return None if t is None else (t - base) / 1e3


def _send_stall(d: Direction, t_from: int, t_to: int) -> float:
    import bisect

    lo = max(bisect.bisect_left(d.sent_t, t_from) - 1, 0)
    hi = min(bisect.bisect_left(d.sent_t, t_to) + 1, len(d.sent_t))
    best = 0
    for i in range(lo + 1, hi):
        best = max(best, d.sent_t[i] - d.sent_t[i - 1])
    return best / 1e6


def _breakdown(traces: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the agent's event -> map-write time goes (first flip of each batch)."""
    parts: dict[str, list[float]] = {
        "read_parse": [],
        "to_decide": [],
        "decide": [],
        "decide_to_flip": [],
        "map_write": [],
        "total": [],
    }
    for t in traces:
        f = t["flips"][0]
        parts["read_parse"].append(t["read_parse_us"])
        parts["to_decide"].append(f["decide_start"] - t["read_parse_us"])
        parts["decide"].append(f["decide_end"] - f["decide_start"])
        parts["decide_to_flip"].append(f["flip_start"] - f["decide_end"])
        parts["map_write"].append(f["flip_end"] - f["flip_start"])
        parts["total"].append(f["flip_end"])
    return {k: summary(v) for k, v in parts.items()}


SCHED_OTHER = {"scheduling": {"realtime_priority": 0}}


def fifo_vs_other(fifo: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The event loop's SCHED_FIFO against normal scheduling, same rate: p99 ratios."""

    def p99(r: dict[str, Any]) -> tuple[float, float]:
        return (r["agent_latency_us"]["primary_down"]["p99"], r["stats"]["g2p_window_ms"]["p99"])

    (fa, fw), (ba, bw) = p99(fifo), p99(base)
    return {
        "rate_pps": fifo["rate_pps"],
        "agent_p99_us": {"fifo": fa, "other": ba, "ratio": fa / ba if ba else None},
        "window_p99_ms": {"fifo": fw, "other": bw, "ratio": fw / bw if bw else None},
    }


def fifo_vs_other_line(c: dict[str, Any]) -> str:
    a, w = c["agent_p99_us"], c["window_p99_ms"]

    def ratio(r: float | None) -> str:  # None: the baseline was 0 (no loss at all)
        return "n/a" if r is None else f"{r:.2f}×"

    return (
        f"SCHED_FIFO vs SCHED_OTHER at {c['rate_pps']:,} pps: agent p99 {a['fifo']:.0f} vs "
        f"{a['other']:.0f} µs ({ratio(a['ratio'])}), lost window p99 {w['fifo']:.2f} vs "
        f"{w['other']:.2f} ms ({ratio(w['ratio'])})"
    )


# One row per rate, shared by the console table and bench/report.py's markdown.
ROW_HEADERS = [
    "pps/dir",
    "agent sched",
    "trials",
    "g2p p50 ms",
    "g2p p99 ms",
    "g2p max ms",
    "p2g p99 ms",
    "gap p99 ms",
    "set call µs p50",
    "notify µs p50",
    "agent µs p50",
    "agent µs p99",
]


def row(r: dict[str, Any]) -> list[Any]:
    s, a = r["stats"], r["agent_latency_us"]["primary_down"]
    return [
        f"{r['rate_pps']:,}",
        r.get("scheduling", "other"),
        r["trials"],
        s["g2p_window_ms"]["p50"],
        s["g2p_window_ms"]["p99"],
        s["g2p_window_ms"]["max"],
        s["p2g_window_ms"]["p99"],
        s["g2p_gap_ms"]["p99"],
        s["set_call_us"]["p50"],
        s["probe_us"].get("p50"),
        a.get("p50"),
        a.get("p99"),
    ]


def run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    trials = 10 if quick else 100
    hold = 0.12 if quick else 0.15
    out: dict[str, Any] = {"trials_per_rate": trials}
    with lab_run("uf") as lr:
        agent = lr.agent(traced=True).start()
        lr.lab.address_failover(0)
        cands = [20000, 40000] if quick else [20000, 30000, 40000, 50000, 60000, 80000]
        probe = find_lossless_rate(lr.lab, cands, 1.0 if quick else 2.0)
        out["lossless_rate_probe"] = probe
        rates = [10000] + ([probe["rate_pps"]] if probe["rate_pps"] > 10000 else [])
        out["runs"] = [run_trials(lr.lab, agent, r, trials, hold) for r in rates]
        # Baseline for the event loop's SCHED_FIFO: the same lab and pins (adopted, no
        # flap), the agent restarted under normal scheduling, at the highest rate.
        agent.stop()
        other = lr.agent(traced=True, name=agent.name, settings=SCHED_OTHER).start()
        out["runs"].append(run_trials(lr.lab, other, rates[-1], trials, hold))
    for r, scheduling in zip(out["runs"], [*["fifo:10"] * len(rates), "other"], strict=True):
        r["scheduling"] = scheduling
    rows = [
        [*row(r), r["background_lost"]["g2p"] + r["background_lost"]["p2g"]] for r in out["runs"]
    ]
    print("\n== unplanned failover (primary carrier loss), lost window ms (guest->peer = g2p)")
    print(table([*ROW_HEADERS, "bg lost"], rows))
    fifo, base = out["runs"][-2], out["runs"][-1]
    out["fifo_vs_other"] = fifo_vs_other(fifo, base)
    print(f"  {fifo_vs_other_line(out['fifo_vs_other'])}")
    for r in out["runs"]:
        b = r["breakdown_us"]
        print(
            f"  {r['rate_pps']} pps agent breakdown p50 us: "
            + ", ".join(f"{k} {b[k].get('p50', float('nan')):.1f}" for k in b)
        )
    common.save("failover", out, meta)
    plots.failover(out)
    return out

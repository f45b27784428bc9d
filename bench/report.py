"""bench/results/summary.md and README-performance.md, generated from the results JSON.

`python -m bench.report` regenerates both from whatever JSON is in bench/results/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import failover
from bench.common import RESULTS, fmt


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _md(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ok(v: float | None, target: float, above: bool = True) -> str:
    if v is None:
        return "-"
    return "met" if (v >= target if above else v <= target) else "**missed**"


def _cpu(t: dict[str, Any]) -> str:
    c = t.get("cpu_us_per_pkt")
    if not c:
        return ""
    return " / ".join(
        f"{c['baseline'] / c[k]:.2f}" if c.get(k) else "–"
        for k in ("fo-tc", "fo-xdp", "fo-veth", "fo-nocheck")
    )


def _bpf_ns(costs: dict[str, Any] | None) -> str:
    """The BPF programs' own ns per packet (64-byte UDP; kernel.bpf_stats_enabled)."""
    if not costs:
        return ""
    cells = [
        f"{cfg} {d}: "
        + ", ".join(f"{pin.removeprefix('prog_')} {ns:.0f}" for pin, ns in v[d].items())
        for cfg, v in costs.items()
        for d in ("tx", "rx")
        if v.get(d)
    ]
    return "\n\nBPF programs' own run time per packet, ns: " + "; ".join(cells) + ".\n"


def sections() -> tuple[list[str], dict[str, Any]]:
    parts: list[str] = []
    info: dict[str, Any] = {}
    tp = _load("throughput")
    if tp:
        r = tp["results"]
        info["throughput"] = tp
        rows = []
        for t in r["tests"]:
            m = t["median"]
            scale = 1e3 if t["metric"] == "pps" else 1
            unit = "kpps" if t["metric"] == "pps" else "Gbit/s"
            rows.append(
                [
                    t["name"],
                    unit,
                    m["baseline"] / scale,
                    m["fo-tc"] / scale,
                    m["fo-xdp"] / scale,
                    m.get("fo-veth", 0) / scale,
                    m.get("fo-nocheck", 0) / scale,
                    t["ratio"]["fo-tc"],
                    t["ratio"]["fo-xdp"],
                    t["ratio"].get("fo-veth"),
                    t["ratio"].get("fo-nocheck"),
                    f"≥ {t['target']:.2f} ({_ok(t['ratio']['fo-tc'], t['target'])} tc)",
                    _cpu(t),
                ]
            )
        parts.append(
            f"### Throughput (median of {r['rounds']} interleaved rounds × {r['seconds']:g} s)\n\n"
            "Baseline: the same lab with the guest address on the primary itself (no "
            "failover device, no BPF). tx = guest sends (failover egress program), rx = "
            "guest receives (`iperf3 -R`, lower receive hook). UDP: 18-byte payloads "
            "(64-byte frames), unlimited rate, delivered packets/s. fo-tc: failoverd as "
            "shipped (`rx_path: tc`, `tx_path: direct`); fo-veth: `tx_path: veth` (the "
            "transmit path the failover device's counters, taps and qdisc see). "
            "fo-nocheck: fo-tc with the datapath's per-packet lower check off. "
            "cpu: the sender's system CPU per packet (baseline / config), which "
            "holds on a busy machine where pps does not.\n\n"
            + _md(
                [
                    "test",
                    "unit",
                    "baseline",
                    "fo-tc",
                    "fo-xdp",
                    "fo-veth",
                    "fo-nocheck",
                    "tc ratio",
                    "xdp ratio",
                    "veth ratio",
                    "nocheck ratio",
                    "target",
                    "cpu tc / xdp / veth / nocheck",
                ],
                rows,
            )
            + _bpf_ns(r.get("bpf_ns_per_run"))
        )
    fo = _load("failover")
    if fo:
        r = fo["results"]
        info["failover"] = fo
        rows = [
            [*failover.row(run), _ok(run["stats"]["g2p_window_ms"]["p99"], 1.0, above=False)]
            for run in r["runs"]
        ]
        bd = r["runs"][0]["breakdown_us"] if r["runs"] else {}
        bd_txt = ", ".join(
            f"{k.replace('_', ' ')} {v.get('p50', 0):.0f} µs" for k, v in bd.items() if v.get("n")
        )
        parts.append(
            "### Unplanned failover (primary carrier loss under UDP both ways)\n\n"
            f"{r['trials_per_rate']} trials per rate; the higher rate is the highest this box "
            "delivered with zero loss in a steady stream "
            f"({r['lossless_rate_probe']['rate_pps']:,} pps/direction). Lost window = lost ÷ "
            "rate, guest→peer (g2p, the direction the map flip serves); peer→guest (p2g) "
            "is carried by the bridge flooding to the standby. `set call` = the hypervisor's "
            "`ip link set vfport down` (kernel close path); `notify` = a plain netlink "
            "listener in the guest hears the carrier loss (both from the request's start); "
            "agent = failoverd's own event received → map written.\n\n"
            + _md(
                [*failover.ROW_HEADERS, "p99 ≤ 1 ms"],
                rows,
            )
            + (
                f"\n\nWhere the agent's time goes (p50, 10k pps run, traced build): {bd_txt}."
                if bd_txt
                else ""
            )
            + (
                "\n\nThe last row is the baseline for the agent's real-time event loop: the "
                "same lab and pins, the agent restarted with `realtime_priority: 0`. "
                + failover.fifo_vs_other_line(r["fifo_vs_other"])
                + "."
                if "fifo_vs_other" in r
                else ""
            )
        )
    pl = _load("planned")
    if pl:
        r = pl["results"]
        info["planned"] = pl
        rows = []
        for key, label in (
            ("set_primary", "set-primary (each switch)"),
            ("restart", "agent SIGKILL + start"),
            ("migrate", "failover-lab migrate"),
        ):
            s = r[f"{key}_summary"]
            tgt = s["target_lost"]
            rows.append(
                [
                    label,
                    s["switches"],
                    s["lost_total"],
                    s["gap_ms"].get("max"),
                    "0 " + ("(met)" if s["lost_total"] == 0 else "(**missed**)")
                    if tgt == 0
                    else "-",
                ]
            )
        parts.append(
            f"### Planned switch, restart, migration ({r['rate_pps']:,} pps UDP both ways)\n\n"
            + _md(["action", "trials", "packets lost", "longest gap ms", "target lost"], rows)
        )
    ac = _load("agent_cost")
    if ac:
        r = ac["results"]
        info["agent_cost"] = ac
        rows = [
            [
                "cold start → first forwarded packet (bcc compile included), p50",
                f"{fmt(r['cold_summary']['to_first_packet_s'].get('p50'))} s",
            ],
            ["cold start → ready, p50", f"{fmt(r['cold_summary']['to_ready_s'].get('p50'))} s"],
            ["warm start (pins present) → ready, p50", f"{fmt(r['warm_to_ready_s'].get('p50'))} s"],
            ["RSS after start", f"{r['rss_after_start_kb'] / 1024:.1f} MiB"],
            [
                f"RSS after {r['events']:,} carrier events (1 h at 1/s, compressed)",
                f"{r['rss_after_events_kb'] / 1024:.1f} MiB",
            ],
            ["CPU per carrier event (switch + GARP)", f"{r['cpu_us_per_event']:.0f} µs"],
            [
                f"CPU at idle over {r['idle_s']:g} s",
                f"{r['idle']['cpu_pct']:.3f} % ({r['idle']['ctxsw']} context switches)",
            ],
            [
                "CPU at idle with the metrics endpoint on",
                f"{r['idle_with_metrics']['cpu_pct']:.3f} % "
                f"({r['idle_with_metrics']['ctxsw']} context switches)",
            ],
        ]
        parts.append("### Agent cost (one group)\n\n" + _md(["what", "value"], rows))
    sc = _load("scale")
    if sc:
        r = sc["results"]
        info["scale"] = sc
        rows = []
        for run in r["runs"]:
            f = run["flap"]
            rows.append(
                [
                    run["groups"],
                    run["agent_cold_to_ready_s"],
                    run["rss_kb"] / 1024,
                    f["switches"],
                    f["agent_latency_us"]["p50"],
                    f["agent_latency_us"]["p99"],
                    f["to_map_ms"]["p50"],
                    f["to_map_ms"]["max"],
                ]
            )
        parts.append(
            "### Scale (N groups, one agent; every primary flapped at once)\n\n"
            + _md(
                [
                    "groups",
                    "cold start → ready s",
                    "RSS MiB",
                    "switches",
                    "agent µs p50",
                    "agent µs p99",
                    "request → map ms p50",
                    "request → map ms max",
                ],
                rows,
            )
        )
    ml = _load("metrics_load")
    if ml:
        r = ml["results"]
        info["metrics_load"] = ml
        rows = []
        for name in ("quiet", "load"):
            ph = r[name]
            rows.append(
                [
                    name,
                    ph["switches"],
                    ph["latency_us"].get("p50"),
                    ph["latency_us"].get("p99"),
                    ph["threads_max"],
                    ph.get("scrapes_ok", "-"),
                    ph.get("scrapes_refused", "-"),
                ]
            )
        ratio = r.get("p99_ratio")
        parts.append(
            f"### Metrics under load ({r['idle_connections']:,} idle connections and "
            f"{r['scrapers']} parallel scrapes during a flap storm of {r['toggles']} toggles)\n\n"
            + _md(
                [
                    "phase",
                    "switches",
                    "agent µs p50",
                    "agent µs p99",
                    "agent threads max",
                    "scrapes answered",
                    "scrapes refused (cap 16)",
                ],
                rows,
            )
            + (f"\n\nSwitch latency p99 load / quiet: {ratio:.2f} (same run)." if ratio else "")
        )
    dc = _load("datapath_check")
    if dc:
        info["datapath_check"] = dc
        parts.append(_datapath_check(dc["results"]))
    return parts, info


def _datapath_check(r: dict[str, Any]) -> str:
    rows = [
        [
            f"{x['rate_pps']:,}",
            "on" if x["check"] else "off",
            x["trials"],
            x["g2p_window_ms"]["p50"],
            x["g2p_window_ms"]["p99"],
            x["g2p_window_ms"]["max"],
            x["p2g_window_ms"]["p99"],
        ]
        for x in r["runs"]
    ]
    text = (
        "### Datapath per-packet lower check, on vs off in the same run\n\n"
        "Unplanned failover (the primary's far end admin down under a UDP stream both ways), "
        "lost window ms (g2p = guest → peer):\n\n"
        + _md(["pps", "check", "n", "g2p p50", "g2p p99", "g2p max", "p2g p99"], rows)
    )
    if r.get("stopped"):
        text += "\n\nThe agent SIGSTOPped across the carrier loss, guest → peer lost:\n\n" + _md(
            ["pps", "check", "stopped s", "lost", "window ms"],
            [
                [
                    f"{x['rate_pps']:,}",
                    "on" if x["check"] else "off",
                    x["stop_s"],
                    x["g2p_lost"],
                    x["g2p_window_ms"],
                ]
                for x in r["stopped"]
            ],
        )
    st = r.get("storm")
    if st:
        text += (
            f"\n\n{st['groups']} groups lose the primary's carrier at once "
            f"({st['trials_per_setting']} trials per setting, alternating); guest → peer "
            f"lost window ms on groups {st['sampled_groups']} ({st['rate_pps']:,} pps "
            "each; the last one is the last the agent gets to):\n\n"
            + _md(
                ["check", "n", "p50", "p99", "max", "last group p50"],
                [
                    [
                        "on" if x["check"] else "off",
                        x["g2p_window_ms"]["n"],
                        x["g2p_window_ms"]["p50"],
                        x["g2p_window_ms"]["p99"],
                        x["g2p_window_ms"]["max"],
                        x["last_group_g2p_window_ms"]["p50"],
                    ]
                    for x in st["runs"]
                ],
            )
        )
    return text


def _machine(info: dict[str, Any]) -> tuple[str, str, str]:
    doc = next(iter(info.values()))
    m = doc["machine"]
    machine = (
        f"{m['os']}, kernel {m['kernel']}, {m['nproc']} × {m['cpu']} (VM), "
        f"{m['mem_gib']} GiB, Python {m['python']}, {m['iperf3']}"
    )
    loads = [d.get("loadavg_before", [0])[0] for d in info.values()]
    return (
        machine,
        doc["command"],
        f"{doc['date']} (git {m['git']}, load average "
        f"{min(loads):.1f}–{max(loads):.1f} at the benchmarks' starts)",
    )


def write(total_s: float | None = None, mode: str = "full") -> None:
    parts, info = sections()
    if not info:
        return
    if total_s is not None:
        (RESULTS / "run.json").write_text(
            json.dumps({"mode": mode, "total_s": round(total_s)}) + "\n"
        )
    run = json.loads((RESULTS / "run.json").read_text()) if (RESULTS / "run.json").exists() else {}
    machine, command, when = _machine(info)
    head = (
        f"Command: `{command}` ({run.get('mode', mode)} run, "
        f"{run.get('total_s', '?')} s in all). Machine: {machine}. Date: {when}.\n"
    )
    body = "\n\n".join(parts)
    (RESULTS / "summary.md").write_text(
        "# bpfailover benchmark results\n\n" + head + "\nGenerated by `python -m bench.report` "
        "from bench/results/*.json; figures: failover.png, throughput.png, scale.png.\n\n"
        + body
        + "\n"
    )
    notes = Path(__file__).resolve().parent / "NOTES.md"
    extra = notes.read_text() if notes.exists() else ""
    (RESULTS / "README-performance.md").write_text(
        "## Performance\n\n" + head + "\nEvery ratio is against a baseline measured in the "
        'same run on the same lab (network namespaces and veth: the "VF" is a veth, so '
        "these numbers are the software paths' costs, not a real NIC's). Reproduce with "
        "`make bench` (≈15 min) or `make bench-quick` (< 4 min); raw data and plots in "
        "`bench/results/`.\n\n" + body + "\n\n" + extra
    )


if __name__ == "__main__":
    write()

"""Unplanned failover with the datapath's per-packet lower check on vs off, in the same run.

`python -m bench.datapath_check [--trials N] [--rates 10000,80000]` (root; ~1-2 min).

One lab, one agent. For each rate, the trials of bench.failover (the primary's far end goes
admin down under a UDP stream both ways, `hold` later up again) run once with the check on
and once with it off (fo_meta written through the pins: same programs, same maps, same
agent), interleaved on/off/on/off in blocks so that load drift hits both alike.  Then the
agent-stopped case: the agent SIGSTOPped across one carrier loss of `stop_s`, on vs off.
Lost window = lost / rate.  Then the storm: `groups` groups (32 in the full run) whose
primaries all lose carrier at once (requests back to back on one rtnetlink socket, as
bench.scale does), with a stream on a few of them (the first, the middle and the last
requested: the last waits longest for the agent), check on and off alternating per trial.
Results: bench/results/datapath_check.json and tables.

`bench.run` runs it (`make bench`; `make bench-quick` a small variant).
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import time
from typing import Any

from bench import common, failover
from bench.common import LinkSetter, lab_run, log, summary, table
from bench.stream import Stream
from bpfailover.datapath import bpfsys
from bpfailover.datapath import layout_gen as L
from bpfailover.datapath.maps import Datapath

MS = 1_000_000


def set_check(pin_dir: Any, on: bool) -> None:
    with Datapath.open(pin_dir, load=False) as dp:
        key = struct.pack("=I", L.FO_META_DP_CHECK)
        bpfsys.map_update(
            dp.fds["fo_meta"], key, struct.pack("=I", L.FO_DPC_ON if on else L.FO_DPC_OFF)
        )


def agent_stopped_trial(lab: Any, agent: Any, rate: int, stop_s: float) -> dict[str, Any]:
    """Carrier loss while the agent is SIGSTOPped for stop_s; lost guest->peer packets."""
    n = lab.names(0)
    hv = LinkSetter(lab.hv)
    st = Stream(lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate, 0.6 + stop_s + 0.6)
    try:
        time.sleep(max(0.0, (st.t0 - time.monotonic_ns()) / 1e9) + 0.4)
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            t_down = time.monotonic_ns()
            hv.set(n.vfport, False)
            time.sleep(stop_s)
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        agent.wait_active(n.standby, timeout=10)
        res = st.result()
    finally:
        st.close()
        hv.set(n.vfport, True)
        hv.close()
    agent.wait_active(n.primary, timeout=10)
    lost = res.a_to_b.lost_between(t_down - 2 * MS, t_down + int((stop_s + 0.5) * 1e9))
    return {
        "rate_pps": rate,
        "stop_s": stop_s,
        "g2p_lost": lost,
        "g2p_window_ms": lost / rate * 1e3,
    }


def storm(groups: int, trials: int, rate: int, hold: float) -> dict[str, Any]:
    """Every group's primary loses carrier at once; lost window on the sampled groups'
    streams, check on vs off (alternating trials, same lab and agent)."""
    sampled = sorted({0, groups // 2, groups - 1})
    per: dict[bool, list[float]] = {True: [], False: []}
    last: dict[bool, list[float]] = {True: [], False: []}
    with lab_run("dg", groups=groups) as lr:
        agent = lr.agent().start(timeout=180)
        for i in range(groups):
            lr.lab.address_failover(i)
        hv = LinkSetter(lr.lab.hv)
        try:
            for t in range(2 * trials):
                on = t % 2 == 0
                set_check(agent.pin_dir, on)
                streams = []
                try:
                    for i in sampled:
                        n = lr.lab.names(i)
                        streams.append(
                            Stream(
                                lr.lab.guest,
                                n.guest_v4,
                                lr.lab.peer,
                                n.peer_v4,
                                rate,
                                0.5 + hold + 0.4,
                            )
                        )
                    t0 = max(st.t0 for st in streams)
                    time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9) + 0.4)
                    t_down = time.monotonic_ns()
                    for i in range(groups):
                        hv.send(lr.lab.names(i).vfport, False)
                    hv.wait_acks(groups)
                    time.sleep(hold)
                    t_up = time.monotonic_ns()
                    for i in range(groups):
                        hv.send(lr.lab.names(i).vfport, True)
                    hv.wait_acks(groups)
                    results = [st.result() for st in streams]
                finally:
                    for st in streams:
                        st.close()
                for i in range(groups):
                    agent.wait_active(lr.lab.names(i).primary, i, timeout=10)
                windows = [
                    r.a_to_b.lost_between(t_down - 2 * MS, t_up) / rate * 1e3 for r in results
                ]
                per[on].extend(windows)
                last[on].append(windows[-1])
                log(
                    f"  storm {groups} groups, check {'on' if on else 'off'}: "
                    f"g2p lost ms {', '.join(f'{w:.1f}' for w in windows)}"
                )
        finally:
            hv.close()
            set_check(agent.pin_dir, True)
    return {
        "groups": groups,
        "sampled_groups": sampled,
        "rate_pps": rate,
        "trials_per_setting": trials,
        "hold_s": hold,
        "runs": [
            {
                "check": on,
                "g2p_window_ms": summary(per[on]),
                "last_group_g2p_window_ms": summary(last[on]),
            }
            for on in (True, False)
        ],
    }


def storm_table(out: dict[str, Any]) -> None:
    print(
        f"\n== {out['groups']} groups lose the primary's carrier at once; g2p lost window ms "
        f"on groups {out['sampled_groups']} ({out['rate_pps']:,} pps each)"
    )
    rows = [
        [
            "on" if r["check"] else "off",
            r["g2p_window_ms"]["n"],
            r["g2p_window_ms"]["p50"],
            r["g2p_window_ms"]["p99"],
            r["g2p_window_ms"]["max"],
            r["last_group_g2p_window_ms"]["p50"],
        ]
        for r in out["runs"]
    ]
    print(table(["check", "n", "p50", "p99", "max", "last group p50"], rows))


def run(trials: int, rates: list[int], hold: float, blocks: int, stop_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"trials_per_setting": trials, "hold_s": hold, "runs": [], "stopped": []}
    with lab_run("dc") as lr:
        agent = lr.agent(traced=True).start()
        lr.lab.address_failover(0)
        for rate in rates:
            per = {True: [], False: []}  # type: dict[bool, list[dict[str, Any]]]
            for _ in range(blocks):
                for on in (True, False):
                    set_check(agent.pin_dir, on)
                    r = failover.run_trials(lr.lab, agent, rate, max(1, trials // blocks), hold)
                    per[on].extend(r["rows"])
            for on in (True, False):
                rows = per[on]
                out["runs"].append(
                    {
                        "rate_pps": rate,
                        "check": on,
                        "trials": len(rows),
                        "g2p_window_ms": summary([r["g2p_window_ms"] for r in rows]),
                        "p2g_window_ms": summary([r["p2g_window_ms"] for r in rows]),
                        "g2p_gap_ms": summary([r["g2p_gap_ms"] for r in rows]),
                    }
                )
            for on in (True, False):
                set_check(agent.pin_dir, on)
                out["stopped"].append(
                    {"check": on, **agent_stopped_trial(lr.lab, agent, rate, stop_s)}
                )
        set_check(agent.pin_dir, True)
    rows = []
    for rate in rates:
        on, off = (
            next(r for r in out["runs"] if r["rate_pps"] == rate and r["check"] is c)
            for c in (True, False)
        )
        for r in (on, off):
            w = r["g2p_window_ms"]
            rows.append(
                [
                    f"{rate:,}",
                    "on" if r["check"] else "off",
                    r["trials"],
                    w["p50"],
                    w["p99"],
                    w["max"],
                    r["p2g_window_ms"]["p99"],
                ]
            )
        ratio = (off["g2p_window_ms"]["p99"] or 0) / max(on["g2p_window_ms"]["p99"] or 0, 1e-3)
        out.setdefault("p99_ratio_off_over_on", {})[rate] = ratio
    print("\n== unplanned failover, datapath check on vs off, lost window ms (g2p = guest->peer)")
    print(table(["pps", "check", "n", "g2p p50", "g2p p99", "g2p max", "p2g p99"], rows))
    for rate, ratio in out["p99_ratio_off_over_on"].items():
        print(f"  {rate:,} pps: g2p p99 off/on = {ratio:.1f}x (on floored at 0.001 ms)")
    print(f"\n== agent SIGSTOPped {stop_s}s across the carrier loss: guest->peer lost")
    print(
        table(
            ["pps", "check", "lost", "window ms"],
            [
                [
                    f"{s['rate_pps']:,}",
                    "on" if s["check"] else "off",
                    s["g2p_lost"],
                    s["g2p_window_ms"],
                ]
                for s in out["stopped"]
            ],
        )
    )
    return out


def bench_run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    """For bench.run: full 20 trials at 10k/80k pps and 32 groups; quick 4 trials at 10k
    and 8 groups."""
    if quick:
        out = run(4, [10000], 0.12, 2, 0.5)
        out["storm"] = storm(8, 2, 2000, 0.3)
    else:
        out = run(20, [10000, 80000], 0.12, 2, 0.5)
        out["storm"] = storm(32, 6, 2000, 0.3)
    storm_table(out["storm"])
    common.save("datapath_check", out, meta)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.datapath_check")
    ap.add_argument("--trials", type=int, default=20, help="per rate and setting")
    ap.add_argument("--rates", default="10000,80000")
    ap.add_argument("--hold", type=float, default=0.12)
    ap.add_argument("--blocks", type=int, default=2, help="on/off alternations per rate")
    ap.add_argument("--stop-s", type=float, default=0.5)
    ap.add_argument("--storm-groups", type=int, default=32, help="0: no storm")
    ap.add_argument("--storm-trials", type=int, default=6, help="per setting")
    ap.add_argument("--storm-rate", type=int, default=2000, help="pps per sampled stream")
    args = ap.parse_args(argv)
    common.sweep_stale()
    meta = common.machine_info()
    out = run(
        args.trials, [int(r) for r in args.rates.split(",")], args.hold, args.blocks, args.stop_s
    )
    if args.storm_groups:
        out["storm"] = storm(args.storm_groups, args.storm_trials, args.storm_rate, 0.3)
        storm_table(out["storm"])
    path = common.save("datapath_check", out, meta)
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

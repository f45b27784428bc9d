"""Unplanned failover with the datapath's per-packet lower check on vs off, in the same run.

`python -m bench.datapath_check [--trials N] [--rates 10000,80000]` (root; ~1-2 min).

One lab, one agent. For each rate, the trials of bench.failover (the primary's far end goes
admin down under a UDP stream both ways, `hold` later up again) run once with the check on
and once with it off (fo_meta written through the pins: same programs, same maps, same
agent), interleaved on/off/on/off in blocks so that load drift hits both alike.  Then the
agent-stopped case: the agent SIGSTOPped across one carrier loss of `stop_s`, on vs off.
Lost window = lost / rate.  Results: bench/results/datapath_check.json and a table.
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
from bpfailover.datapath.maps import Datapath

MS = 1_000_000


def set_check(pin_dir: Any, on: bool) -> None:
    with Datapath.open(pin_dir, load=False) as dp:
        L = dp.L
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.datapath_check")
    ap.add_argument("--trials", type=int, default=20, help="per rate and setting")
    ap.add_argument("--rates", default="10000,80000")
    ap.add_argument("--hold", type=float, default=0.12)
    ap.add_argument("--blocks", type=int, default=2, help="on/off alternations per rate")
    ap.add_argument("--stop-s", type=float, default=0.5)
    args = ap.parse_args(argv)
    common.sweep_stale()
    meta = common.machine_info()
    out = run(
        args.trials, [int(r) for r in args.rates.split(",")], args.hold, args.blocks, args.stop_s
    )
    path = common.save("datapath_check", out, meta)
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

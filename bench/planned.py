"""Planned switches under a 10k pps UDP stream both ways: packets lost and longest silence.

  set-primary  `set-primary ens10 ens10nsby` then `--auto` back (each a switch; target 0 lost)
  restart      SIGKILL failoverd, start it again on its pins (target 0 lost)
  migrate      `failover-lab migrate` (net_failover.rst seed script, 0.5 s pause)
Each trial's window runs from its first action to the next trial (or the stream's end).
"""

from __future__ import annotations

import time
from typing import Any

from bench import common
from bench.common import lab_run, log, summary, table
from bench.stream import Stream

MS = 1_000_000
RATE = 10_000


def _windows(res: Any, marks: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    rows = []
    for kind, t_from, t_to in marks:
        row: dict[str, Any] = {"kind": kind, "window_ms": (t_to - t_from) / 1e6}
        for key, d in (("g2p", res.a_to_b), ("p2g", res.b_to_a)):
            row[f"{key}_lost"] = d.lost_between(t_from - 2 * MS, t_to)
            row[f"{key}_gap_ms"] = d.max_gap_between(t_from - 2 * MS, t_to)[0]
        rows.append(row)
    return rows


def set_primary_trials(lab: Any, agent: Any, trials: int, hold: float) -> list[dict[str, Any]]:
    n = lab.names(0)
    st = Stream(lab.guest, n.guest_v4, lab.peer, n.peer_v4, RATE, 0.5 + trials * 2 * hold)
    marks: list[tuple[str, int, int]] = []
    try:
        time.sleep(max(0.0, (st.t0 - time.monotonic_ns()) / 1e9) + 0.3)
        for _ in range(trials):
            for kind, lower in (("to standby", n.standby), ("back (auto)", None)):
                t = time.monotonic_ns()
                reply = agent.request({"cmd": "set-primary", "group": n.failover, "lower": lower})
                if not reply.get("ok"):
                    raise RuntimeError(f"set-primary failed: {reply}")
                time.sleep(hold)
                marks.append((kind, t, time.monotonic_ns()))
        res = st.result()
    finally:
        st.close()
    return _windows(res, marks)


def restart_trials(lab: Any, agent: Any, trials: int) -> list[dict[str, Any]]:
    n = lab.names(0)
    st = Stream(lab.guest, n.guest_v4, lab.peer, n.peer_v4, RATE, 0.5 + trials * 2.5)
    marks: list[tuple[str, int, int]] = []
    ready: list[float] = []
    try:
        time.sleep(max(0.0, (st.t0 - time.monotonic_ns()) / 1e9) + 0.3)
        for _ in range(trials):
            if st.procs[0].poll() is not None:
                break
            t = time.monotonic_ns()
            agent.kill()
            agent.start()
            ready.append(agent.t_ready - agent.t_spawn)
            time.sleep(0.2)
            marks.append(("SIGKILL + start", t, time.monotonic_ns()))
        res = st.result()
    finally:
        st.close()
    rows = _windows(res, marks)
    for r, s in zip(rows, ready, strict=False):
        r["restart_to_ready_s"] = s
    return rows


def migrate_trials(lab: Any, agent: Any, trials: int, pause: float) -> list[dict[str, Any]]:
    n = lab.names(0)
    rows: list[dict[str, Any]] = []
    for _ in range(trials):
        st = Stream(lab.guest, n.guest_v4, lab.peer, n.peer_v4, RATE, pause + 2.5)
        try:
            time.sleep(max(0.0, (st.t0 - time.monotonic_ns()) / 1e9) + 0.3)
            t = time.monotonic_ns()
            lab.migrate(0, pause_s=pause, log=lambda _s: None)
            agent.wait_active(n.primary, timeout=10)
            t_done = time.monotonic_ns()
            res = st.result()
        finally:
            st.close()
        row = _windows(res, [("migrate", t, res.t0 + int((pause + 2.5) * 1e9))])[0]
        row["migrate_s"] = (t_done - t) / 1e9
        rows.append(row)
    return rows


def run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    sp_trials, rs_trials, mg_trials = (3, 2, 1) if quick else (20, 5, 3)
    out: dict[str, Any] = {"rate_pps": RATE}
    with lab_run("pl") as lr:
        agent = lr.agent().start()
        lr.lab.address_failover(0)
        time.sleep(0.3)
        out["set_primary"] = set_primary_trials(lr.lab, agent, sp_trials, 0.15)
        log(f"  set-primary: {sp_trials} x 2 switches done")
        out["restart"] = restart_trials(lr.lab, agent, rs_trials)
        log(f"  restart: {rs_trials} done")
        out["migrate"] = migrate_trials(lr.lab, agent, mg_trials, 0.5)
        log(f"  migrate: {mg_trials} done")
    rows = []
    for key, label, target in (
        ("set_primary", "set-primary (switch)", 0),
        ("restart", "agent SIGKILL + start", 0),
        ("migrate", "failover-lab migrate", None),
    ):
        trials = out[key]
        lost = [t["g2p_lost"] + t["p2g_lost"] for t in trials]
        gaps = [max(t["g2p_gap_ms"], t["p2g_gap_ms"]) for t in trials]
        out[f"{key}_summary"] = {
            "switches": len(trials),
            "lost_total": sum(lost),
            "lost": summary(lost),
            "gap_ms": summary(gaps),
            "target_lost": target,
        }
        rows.append(
            [
                label,
                len(trials),
                sum(lost),
                max(lost) if lost else None,
                max(gaps) if gaps else None,
                "0" if target == 0 else "-",
            ]
        )
    if out["restart"]:
        out["restart_summary"]["restart_to_ready_s"] = summary(
            [t["restart_to_ready_s"] for t in out["restart"] if "restart_to_ready_s" in t]
        )
    print(f"\n== planned switches under {RATE:,} pps UDP both ways")
    print(table(["action", "trials", "lost total", "lost max", "gap max ms", "target lost"], rows))
    common.save("planned", out, meta)
    return out

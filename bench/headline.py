"""The README's headline figures, written from the committed results in bench/results/.

    python -m bench.headline            # print the block
    python -m bench.headline --write    # replace it in README.md (between the markers)

Every row names the result file it comes from, with the command, date and commit of that
run (a commit marked `-dirty` had uncommitted changes to the measured code: it is not the
code measured).  tests/test_headline.py fails when README.md and the results disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- headline:begin (python -m bench.headline --write) -->"
END = "<!-- headline:end -->"


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _src(name: str, d: dict[str, Any]) -> str:
    machine = d.get("machine") or {}
    commit = machine.get("git") or "?"
    date = str(d.get("date", "?"))[:10]
    return f"[{name}](bench/results/{name}.json): `{d.get('command', '?')}`, {date}, {commit}"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} ms"


def _throughput(rows: list[list[str]]) -> None:
    d = _load("throughput")
    if d is None:
        return
    r = d["results"]
    tests = {t["name"]: t for t in r["tests"]}
    n = f"median of {r['rounds']} interleaved rounds × {r['seconds']:g} s"
    for key, what in (("tcp1", "TCP, one stream"), ("udp64", "64-byte UDP, packets/s")):
        tx, rx = tests.get(f"{key} tx"), tests.get(f"{key} rx")
        if tx is None or rx is None:
            continue
        rows.append(
            [
                f"{what}: failover device ÷ the VF used directly (tx / rx)",
                f"{_x(tx['ratio']['fo-tc'])} / {_x(rx['ratio']['fo-tc'])} ({n})",
                f"≥ {tx['target']:.2f}×",
                _src("throughput", d),
            ]
        )


def _failover(rows: list[list[str]]) -> None:
    d = _load("failover")
    if d is None or not d["results"]["runs"]:
        return
    run = d["results"]["runs"][0]
    w, a = run["stats"]["g2p_window_ms"], run["agent_latency_us"]["primary_down"]
    rows.append(
        [
            f"unplanned failover (primary carrier lost), lost window at {run['rate_pps']:,} pps",
            f"p50 {_ms(w['p50'])}, p99 {_ms(w['p99'])} (N = {run['trials']})",
            "p99 ≤ 1 ms",
            _src("failover", d),
        ]
    )
    rows.append(
        [
            "agent: link event → map written",
            f"p50 {a['p50'] / 1000:.2f} ms, p99 {a['p99'] / 1000:.2f} ms (same run)",
            "p99 < 1 ms",
            _src("failover", d),
        ]
    )


def _planned(rows: list[list[str]]) -> None:
    d = _load("planned")
    if d is None:
        return
    r = d["results"]
    sp, rs = r.get("set_primary") or [], r.get("restart") or []
    lost_sp = sum(t["g2p_lost"] + t["p2g_lost"] for t in sp)
    lost_rs = sum(t["g2p_lost"] + t["p2g_lost"] for t in rs)
    rows.append(
        [
            f"planned `set-primary`, agent SIGKILL + restart ({r['rate_pps']:,} pps both ways)",
            f"{lost_sp} lost in {len(sp)} switches; {lost_rs} lost in {len(rs)} restarts",
            "0",
            _src("planned", d),
        ]
    )


def _datapath_check(rows: list[list[str]]) -> None:
    d = _load("datapath_check")
    if d is None:
        return
    runs = {(r["rate_pps"], r["check"]): r for r in d["results"]["runs"] if "check" in r}
    on, off = runs.get((10000, True)), runs.get((10000, False))
    if on is None or off is None:
        return
    rows.append(
        [
            "per-packet lower check: lost window p99, 10,000 pps (check on / off)",
            f"{_ms(on['g2p_window_ms']['p99'])} / {_ms(off['g2p_window_ms']['p99'])} "
            f"(N = {on['trials']} each)",
            "–",
            _src("datapath_check", d),
        ]
    )


def _prog_cost(rows: list[list[str]]) -> None:
    d = _load("prog_cost")
    if d is None:
        return
    table = {row[0]: row for row in d["results"]["table"]}
    up = table.get("up")
    if up is None:
        return
    on = up[2].split(" / ")[0]
    off = up[1].split(" / ")[0]
    rows.append(
        [
            "`fo_egress` per packet (BPF_PROG_TEST_RUN, primary up)",
            f"{on} ns with the lower check, {off} ns without "
            f"(median of {d['results']['rounds']} rounds)",
            "–",
            _src("prog_cost", d),
        ]
    )


def _agent_cost(rows: list[list[str]]) -> None:
    d = _load("agent_cost")
    if d is None:
        return
    r = d["results"]
    rows.append(
        [
            "agent RSS; CPU while idle",
            f"{r['rss_after_events_kb'] / 1024:.0f} MiB after {r['events']:,} events; "
            f"{r['idle']['cpu_pct']:.1f} % over {r['idle_s']:g} s",
            "≈ 0",
            _src("agent_cost", d),
        ]
    )


def _proving_ground(rows: list[list[str]]) -> None:
    d = _load("proving_ground")
    if d is None:
        return
    by = {(s["mode"], s["step"]): s for s in d["summary"]}
    steps = [s for s in d["settings"]["steps"] if s != "baseline"]
    cells = []
    for step in steps:
        k, b = by.get(("kernel", step)), by.get(("bpfailover", step))
        if b is None:
            continue
        kern = f"{k['lost_p50']:g}" if k else "–"
        cells.append(f"{step} {kern} / {b['lost_p50']:g}")
    src = (
        f"[proving_ground](bench/results/proving_ground.json): `make proving-ground`, "
        f"{d['date'][:10]}, guest {d['guest_kernel']}"
    )
    rows.append(
        [
            "real drivers (QEMU guest): packets lost p50, kernel net_failover / bpfailover",
            "; ".join(cells) + f" (N = {d['settings']['trials']})",
            "bpfailover ≤ kernel",
            src,
        ]
    )


def block() -> str:
    rows: list[list[str]] = []
    for part in (
        _throughput,
        _failover,
        _planned,
        _datapath_check,
        _prog_cost,
        _agent_cost,
        _proving_ground,
    ):
        part(rows)
    head = ["what", "result", "target", "from"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([BEGIN, *out, END])


def splice(text: str, new_block: str) -> str:
    """text with its headline block replaced; ValueError if the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {BEGIN!r} ... {END!r} block")
    return text[:start] + new_block + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the block in README.md")
    args = ap.parse_args(argv)
    new = block()
    if args.write:
        README.write_text(splice(README.read_text(), new))
    else:
        print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the benchmarks: `python -m bench.run [--quick] [--only NAME ...]` (`make bench`,
`make bench-quick`). Writes bench/results/<name>.json (+ PNG), then summary.md and
README-performance.md from the JSON. Labs, agents and pins are removed even on failure
(and leftovers of an earlier, killed run are swept first)."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench import (
    agent_cost,
    common,
    datapath_check,
    doorbell_load,
    failover,
    metrics_load,
    planned,
    prog_cost,
    report,
    scale,
    throughput,
)

BENCHES = {
    "throughput": throughput.run,
    "failover": failover.run,
    "planned": planned.run,
    "agent_cost": agent_cost.run,
    "scale": scale.run,
    "metrics_load": metrics_load.run,
    "doorbell_load": doorbell_load.run,
    "datapath_check": datapath_check.bench_run,
    "prog_cost": prog_cost.bench_run,
}
FULL_ONLY = {"metrics_load", "doorbell_load"}  # not in --quick (only with --only)


_MAIN_PID = os.getpid()


def _sigterm(_sig: int, _frm: Any) -> None:
    # pyroute2's IPRoute(netns=...) forks helpers that inherit this handler and get
    # SIGTERM when done: they must just exit, not unwind (and tear down) our labs.
    if os.getpid() != _MAIN_PID:
        os._exit(143)
    raise KeyboardInterrupt  # unwind through every finally: labs, agents, pins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller subset (< 4 min)")
    ap.add_argument("--only", action="append", choices=list(BENCHES), help="repeatable")
    ap.add_argument(
        "--rounds", type=int, help="throughput: rounds (default 3, --quick 1); more = less noise"
    )
    ap.add_argument("--seconds", type=float, help="throughput: seconds per sample (default 4)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    stale = common.sweep_stale()
    if stale:
        common.log(f"bench: removed leftovers of an earlier run: {', '.join(stale)}")
    names = args.only or [n for n in BENCHES if not (args.quick and n in FULL_ONLY)]
    mode = "quick" if args.quick else "full"
    cmd = "make bench-quick" if args.quick else "make bench"
    if args.only:
        cmd = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    t_all = time.monotonic()
    failed: list[str] = []
    for name in names:
        meta = {
            "mode": mode,
            "command": cmd,
            "argv": [sys.executable, "-m", "bench.run", *(argv or sys.argv[1:])],
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": common.machine_info(),
            "loadavg_before": common.loadavg(),
        }
        if args.rounds or args.seconds:
            meta["overrides"] = {"rounds": args.rounds, "seconds": args.seconds}
        common.log(f"\n### {name} ({mode})")
        t = time.monotonic()
        try:
            BENCHES[name](args.quick, meta)
        except KeyboardInterrupt:
            common.log("bench: interrupted; cleaned up")
            return 130
        except Exception as e:  # one broken benchmark must not hide the others' results
            common.log(f"bench: {name} failed: {type(e).__name__}: {e}")
            failed.append(name)
            continue
        _stamp(name, time.monotonic() - t, common.loadavg())
        common.log(f"### {name}: {time.monotonic() - t:.0f}s")
    total = time.monotonic() - t_all
    report.write(total_s=total if not args.only else None, mode=mode)
    common.log(
        f"\nbench: {len(names) - len(failed)}/{len(names)} done in {total:.0f}s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def _stamp(name: str, elapsed: float, load_after: list[float]) -> None:
    import json

    path = common.RESULTS / f"{name}.json"
    doc = json.loads(path.read_text())
    doc["elapsed_s"] = round(elapsed, 1)
    doc["loadavg_after"] = load_after
    path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Doorbell under load: does an unprivileged multicast join/leave loop slow a switch?

Every IGMP/MLD report leaving the failover device rings the agent's doorbell, and any user
may send them: joining or leaving a group needs no privilege.  One group, the guest's
addresses on the failover device.  Two phases in the same run, each a paced flap storm of
the primary (its far end down/up, `toggles` changes, one every `interval` s):
  quiet  nothing else;
  load   a process running as nobody (setpriv) in the guest namespace loops
         IP_ADD_MEMBERSHIP / IP_DROP_MEMBERSHIP on the failover device (a new group each
         time, so each one is a report); it stops by itself after `joins` joins.
Measured per phase: the agent's own event -> map-write latency of every switch (p50, p99,
max) and the agent's CPU time.  The figure of merit is p99(load) / p99(quiet), measured in
the same run.  `python -m bench.doorbell_load --tag before` writes
bench/results/doorbell_load_before.json (compare two builds of the agent).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench import common
from bench.common import LinkSetter, lab_run, log, summary, table

# The join/leave loop, run as nobody: bounded by its own count, and by the bench's kill.
JOINER = r"""
import socket, struct, sys
ifindex, joins = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
done = 0
for i in range(joins):
    group = socket.inet_aton(f"239.77.{(i >> 8) & 255}.{i & 255}")
    mreqn = group + socket.inet_aton("0.0.0.0") + struct.pack("=i", ifindex)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, mreqn)
    done += 1
print(done)
"""


def storm(lab: Any, agent: Any, toggles: int, interval: float) -> dict[str, Any]:
    n = lab.names(0)
    far = LinkSetter(lab.hv)
    n0 = len(agent.events("switch"))
    cpu0, t0 = common.proc_cpu_s(agent.pid), time.monotonic()
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
    seconds = time.monotonic() - t0
    lat = [e["latency_us"] for e in agent.events("switch")[n0:]]
    return {
        "toggles": toggles,
        "seconds": seconds,
        "switches": len(lat),
        "latency_us": summary(lat),
        "latency_samples_us": lat,
        "agent_cpu_s": common.proc_cpu_s(agent.pid) - cpu0,
    }


def run(quick: bool, meta: dict[str, Any], tag: str = "") -> dict[str, Any]:
    toggles, interval = (100, 0.02) if quick else (300, 0.02)
    joins = 2_000_000  # more than a storm lasts: the bench stops it at the storm's end
    with lab_run("db") as lr:
        agent = lr.agent().start()
        lr.lab.address_failover(0)
        time.sleep(0.5)
        n = lr.lab.names(0)
        link = lr.lab.link(lr.lab.guest, n.failover)
        assert link is not None, f"no {n.failover} in {lr.lab.guest}"
        ifindex = int(link["ifindex"])
        quiet = storm(lr.lab, agent, toggles, interval)
        argv = ["ip", "netns", "exec", lr.lab.guest, "setpriv", "--reuid=65534"]
        argv += ["--regid=65534", "--clear-groups", "--no-new-privs"]
        argv += ["/usr/bin/python3", "-I", "-c", JOINER, str(ifindex), str(joins)]
        joiner = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)  # the loop is going
            if joiner.poll() is not None:
                raise RuntimeError(f"the join/leave loop ended early: {joiner.communicate()}")
            loaded = storm(lr.lab, agent, toggles, interval)
        finally:
            joiner.terminate()
            joiner.wait(10)
        alive = agent.proc is not None and agent.proc.poll() is None
    p99q, p99l = quiet["latency_us"].get("p99"), loaded["latency_us"].get("p99")
    p50q, p50l = quiet["latency_us"].get("p50"), loaded["latency_us"].get("p50")
    out = {
        "toggles": toggles,
        "interval_s": interval,
        "joiner": "uid 65534 (setpriv), IP_ADD_MEMBERSHIP + IP_DROP_MEMBERSHIP in a loop",
        "quiet": quiet,
        "load": loaded,
        "p50_ratio": (p50l / p50q) if p50q and p50l else None,
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
            f"{r['agent_cpu_s'] / r['seconds'] * 100:.0f}%",
        ]
        for name, r in (("quiet", quiet), ("load", loaded))
    ]
    print(
        f"\n== doorbell under load: an unprivileged join/leave loop during a flap storm "
        f"({toggles} toggles, {interval * 1e3:g} ms apart){f' [{tag}]' if tag else ''}"
    )
    headers = ["phase", "switches", "agent us p50", "agent us p99", "agent us max", "agent cpu"]
    print(table(headers, rows))
    ratio = out["p99_ratio"]
    log(f"  p99 load/quiet {ratio:.2f}" if ratio else "  p99 ratio n/a")
    common.save("doorbell_load" + (f"_{tag}" if tag else ""), out, meta)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.doorbell_load")
    ap.add_argument("--quick", action="store_true", help="100 toggles instead of 300")
    ap.add_argument("--tag", default="", help="results name suffix: doorbell_load_TAG.json")
    args = ap.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    meta = {
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench.doorbell_load " + shlex.join(given),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "loadavg_before": common.loadavg(),
    }
    run(args.quick, meta, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

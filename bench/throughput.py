"""Throughput through the failover device vs the same lab with no failover, in one run.

Three labs are up at once and measured interleaved (round-robin, order rotated each round,
median of the rounds), so a noisy neighbour hits every configuration alike:
  baseline  the guest address straight on the primary (Lab.address_lower_directly),
            standby admin down: the plain veth path, no BPF at all;
  fo-tc     failoverd, receive path TC (lower ingress -> bpf_redirect to the failover dev);
  fo-xdp    failoverd, receive path XDP (lower XDP -> devmap -> failover dev's hidden peer).
Tests, each both ways (tx = guest sends, through the failover egress; rx = guest receives,
iperf3 -R, through the lower's receive hook): iperf3 TCP 1 and 4 streams, and UDP with
18-byte payloads (64-byte frames) unlimited rate, counting delivered packets/s.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from typing import Any

from bench import common, plots
from bench.common import lab_run, log, median, table
from bpfailover import netns

PORT = 5301
TESTS = [
    ("tcp1", ["-P", "1"]),
    ("tcp4", ["-P", "4"]),
    ("udp64", ["-u", "-b", "0", "-l", "18"]),
]
CONFIGS = ["baseline", "fo-tc", "fo-xdp"]


def iperf(lab: Any, args: list[str], seconds: float) -> dict[str, float]:
    n = lab.names(0)
    argv = [
        "iperf3",
        "-c",
        n.peer_v4,
        "-p",
        str(PORT),
        "-t",
        f"{seconds:g}",
        "-J",
        "--connect-timeout",
        "3000",
        *args,
    ]
    p = subprocess.run(
        netns.cmd_in(lab.guest, argv),
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    try:
        j = json.loads(p.stdout)
        end = j["end"]
        if "-u" in args:
            s = end["sum"]
            secs = s["seconds"] or seconds
            return {
                "pps": (s["packets"] - s["lost_packets"]) / secs,
                "sent_pps": s["packets"] / secs,
            }
        return {"gbps": end["sum_received"]["bits_per_second"] / 1e9}
    except (ValueError, KeyError) as e:
        err = (p.stderr or p.stdout).strip()[-200:]
        raise RuntimeError(f"iperf3 {' '.join(args)} failed: {err}") from e


def run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    rounds, seconds = (1, 1.5) if quick else (3, 4.0)
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    counters: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        labs: dict[str, Any] = {}
        agents: dict[str, Any] = {}
        for cfg, tag in zip(CONFIGS, ("tpb", "tpt", "tpx"), strict=True):
            lr = stack.enter_context(lab_run(tag))
            labs[cfg] = lr.lab
            if cfg == "baseline":
                lr.lab.address_lower_directly(0, "primary")
            else:
                agents[cfg] = lr.agent({"rx_path": cfg.split("-")[1]}).start()
                lr.lab.address_failover(0)
            n = lr.lab.names(0)
            srv = subprocess.Popen(
                netns.cmd_in(lr.lab.peer, ["iperf3", "-s", "-p", str(PORT), "-B", n.peer_v4]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stack.callback(_stop, srv)
        time.sleep(0.5)
        for rnd in range(rounds):
            for name, args in TESTS:
                for direction in ("tx", "rx"):
                    a = args + (["-R"] if direction == "rx" else [])
                    order = CONFIGS[rnd % 3 :] + CONFIGS[: rnd % 3]
                    for cfg in order:
                        samples.setdefault((f"{name} {direction}", cfg), []).append(
                            iperf(labs[cfg], a, seconds)
                        )
            log(f"  throughput round {rnd + 1}/{rounds} done")
        for cfg, ag in agents.items():
            g = ag.group(0)
            counters[cfg] = {
                "lowers": {
                    lw["name"]: {k: lw[k] for k in ("active", "tx_packets", "rx_packets")}
                    for lw in g["lowers"]
                },
                "drops": {k: v for k, v in g["drops"].items() if v},
            }
    tests = []
    rows = []
    for name, _ in TESTS:
        for direction in ("tx", "rx"):
            key = f"{name} {direction}"
            metric = "pps" if name.startswith("udp") else "gbps"
            med = {cfg: median([s[metric] for s in samples[(key, cfg)]]) for cfg in CONFIGS}
            ratio = {
                cfg: med[cfg] / med["baseline"] if med["baseline"] else None for cfg in CONFIGS[1:]
            }
            target = 0.90 if metric == "pps" else 0.95
            tests.append(
                {
                    "name": key,
                    "metric": metric,
                    "median": med,
                    "ratio": ratio,
                    "target": target,
                    "samples": {cfg: samples[(key, cfg)] for cfg in CONFIGS},
                }
            )
            unit = (lambda v: f"{v / 1e3:,.1f}k") if metric == "pps" else (lambda v: f"{v:.2f}")
            rows.append(
                [
                    key,
                    "kpps" if metric == "pps" else "Gbit/s",
                    unit(med["baseline"]),
                    unit(med["fo-tc"]),
                    unit(med["fo-xdp"]),
                    ratio["fo-tc"],
                    ratio["fo-xdp"],
                    f">= {target:.2f}",
                ]
            )
    out = {
        "rounds": rounds,
        "seconds": seconds,
        "configs": CONFIGS[1:],
        "tests": tests,
        "datapath_counters": counters,
    }
    print("\n== throughput: failover device vs address on the primary (median of rounds)")
    print(
        table(
            ["test", "unit", "baseline", "fo-tc", "fo-xdp", "tc ratio", "xdp ratio", "target"], rows
        )
    )
    common.save("throughput", out, meta)
    plots.throughput(out)
    return out


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()

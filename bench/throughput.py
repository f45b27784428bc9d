"""Throughput through the failover device vs the same lab with no failover, in one run.

Three labs are up at once and measured interleaved (round-robin, order rotated each round,
median of the rounds), so a noisy neighbour hits every configuration alike:
  baseline  the guest address straight on the primary (Lab.address_lower_directly),
            standby admin down: the plain veth path, no BPF at all;
  fo-tc     failoverd as shipped: receive path TC (lower ingress -> bpf_redirect through
            the failover device's hidden peer), tx_path direct (its clsact egress redirects);
  fo-xdp    as fo-tc with receive path XDP (lower XDP -> devmap -> the hidden peer);
  fo-veth   as fo-tc with tx_path veth (the device transmits into its hidden peer, whose
            ingress redirects: counted on the device, tapped, shaped by its qdisc);
  fo-nocheck  as fo-tc with the datapath's per-packet lower check off (fo_meta), to show
            what that check costs.
Tests, each both ways (tx = guest sends, through the failover egress; rx = guest receives,
iperf3 -R, through the lower's receive hook): iperf3 TCP 1 and 4 streams, and UDP with
18-byte payloads (64-byte frames) unlimited rate, counting delivered packets/s.
After the rounds, one 64-byte UDP sample each way per failoverd config with the kernel's
BPF statistics on (kernel.bpf_stats_enabled, off again afterwards; it adds two clock reads
per program run, so it is kept out of the rounds): the programs' own run time per packet,
a figure that does not move with the machine's load as pps does.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import common, plots
from bench.common import lab_run, log, median, table
from bench.datapath_check import set_check
from bpfailover import netns

PORT = 5301
TESTS = [
    ("tcp1", ["-P", "1"]),
    ("tcp4", ["-P", "4"]),
    ("udp64", ["-u", "-b", "0", "-l", "18"]),
]
CONFIGS = ["baseline", "fo-tc", "fo-xdp", "fo-veth", "fo-nocheck"]
AGENT = {  # group settings of each failoverd config, spelled out (defaults may change)
    "fo-tc": {"rx_path": "tc", "tx_path": "direct"},
    "fo-xdp": {"rx_path": "xdp", "tx_path": "direct"},
    "fo-veth": {"rx_path": "tc", "tx_path": "veth"},
    "fo-nocheck": {"rx_path": "tc", "tx_path": "direct"},
}
PROG_PINS = ("prog_fo_egress", "prog_lower_ingress", "prog_xdp_lower_rx")


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
            # System CPU of the sending side per packet sent: the softirq path of every
            # hop (the datapath included) runs in the sender's context, so this is the
            # per-packet cost of the path, and it holds on a busy machine where pps does not.
            cpu = end["cpu_utilization_percent"]
            sys_pct = cpu["remote_system"] if "-R" in args else cpu["host_system"]
            return {
                "pps": (s["packets"] - s["lost_packets"]) / secs,
                "sent_pps": s["packets"] / secs,
                "cpu_us_per_pkt": sys_pct / 100 * secs / max(s["packets"], 1) * 1e6,
            }
        return {"gbps": end["sum_received"]["bits_per_second"] / 1e9}
    except (ValueError, KeyError) as e:
        err = (p.stderr or p.stdout).strip()[-200:]
        raise RuntimeError(f"iperf3 {' '.join(args)} failed: {err}") from e


def run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    rounds, seconds = (1, 1.5) if quick else (3, 4.0)
    over = meta.get("overrides", {})
    rounds, seconds = over.get("rounds") or rounds, over.get("seconds") or seconds
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    counters: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        labs: dict[str, Any] = {}
        agents: dict[str, Any] = {}
        for cfg, tag in zip(CONFIGS, ("tpb", "tpt", "tpx", "tpv", "tpn"), strict=True):
            lr = stack.enter_context(lab_run(tag))
            labs[cfg] = lr.lab
            if cfg == "baseline":
                lr.lab.address_lower_directly(0, "primary")
            else:
                agents[cfg] = lr.agent(AGENT[cfg]).start()
                if cfg == "fo-nocheck":
                    set_check(agents[cfg].pin_dir, False)
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
                    k = rnd % len(CONFIGS)
                    order = CONFIGS[k:] + CONFIGS[:k]
                    for cfg in order:
                        samples.setdefault((f"{name} {direction}", cfg), []).append(
                            iperf(labs[cfg], a, seconds)
                        )
            log(f"  throughput round {rnd + 1}/{rounds} done")
        with _bpf_stats():
            bpf_ns = _prog_costs(labs, agents, seconds)
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
            cpu = None
            if metric == "pps":
                cpu = {
                    cfg: median([x["cpu_us_per_pkt"] for x in samples[(key, cfg)]])
                    for cfg in CONFIGS
                }
            tests.append(
                {
                    "name": key,
                    "metric": metric,
                    "median": med,
                    "ratio": ratio,
                    "target": target,
                    "samples": {cfg: samples[(key, cfg)] for cfg in CONFIGS},
                    # sender system CPU per packet (µs): baseline / fo = the pps ratio a
                    # CPU-bound sender would see, whatever else the machine is doing
                    "cpu_us_per_pkt": cpu,
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
                    unit(med["fo-veth"]),
                    unit(med["fo-nocheck"]),
                    ratio["fo-tc"],
                    ratio["fo-xdp"],
                    ratio["fo-veth"],
                    ratio["fo-nocheck"],
                    f">= {target:.2f}",
                ]
            )
    out = {
        "rounds": rounds,
        "seconds": seconds,
        "configs": CONFIGS[1:],
        "tests": tests,
        "datapath_counters": counters,
        "bpf_ns_per_run": bpf_ns,
    }
    print("\n== throughput: failover device vs address on the primary (median of rounds)")
    print(
        table(
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
            ],
            rows,
        )
    )
    cpu_rows = [
        [
            t["name"],
            *(f"{t['cpu_us_per_pkt'][c]:.2f}" for c in CONFIGS),
            *(t["cpu_us_per_pkt"]["baseline"] / t["cpu_us_per_pkt"][c] for c in CONFIGS[1:]),
        ]
        for t in tests
        if t["cpu_us_per_pkt"]
    ]
    print("\n== 64-byte UDP: sending side's system CPU per packet, µs (baseline / config)")
    print(table(["test", *CONFIGS, *(f"{c} ratio" for c in CONFIGS[1:])], cpu_rows))
    print("\n== BPF programs' own run time per packet, ns (64-byte UDP, kernel.bpf_stats_enabled)")
    print(
        table(
            ["config", "direction", *PROG_PINS],
            [
                [cfg, d, *(f"{v[d].get(p, 0):.0f}" if v[d].get(p) else "-" for p in PROG_PINS)]
                for cfg, v in bpf_ns.items()
                for d in ("tx", "rx")
            ],
        )
    )
    out["paired"] = paired(tests)
    print_paired(out["paired"])
    common.save("throughput", out, meta)
    plots.throughput(out)
    return out


PAIRS = (("fo-tc", "baseline"), ("fo-veth", "fo-tc"), ("fo-tc", "fo-nocheck"))


def paired(tests: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per-round ratios of two configs measured back to back in the same round (fo-veth vs
    fo-tc: the transmit paths), as median and range: the spread says how far a single
    ratio of medians can be trusted on this machine."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in tests:
        metric = t["metric"]
        for a, b in PAIRS:
            sa, sb = t["samples"].get(a), t["samples"].get(b)
            if not sa or not sb:
                continue
            r = sorted(x[metric] / y[metric] for x, y in zip(sa, sb, strict=False) if y[metric])
            if r:
                out.setdefault(t["name"], {})[f"{a}/{b}"] = {
                    "median": median(r),
                    "min": r[0],
                    "max": r[-1],
                    "n": len(r),
                }
    return out


def print_paired(pairs: dict[str, dict[str, dict[str, float]]]) -> None:
    names = [f"{a}/{b}" for a, b in PAIRS]
    print("\n== per-round ratios (same round, back to back): median (min-max)")
    print(
        table(
            ["test", *names],
            [
                [
                    test,
                    *(
                        f"{v[n]['median']:.3f} ({v[n]['min']:.2f}-{v[n]['max']:.2f})"
                        if n in v
                        else "-"
                        for n in names
                    ),
                ]
                for test, v in pairs.items()
            ],
        )
    )


@contextlib.contextmanager
def _bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled on for the block, back to what it was after."""
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = knob.read_text().strip()
    knob.write_text("1")
    try:
        yield
    finally:
        knob.write_text(before)


def _prog_stats(pin_dir: Path) -> dict[str, tuple[int, int]]:
    """pin name -> (run_time_ns, run_cnt) of an agent's pinned programs."""
    out = {}
    for pin in PROG_PINS:
        p = subprocess.run(
            ["bpftool", "-j", "prog", "show", "pinned", str(pin_dir / pin)],
            capture_output=True,
            text=True,
            check=False,
        )
        with contextlib.suppress(ValueError, KeyError):
            j = json.loads(p.stdout)
            out[pin] = (int(j.get("run_time_ns", 0)), int(j.get("run_cnt", 0)))
    return out


def _prog_costs(
    labs: dict[str, Any], agents: dict[str, Any], seconds: float
) -> dict[str, dict[str, dict[str, float]]]:
    """config -> direction -> pin -> ns per run, over one 64-byte UDP sample each way."""
    udp = dict(TESTS)["udp64"]
    costs: dict[str, dict[str, dict[str, float]]] = {}
    for cfg, ag in agents.items():
        for direction in ("tx", "rx"):
            a = _prog_stats(ag.pin_dir)
            iperf(labs[cfg], udp + (["-R"] if direction == "rx" else []), seconds)
            b = _prog_stats(ag.pin_dir)
            costs.setdefault(cfg, {})[direction] = {
                pin: (b[pin][0] - a[pin][0]) / (b[pin][1] - a[pin][1])
                for pin in b
                if pin in a and b[pin][1] - a[pin][1] > 1000
            }
    return costs


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


if __name__ == "__main__":  # re-read committed runs: python -m bench.throughput FILE.json ...
    import sys

    for f in sys.argv[1:]:
        print(f"\n# {f}")
        print_paired(paired(json.loads(Path(f).read_text())["results"]["tests"]))

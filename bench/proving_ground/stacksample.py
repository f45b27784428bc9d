"""Where a UDP sender's skbs are, sampled inside the proving-ground guest (stdlib only).

A UDP socket's send buffer is charged for every skb it sent until the skb is freed: by
the NIC driver once the device has taken it (TX completion), or by a drop on the way.  A
sender refused with EAGAIN means the skbs stayed somewhere: in a qdisc held back by a
stopped driver queue, in a NIC's TX ring the device emulation did not drain, in a
backlog, in a neighbour's queue while its address is resolved.  Every `--interval`
seconds this prints one JSON line: the guest's monotonic time, the bytes charged to the
sockets bound to `--port` (/proc/net/udp tx_queue), per netdev the TX packets and drops
and BQL's in-flight bytes (e1000e has BQL), softnet's drops and squeezes, the IPv4
neighbours' flags (0x0: incomplete, packets queued); when a socket holds more than
`--deep` bytes, `tc -s qdisc` of every device as well (a fork: only then).  Bounded by
`--duration`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def udp_tx_queue(port: int) -> list[int]:
    hexport = f":{port:04X}"
    out = []
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1].endswith(hexport):
                out.append(int(parts[4].split(":")[0], 16))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def links() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for d in Path("/sys/class/net").iterdir():
        st = d / "statistics"
        row = {
            "tx": int(_read(st / "tx_packets") or 0),
            "txdrop": int(_read(st / "tx_dropped") or 0),
            "carrier": int(_read(d / "carrier") or 0),
        }
        inflight = _read(d / "queues" / "tx-0" / "byte_queue_limits" / "inflight")
        if inflight:
            row["bql"] = int(inflight)
        out[d.name] = row
    return out


def arp() -> dict[str, str]:
    """IPv4 neighbours: address -> flags (0x2 complete, 0x0 incomplete: packets queued)."""
    out = {}
    with open("/proc/net/arp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            out[cols[0]] = cols[2]
    return out


def softnet() -> tuple[int, int]:
    drop = squeeze = 0
    with open("/proc/net/softnet_stat") as f:
        for line in f:
            cols = line.split()
            drop += int(cols[1], 16)
            squeeze += int(cols[2], 16)
    return drop, squeeze


def qdiscs() -> list[str]:
    p = subprocess.run(["tc", "-s", "qdisc", "show"], capture_output=True, text=True, check=False)
    keep, cur = [], ""
    for line in p.stdout.splitlines():
        if line.startswith("qdisc"):
            cur = " ".join(line.split()[:5])
        elif ("backlog" in line and " 0b 0p" not in line) or (
            "dropped" in line and "(dropped 0," not in line
        ):
            keep.append(f"{cur}: {line.strip()}")
    return keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stacksample")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--deep", type=int, default=100_000, help="bytes: then tc -s qdisc too")
    a = ap.parse_args(argv)
    end = time.monotonic() + a.duration
    print(
        json.dumps(
            {"pid": os.getpid(), "wmem_default": _read(Path("/proc/sys/net/core/wmem_default"))}
        ),
        flush=True,
    )
    while time.monotonic() < end:
        t = time.monotonic()
        txq = udp_tx_queue(a.port)
        row: dict[str, object] = {"t": round(t, 3), "txq": txq, "links": links()}
        row["softnet"] = softnet()
        row["arp"] = arp()
        if txq and max(txq) > a.deep:
            row["qdisc"] = qdiscs()
        print(json.dumps(row, separators=(",", ":")), flush=True)
        time.sleep(max(0.0, t + a.interval - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What fo_egress costs per packet, and what the per-packet lower check adds to it.

`python -m bench.prog_cost [--rounds 9] [--repeat 200000]` (root; ~1 min).

BPF_PROG_TEST_RUN runs the pinned fo_egress `repeat` times on one 64-byte frame in a
private netns (real veths: the check walks the real netns and reads real link state) and
the kernel reports the mean time per run: the program alone, none of the redirect that
follows, and no other load in the figure, so it moves far less than pps does.  Two
datapaths are loaded side by side: the check's kernel reads fetched two fields with one
probe read where they lie close together (the default), and with one probe read per field
(`read_window` 0: the code before this change).  Each is measured with the check off (the
baseline of the same programs and maps) and on, with the active lower up and with it
without carrier (then the check looks up both lowers and the frame goes to the standby),
in rounds with the order rotated; medians of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

from bench import common
from bench.common import log, median, table
from bench.datapath_check import set_check
from bpfailover import netns
from bpfailover.datapath import bpfsys
from bpfailover.datapath import layout_gen as L
from bpfailover.datapath.maps import Datapath
from bpfailover_lab.agent_run import BPFFS

VARIANTS = {"one read": (), "separate reads": ("--layout-override", '{"read_window": 0}')}
DEVS = ("fo", "sb", "pr")  # the failover device, its standby and primary: veth pairs
SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff); ifindex at offset 40
TC_ACT_REDIRECT = 7
# 64 bytes: Ethernet (to a peer, from the group MAC), IPv4 UDP 198.18.0.1 -> 198.18.0.2
GROUP_MAC = bytes.fromhex("525400001201")
FRAME = (
    bytes.fromhex("525400009901")
    + GROUP_MAC
    + b"\x08\x00"
    + bytes.fromhex("45000032000040004011")
    + b"\0\0"
    + bytes([198, 18, 0, 1, 198, 18, 0, 2])
    + struct.pack("!HHHH", 5001, 5002, 30, 0)
    + bytes(22)
)


def _ifindex(ns: str, dev: str) -> int:
    out = netns.run_in(ns, ["ip", "-o", "link", "show", dev])
    return int(out.stdout.split(":", 1)[0])


@contextlib.contextmanager
def rig() -> Iterator[tuple[str, dict[str, int], dict[str, Datapath]]]:
    """A netns with the three veth pairs up and one datapath per variant, group 0 set up
    as the agent would (tx_path veth: fo_egress serves the hidden peer `fop`)."""
    pre = common.prefix("pc")
    ns = f"{pre}-guest"
    dps: dict[str, Datapath] = {}
    netns.run_in(None, ["ip", "netns", "add", ns])
    try:
        cmds = [f"link add {d} type veth peer name {d}p" for d in DEVS]
        cmds += [f"link set {n} up" for d in DEVS for n in (d, f"{d}p")]
        subprocess.run(
            ["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds), text=True, check=True
        )
        ifx = {n: _ifindex(ns, n) for d in DEVS for n in (d, f"{d}p")}
        for i, (name, args) in enumerate(VARIANTS.items()):
            dp = dps[name] = Datapath.open(BPFFS / f"bpfailover-{pre}-{i}", loader_args=args)
            if dp.datapath_check() != "on":
                raise RuntimeError(f"{name}: the per-packet check is {dp.datapath_check()}")
            g = dp.alloc_group("fo")
            dp.update_group(
                g, master_ifindex=ifx["fo"], peer_ifindex=ifx["fop"], mac=GROUP_MAC.hex(":")
            )
            dp.set_dev(ifx["fop"], g, L.FO_ROLE_MASTER)
            for slot, dev in ((L.FO_SLOT_STANDBY, "sb"), (L.FO_SLOT_PRIMARY, "pr")):
                dp.set_dev(ifx[dev], g, slot)
                dp.set_lower(g, slot, ifx[dev])
            dp.flip(g, L.FO_SLOT_PRIMARY)
        yield ns, ifx, dps
    finally:
        for dp in dps.values():
            with contextlib.suppress(Exception):
                dp.close()
            shutil.rmtree(dp.pin_dir, ignore_errors=True)
        netns.run_in(None, ["ip", "netns", "del", ns], check=False)


def ns_per_run(ns: str, dp: Datapath, ifindex: int, repeat: int) -> int:
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("=I", ctx, 40, ifindex)
    with netns.entered(ns):
        res = bpfsys.prog_test_run(dp.prog_fd("prog_fo_egress"), FRAME, bytes(ctx), repeat)
    if res.retval != TC_ACT_REDIRECT:
        raise RuntimeError(f"fo_egress returned {res.retval}, not a redirect")
    return res.duration_ns


def run(rounds: int, repeat: int) -> dict[str, Any]:
    samples: dict[str, list[int]] = {}
    with rig() as (ns, ifx, dps):
        for primary in ("up", "no carrier"):
            # the primary's far end down: the primary is up without carrier
            netns.run_in(ns, ["ip", "link", "set", "prp", "up" if primary == "up" else "down"])
            settings = [(v, c) for v in VARIANTS for c in ("off", "on")]
            for r in range(rounds):
                for variant, check in settings[r % len(settings) :] + settings[: r % len(settings)]:
                    set_check(dps[variant].pin_dir, check == "on")
                    key = f"{variant} / check {check} / primary {primary}"
                    samples.setdefault(key, []).append(
                        ns_per_run(ns, dps[variant], ifx["fop"], repeat)
                    )
    return {"rounds": rounds, "repeat": repeat, "samples": samples}


def report(out: dict[str, Any]) -> list[list[Any]]:
    s = {k: median(v) for k, v in out["samples"].items()}
    rows = []
    for primary in ("up", "no carrier"):
        base = {v: s[f"{v} / check off / primary {primary}"] for v in VARIANTS}
        on = {v: s[f"{v} / check on / primary {primary}"] for v in VARIANTS}
        rows.append(
            [
                primary,
                f"{base['one read']:.0f} / {base['separate reads']:.0f}",
                f"{on['one read']:.0f} / {on['separate reads']:.0f}",
                f"{on['one read'] - base['one read']:.0f} / "
                f"{on['separate reads'] - base['separate reads']:.0f}",
                f"{on['one read'] / on['separate reads']:.3f}",
            ]
        )
    log(
        table(
            [
                "active lower",
                "check off ns (one / separate)",
                "check on ns",
                "the check's own ns",
                "one read / separate, check on",
            ],
            rows,
        )
    )
    return rows


def bench_run(quick: bool, meta: dict[str, Any]) -> dict[str, Any]:
    """For bench.run: 9 rounds of 200k runs (quick: 3 of 100k)."""
    out = run(3, 100_000) if quick else run(9, 200_000)
    out["table"] = report(out)
    common.save("prog_cost", out, meta)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.prog_cost", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=200_000, help="runs per sample")
    args = ap.parse_args(argv)
    common.sweep_stale()
    out = run(args.rounds, args.repeat)
    out["table"] = report(out)
    path = common.save("prog_cost", out, common.machine_info())
    log(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

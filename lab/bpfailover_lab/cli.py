"""`failover-lab`: up, down, show, migrate, traffic, demo."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from pyroute2 import IPRoute

from bpfailover import netns
from bpfailover.datapath.maps import lock_holder, remove_lock
from bpfailover.ops.cli import DefaultsHelp
from bpfailover_lab import traffic
from bpfailover_lab.demo import demo
from bpfailover_lab.topology import MAX_GROUPS, Lab, LabError, _err, group_names


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> _Parser:
    p = _Parser(
        prog="failover-lab",
        description="net_failover lab in network namespaces",
        formatter_class=DefaultsHelp,
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, formatter_class=DefaultsHelp)
        c.add_argument("--prefix", default="fo", help="namespace name prefix")
        return c

    c = cmd("up", "create the namespaces, bridge and lowers, then print the next steps")
    c.add_argument(
        "--groups",
        type=int,
        default=1,
        help=f"failover groups (1..{MAX_GROUPS}): group N has standby ens{{10+10N}}nsby and "
        "primary ens{11+10N} in PREFIX-guest",
    )
    c.add_argument(
        "--standby-link",
        choices=["up", "down"],
        default="up",
        help="carrier of the standby's far end at start",
    )
    cmd("down", "remove the lab")
    cmd("show", "print the lab's devices and addresses")
    c = cmd("migrate", "replay the net_failover.rst migration script")
    c.add_argument("--group", type=int, default=0, help="which group (0-based)")
    c.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds between the script's steps",
    )
    c = cmd(
        "traffic",
        "UDP stream between the guest failover address and the peer; exit 1 when more than "
        "--max-loss is lost or a send fails",
    )
    c.add_argument("--group", type=int, default=0, help="which group (0-based)")
    c.add_argument("--rate", type=int, default=1000, help="packets per second per direction")
    c.add_argument("--duration", type=float, default=2.0, help="seconds")
    c.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    c.add_argument("--ipv6", action="store_true", help="between the IPv6 addresses")
    c.add_argument("--json", action="store_true", help="the report as JSON")
    c.add_argument(
        "--max-loss",
        type=float,
        default=1.0,
        metavar="PERCENT",
        help="loss per direction above which it exits 1",
    )
    cmd("demo", "bring a lab up, show it, take it down")
    return p


def _groups_present(prefix: str) -> int:
    """Group count of an existing lab, read from the guest (lowers ens{N}nsby)."""
    lab = Lab(prefix)
    if not netns.exists(lab.guest):
        return 1
    with IPRoute(netns=lab.guest) as ipr:
        names = {str(m.get("ifname")) for m in ipr.get_links()}
    n = 0
    while n < MAX_GROUPS and group_names(n).standby in names:
        n += 1
    return max(n, 1)


def next_steps(lab: Lab) -> str:
    """What to do after `up` (docs/lab.md walks through it)."""
    g = lab.names(0)
    p = lab.prefix
    opt = "" if p == "fo" else f" --prefix {p}"
    return "\n".join(
        [
            f"lab {p} is up: lowers {g.standby} (standby) and {g.primary} (primary) in netns "
            f"{lab.guest}, the peer {g.peer_v4} in {lab.peer}. Next (docs/lab.md):",
            f"  failoverd --config {lab.agent_config} --netns {lab.guest} &   # the agent",
            f"  ip -n {lab.guest} addr add {g.guest_v4}/{g.prefixlen_v4} dev {g.failover}",
            f"  failover-lab traffic{opt}               # UDP both ways, exits 1 on loss",
            f"  ip -n {lab.hv} link set {g.vfport} down   # the VF's link drops: a failover",
            f"  failoverctl --socket {lab.agent_socket} status",
            f"  failoverctl --config {lab.agent_config} doctor --netns {lab.guest}",
            f"  failover-lab down{opt}                  # (stop failoverd first)",
        ]
    )


def remove_lab_agent_pins(lab: Lab) -> None:
    """The pins of the lab's agent go with its lab; refused (before anything is removed)
    while that agent still runs: it holds their lock."""
    pins = lab.agent_pins
    if not pins.is_dir():
        return
    if not remove_lock(pins):
        pid = lock_holder(pins)
        who = f"pid {pid}, holding" if pid is not None else "it holds"
        raise LabError(f"the lab's failoverd still runs ({who} {pins}): stop it first")
    shutil.rmtree(pins, ignore_errors=True)


def traffic_failures(report: traffic.StreamReport, max_loss_pct: float) -> list[str]:
    """Why a stream failed (empty: it did not): send errors, or loss above the limit."""
    out = []
    for name, d in report.directions:
        pct = 100.0 * d.lost / d.sent if d.sent else 100.0
        if d.send_errors:
            out.append(f"{name}: {d.send_errors} send errors")
        if d.sent == 0 or pct > max_loss_pct:
            out.append(f"{name}: {d.lost} of {d.sent} lost ({pct:.1f}% > {max_loss_pct:g}%)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:  # every command creates, enters or removes network namespaces
        print(
            f"failover-lab: {args.cmd} needs root (network namespaces, the bpffs)", file=sys.stderr
        )
        return 1
    try:
        if args.cmd == "up":
            lab = Lab(args.prefix, args.groups)
            lab.up(standby_link=args.standby_link == "up")
            print(next_steps(lab))
        elif args.cmd == "down":
            lab = Lab(args.prefix)  # validates the prefix
            remove_lab_agent_pins(lab)
            lab.down()
        elif args.cmd == "show":
            print(Lab(args.prefix).describe())
        elif args.cmd == "migrate":
            lab = Lab(args.prefix, _groups_present(args.prefix))
            if not lab.exists():
                raise LabError(f"no lab {args.prefix}: run `failover-lab up` first")
            lab.migrate(args.group, args.pause)
        elif args.cmd == "traffic":
            lab = Lab(args.prefix, _groups_present(args.prefix))
            report = traffic.run(
                lab,
                args.group,
                rate_pps=args.rate,
                duration_s=args.duration,
                size=args.size,
                ipv6=args.ipv6,
            )
            print(report.to_json() if args.json else report.format())
            bad = traffic_failures(report, args.max_loss)
            if bad:
                print(f"failover-lab: traffic: {'; '.join(bad)}", file=sys.stderr)
                return 1
        elif args.cmd == "demo":
            return demo(args.prefix)
        return 0
    except KeyboardInterrupt:
        print("failover-lab: interrupted", file=sys.stderr)
        return 130
    except PermissionError as e:  # root without the capabilities (a container): say which
        what = f"{e.filename}: " if e.filename else ""
        print(
            f"failover-lab: {what}permission denied (needs root with CAP_SYS_ADMIN, CAP_NET_ADMIN)",
            file=sys.stderr,
        )
        return 1
    except Exception as e:  # every runtime failure: one line, exit 1
        print(f"failover-lab: {_err(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

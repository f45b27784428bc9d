"""`failover-lab`: up, down, show, migrate, traffic, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from pyroute2 import IPRoute

from bpfailover import netns
from bpfailover_lab import traffic
from bpfailover_lab.demo import demo
from bpfailover_lab.topology import MAX_GROUPS, Lab, LabError, _err, group_names


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> _Parser:
    p = _Parser(prog="failover-lab", description="net_failover lab in network namespaces")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--prefix", default="fo", help="namespace name prefix (default fo)")
        return c

    c = cmd("up", "create the namespaces, bridge and lowers")
    c.add_argument("--groups", type=int, default=1)
    c.add_argument("--standby-link", choices=["up", "down"], default="up")
    cmd("down", "remove the lab")
    cmd("show", "print the lab's devices and addresses")
    c = cmd("migrate", "replay the net_failover.rst migration script")
    c.add_argument("--group", type=int, default=0)
    c.add_argument("--pause", type=float, default=0.5)
    c = cmd("traffic", "UDP stream between the guest failover address and the peer")
    c.add_argument("--group", type=int, default=0)
    c.add_argument("--rate", type=int, default=1000, help="packets per second per direction")
    c.add_argument("--duration", type=float, default=2.0, help="seconds")
    c.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    c.add_argument("--ipv6", action="store_true")
    c.add_argument("--json", action="store_true")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "up":
            Lab(args.prefix, args.groups).up(standby_link=args.standby_link == "up")
        elif args.cmd == "down":
            Lab(args.prefix).down()
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
        elif args.cmd == "demo":
            return demo(args.prefix)
        return 0
    except KeyboardInterrupt:
        print("failover-lab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every runtime failure: one line, exit 1
        print(f"failover-lab: {_err(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

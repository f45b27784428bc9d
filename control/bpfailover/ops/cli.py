"""failoverctl: talk to failoverd over its control socket (and check the host: doctor).

    failoverctl [--socket PATH | --config FILE] status [--json] [--check] [GROUP]
    failoverctl set-primary GROUP LOWER|--auto [--wait SECONDS] [--json]
    failoverctl teardown GROUP [--yes]
    failoverctl teardown --pins DIR GROUP|--all [--yes] [--netns NAME]   (no agent)
    failoverctl doctor [--netns NAME]

Exit codes (docs/operators.md): 0 ok, 1 failed (the agent refused: its reason on stderr),
2 usage, 3 agent unreachable, 4 degraded (`status --check`), 5 timed out (`set-primary --wait`),
6 redundancy lost (`status --check`: traffic flows, but through the one usable lower left).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from bpfailover.model import paths
from bpfailover.model.status import (
    AgentStatus,
    GroupStatus,
    LowerCounters,
    LowerStatus,
    StatusFormatError,
)
from bpfailover.ops import api

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DEGRADED = 4
EXIT_TIMEOUT = 5
EXIT_NOT_REDUNDANT = 6

DEFAULT_SOCKET = "/run/bpfailover/control.sock"


class DefaultsHelp(argparse.HelpFormatter):
    """--help names an option's default: "(default: …)" added to an option whose help
    does not say it already (none for flags and options without a default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS)
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def socket_path(cli_socket: str | None, cli_config: str | None) -> str:
    """--socket, else the config's control.socket (--config / $BPFAILOVER_CONFIG / the
    default file, when it exists), else the built-in default."""
    if cli_socket:
        return cli_socket

    path = paths.config_path(cli_config)
    explicit = bool(cli_config or os.environ.get(paths.CONFIG_ENV))
    try:
        present = path.exists()
    except PermissionError:  # a directory on the way we may not search: it may be there
        present = True
    if explicit or present:
        from bpfailover.model import config as configmod  # pydantic: only with a config

        try:
            return configmod.load_config(path).control.socket
        except configmod.ConfigError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    return DEFAULT_SOCKET


PERMISSION_HINT = "run as root or as a member of the config's control.group"


def unreachable_message(e: OSError) -> str:
    """One line: why the socket did not answer, and the hint that fits that reason."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on the control socket: {e.strerror or e} ({PERMISSION_HINT})"
    if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return f"agent unreachable: {e.strerror or e} (is failoverd running?)"
    return f"agent unreachable: {e.strerror or e} (is failoverd running, or hung?)"


def call(sock: str, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    try:
        reply = api.request(sock, msg, timeout)
    except api.AgentUnreachable as e:
        raise CliError(unreachable_message(e), EXIT_UNREACHABLE) from None
    except api.ReplyError as e:
        raise CliError(str(e), EXIT_UNREACHABLE) from None
    if not reply.get("ok"):
        raise CliError(str(reply.get("error") or "refused without a reason"), EXIT_FAILED)
    return reply


# -- status ---------------------------------------------------------------------------------


def fetch_status(sock: str) -> AgentStatus:
    """The agent's status, parsed into the typed snapshot (docs/status-schema.md)."""
    reply = call(sock, {"cmd": "status"})
    try:
        return AgentStatus.from_json(reply.get("status"))
    except StatusFormatError as e:
        raise CliError(f"agent replied with a status this failoverctl cannot read: {e}") from None


def degraded_reasons(group: GroupStatus) -> list[str]:
    """Why `status --check` calls a group degraded (empty: healthy)."""
    if not any(lw.usable for lw in group.lowers):
        return ["no usable lower: traffic is dropped"]
    primary = group.lower("primary")
    if group.active == "standby" and primary is not None and primary.usable:
        why = f"running on the standby while primary {primary.name} is usable"
        if group.override == "standby":
            why += f" (operator override: failoverctl set-primary {group.name} --auto clears it)"
        return [why]
    return []


def redundancy_reasons(group: GroupStatus, now: float) -> list[str]:
    """Why `status --check` says a group's redundancy is lost (empty: it has it, or lost it
    for less than its grace, as during a migration's VF unplug)."""
    if not group.redundancy_lost(now):
        return []
    assert group.single_since is not None
    gone = [r for r in ("primary", "standby") if not (lw := group.lower(r)) or not lw.usable]
    since = _ago(group.single_since)
    return [
        f"only one usable lower since {since} ({' and '.join(gone)} not usable): the next "
        "failure cuts the guest off"
    ]


def status_document(st: AgentStatus, only: str | None = None) -> dict[str, Any]:
    """The stable `status --json` document (docs/status-schema.md)."""
    return st.document(degraded_reasons, only)


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    d = max(0.0, time.time() - t)
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.1f}h ago"


def format_group(g: GroupStatus) -> list[str]:
    degraded = degraded_reasons(g)
    lost = redundancy_reasons(g, time.time())
    state = (
        "DEGRADED: " + "; ".join(degraded)
        if degraded
        else "REDUNDANCY LOST: " + "; ".join(lost)
        if lost
        else "ok"
    )
    out = [
        f"{g.name}: active {g.active_lower or 'none'} ({g.active or '-'}), "
        f"override {g.override or 'auto'}, carrier {'on' if g.carrier else 'off'}, "
        f"mac {g.mac}, mtu {g.mtu} -- {state}"
    ]
    head = ("", "LOWER", "IFINDEX", "ROLE", "USABLE", "ADMIN", "CARRIER", "TX_PKTS", "RX_PKTS")
    rows = [head]
    for lw in g.lowers:
        c = lw.counters or LowerCounters()
        rows.append(
            (
                "*" if lw.active else "",
                lw.name,
                str(lw.ifindex),
                lw.role,
                _yes(lw.usable),
                "up" if lw.admin_up else "down",
                _yes(lw.carrier),
                str(c.tx_packets),
                str(c.rx_packets),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if g.waiting_for_udev:
        out.append(
            "  waiting for udev to name it (not a lower yet): " + ", ".join(g.waiting_for_udev)
        )
    sw = g.last_switch
    if sw is not None:
        out.append(
            f"  last switch {_ago(sw.time)}: {sw.from_lower or 'none'} -> "
            f"{sw.to_lower or 'none'} ({sw.reason}, {sw.latency_s * 1e6:.0f} us)"
        )
    total = sum(g.switches.values())
    if total:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(g.switches.items()))
        out.append(f"  switches {total}: {parts}")
    drops = {k: v for k, v in (g.drops or {}).items() if v}
    if drops:
        out.append("  drops: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    moved = [f for f in g.datapath_fallback or () if f.tx_packets or f.rx_packets]
    if moved:
        out.append(
            "  datapath fallback (before the agent switched): "
            + ", ".join(
                f"{f.from_role} -> {f.to_role} tx {f.tx_packets} rx {f.rx_packets}" for f in moved
            )
        )
    return out


def format_table(st: AgentStatus, only: str | None = None) -> str:
    groups = [g for g in sorted(st.groups, key=lambda g: g.name) if only in (None, g.name)]
    lines = [line for g in groups for line in format_group(g)] or ["no groups"]
    if st.datapath_check not in (None, "on"):
        lines.append(
            f"datapath per-packet lower check: {st.datapath_check} (failover waits for the agent)"
        )
    return "\n".join(lines)


class Status:
    help = "show groups, lowers, the active lower and the last switch"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("group", nargs="?", help="only this group")
        p.add_argument("--json", action="store_true", help="stable JSON (docs/status-schema.md)")
        p.add_argument(
            "--check",
            action="store_true",
            help="exit 4 if a group is degraded (no usable lower, or on the standby while "
            "the primary is usable) or there is no group; else 6 if a group has had only one "
            "usable lower for longer than its redundancy_grace_s (default 300)",
        )

    @staticmethod
    def run(args: argparse.Namespace, sock: str) -> int:
        st = fetch_status(sock)
        if args.group is not None and st.group(args.group) is None:
            known = ", ".join(sorted(g.name for g in st.groups)) or "none"
            raise CliError(f"unknown group {args.group!r} (groups: {known})")
        if args.json:
            print(json.dumps(status_document(st, args.group), indent=2, sort_keys=True))
        else:
            print(format_table(st, args.group))
        if args.check:
            return check(st, args.group)
        return EXIT_OK


def check(st: AgentStatus, only: str | None) -> int:
    """`status --check`: 4 degraded (traffic dropped, or the standby carries it while the
    primary is usable; no group at all), else 6 when a group's redundancy is lost, else 0."""
    groups = [g for g in sorted(st.groups, key=lambda g: g.name) if only in (None, g.name)]
    if not groups:
        print("failoverctl: degraded: failoverd runs no failover group", file=sys.stderr)
        return EXIT_DEGRADED
    now = time.time()
    code = EXIT_OK
    for g in groups:
        for reason in degraded_reasons(g):
            print(f"failoverctl: {g.name}: degraded: {reason}", file=sys.stderr)
            code = EXIT_DEGRADED
    for g in groups:
        for reason in redundancy_reasons(g, now):
            print(f"failoverctl: {g.name}: redundancy lost: {reason}", file=sys.stderr)
            code = code or EXIT_NOT_REDUNDANT
    return code


class SetPrimary:
    help = "prefer a lower (a planned, lossless switch), or --auto to return to the policy"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("group")
        p.add_argument("lower", nargs="?", help="lower name (or role: primary, standby)")
        p.add_argument("--auto", action="store_true", help="clear the override")
        p.add_argument(
            "--wait",
            type=float,
            metavar="SECONDS",
            help="then wait until that lower (--auto: the primary) is the active one, at most "
            "SECONDS (exit 5 if it is not by then; the override stays as set)",
        )
        p.add_argument(
            "--json",
            action="store_true",
            help="print the group's status document at the end (as `status --json GROUP`)",
        )

    @staticmethod
    def run(args: argparse.Namespace, sock: str) -> int:
        if args.auto == (args.lower is not None):
            raise CliError("set-primary: give either LOWER or --auto", EXIT_USAGE)
        if args.wait is not None and not 0 < args.wait < 86400:
            raise CliError(
                f"set-primary: --wait {args.wait:g}: give 0 < SECONDS < 86400", EXIT_USAGE
            )
        call(sock, {"cmd": "set-primary", "group": args.group, "lower": args.lower})
        # the result is read back from a status either way: one form, with --wait or not
        want = args.lower or "primary"
        deadline = time.monotonic() + (args.wait or 0.0)
        delay = 0.05
        while True:
            st = fetch_status(sock)
            g = st.group(args.group)
            if g is None:  # removed meanwhile (teardown)
                raise CliError(f"unknown group {args.group!r}")
            done = switched_to(g, want)
            if done or args.wait is None or time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(0.25, delay * 1.5)  # one status read per 0.25 s once it takes a while
        if args.json:
            print(json.dumps(status_document(st, args.group), indent=2, sort_keys=True))
        else:
            active = f"{g.active_lower} ({g.active})" if g.active_lower else "none"
            print(f"{args.group}: override {g.override or 'auto'}, active {active}")
        if args.wait is not None and not done:
            lw = _target(g, want)
            what = f"{want} {lw.name}" if lw is not None and lw.name != want else want
            raise CliError(
                f"{args.group}: {what} not active after {args.wait:g}s "
                f"(active: {g.active_lower or 'none'}; {_lower_state(lw, want)})",
                EXIT_TIMEOUT,
            )
        return EXIT_OK


def _target(g: GroupStatus, want: str) -> LowerStatus | None:
    """The lower `set-primary GROUP want` asks for: a role, or a lower's name."""
    if want in ("primary", "standby"):
        return g.lower(want)
    return next((lw for lw in g.lowers if lw.name == want), None)


def switched_to(g: GroupStatus, want: str) -> bool:
    """The datapath transmits through the lower asked for (a role or a name)."""
    lw = _target(g, want)
    return lw is not None and lw.active and g.active_lower == lw.name


def _lower_state(lw: LowerStatus | None, want: str) -> str:
    if lw is None:
        return f"no {want} lower registered"
    return (
        f"{lw.name}: {'usable' if lw.usable else 'not usable'}, "
        f"admin {'up' if lw.admin_up else 'down'}, carrier {'yes' if lw.carrier else 'no'}"
    )


class Teardown:
    help = (
        "remove a group's datapath: the failover device (with its addresses) and its hidden "
        "peer, the programs on its lowers, its map state; the lowers stay. The only way: "
        "stopping failoverd never does it"
    )

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("group", nargs="?")
        p.add_argument(
            "--yes",
            action="store_true",
            help="also when the failover device has carrier and addresses (its traffic stops)",
        )
        p.add_argument(
            "--pins",
            metavar="DIR",
            help="without an agent: remove the datapath pinned at DIR (an orphan: its agent "
            "is gone; refused while an agent holds DIR), its devices in this netns, and DIR "
            "once no group is left",
        )
        p.add_argument("--all", action="store_true", help="with --pins: every group in DIR")
        p.add_argument(
            "--netns", help="with --pins: the network namespace the datapath's devices are in"
        )

    @staticmethod
    def run_orphan(args: argparse.Namespace) -> int:
        from pathlib import Path

        from bpfailover import netns
        from bpfailover.ops import orphans

        if args.all == (args.group is not None):
            raise CliError("teardown --pins: give either GROUP or --all", EXIT_USAGE)
        if os.geteuid() != 0:
            raise CliError("teardown --pins needs root (it opens the pins and the devices)")
        pin_dir = Path(args.pins)
        try:
            with netns.entered(args.netns):
                removed, pins_gone = orphans.teardown(
                    pin_dir, None if args.all else [args.group], args.yes
                )
        except orphans.TeardownError as e:
            raise CliError(str(e)) from None
        except OSError as e:
            where = f"netns {args.netns}" if args.netns else str(pin_dir)
            raise CliError(f"{where}: {e.strerror or e}") from None
        for r in removed:  # what was done, nothing more
            addrs = ", ".join(r.addresses) or "none"
            if r.device:
                dev = (
                    f"removed failover device {r.device} (addresses: {addrs}) and its peer {r.peer}"
                )
            elif r.error:
                dev = f"failover device {r.group} NOT removed ({r.error}; its group kept)"
            else:
                dev = "failover device already gone"
            lowers = (
                f"programs detached from lowers {', '.join(r.lowers)} (left in place)"
                if r.lowers
                else "no programs of its on lowers to detach"
            )
            print(f"{r.group}: {dev}; {lowers}")
        print(f"{pin_dir}: {'pins removed' if pins_gone else 'pins kept (groups left)'}")
        return EXIT_OK

    @staticmethod
    def run(args: argparse.Namespace, sock: str) -> int:
        if args.pins is None and (args.all or args.netns):
            raise CliError("teardown: --all and --netns go with --pins DIR", EXIT_USAGE)
        if args.group is None:
            raise CliError("teardown: give GROUP (or --pins DIR GROUP|--all)", EXIT_USAGE)
        msg: dict[str, Any] = {"cmd": "teardown", "group": args.group}
        if args.yes:
            msg["force"] = True
        removed = call(sock, msg).get("removed") or {}
        addrs = ", ".join(removed.get("addresses") or []) or "none"
        lowers = ", ".join(removed.get("lowers") or []) or "none"
        print(
            f"{args.group}: removed failover device {removed.get('device', args.group)} "
            f"(addresses: {addrs}) and its peer {removed.get('peer', '?')}; programs "
            f"detached from lowers {lowers} (left in place)"
        )
        return EXIT_OK


class Doctor:
    help = "check this host for known net_failover pains; each finding with its fix"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--netns", help="check the lowers in this named network namespace (labs)")
        p.add_argument("--json", action="store_true", help="findings as JSON")

    @staticmethod
    def run(args: argparse.Namespace, sock: str | None) -> int:
        from bpfailover.ops import doctor

        return doctor.main_for_cli(args, sock)


VERBS: dict[str, Any] = {
    "status": Status,
    "set-primary": SetPrimary,
    "teardown": Teardown,
    "doctor": Doctor,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="failoverctl", description=__doc__.splitlines()[0], formatter_class=DefaultsHelp
    )
    ap.add_argument(
        "--socket", help=f"control socket (default: the config's, else {DEFAULT_SOCKET})"
    )
    ap.add_argument(
        "--config",
        help="agent config to read the socket path from "
        "(default: $BPFAILOVER_CONFIG or /etc/bpfailover/config.yaml)",
    )
    sub = ap.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for name, verb in VERBS.items():
        p = sub.add_parser(
            name, help=verb.help, description=verb.help, formatter_class=DefaultsHelp
        )
        verb.add_arguments(p)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.verb == "doctor":
            return int(Doctor.run(args, args.socket))
        if args.verb == "teardown" and args.pins is not None:
            return Teardown.run_orphan(args)  # no agent to talk to
        sock = socket_path(args.socket, args.config)
        return int(VERBS[args.verb].run(args, sock))
    except CliError as e:
        for line in str(e).splitlines():  # a config's problems: one line each
            print(f"failoverctl: {line}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `failoverctl status | head`
        return EXIT_OK
    except PermissionError as e:  # whatever a path's mode: one line, not a traceback
        print(f"failoverctl: {denied_message(e)}", file=sys.stderr)
        return EXIT_FAILED


def denied_message(e: OSError) -> str:
    what = f"{e.filename}: " if e.filename else ""
    return f"{what}permission denied ({PERMISSION_HINT})"


if __name__ == "__main__":
    sys.exit(main())

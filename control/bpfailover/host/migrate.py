"""failover-migrate: detach a guest's VF without losing a packet, from the host.

    failover-migrate --qmp SOCK --qga SOCK --device DRIVER,id=ID,prop=value,... [options]
    failover-migrate --libvirt DOMAIN --hostdev-xml FILE [--connect URI] [--dest-connect URI]

The sequence (docs/host-migration.md):
  1. ask the guest (qemu-ga guest-exec of `failoverctl`) to move to the standby, and wait
     until its `failoverctl status --json` shows the standby active;
  2. detach the VF and wait until QEMU reports it gone; run the migration (--migrate-cmd)
     or, without one, pause (--pause: a stand-in, as in the proving ground);
  3. attach the VF (on the destination), wait until the guest's failoverd has it usable,
     `failoverctl set-primary GROUP --auto` (or the override the guest had before), and
     wait until the primary is active again.
Nothing is detached unless the guest is on its standby.  Refusals before that, each one
line on stderr and its own exit code: the guest agent absent or not answering (3),
failoverd not running in the guest (4), the standby not usable (5), a timeout waiting for
the switch (6, the override undone), the VF not attached (7).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from bpfailover.host.qga import Agent, AgentError, ExecError, SocketAgent, VirshAgent
from bpfailover.host.vf import QmpVf, Vf, VfError, VirshVf, parse_device

EXIT_OK = 0
EXIT_FAILED = 1  # after the VF was detached: what failed is said, the guest is on the standby
EXIT_USAGE = 2
EXIT_NO_GUEST_AGENT = 3
EXIT_NO_FAILOVERD = 4
EXIT_STANDBY_UNUSABLE = 5
EXIT_SWITCH_TIMEOUT = 6
EXIT_VF_NOT_ATTACHED = 7  # also: the detach itself failed (the guest is put back)
EXIT_MIGRATION_FAILED = 8  # the VF was re-attached on the source and the guest put back

# failoverctl's own exit codes (docs/operators.md)
CTL_FAILED, CTL_USAGE, CTL_UNREACHABLE, CTL_TIMEOUT = 1, 2, 3, 5


class Stop(Exception):
    """Ends the run: one line for the operator and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Guest:
    """failoverctl in the guest, run through the guest agent."""

    def __init__(
        self, agent: Agent, failoverctl: str, exec_timeout: float, agent_timeout: float = 10.0
    ) -> None:
        self.agent, self.failoverctl, self.exec_timeout = agent, failoverctl, exec_timeout
        self.agent_timeout = agent_timeout
        self.waits: bool | None = None  # failoverctl has `set-primary --wait` (None: not tried)

    def ctl(self, *args: str, wait: float = 0.0) -> tuple[int | None, str, str]:
        try:
            r = self.agent.run([self.failoverctl, *args], self.exec_timeout + wait)
        except ExecError as e:
            raise Stop(f"failoverctl is not usable in the guest: {e}", EXIT_NO_FAILOVERD) from None
        except AgentError as e:
            raise Stop(f"guest agent: {e}", EXIT_NO_GUEST_AGENT) from None
        return r.exitcode, r.out, r.err.strip()

    def group(self, name: str | None) -> dict[str, Any]:
        code, out, err = self.ctl("status", "--json", *([name] if name else []))
        if code == CTL_UNREACHABLE:
            raise Stop(f"failoverd is not running in the guest ({err})", EXIT_NO_FAILOVERD)
        if code == CTL_FAILED and "unknown group" in err:
            raise Stop(f"the guest's failoverd: {err.removeprefix('failoverctl: ')}", EXIT_USAGE)
        if code != 0:
            raise Stop(f"failoverctl status in the guest: exit {code}: {err}", EXIT_NO_FAILOVERD)
        groups = _groups(out)
        if name is None and len(groups) != 1:
            names = ", ".join(g["group"] for g in groups) or "none"
            raise Stop(f"the guest has groups {names}: choose one with --group", EXIT_USAGE)
        g: dict[str, Any] = groups[0]
        return g

    def set_primary(self, group: str, lower: str | None) -> tuple[int | None, str]:
        code, _, err = self.ctl("set-primary", group, *([lower] if lower else ["--auto"]))
        return code, err

    def switch(
        self, group: str, lower: str | None, wait: float
    ) -> tuple[int | None, dict[str, Any] | None, str] | None:
        """One failoverctl run: `set-primary GROUP LOWER|--auto --wait SECONDS --json`, which
        returns once that lower (--auto: the primary) is active, or after `wait` (exit 5).
        None: this failoverctl has no --wait (older than the host tool): nothing was changed,
        the caller sets and polls instead."""
        if self.waits is False:
            return None
        target = [lower] if lower else ["--auto"]
        code, out, err = self.ctl(
            "set-primary", group, *target, "--wait", f"{wait:g}", "--json", wait=wait
        )
        if code == CTL_USAGE and "--wait" in err:  # argparse: unrecognized arguments
            self.waits = False
            return None
        self.waits = True
        try:
            g = _groups(out)[0] if out.strip() else None
        except (Stop, IndexError):
            g = None
        return code, g, err


def _groups(out: str) -> list[dict[str, Any]]:
    try:
        groups: list[dict[str, Any]] = json.loads(out)["groups"]
    except (ValueError, KeyError, TypeError):
        raise Stop(f"failoverctl status --json: not a status: {out[:80]!r}", 1) from None
    return groups


def lower(g: dict[str, Any], role: str) -> dict[str, Any] | None:
    return next((lw for lw in g.get("lowers", []) if lw.get("role") == role), None)


def on(g: dict[str, Any], role: str) -> bool:
    lw = lower(g, role)
    return g.get("active") == role and lw is not None and bool(lw.get("active"))


def describe(lw: dict[str, Any] | None, role: str) -> str:
    if lw is None:
        return f"no {role} lower"
    return (
        f"{role} {lw.get('name')}: admin {'up' if lw.get('admin_up') else 'down'}, "
        f"carrier {'yes' if lw.get('carrier') else 'no'}"
    )


class Migration:
    def __init__(
        self,
        guest: Guest,
        vf: Vf,
        group: str | None,
        migrate: Callable[[], None],
        switch_timeout: float = 15.0,
        detach_timeout: float = 30.0,
        return_timeout: float = 90.0,
        poll: float = 0.2,
        after_migration: Callable[[], Guest] | None = None,
        log: Callable[[str], None] = lambda m: print(f"failover-migrate: {m}", file=sys.stderr),
    ) -> None:
        self.guest, self.vf, self.group, self.migrate = guest, vf, group, migrate
        self.switch_timeout, self.detach_timeout = switch_timeout, detach_timeout
        self.return_timeout, self.poll = return_timeout, poll
        self.after_migration = after_migration
        self.log = log
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        self.detach_sent = False  # from here on, a failure is no longer a refusal

    def mark(self, name: str) -> float:
        t = round(time.monotonic() - self.t0, 3)
        self.marks[name] = t
        return t

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            g = self.guest.group(self.group)
            if pred(g):
                return g
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll)

    def run(self) -> dict[str, Any]:
        # -- 1: checks, nothing changed yet --------------------------------------------------
        try:
            self.guest.agent.ping(self.guest.agent_timeout)
        except AgentError as e:
            raise Stop(
                f"guest agent not answering ({e}); is qemu-ga running in the guest?",
                EXIT_NO_GUEST_AGENT,
            ) from None
        self.mark("agent_ok")
        g = self.guest.group(self.group)
        self.group = name = str(g["group"])
        prior = g.get("override")
        sby = lower(g, "standby")
        if sby is None or not sby.get("usable"):
            raise Stop(
                f"{name}: the standby is not usable ({describe(sby, 'standby')})",
                EXIT_STANDBY_UNUSABLE,
            )
        try:
            if not self.vf.attached():
                raise Stop(f"{self.vf.name} is not attached to the guest", EXIT_VF_NOT_ATTACHED)
        except VfError as e:
            raise Stop(f"{self.vf.name}: {e}", EXIT_VF_NOT_ATTACHED) from None
        self.mark("checked")
        # -- 2: the guest moves to the standby -----------------------------------------------
        if not self._to_standby(name):
            self.guest.set_primary(name, prior)  # undo: the VF stays and carries traffic again
            raise Stop(
                f"{name}: the guest did not report the standby active within "
                f"{self.switch_timeout:g}s (override undone)",
                EXIT_SWITCH_TIMEOUT,
            )
        self.log(f"{name}: guest on the standby after {self.mark('on_standby'):.1f}s")
        # -- 3: detach, migrate, attach ------------------------------------------------------
        self.detach_sent = True
        try:
            self.vf.detach(self.detach_timeout)
        except VfError as e:
            still = self._still_attached()
            if still:
                self.guest.set_primary(name, prior)
            raise Stop(
                f"{self.vf.name}: detach failed ({e})"
                + ("; it is still attached, the guest was put back" if still else ""),
                EXIT_VF_NOT_ATTACHED,
            ) from None
        self.log(f"{self.vf.name} detached at {self.mark('detached'):.1f}s")
        migrated = True
        try:
            self.migrate()
        except Stop as e:
            migrated = False
            self.log(str(e))
        self.mark("migrated")
        try:
            self.vf.attach(on_destination=migrated)
        except VfError as e:
            raise Stop(
                f"{self.vf.name}: attach failed ({e}); the guest stays on the standby", EXIT_FAILED
            ) from None
        self.log(f"{self.vf.name} attached at {self.mark('attached'):.1f}s")
        if migrated and self.after_migration is not None:
            self.guest = self.after_migration()
        # -- 4: back to the VF ---------------------------------------------------------------
        if prior is None and self._auto_back(name):
            self.log(f"{name}: back on the VF at {self.mark('on_primary'):.1f}s")
        else:  # an override to put back, or a failoverctl without --wait: poll its status
            got = self.wait(
                lambda g: bool((lw := lower(g, "primary")) and lw.get("usable")),
                self.return_timeout,
            )
            if got is None:
                raise Stop(
                    f"{name}: the guest did not report the new VF usable within "
                    f"{self.return_timeout:g}s; it stays on the standby (override standby)",
                    EXIT_FAILED,
                )
            self.log(f"{name}: VF usable in the guest at {self.mark('vf_usable'):.1f}s")
            code, err = self.guest.set_primary(name, prior)
            if code != 0:
                raise Stop(f"{name}: set-primary {prior or '--auto'} refused: {err}", EXIT_FAILED)
            if prior in (None, "primary"):
                if self.wait(lambda g: on(g, "primary"), self.return_timeout) is None:
                    raise Stop(f"{name}: the primary did not become active again", EXIT_FAILED)
                self.log(f"{name}: back on the VF at {self.mark('on_primary'):.1f}s")
        if not migrated:
            raise Stop(
                "migration failed: the VF was re-attached on the source", EXIT_MIGRATION_FAILED
            )
        return {"group": name, "override_restored": prior, "marks": self.marks}

    def _to_standby(self, name: str) -> bool:
        """set-primary standby and wait until the guest reports it active: one failoverctl
        run (`--wait`), or set-primary and status polls with an older failoverctl."""
        res = self.guest.switch(name, "standby", self.switch_timeout)
        if res is None:
            code, err = self.guest.set_primary(name, "standby")
        else:
            code, g, err = res
            if code == CTL_TIMEOUT:
                return False
        if code == CTL_UNREACHABLE:
            raise Stop(f"failoverd is not running in the guest ({err})", EXIT_NO_FAILOVERD)
        if code != 0:
            raise Stop(
                f"{name}: the guest refused set-primary standby: {err}", EXIT_STANDBY_UNUSABLE
            )
        if res is None:
            return self.wait(lambda g: on(g, "standby"), self.switch_timeout) is not None
        return g is not None and on(g, "standby")

    def _auto_back(self, name: str) -> bool:
        """`set-primary --auto --wait`: the override cleared at once, the guest's policy
        moves to the new VF once it is usable, failoverctl returns when it is active.  False:
        this failoverctl has no --wait (the caller polls)."""
        res = self.guest.switch(name, None, self.return_timeout)
        if res is None:
            return False
        code, g, err = res
        if code == CTL_TIMEOUT or (code == 0 and not (g and on(g, "primary"))):
            raise Stop(
                f"{name}: the guest did not get back to the new VF within "
                f"{self.return_timeout:g}s ({err.removeprefix('failoverctl: ') or 'not active'}); "
                "the override is cleared: it moves to the VF once the VF is usable",
                EXIT_FAILED,
            )
        if code != 0:
            raise Stop(f"{name}: set-primary --auto refused: {err}", EXIT_FAILED)
        return True

    def _still_attached(self) -> bool:
        try:
            return self.vf.attached()
        except VfError:
            return False


def migrate_step(cmd: str | None, pause: float) -> Callable[[], None]:
    def run() -> None:
        if not cmd:
            time.sleep(pause)
            return
        p = subprocess.run(shlex.split(cmd), check=False)
        if p.returncode != 0:
            raise Stop(f"--migrate-cmd exited {p.returncode}", EXIT_MIGRATION_FAILED)

    return run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="failover-migrate",
        description=__doc__.split("\n\n")[0].strip() if __doc__ else None,
        epilog="Exit codes: 0 done, 1 failed after the detach (the guest stays on the standby), "
        "2 usage, 3 guest agent absent/not answering, 4 failoverd not running in the guest, "
        "5 standby not usable, 6 switch timeout, 7 VF not attached or detach failed, "
        "8 migration failed (VF back on the source). 3-7: nothing was detached.",
    )
    q = ap.add_argument_group("plain QEMU")
    q.add_argument("--qmp", metavar="SOCK", help="QMP unix socket")
    q.add_argument("--qga", metavar="SOCK", help="host end of the guest agent's channel")
    q.add_argument("--device", metavar="SPEC", help="the VF for device_add (DRIVER,id=ID,...)")
    v = ap.add_argument_group("libvirt")
    v.add_argument("--libvirt", metavar="DOMAIN", help="the domain (virsh)")
    v.add_argument("--hostdev-xml", metavar="FILE", help="the VF's <hostdev>/<interface> XML")
    v.add_argument(
        "--dest-hostdev-xml", metavar="FILE", help="the destination's VF (default: the same)"
    )
    v.add_argument("--connect", metavar="URI", help="libvirt URI of the source")
    v.add_argument("--dest-connect", metavar="URI", help="libvirt URI of the destination")
    ap.add_argument("--group", help="failover group in the guest (default: its only one)")
    ap.add_argument(
        "--failoverctl",
        default="failoverctl",
        help="failoverctl in the guest (a path, or found on qemu-ga's PATH)",
    )
    ap.add_argument("--migrate-cmd", help="run on the host between detach and attach")
    ap.add_argument(
        "--pause", type=float, default=0.3, help="without --migrate-cmd: seconds to wait"
    )
    ap.add_argument(
        "--agent-timeout", type=float, default=10.0, help="for qemu-ga to answer guest-ping"
    )
    ap.add_argument(
        "--exec-timeout", type=float, default=30.0, help="per failoverctl run in the guest"
    )
    ap.add_argument("--switch-timeout", type=float, default=15.0)
    ap.add_argument("--detach-timeout", type=float, default=30.0)
    ap.add_argument("--return-timeout", type=float, default=90.0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return ap


def build(args: argparse.Namespace) -> Migration:
    vf: Vf
    if args.libvirt:
        if args.qmp or args.qga or args.device or not args.hostdev_xml:
            raise Stop("--libvirt takes --hostdev-xml (and not --qmp/--qga/--device)", EXIT_USAGE)
        try:
            vf = VirshVf(
                args.libvirt,
                args.hostdev_xml,
                args.connect,
                args.dest_connect,
                dest_xml_file=args.dest_hostdev_xml,
            )
        except ValueError as e:
            raise Stop(str(e), EXIT_USAGE) from None
        agent: Agent = VirshAgent(args.libvirt, args.connect)
        dest = args.dest_connect

        def after() -> Guest:
            return Guest(
                VirshAgent(args.libvirt, dest),
                args.failoverctl,
                args.exec_timeout,
                args.agent_timeout,
            )

        after_migration = after if dest and dest != args.connect else None
    else:
        if not (args.qmp and args.qga and args.device):
            raise Stop("give --qmp, --qga and --device (or --libvirt DOMAIN)", EXIT_USAGE)
        try:
            vf = QmpVf(args.qmp, parse_device(args.device))
        except ValueError as e:
            raise Stop(str(e), EXIT_USAGE) from None
        agent = SocketAgent(args.qga)
        after_migration = None
    return Migration(
        Guest(agent, args.failoverctl, args.exec_timeout, args.agent_timeout),
        vf,
        args.group,
        migrate_step(args.migrate_cmd, args.pause),
        switch_timeout=args.switch_timeout,
        detach_timeout=args.detach_timeout,
        return_timeout=args.return_timeout,
        after_migration=after_migration,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    mig: Migration | None = None
    try:
        mig = build(args)
        result = mig.run()
        code, message = EXIT_OK, f"{result['group']}: done, VF detached and attached again"
    except Stop as e:
        result, code, message = {}, e.code, str(e)
        if mig is not None and not mig.detach_sent:
            message = f"refused: {message} (nothing detached)"
    except KeyboardInterrupt:
        return 130
    finally:
        if mig is not None:
            mig.vf.close()
            mig.guest.agent.close()
    print(f"failover-migrate: {message}", file=sys.stderr)
    if args.json:
        marks = mig.marks if mig is not None else {}
        print(json.dumps({"exit": code, "message": message, "marks": marks, **result}))
    return code


if __name__ == "__main__":
    sys.exit(main())

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
the switch (6, the override undone), the VF not attached (7), a malformed reply from the
guest (9).  The guest is not trusted: every call to it has one deadline, every reply a size
cap, its data is checked before use, and its strings are printed escaped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from bpfailover.host.qga import (
    Agent,
    AgentError,
    ExecError,
    MalformedReply,
    SocketAgent,
    VirshAgent,
    show,
)
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
EXIT_BAD_REPLY = 9  # the guest agent or failoverctl answered malformed data
# Refusals: nothing detached.  The same causes after the detach are EXIT_FAILED.
REFUSALS = frozenset({EXIT_USAGE, EXIT_NO_GUEST_AGENT, EXIT_NO_FAILOVERD, EXIT_BAD_REPLY})
REFUSALS |= {EXIT_STANDBY_UNUSABLE, EXIT_SWITCH_TIMEOUT}
MESSAGE_LIMIT = 2000  # characters of one message line (guest text can be long)

# failoverctl's own exit codes (docs/operators.md)
CTL_FAILED, CTL_USAGE, CTL_UNREACHABLE, CTL_TIMEOUT = 1, 2, 3, 5


def escape(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """One printable line: control characters (terminal escape sequences, newlines, bidi
    overrides) from the guest are shown as \\x.. escapes, never sent to the terminal."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    if len(text) > limit:
        out += f"... ({len(text) - limit} more characters)"
    return out


def say(message: str) -> None:
    print(f"failover-migrate: {escape(message)}", file=sys.stderr)


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
        except MalformedReply as e:
            raise Stop(f"guest agent: malformed reply: {e}", EXIT_BAD_REPLY) from None
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
        if not groups or (name is not None and groups[0]["group"] != name):
            raise Stop(f"failoverctl status --json: not group {name}", EXIT_BAD_REPLY)
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
        groups = _groups(out) if out.strip() else []
        return code, (groups[0] if groups else None), err


ROLES = ("primary", "standby", None)
LOWER_FLAGS = ("usable", "active", "admin_up", "carrier")


def _groups(out: str) -> list[dict[str, Any]]:
    """The groups of a `status --json` document (docs/status-schema.md), every field this
    tool reads checked for its type: the document comes from the guest."""
    try:
        doc = json.loads(out)
    except (ValueError, RecursionError):
        doc = None
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list):
        raise Stop(f"failoverctl status --json: not a status: {show(out)}", EXIT_BAD_REPLY)
    for g in groups:
        bad = _bad_group(g)
        if bad:
            raise Stop(f"failoverctl status --json: {bad}", EXIT_BAD_REPLY)
    return groups


def _bad_group(g: Any) -> str | None:
    if not isinstance(g, dict) or not isinstance(g.get("group"), str):
        return f"a group without a name: {show(g)}"
    for key in ("active", "override"):
        if g.get(key) not in ROLES:
            return f"group {g['group']}: {key} {show(g.get(key))}"
    lowers = g.get("lowers", [])
    if not isinstance(lowers, list):
        return f"group {g['group']}: lowers {show(lowers)}"
    for lw in lowers:
        if not isinstance(lw, dict) or not isinstance(lw.get("name"), str):
            return f"group {g['group']}: a lower without a name: {show(lw)}"
        if lw.get("role") not in ROLES[:2]:
            return f"group {g['group']}: lower {lw['name']}: role {show(lw.get('role'))}"
        for key in LOWER_FLAGS:
            if not isinstance(lw.get(key, False), bool):
                return f"group {g['group']}: lower {lw['name']}: {key} {show(lw.get(key))}"
    return None


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
        log: Callable[[str], None] = say,
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
        except MalformedReply as e:
            raise Stop(f"guest agent: malformed reply: {e}", EXIT_BAD_REPLY) from None
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
        try:
            on_standby = self._to_standby(name)
        except Stop as e:
            if e.code in (EXIT_NO_GUEST_AGENT, EXIT_BAD_REPLY):  # it may have switched
                with contextlib.suppress(Stop):
                    self.guest.set_primary(name, prior)
            raise
        if not on_standby:
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


def migrate_argv(cmd: str | None, args: list[str] | None) -> list[str] | None:
    """The migration command as an argv, checked before anything is detached: --migrate-cmd
    split like a shell would (no shell runs it), or --migrate-arg taken word for word."""
    if cmd is not None and args:
        raise Stop("give --migrate-cmd or --migrate-arg, not both", EXIT_USAGE)
    if cmd is not None:
        try:
            argv = shlex.split(cmd)
        except ValueError as e:
            raise Stop(f"--migrate-cmd {cmd!r}: {e} (or give --migrate-arg)", EXIT_USAGE) from None
        if not argv:
            raise Stop("--migrate-cmd is empty", EXIT_USAGE)
    elif args:
        argv = list(args)
    else:
        return None
    if shutil.which(argv[0]) is None:
        raise Stop(f"migration command {argv[0]!r}: not found or not executable", EXIT_USAGE)
    return argv


def migrate_step(
    argv: list[str] | None, pause: float, timeout: float = 3600.0, grace: float = 5.0
) -> Callable[[], None]:
    """Run the migration (or pause); any failure is EXIT_MIGRATION_FAILED, which re-attaches
    the VF on the source.  Past `timeout` the command (its whole process group) gets
    SIGTERM, then SIGKILL after `grace` seconds."""

    def run() -> None:
        if not argv:
            time.sleep(pause)
            return
        try:
            p = subprocess.Popen(argv, start_new_session=True)
        except OSError as e:
            msg = f"migration command {argv[0]}: {e.strerror or e}"
            raise Stop(msg, EXIT_MIGRATION_FAILED) from None
        try:
            code = p.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop_group(p, grace)
            raise Stop(
                f"migration command still running after {timeout:g}s: stopped",
                EXIT_MIGRATION_FAILED,
            ) from None
        except BaseException:
            _stop_group(p, grace)
            raise
        if code != 0:
            raise Stop(f"migration command exited {code}", EXIT_MIGRATION_FAILED)

    return run


def _stop_group(p: subprocess.Popen[bytes], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


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
        "2 usage, 3 guest agent absent/not answering/flooding, 4 failoverd not running in the "
        "guest, 5 standby not usable, 6 switch timeout, 7 VF not attached or detach failed, "
        "8 migration failed (VF back on the source), 9 malformed reply from the guest. "
        "2-7 and 9: nothing was detached.",
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
    ap.add_argument(
        "--migrate-cmd",
        help="run on the host between detach and attach (split into words like a shell "
        "would, no shell runs it)",
    )
    ap.add_argument(
        "--migrate-arg",
        action="append",
        metavar="WORD",
        help="instead of --migrate-cmd: the command one word at a time, taken as it is "
        "(--migrate-arg=virsh --migrate-arg=migrate ...)",
    )
    ap.add_argument(
        "--migrate-timeout",
        type=float,
        default=3600.0,
        help="seconds before the migration command is stopped (the VF goes back on the source)",
    )
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
    migration = migrate_argv(args.migrate_cmd, args.migrate_arg)
    if args.libvirt is not None and (not args.libvirt or args.libvirt.startswith("-")):
        raise Stop(f"--libvirt {args.libvirt!r}: not a domain name virsh takes", EXIT_USAGE)
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
        migrate_step(migration, args.pause, args.migrate_timeout),
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
        elif mig is not None and code in REFUSALS:  # too late to refuse: the VF was detached
            code = EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    finally:
        if mig is not None:
            mig.vf.close()
            mig.guest.agent.close()
    say(message)
    if args.json:
        marks = mig.marks if mig is not None else {}
        doc = {"exit": code, "message": escape(message), "marks": marks, **result}
        print(json.dumps(doc).replace("\x7f", "\\u007f"))
    return code


if __name__ == "__main__":
    sys.exit(main())

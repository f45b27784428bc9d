"""failover-migrate against a fake QEMU monitor and a fake qemu-ga (unix sockets, no root).

The fake guest answers `failoverctl status --json` / `set-primary` run through guest-exec
the way failoverd would; the fake monitor records every QMP command.  Every refusal must
leave the VF attached: no device_del sent.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bpfailover.host import migrate
from bpfailover.host.qga import AgentError, MalformedReply, SocketAgent, VirshAgent
from bpfailover.host.vf import VirshVf, parse_device

DEVICE = "e1000e,netdev=hpri,mac=52:54:00:00:12:53,id=pri0,bus=rp2"


@dataclass
class FakeGuest:
    """What the guest's failoverd, qemu-ga and the VF look like to the host."""

    qga_answers: bool = True
    guest_exec_allowed: bool = True
    failoverctl_installed: bool = True
    failoverd_running: bool = True
    standby_carrier: bool = True
    switch_works: bool = True
    vf_attached: bool = True
    vf_usable_after_plug: bool = True
    ctl_waits: bool = True  # failoverctl knows `set-primary --wait` (older ones do not)
    groups: tuple[str, ...] = ("fo0",)
    override: str | None = None
    active: str = "primary"
    ctl_calls: list[list[str]] = field(default_factory=list)
    qmp_calls: list[str] = field(default_factory=list)
    # a hostile guest: qemu-ga's reply to a command replaced (raw bytes, or a function that
    # writes to the channel itself), failoverctl's (exit, out, err) replaced (None: as usual)
    raw: dict[str, bytes | Callable[[socket.socket], None]] = field(default_factory=dict)
    ctl_hook: Callable[[list[str]], tuple[int, str, str] | None] | None = None

    def pri_usable(self) -> bool:
        return self.vf_attached and self.vf_usable_after_plug

    def doc(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "groups": [
                {
                    "group": name,
                    "active": self.active,
                    "override": self.override,
                    "lowers": [
                        {
                            "name": "eth0",
                            "role": "standby",
                            "usable": self.standby_carrier,
                            "active": self.active == "standby",
                            "admin_up": True,
                            "carrier": self.standby_carrier,
                        }
                    ]
                    + (
                        [
                            {
                                "name": "eth1",
                                "role": "primary",
                                "usable": self.pri_usable(),
                                "active": self.active == "primary",
                                "admin_up": True,
                                "carrier": self.pri_usable(),
                            }
                        ]
                        if self.vf_attached
                        else []
                    ),
                }
                for name in self.groups
            ],
        }

    def reselect(self) -> None:
        want = self.override or "primary"
        if want == "primary" and self.pri_usable():
            self.active = "primary"
        elif self.standby_carrier:
            self.active = "standby"

    def failoverctl(self, argv: list[str]) -> tuple[int, str, str]:
        self.ctl_calls.append(argv)
        if self.ctl_hook is not None and (res := self.ctl_hook(argv)) is not None:
            return res
        if not self.failoverd_running:
            return 3, "", "failoverctl: agent unreachable: No such file or directory"
        if argv[0] == "status":
            names = [a for a in argv[1:] if not a.startswith("--")]
            if names and names[0] not in self.groups:
                return 1, "", f"failoverctl: unknown group {names[0]!r} (groups: fo0)"
            return 0, json.dumps(self.doc()), ""
        if argv[0] == "set-primary":
            if "--wait" in argv and not self.ctl_waits:
                return 2, "", "failoverctl: unrecognized arguments: --wait 1 --json"
            target = None if "--auto" in argv else argv[2]
            if target == "standby" and not self.standby_carrier:
                return 1, "", "failoverctl: lower eth0 is not usable"
            self.override = target
            if self.switch_works or target != "standby":
                self.reselect()
            if "--wait" not in argv:
                return 0, "", ""
            want = target or "primary"
            if self.active == want:
                return 0, json.dumps(self.doc()), ""
            return 5, json.dumps(self.doc()), f"failoverctl: fo0: {want} not active after 1s"
        return 2, "", "usage"


def _serve(path: Path, handle: Any) -> Iterator[threading.Thread]:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    stop = threading.Event()

    def loop() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield t
    stop.set()
    srv.close()
    t.join(timeout=2)


def _lines(conn: socket.socket) -> Iterator[dict[str, Any]]:
    f = conn.makefile("rb")
    for raw in f:
        raw = raw.strip().lstrip(b"\xff")
        if raw:
            yield json.loads(raw)


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[FakeGuest]:
    g = FakeGuest()
    lock = threading.Lock()
    execs: dict[int, tuple[int, str, str]] = {}

    def qga(conn: socket.socket) -> None:
        with conn:
            for req in _lines(conn):
                if not g.qga_answers:
                    continue
                cmd, args = req["execute"], req.get("arguments", {})
                raw = g.raw.get(cmd)
                if callable(raw):
                    raw(conn)
                    return
                if raw is not None:
                    conn.sendall(raw)
                    continue
                with lock:
                    if cmd == "guest-sync-delimited":
                        conn.sendall(b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n")
                        continue
                    reply: dict[str, Any]
                    if cmd == "guest-ping":
                        reply = {"return": {}}
                    elif cmd.startswith("guest-exec") and not g.guest_exec_allowed:
                        reply = {
                            "error": {
                                "class": "CommandNotFound",
                                "desc": f"Command {cmd} has been disabled",
                            }
                        }
                    elif cmd == "guest-exec":
                        if not g.failoverctl_installed:
                            reply = {
                                "error": {
                                    "class": "GenericError",
                                    "desc": "Guest agent command failed, error was 'Failed to "
                                    "execute child process “failoverctl” (No such file or "
                                    "directory)'",
                                }
                            }
                        else:
                            pid = len(execs) + 100
                            execs[pid] = g.failoverctl(args["arg"])
                            reply = {"return": {"pid": pid}}
                    elif cmd == "guest-exec-status":
                        code, out, err = execs[args["pid"]]
                        reply = {
                            "return": {
                                "exited": True,
                                "exitcode": code,
                                "out-data": base64.b64encode(out.encode()).decode(),
                                "err-data": base64.b64encode(err.encode()).decode(),
                            }
                        }
                    else:
                        reply = {"error": {"class": "CommandNotFound", "desc": cmd}}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def qmp(conn: socket.socket) -> None:
        with conn:
            conn.sendall(json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\n")
            for req in _lines(conn):
                cmd, args, rid = req["execute"], req.get("arguments", {}), req.get("id")
                out: list[dict[str, Any]] = []
                with lock:
                    g.qmp_calls.append(cmd)
                    if cmd == "qom-list":
                        kids = [{"name": "pri0", "type": "child<e1000e>"}] if g.vf_attached else []
                        out.append({"return": kids + [{"name": "net0", "type": "child<x>"}]})
                    elif cmd == "device_del":
                        g.vf_attached = False
                        g.reselect()
                        out.append({"return": {}})
                        ev = {"event": "DEVICE_DELETED", "data": {"device": args["id"]}}
                        out.append(ev)
                    elif cmd == "device_add":
                        assert args["driver"] == "e1000e" and args["id"] == "pri0"
                        g.vf_attached = True
                        out.append({"return": {}})
                    else:
                        out.append({"return": {}})
                for msg in out:
                    if "return" in msg:
                        msg["id"] = rid
                    conn.sendall(json.dumps(msg).encode() + b"\n")

    short = Path(f"/tmp/pytest-hm-{os.getpid()}-{id(g)}")
    short.mkdir()
    g.qga_path, g.qmp_path = short / "qga.sock", short / "qmp.sock"  # type: ignore[attr-defined]
    gens = [_serve(g.qga_path, qga), _serve(g.qmp_path, qmp)]  # type: ignore[attr-defined]
    for gen in gens:
        next(gen)
    try:
        yield g
    finally:
        for gen in gens:
            next(gen, None)
        for p in short.iterdir():
            p.unlink()
        short.rmdir()


def run(g: FakeGuest, *extra: str) -> int:
    argv = [
        "--qmp",
        str(g.qmp_path),  # type: ignore[attr-defined]
        "--qga",
        str(g.qga_path),  # type: ignore[attr-defined]
        "--device",
        DEVICE,
        "--exec-timeout",
        "2",
        "--agent-timeout",
        "1",
        "--switch-timeout",
        "1",
        "--return-timeout",
        "1",
        "--pause",
        "0",
        *extra,
    ]
    return migrate.main(argv)


def test_planned_sequence_in_order_and_back_on_the_vf(guest: FakeGuest, capsys: Any) -> None:
    """Three failoverctl runs in all (each one a Python start-up in the guest): the checks'
    status, then set-primary standby and set-primary --auto, each waiting in the guest."""
    assert run(guest, "--json") == 0
    assert guest.ctl_calls == [
        ["status", "--json"],
        ["set-primary", "fo0", "standby", "--wait", "1", "--json"],
        ["set-primary", "fo0", "--auto", "--wait", "1", "--json"],
    ]
    assert [c for c in guest.qmp_calls if c.startswith("device")] == ["device_del", "device_add"]
    assert guest.vf_attached and guest.active == "primary" and guest.override is None
    out = json.loads(capsys.readouterr().out)
    m = out["marks"]
    assert out["exit"] == 0
    assert m["on_standby"] <= m["detached"] <= m["attached"] <= m["on_primary"]


def test_an_older_failoverctl_without_wait_is_polled(guest: FakeGuest, capsys: Any) -> None:
    guest.ctl_waits = False
    assert run(guest, "--json") == 0
    sets = [c for c in guest.ctl_calls if c[0] == "set-primary"]
    assert sets == [
        ["set-primary", "fo0", "standby", "--wait", "1", "--json"],  # refused: usage, no change
        ["set-primary", "fo0", "standby"],
        ["set-primary", "fo0", "--auto"],
    ]
    assert guest.active == "primary" and guest.override is None
    m = json.loads(capsys.readouterr().out)["marks"]
    assert m["on_standby"] <= m["detached"] <= m["attached"] <= m["vf_usable"] <= m["on_primary"]


def test_an_override_the_guest_had_is_restored(guest: FakeGuest) -> None:
    guest.override = "primary"
    assert run(guest) == 0
    assert guest.ctl_calls[-2][:3] == ["set-primary", "fo0", "primary"]
    assert guest.override == "primary" and guest.active == "primary"


def _refused(g: FakeGuest, capsys: Any, code: int, words: str, *extra: str) -> None:
    assert run(g, *extra) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "nothing detached" in err[0], err
    assert "device_del" not in g.qmp_calls
    assert g.vf_attached and g.active == "primary"


def test_refuses_when_the_guest_agent_socket_is_absent(guest: FakeGuest, capsys: Any) -> None:
    guest.qga_path.unlink()  # type: ignore[attr-defined]
    _refused(guest, capsys, migrate.EXIT_NO_GUEST_AGENT, "does not exist")


def test_refuses_when_qemu_ga_does_not_answer(guest: FakeGuest, capsys: Any) -> None:
    guest.qga_answers = False
    _refused(guest, capsys, migrate.EXIT_NO_GUEST_AGENT, "qemu-ga running")


def test_refuses_when_qemu_ga_blocks_guest_exec(guest: FakeGuest, capsys: Any) -> None:
    guest.guest_exec_allowed = False
    _refused(guest, capsys, migrate.EXIT_NO_GUEST_AGENT, "disabled")


def test_refuses_when_failoverd_is_not_running(guest: FakeGuest, capsys: Any) -> None:
    guest.failoverd_running = False
    _refused(guest, capsys, migrate.EXIT_NO_FAILOVERD, "failoverd is not running")


def test_refuses_when_failoverctl_is_missing(guest: FakeGuest, capsys: Any) -> None:
    guest.failoverctl_installed = False
    _refused(guest, capsys, migrate.EXIT_NO_FAILOVERD, "failoverctl is not usable")


def test_refuses_when_the_standby_is_not_usable(guest: FakeGuest, capsys: Any) -> None:
    guest.standby_carrier = False
    _refused(guest, capsys, migrate.EXIT_STANDBY_UNUSABLE, "carrier no")
    assert not [c for c in guest.ctl_calls if c[0] == "set-primary"]


@pytest.mark.parametrize("ctl_waits", [True, False])
def test_refuses_and_undoes_the_override_when_the_switch_times_out(
    guest: FakeGuest, capsys: Any, ctl_waits: bool
) -> None:
    guest.switch_works, guest.ctl_waits = False, ctl_waits
    _refused(guest, capsys, migrate.EXIT_SWITCH_TIMEOUT, "did not report the standby")
    assert guest.ctl_calls[-1] == ["set-primary", "fo0", "--auto"] and guest.override is None


def test_refuses_when_the_vf_is_not_attached(guest: FakeGuest, capsys: Any) -> None:
    guest.vf_attached = False
    guest.reselect()
    assert run(guest) == migrate.EXIT_VF_NOT_ATTACHED
    assert "not attached" in capsys.readouterr().err
    assert "device_del" not in guest.qmp_calls and "device_add" not in guest.qmp_calls


def test_unknown_group_is_a_usage_error(guest: FakeGuest, capsys: Any) -> None:
    _refused(guest, capsys, migrate.EXIT_USAGE, "unknown group", "--group", "nope")


def test_two_groups_need_a_choice(guest: FakeGuest, capsys: Any) -> None:
    guest.groups = ("fo0", "fo1")
    _refused(guest, capsys, migrate.EXIT_USAGE, "--group")


def test_vf_never_usable_after_attach_fails_on_the_standby(guest: FakeGuest, capsys: Any) -> None:
    """The override is cleared before the wait: the guest's policy takes the VF whenever it
    becomes usable, after the tool gave up."""
    guest.vf_usable_after_plug = False
    assert run(guest) == migrate.EXIT_FAILED
    err = capsys.readouterr().err
    assert "did not get back to the new VF" in err and "once the VF is usable" in err
    assert guest.active == "standby" and guest.override is None


def test_vf_never_usable_with_an_older_failoverctl_keeps_the_override(
    guest: FakeGuest, capsys: Any
) -> None:
    guest.vf_usable_after_plug, guest.ctl_waits = False, False
    assert run(guest) == migrate.EXIT_FAILED
    assert "stays on the standby" in capsys.readouterr().err
    assert guest.active == "standby" and guest.override == "standby"


def test_failed_migration_reattaches_on_the_source(guest: FakeGuest, capsys: Any) -> None:
    assert run(guest, "--pause", "0", "--migrate-cmd", "false") == migrate.EXIT_MIGRATION_FAILED
    assert [c for c in guest.qmp_calls if c.startswith("device")] == ["device_del", "device_add"]
    assert guest.active == "primary" and "re-attached on the source" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--qmp", "x", "--qga", "y"],
        ["--qmp", "x", "--qga", "y", "--device", "id=pri0"],
        ["--qmp", "x", "--qga", "y", "--device", "e1000e,mac"],
        ["--qmp", "x", "--qga", "y", "--device", "e1000e,mac=1"],
        ["--libvirt", "dom"],
        ["--libvirt", "dom", "--hostdev-xml", "/nonexistent.xml"],
    ],
)
def test_bad_arguments_one_line_exit_2(argv: list[str], capsys: Any) -> None:
    assert migrate.main(argv) == migrate.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("failover-migrate: ") and "refused" not in err[0]


def test_parse_device() -> None:
    assert parse_device(DEVICE) == {
        "driver": "e1000e",
        "netdev": "hpri",
        "mac": "52:54:00:00:12:53",
        "id": "pri0",
        "bus": "rp2",
    }


def test_socket_agent_skips_a_stale_reply_before_the_sync(tmp_path: Path) -> None:
    """A reply left in the channel by an earlier client is not taken for ours."""
    path = Path(f"/tmp/pytest-hm-stale-{os.getpid()}.sock")
    path.unlink(missing_ok=True)

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b'{"return": {"pid": 7}}\n{"retu')  # stale and truncated
            for req in _lines(conn):
                if req["execute"] == "guest-sync-delimited":
                    conn.sendall(b"\xff" + json.dumps({"return": req["arguments"]["id"]}).encode())
                    conn.sendall(b"\n")
                else:
                    conn.sendall(b'{"return": {"pong": 1}}\n')

    gen = _serve(path, handle)
    next(gen)
    try:
        a = SocketAgent(str(path))
        assert a.execute("guest-ping", 2) == {"pong": 1}
        a.close()
    finally:
        next(gen, None)
        path.unlink(missing_ok=True)


# ---- a hostile guest: floods, malformed replies, control characters ---------------------------

MiB = 1 << 20


def _flood(newlines: bool) -> Callable[[socket.socket], None]:
    """Instead of an answer: `{}` lines for 30 s, or 100 MiB without a newline."""

    def send(conn: socket.socket) -> None:
        chunk = b"{}\n" * 20000 if newlines else b"x" * 65536
        end, sent = time.monotonic() + 30, 0
        with conn, contextlib.suppress(OSError):  # the tool hangs up: the flood ends
            if not newlines:
                conn.sendall(b'{"return": "')
            while time.monotonic() < end and (newlines or sent < 100 * MiB):
                conn.sendall(chunk)
                sent += len(chunk)

    return send


def _run_tool(g: FakeGuest, *extra: str, limit: float = 60.0) -> tuple[int, float, int, str]:
    """failover-migrate as its own process: (exit, seconds, max RSS in bytes, stderr)."""
    argv = [sys.executable, "-m", "bpfailover.host.migrate", "--qmp", str(g.qmp_path)]  # type: ignore[attr-defined]
    argv += ["--qga", str(g.qga_path), "--device", DEVICE, *extra]  # type: ignore[attr-defined]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The tool's own peak: VmHWM of its address space, polled while it runs (rusage's
    # maxrss would count the pages of the test process it was forked from: in a full
    # suite run that is pytest's few hundred MiB, not the tool's).
    hwm = 0
    while True:
        try:
            status_text = Path(f"/proc/{p.pid}/status").read_text()
            kb = next(ln.split()[1] for ln in status_text.splitlines() if ln.startswith("VmHWM:"))
            hwm = max(hwm, int(kb) * 1024)
        except (OSError, StopIteration, ValueError):
            pass  # not exec'd yet, or already gone
        pid, status, _ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - t0 > limit:
            p.kill()
            pid, status, _ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.01)
    took = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.stderr is not None
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    return p.returncode, took, hwm, err


@pytest.mark.parametrize("newlines", [True, False], ids=["lines", "no-newline"])
@pytest.mark.parametrize("command", ["guest-ping", "guest-exec-status"])
def test_a_flooding_guest_is_refused_by_the_deadline_and_the_reply_cap(
    guest: FakeGuest, command: str, newlines: bool
) -> None:
    """Every call has one deadline, however busy the guest keeps the channel, and a reply
    has a size cap: exit 3 within --exec-timeout (+ the start-up), memory bounded."""
    guest.raw[command] = _flood(newlines)
    code, took, rss, err = _run_tool(
        guest, "--exec-timeout", "2", "--agent-timeout", "1", "--pause", "0"
    )
    print(f"{command} {'lines' if newlines else 'no-newline'}: {took:.2f}s, {rss / MiB:.1f} MiB")
    assert code == migrate.EXIT_NO_GUEST_AGENT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "nothing detached" in lines[0], err
    assert took < 2 + 3, f"{took:.1f}s"
    assert rss < 100 * MiB, f"{rss / MiB:.0f} MiB"
    assert "device_del" not in guest.qmp_calls and guest.vf_attached


DEEP = b"[" * 100000 + b"]" * 100000
MALFORMED_AGENT = {
    "return-list": ("guest-exec", b'{"return": []}\n'),
    "pid-string": ("guest-exec", b'{"return": {"pid": "7"}}\n'),
    "deep": ("guest-ping", b'{"return": ' + DEEP + b"}\n"),
    "not-object": ("guest-ping", b'"pong"\n'),
    "not-json": ("guest-ping", b"pong\n"),
    "error-string": ("guest-ping", b'{"error": "boom"}\n'),
    "bad-base64": (
        "guest-exec-status",
        b'{"return": {"exited": true, "exitcode": 0, "out-data": "!!not base64"}}\n',
    ),
    "exitcode-string": ("guest-exec-status", b'{"return": {"exited": true, "exitcode": "0"}}\n'),
    "exited-string": ("guest-exec-status", b'{"return": {"exited": "yes"}}\n'),
    "out-data-number": (
        "guest-exec-status",
        b'{"return": {"exited": true, "exitcode": 0, "out-data": 12}}\n',
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_AGENT))
def test_a_malformed_agent_reply_is_a_refusal(guest: FakeGuest, capsys: Any, case: str) -> None:
    command, raw = MALFORMED_AGENT[case]
    guest.raw[command] = raw
    _refused(guest, capsys, migrate.EXIT_BAD_REPLY, "malformed reply")


LOWER = '{"name": "eth0", "role": "standby", "usable": true, "active": false}'
MALFORMED_STATUS = {
    "not-json": "Traceback (most recent call last):",
    "deep": '{"groups": ' + "[" * 100000 + "]" * 100000 + "}",
    "groups-string": '{"groups": "fo0"}',
    "group-number": '{"groups": [{"group": 5}]}',
    "group-not-object": '{"groups": [["fo0"]]}',
    "override-option": '{"groups": [{"group": "fo0", "override": "--help"}]}',
    "lowers-object": '{"groups": [{"group": "fo0", "lowers": {}}]}',
    "lower-usable-string": '{"groups": [{"group": "fo0", "lowers": ['
    + LOWER.replace("true", '"yes"')
    + "]}]}",
    "lower-role": '{"groups": [{"group": "fo0", "lowers": ['
    + LOWER.replace("standby", "x")
    + "]}]}",
    "empty-groups-for-a-name": '{"groups": []}',
}


@pytest.mark.parametrize("case", sorted(MALFORMED_STATUS))
def test_a_malformed_status_document_is_a_refusal(guest: FakeGuest, capsys: Any, case: str) -> None:
    text = MALFORMED_STATUS[case]
    guest.ctl_hook = lambda argv: (0, text, "") if argv[0] == "status" else None
    extra = ("--group", "fo0") if case == "empty-groups-for-a-name" else ()
    _refused(guest, capsys, migrate.EXIT_BAD_REPLY, "status --json", *extra)


def test_a_malformed_switch_reply_is_refused_and_the_override_undone(
    guest: FakeGuest, capsys: Any
) -> None:
    def hook(argv: list[str]) -> tuple[int, str, str] | None:
        if argv[:3] == ["set-primary", "fo0", "standby"] and "--wait" in argv:
            guest.failoverctl(argv[:3])  # it did switch, then answered garbage
            return 0, '{"groups": [{"group": "fo0", "active": 7}]}', ""
        return None

    guest.ctl_hook = hook
    assert run(guest) == migrate.EXIT_BAD_REPLY
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing detached" in err[0], err
    assert "device_del" not in guest.qmp_calls
    assert guest.ctl_calls[-1] == ["set-primary", "fo0", "--auto"] and guest.active == "primary"


def test_a_malformed_reply_after_the_detach_is_a_failure_not_a_refusal(
    guest: FakeGuest, capsys: Any
) -> None:
    """Too late to refuse: exit 1 (failed after the detach), the guest on its standby."""
    guest.ctl_hook = lambda argv: (0, "[[[", "") if "--auto" in argv else None
    assert run(guest) == migrate.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert "status --json" in err[-1] and "refused" not in err[-1], err
    assert [c for c in guest.qmp_calls if c.startswith("device")] == ["device_del", "device_add"]


CONTROL = "\x1b]0;owned\x07\x1b[2J\u202e\x9b31m\nFAKE LINE"


def _clean(err: str) -> None:
    for c in ("\x1b", "\x07", "\u202e", "\x9b"):
        assert c not in err
    assert not [x for x in err.splitlines() if x.startswith("FAKE")], err


def test_guest_strings_are_printed_escaped(guest: FakeGuest, capsys: Any) -> None:
    """A group name with terminal control sequences and a newline: every line the tool
    prints shows them escaped, the run itself is not disturbed."""
    guest.groups = ("fo0" + CONTROL,)
    assert run(guest, "--json") == 0
    out = capsys.readouterr()
    _clean(out.err)
    assert all(x.startswith("failover-migrate: ") for x in out.err.splitlines())
    assert "\\x1b]0;owned" in out.err
    _clean(out.out)
    assert json.loads(out.out)["group"] == "fo0" + CONTROL


def test_guest_error_text_is_printed_escaped(guest: FakeGuest, capsys: Any) -> None:
    guest.ctl_hook = lambda argv: (
        (3, "", "failoverctl: " + CONTROL) if argv[0] == "status" else None
    )
    assert run(guest) == migrate.EXIT_NO_FAILOVERD
    err = capsys.readouterr().err
    _clean(err)
    assert len(err.strip().splitlines()) == 1


# ---- the migration command ------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["--migrate-cmd", "virsh migrate --live it's qemu+ssh://hv2/system"],
        ["--migrate-cmd", ""],
        ["--migrate-cmd", "/nonexistent/migrate now"],
        ["--migrate-arg=/nonexistent/migrate"],
        ["--migrate-cmd", "true", "--migrate-arg=true"],
    ],
    ids=["unbalanced-quote", "empty", "not-found", "arg-not-found", "both"],
)
def test_a_migration_command_that_cannot_run_is_refused_first(
    guest: FakeGuest, capsys: Any, extra: list[str]
) -> None:
    assert run(guest, *extra) == migrate.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("failover-migrate: "), err
    assert not guest.qmp_calls and not guest.ctl_calls


def test_a_migration_command_that_fails_to_start_reattaches_on_the_source(
    guest: FakeGuest, capsys: Any, tmp_path: Path
) -> None:
    broken = tmp_path / "migrate"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    assert run(guest, "--migrate-arg", str(broken)) == migrate.EXIT_MIGRATION_FAILED
    assert [c for c in guest.qmp_calls if c.startswith("device")] == ["device_del", "device_add"]
    assert guest.vf_attached and guest.active == "primary"
    assert "re-attached on the source" in capsys.readouterr().err


def test_a_hanging_migration_command_is_stopped_and_the_vf_reattached(
    guest: FakeGuest, capsys: Any, tmp_path: Path
) -> None:
    """The command and what it started (its process group) are stopped after
    --migrate-timeout; the VF goes back on the source."""
    pidfile = tmp_path / "pid"
    hang = tmp_path / "migrate"
    hang.write_text(f"#!/bin/sh\nsleep 120 &\necho $! > {pidfile}\nwait\n")
    hang.chmod(0o755)
    code = run(guest, "--migrate-arg", str(hang), "--migrate-timeout", "1")
    assert code == migrate.EXIT_MIGRATION_FAILED
    assert "still running after 1s" in capsys.readouterr().err
    assert [c for c in guest.qmp_calls if c.startswith("device")] == ["device_del", "device_add"]
    assert guest.vf_attached and guest.active == "primary"
    stat = Path(f"/proc/{int(pidfile.read_text())}/stat")
    for _ in range(100):  # the orphaned sleep: killed, reaped by init soon after
        if not stat.exists() or stat.read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the migration command's child is still running")


# ---- libvirt backends, against a fake virsh ----------------------------------------------------

HOSTDEV = """<interface type='hostdev' managed='yes'>
  <mac address='52:54:00:00:12:53'/>
  <source><address type='pci' domain='0x0000' bus='0x3b' slot='0x02' function='0x1'/></source>
</interface>"""

FAKE_VIRSH = """#!{py}
import json, os, sys
state = os.environ["FAKE_VIRSH_STATE"]
args = sys.argv[1:]
if args[0] == "-c":
    uri, args = args[1], args[2:]
else:
    uri = "default"
with open(state + ".log", "a") as f:
    f.write(json.dumps([uri] + args) + "\\n")
attached = os.path.exists(state)
if args[0] == "dumpxml":
    dev = open(sys.argv[0] + ".dev").read() if attached else ""
    standby = "<interface type='bridge'><mac address='52:54:00:00:12:53'/><model type='virtio'/>"
    print("<domain><devices>" + standby + "</interface>" + dev + "</devices></domain>")
elif args[0] == "detach-device":
    os.unlink(state)
elif args[0] == "attach-device":
    open(state, "w").close()
elif args[0] == "qemu-agent-command":
    cmd = json.loads(args[2])
    print(json.dumps({{"return": {{"echo": cmd["execute"], "uri": uri}}}}))
"""


def test_virsh_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    virsh = tmp_path / "virsh"
    virsh.write_text(FAKE_VIRSH.format(py=sys.executable))
    virsh.chmod(0o755)
    (tmp_path / "virsh.dev").write_text(HOSTDEV)
    xml = tmp_path / "vf.xml"
    xml.write_text(HOSTDEV)
    state = tmp_path / "attached"
    state.touch()
    monkeypatch.setenv("FAKE_VIRSH_STATE", str(state))
    dest_xml = tmp_path / "vf-dest.xml"
    dest_xml.write_text(HOSTDEV.replace("0x3b", "0x5e"))
    vf = VirshVf(
        "dom",
        str(xml),
        "qemu:///src",
        "qemu+ssh://dst/system",
        virsh=str(virsh),
        dest_xml_file=str(dest_xml),
    )
    assert vf.name == "VF 0000:3b:02.1" and vf.attached()
    vf.detach(timeout=5)
    assert not vf.attached()
    vf.attach(on_destination=True)
    log = [json.loads(x) for x in Path(str(state) + ".log").read_text().splitlines()]
    assert ["qemu:///src", "detach-device", "dom", str(xml), "--live"] in log
    assert log[-1] == ["qemu+ssh://dst/system", "attach-device", "dom", str(dest_xml), "--live"]
    # a VF from a libvirt hostdev network is found by its MAC, never the virtio standby's
    pool = tmp_path / "pool.xml"
    pool.write_text(
        "<interface type='network'><mac address='52:54:00:00:12:53'/>"
        "<source network='sriov-pool'/></interface>"
    )
    by_mac = VirshVf("dom", str(pool), "qemu:///src", virsh=str(virsh))
    assert by_mac.name == "VF 52:54:00:00:12:53" and by_mac.attached()
    state.unlink()
    assert not by_mac.attached()
    agent = VirshAgent("dom", "qemu+ssh://dst/system", virsh=str(virsh))
    assert agent.execute("guest-ping", 5) == {"echo": "guest-ping", "uri": "qemu+ssh://dst/system"}


HOSTILE_VIRSH = {
    # the guest's reply, as virsh prints it: 100 MiB, nested too deeply, an error without text
    "flood": (
        "import sys\nfor _ in range(1600): sys.stdout.write('x' * 65536)\n",
        "AgentError",
        "more than",
    ),
    "deep": (
        "print('{\"return\": ' + '[' * 100000 + ']' * 100000 + '}')\n",
        "MalformedReply",
        "nested",
    ),
    "error-string": ("print('{\"error\": 5}')\n", "MalformedReply", "without a text"),
    "no-reply": ("print('{}')\n", "MalformedReply", "no reply"),
    "hang": ("import time\ntime.sleep(60)\n", "AgentError", "still running"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_VIRSH))
def test_virsh_agent_bounds_and_checks_what_virsh_prints(tmp_path: Path, case: str) -> None:
    """Through libvirt too: the reply is capped, the run has a deadline, its data checked."""
    body, error, words = HOSTILE_VIRSH[case]
    virsh = tmp_path / "virsh"
    virsh.write_text(f"#!{sys.executable}\n{body}")
    virsh.chmod(0o755)
    agent = VirshAgent("dom", virsh=str(virsh))
    with pytest.raises((AgentError, MalformedReply)) as e:
        agent.execute("guest-ping", 1)
    assert type(e.value).__name__ == error and words in str(e.value), e.value


# ---- deploy/: the qemu-ga block-list and the libvirt wrapper -----------------------------------

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_qemu_ga_blocklist_blocks_everything_but_what_failover_migrate_needs(
    tmp_path: Path,
) -> None:
    rpcs = ["guest-sync-delimited", "guest-sync", "guest-ping", "guest-exec", "guest-exec-status"]
    others = ["guest-file-open", "guest-set-user-password", "guest-shutdown", "guest-info"]
    fake = tmp_path / "qemu-ga"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --block-rpcs=help ] || exit 9\n'
        + "".join(f"echo {r}\n" for r in others + rpcs)
    )
    fake.chmod(0o755)
    script = str(DEPLOY / "qemu-ga" / "qemu-ga-blocklist")
    out = subprocess.run([script, "", str(fake)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == others
    out = subprocess.run(
        [script, "guest-info", str(fake)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().split(",") == others[:3]


def _wrapper(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fm"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    wrapper = str(DEPLOY / "libvirt" / "failover-migrate-libvirt")
    env = {**os.environ, "FAILOVER_MIGRATE": str(fake)}
    return subprocess.run([wrapper, *args], capture_output=True, text=True, env=env, check=False)


def test_libvirt_wrapper_runs_failover_migrate_with_virsh_migrate(tmp_path: Path) -> None:
    p = _wrapper(
        tmp_path, "web1", "qemu+ssh://hv2/system", "a.xml", "b.xml", "--", "--group", "fo0"
    )
    argv = json.loads(p.stdout)
    assert argv == [
        "--libvirt=web1",
        "--hostdev-xml=a.xml",
        "--dest-hostdev-xml=b.xml",
        "--dest-connect=qemu+ssh://hv2/system",
        "--migrate-arg=virsh",
        "--migrate-arg=migrate",
        "--migrate-arg=--live",
        "--migrate-arg=--verbose",
        "--migrate-arg=--domain",
        "--migrate-arg=web1",
        "--migrate-arg=--desturi",
        "--migrate-arg=qemu+ssh://hv2/system",
        "--group",
        "fo0",
    ]
    p = _wrapper(tmp_path, "web1")
    assert p.returncode == 2 and "DOMAIN DEST_URI VF_XML" in p.stderr


@pytest.mark.parametrize("domain", ["it's", "web 1", '"$(touch x)"; web'])
def test_libvirt_wrapper_passes_the_domain_to_virsh_word_for_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, domain: str
) -> None:
    """No shell lexer between the wrapper and `virsh migrate`: a domain with a quote, a
    space or shell syntax reaches virsh as one argument, unchanged."""
    dest = "qemu+ssh://hv2/system"
    argv = json.loads(_wrapper(tmp_path, domain, dest, "a.xml").stdout)
    args = migrate.parser().parse_args(argv)
    assert args.libvirt == domain and args.dest_connect == dest
    seen = tmp_path / "virsh-argv"
    virsh = tmp_path / "bin" / "virsh"
    virsh.parent.mkdir()
    virsh.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    virsh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{virsh.parent}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    migrate.migrate_step(migrate.migrate_argv(args.migrate_cmd, args.migrate_arg), 0)()
    assert json.loads(seen.read_text()) == [
        "migrate",
        "--live",
        "--verbose",
        "--domain",
        domain,
        "--desturi",
        dest,
    ]
    assert not (tmp_path / "x").exists()


def test_a_domain_virsh_would_take_for_an_option_is_refused(capsys: Any, tmp_path: Path) -> None:
    xml = tmp_path / "vf.xml"
    xml.write_text(HOSTDEV)
    assert migrate.main(["--libvirt=-web", "--hostdev-xml", str(xml)]) == migrate.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'-web'" in err[0], err


def test_failoverctl_without_a_config_does_not_import_pydantic(tmp_path: Path) -> None:
    """failoverctl runs once per step through guest-exec: without a config file it must not
    pay for pydantic (seconds in an emulated guest)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bpfailover.model import paths\n"
        "from bpfailover.ops import cli\n"
        f"paths.DEFAULT_CONFIG_PATH = Path({str(tmp_path / 'none.yaml')!r})\n"
        "assert cli.socket_path(None, None) == cli.DEFAULT_SOCKET\n"
        "print('pydantic' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "BPFAILOVER_CONFIG"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False", out.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("groups: [{name: fo0, standby: eth1}]\ncontrol: {socket: /run/x.sock}\n")
    code = code.replace("none.yaml", "c.yaml").replace("cli.DEFAULT_SOCKET", "'/run/x.sock'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stderr

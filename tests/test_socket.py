"""Control socket security: who may connect, and what bad input gets (an error; nothing else)."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpfailover.ops import api, cli
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab
from tests.opsutil import agent_in_lab, ctl, status_json

pytestmark = pytest.mark.root

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name  # "nogroup" on Debian


def as_user(uid: int, gid: int, groups: list[int], fn: Callable[[], Any]) -> Any:
    """Run fn in a forked child with these credentials; return its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for good, then try
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            try:
                out: Any = {"result": fn()}
            except Exception as e:
                out = {"exception": type(e).__name__, "text": str(e)}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def raw(path: str, payload: bytes, shut: bool = False, timeout: float = 10.0) -> dict[str, Any]:
    """Send raw bytes (a send blocked by a closed server is fine), return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        sender = threading.Thread(target=_send_quietly, args=(s, payload, shut))
        sender.start()
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        sender.join(timeout)
    reply: dict[str, Any] = json.loads(data)
    return reply


def _send_quietly(s: socket.socket, payload: bytes, shut: bool) -> None:
    try:
        s.sendall(payload)
        if shut:
            s.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server answered and closed before taking it all: that is the point


def _restart_with_group(run: AgentRun, group: str | None, mode: int | None = None) -> None:
    run.stop()
    run.config["control"]["group"] = group
    run.config_path.write_text(yaml.safe_dump(run.config))
    run.start()
    if mode is not None:
        os.chmod(run.socket, mode)


def test_non_root_non_group_client_is_refused(lab: Lab) -> None:
    with agent_in_lab(lab, address=False) as run:
        assert oct(os.stat(run.socket).st_mode & 0o777) == "0o600"
        ok = api.request(run.socket, {"cmd": "status"})
        assert ok["ok"]

        def status() -> Any:
            return api.request(run.socket, {"cmd": "status"})

        # The file mode stops nobody first ...
        res = as_user(NOBODY.pw_uid, NOBODY.pw_gid, [], status)
        assert res.get("exception") == "AgentUnreachable" and "ermission" in res["text"]
        # ... and with the file wide open, SO_PEERCRED still does.
        os.chmod(run.socket, 0o666)
        res = as_user(NOBODY.pw_uid, NOBODY.pw_gid, [], status)
        assert res["result"] == {"ok": False, "error": res["result"]["error"]}
        assert "permission denied" in res["result"]["error"]
        # set-primary as nobody changes nothing either
        res = as_user(
            NOBODY.pw_uid,
            NOBODY.pw_gid,
            [],
            lambda: api.request(
                run.socket, {"cmd": "set-primary", "group": "ens10", "lower": "standby"}
            ),
        )
        assert res["result"]["ok"] is False
        assert status_json(run)["groups"][0]["override"] is None

        # With control.group set, a member may (primary group or supplementary) ...
        _restart_with_group(run, NOGROUP, 0o666)
        assert oct(os.stat(run.socket).st_mode & 0o777) == "0o666"
        gid = grp.getgrnam(NOGROUP).gr_gid
        res = as_user(NOBODY.pw_uid, gid, [], status)
        assert res["result"]["ok"] is True
        res = as_user(NOBODY.pw_uid, 1, [gid], status)  # supplementary membership
        assert res["result"]["ok"] is True
        # ... and someone outside the group may not.
        res = as_user(NOBODY.pw_uid, 1, [], status)  # gid 1: daemon
        assert res["result"]["ok"] is False and "permission denied" in res["result"]["error"]
        # failoverctl as that user: the refusal is "failed" (1) with the reason
        os.chmod(run.socket, 0o660)
        # (in-process in the child: the venv may sit where `nobody` cannot exec it, e.g. /root)
        res = as_user(NOBODY.pw_uid, 1, [], lambda: cli.main(["--socket", run.socket, "status"]))
        assert res["result"] == 3  # the file mode: cannot even connect

        # A member of the control group may read, not change: one line, nothing changed.
        def teardown() -> Any:
            return api.request(run.socket, {"cmd": "teardown", "group": "ens10"})

        def standby() -> Any:
            return api.request(
                run.socket,
                {"cmd": "set-primary", "group": run.lab.names(0).failover, "lower": "standby"},
            )

        for fn in (teardown, standby):
            res = as_user(NOBODY.pw_uid, 1, [gid], fn)
            assert res["result"]["ok"] is False, res
            err = res["result"]["error"]
            assert "permission denied" in err and "admin_group" in err and "\n" not in err
        assert not run.events("teardown") and not run.events("override")
        assert status_json(run)["groups"][0]["override"] is None
        # ... a member of control.admin_group may.
        run.stop()
        run.config["control"]["admin_group"] = NOGROUP
        run.config_path.write_text(yaml.safe_dump(run.config))
        run.start()
        res = as_user(NOBODY.pw_uid, 1, [gid], standby)
        assert res["result"]["ok"] is True, res
        assert status_json(run)["groups"][0]["override"] == "standby"


def test_bad_messages_get_errors_and_the_agent_keeps_serving(lab: Lab) -> None:
    with agent_in_lab(lab, address=False) as run:
        before = status_json(run)["groups"]
        cases: list[tuple[bytes, bool, str]] = [
            (b"\x00\xff\xfe garbage\n", False, "not JSON"),
            (b"not json at all\n", False, "not JSON"),
            (b"[1, 2, 3]\n", False, "not a JSON object"),
            (b'"status"\n', False, "not a JSON object"),
            (b"{}\n", False, "unknown command"),
            (b'{"cmd": "rm -rf /"}\n', False, "unknown command"),
            (b'{"cmd": "set-primary", "group": ["ens10"]}\n', False, "unknown group"),
            (b'{"cmd": "set-primary", "group": "ens10", "lower": 7}\n', False, "must be a name"),
            (b'{"cmd": "teardown"}\n', False, "unknown group"),
            (b'{"cmd": "sta', True, "truncated"),  # closed before the newline
            (b"[" * 100_000 + b"\n", False, "over"),  # deep nesting and oversized
            (b"[" * 30_000 + b"\n", False, "not JSON"),  # deep nesting under the limit
            (b"x" * (1 << 20), False, "over 65536 bytes"),  # 1 MiB without a newline
            (
                json.dumps({"cmd": "status", "pad": "y" * (1 << 20)}).encode() + b"\n",
                False,
                "over 65536 bytes",
            ),  # 1 MiB of valid JSON
        ]
        for payload, shut, msg in cases:
            reply = raw(run.socket, payload, shut)
            assert reply["ok"] is False, (payload[:40], reply)
            assert msg in reply["error"], (payload[:40], reply)
            assert run.proc is not None and run.proc.poll() is None
            assert run.status()["groups"]  # still serving
        assert status_json(run)["groups"][0]["override"] == before[0]["override"]
        assert status_json(run)["groups"][0]["active"] == before[0]["active"]
        assert not run.events("override") and not run.events("teardown")


def test_several_clients_and_idle_ones(lab: Lab) -> None:
    with agent_in_lab(lab, address=False) as run:
        # Idle clients (connected, silent) do not hold the agent up ...
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(70)]
        try:
            for s in idle[:10]:
                s.connect(run.socket)
            t0 = time.monotonic()
            assert run.status()["groups"]  # answered while they are all still connected:
            print(f"\nstatus with 10 idle clients: {(time.monotonic() - t0) * 1e3:.1f} ms")
            for s in idle[:10]:  # none was dropped to make way (no EOF), none got a reply
                s.setblocking(False)
                with pytest.raises(BlockingIOError):
                    s.recv(1)
            # ... and when they fill every slot, the idle ones make room after a while.
            for s in idle[10:]:
                s.connect(run.socket)
            time.sleep(api.CLIENT_DEADLINE_S + 0.5)
            assert run.status()["groups"]
        finally:
            for s in idle:
                s.close()
        # Many clients at once all get their answer.
        results: list[bool] = []

        def one() -> None:
            results.append(bool(api.request(run.socket, {"cmd": "status"})["ok"]))

        threads = [threading.Thread(target=one) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert results == [True] * 40


def test_trickling_clients_do_not_lock_out_status(lab: Lab) -> None:
    """64 clients sending one byte a second (a request that never ends) fill every slot;
    their bytes do not extend their deadline, so failoverctl status still gets in."""
    with agent_in_lab(lab, address=False) as run:
        slow = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(api.MAX_CLIENTS)]
        try:
            for s in slow:
                s.connect(run.socket)
                s.setblocking(False)
            answered = None
            t_end = time.monotonic() + 4 * api.CLIENT_DEADLINE_S + 10  # bounded run
            while answered is None and time.monotonic() < t_end:
                for s in slow:
                    with contextlib.suppress(OSError):  # dropped ones: fine
                        s.send(b"{")
                if time.monotonic() > t_end - 8:  # trickled past every deadline
                    p = ctl("status", "--json", socket=run.socket, timeout=10)
                    answered = p
                time.sleep(1.0)
            assert answered is not None and answered.returncode == 0, answered
            assert json.loads(answered.stdout)["groups"]
        finally:
            for s in slow:
                s.close()


def test_socket_path_never_taken_from_a_live_socket_or_a_non_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    live = api.ControlServer(path, handler)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with pytest.raises(api.SocketInUse, match="live process"):
            api.ControlServer(path, handler)
        assert os.path.exists(path)  # still the live one's
        ino = os.stat(path).st_ino
    finally:
        live.sock.close()  # dies without cleaning up: a stale socket stays
    assert os.stat(path).st_ino == ino
    again = api.ControlServer(path, handler)  # stale: replaced
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)  # the new one listens there
    again.close()
    assert not os.path.exists(path)

    target = tmp_path / "precious"
    target.write_text("x")
    os.symlink(target, path)
    with pytest.raises(api.SocketInUse, match="not a socket"):
        api.ControlServer(path, handler)
    assert os.path.islink(path) and target.read_text() == "x"
    os.unlink(path)
    (tmp_path / "c.sock").write_text("a file")
    with pytest.raises(api.SocketInUse, match="not a socket"):
        api.ControlServer(path, handler)
    assert (tmp_path / "c.sock").read_text() == "a file"


# Any JSON value a client may put where a string or a name belongs.
ODD_VALUES: list[Any] = [
    [],
    {},
    [1, [2, {"x": []}]],
    {"cmd": "status"},
    0,
    -1,
    1.5,
    1e308,
    True,
    False,
    None,
    "",
    "status\n",
    "\x00\u2028\"'",
    "y" * 60_000,
    [None] * 2_000,
]


def test_any_json_value_for_cmd_or_an_argument_is_one_error_line(tmp_path: Path) -> None:
    """The agent's own request handler behind a control socket: whatever JSON value stands
    for the command or an argument, root and a read-only member get ok: false with a short
    one-line reason; nothing raises (which the loop would count as an agent error)."""
    from bpfailover.agent.requests import Requests
    from bpfailover.model import config as configmod
    from bpfailover.model.groups import Group, Lower
    from bpfailover.policy import PolicyConfig

    gcfg = configmod.Group(name="ens10", standby="ens10nsby")
    g = Group(
        cfg=gcfg, gid=1, mac="52:54:00:00:12:53", master=5, peer=6, carrier=True,
        pcfg=PolicyConfig.from_settings(gcfg.policy),
    )  # fmt: skip
    g.lowers["standby"] = Lower("standby", 4, "ens10nsby", False, False, 1500)  # not usable
    # no datapath, wiring or switch: a request that got past its checks would fail loudly
    handler = Requests({"ens10": g}, None, None, None, {5: {(2, "198.18.0.1")}}, dict, None)  # type: ignore[arg-type]
    server = api.ControlServer(str(tmp_path / "c.sock"), handler.handle)
    try:
        for value in ODD_VALUES:
            reqs: list[dict[str, Any]] = [
                {"cmd": value},
                {"cmd": "set-primary", "group": value},
                {"cmd": "teardown", "group": value},
            ]
            if value is not None:  # None: --auto, a valid request
                reqs.append({"cmd": "set-primary", "group": "ens10", "lower": value})
            if not isinstance(value, bool):
                reqs.append({"cmd": "teardown", "group": "ens10", "force": value})
            for req in reqs:
                for admin in (True, False):
                    reply = server.dispatch(json.dumps(req).encode(), admin=admin)
                    assert reply["ok"] is False, (req, admin, reply)
                    err = reply["error"]
                    assert isinstance(err, str) and "\n" not in err and len(err) < 200, err
                    assert "internal error" not in err, (req, admin, err)
    finally:
        server.close()


def test_a_read_only_member_sending_a_list_for_cmd_gets_an_error(lab: Lab) -> None:
    """Served by a running agent: the reply comes, and no error is counted."""
    with agent_in_lab(lab, address=False) as run:
        _restart_with_group(run, NOGROUP)
        gid = grp.getgrnam(NOGROUP).gr_gid
        for value in ([], {}, [["status"]], 7, None):

            def send(value: Any = value) -> Any:
                return api.request(run.socket, {"cmd": value}, timeout=5)

            res = as_user(NOBODY.pw_uid, 1, [gid], send)
            assert "result" in res, res  # a reply, not a timeout
            assert res["result"]["ok"] is False and "\n" not in res["result"]["error"], res
        assert raw(run.socket, b'{"cmd": []}\n')["ok"] is False  # root too
        assert run.status()["groups"]
        assert not run.events("agent_error")
        assert not any(status_json(run).get("errors", {}).values())


def test_socket_directory_must_be_roots_and_not_writable_by_others(tmp_path: Path) -> None:
    """Whoever can write in the socket's directory can replace the socket: a directory of
    another user's, open to others, or a symlink is refused, and nothing is created."""

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    d = tmp_path / "run"
    d.mkdir()
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(api.SocketDirError) as e:
        api.ControlServer(str(d / "c.sock"), handler)
    assert f"uid {NOBODY.pw_uid}" in str(e.value) and "\n" not in str(e.value)
    os.chown(d, 0, 0)
    for mode in (0o777, 0o1777, 0o775):
        os.chmod(d, mode)
        with pytest.raises(api.SocketDirError, match=f"mode {mode:04o}"):
            api.ControlServer(str(d / "c.sock"), handler)
    assert not list(d.iterdir())
    link = tmp_path / "link"
    os.chmod(d, 0o755)
    link.symlink_to(d)
    with pytest.raises(api.SocketDirError, match="not a directory"):
        api.ControlServer(str(link / "c.sock"), handler)
    assert not list(d.iterdir())

    # Not there: made root's and 0755, whatever the umask.
    fresh = tmp_path / "a" / "b"
    old = os.umask(0o077)
    try:
        server = api.ControlServer(str(fresh / "c.sock"), handler)
    finally:
        os.umask(old)
    server.close()
    st = fresh.stat()
    assert st.st_uid == 0 and oct(st.st_mode & 0o777) == "0o755"

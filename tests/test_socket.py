"""Control socket security: who may connect, and what bad input gets (an error; nothing else)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from bpfailover.ops import api, cli
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab
from tests.opsutil import agent_in_lab, status_json

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
            assert run.status()["groups"]
            assert time.monotonic() - t0 < 1.0
            # ... and when they fill every slot, the idle ones make room after a while.
            for s in idle[10:]:
                s.connect(run.socket)
            time.sleep(api.IDLE_EVICT_S + 0.5)
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

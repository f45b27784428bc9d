"""The QEMU guest agent (qemu-ga) from the host: ping, and run a program with guest-exec.

Two transports, one interface (`Agent.execute`):
  * `SocketAgent`: the host end of the guest agent's virtio-serial channel, a unix socket
    (`-chardev socket,path=P,server=on,wait=off,id=qga0 -device virtserialport,
    chardev=qga0,name=org.qemu.guest_agent.0`).  Synchronised with `guest-sync-delimited`
    (the agent answers after a 0xFF byte, so stale replies of an earlier client are skipped).
  * `VirshAgent`: libvirt owns that socket; `virsh qemu-agent-command DOMAIN JSON`.
The guest side needs nothing but qemu-ga with guest-ping, guest-exec and guest-exec-status
allowed (docs/host-migration.md: the allow-list).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import select
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any


class AgentError(RuntimeError):
    """qemu-ga is absent, does not answer, or refused a command (the message says which)."""


class ExecError(RuntimeError):
    """guest-exec could not start the program (not found, not executable)."""


@dataclass
class ExecResult:
    exitcode: int | None  # None: killed by a signal
    out: str
    err: str


class Agent:
    def execute(self, command: str, timeout: float, **args: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def ping(self, timeout: float) -> None:
        self.execute("guest-ping", timeout)

    def run(
        self, argv: list[str], timeout: float, poll: float = 0.05, max_poll: float = 0.25
    ) -> ExecResult:
        """guest-exec argv[0] with argv[1:], wait for it (guest-exec-status) up to timeout.
        guest-exec-status every `poll` seconds at first, backing off to `max_poll` (a
        program that blocks for a while, `set-primary --wait`, is not asked 20 times a
        second: every request wakes the guest)."""
        deadline = time.monotonic() + timeout
        try:
            pid = self.execute(
                "guest-exec", timeout, path=argv[0], arg=argv[1:], **{"capture-output": True}
            )["pid"]
        except AgentError as e:
            text = str(e)
            if "Failed to execute child process" in text or "No such file" in text:
                raise ExecError(f"{argv[0]}: cannot run it in the guest ({text})") from None
            raise
        while True:
            left = deadline - time.monotonic()
            st = self.execute("guest-exec-status", max(1.0, left), pid=pid)
            if st.get("exited"):
                code = st.get("exitcode")
                if code is None and st.get("signal") is None:
                    code = 0
                return ExecResult(code, _b64(st.get("out-data")), _b64(st.get("err-data")))
            if left <= 0:
                raise AgentError(f"{' '.join(argv)}: still running after {timeout:g}s")
            time.sleep(min(poll, max(0.0, left)))
            poll = min(max_poll, poll * 1.5)


def _b64(data: str | None) -> str:
    if not data:
        return ""
    return base64.b64decode(data).decode(errors="replace")


def _error_text(reply: dict[str, Any]) -> str:
    err = reply.get("error", {})
    return f"{err.get('class', 'error')}: {err.get('desc', err)}"


class SocketAgent(Agent):
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        if self.sock is not None:
            return self.sock
        if not os.path.exists(self.path):
            raise AgentError(f"guest agent socket {self.path} does not exist")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise AgentError(f"guest agent socket {self.path}: {e.strerror or e}") from None
        self.sock = s
        return s

    def _send(self, msg: dict[str, Any] | bytes) -> None:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\n"
        try:
            self._connect().sendall(data)
        except OSError as e:
            self.close()
            raise AgentError(f"guest agent socket {self.path}: {e.strerror or e}") from None

    def _fill(self, deadline: float, what: str) -> None:
        assert self.sock is not None
        left = deadline - time.monotonic()
        r, _, _ = select.select([self.sock], [], [], max(0.0, left))
        if not r:
            raise AgentError(f"{what}: no answer from the guest agent within the timeout")
        chunk = self.sock.recv(65536)
        if not chunk:
            self.close()
            raise AgentError(f"{what}: the guest agent channel closed")
        self.buf += chunk

    def _line(self, deadline: float, what: str) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            self._fill(deadline, what)
        line, _, self.buf = self.buf.partition(b"\n")
        line = line.strip()
        if not line:
            return None
        try:
            msg: dict[str, Any] = json.loads(line)
        except ValueError:
            return None  # a fragment of an earlier client's reply: skipped
        return msg

    def sync(self, timeout: float) -> None:
        """guest-sync-delimited: discard everything up to the 0xFF and our id's reply."""
        deadline = time.monotonic() + timeout
        sid = random.randrange(1, 2**31)
        self.buf = b""
        # A 0xFF first resets the agent's JSON parser after a half-written request.
        self._send(b"\xff")
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": sid}})
        what = "guest-sync-delimited"
        seen = False
        while True:
            self._fill(deadline, what)
            if b"\xff" in self.buf:
                self.buf = self.buf.rsplit(b"\xff", 1)[1]
                seen = True
            if not seen:
                self.buf = b""
                continue
            while b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("return") == sid:
                    return

    def execute(self, command: str, timeout: float, **args: Any) -> Any:
        deadline = time.monotonic() + timeout
        if self.sock is None:
            self.sync(timeout)
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        self._send(msg)
        while True:
            try:
                reply = self._line(deadline, command)
            except AgentError:
                self.close()  # a late reply must not answer the next command: re-sync
                raise
            if reply is None or ("return" not in reply and "error" not in reply):
                continue
            if "error" in reply:
                raise AgentError(f"{command}: {_error_text(reply)}")
            return reply["return"]

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self.buf = b""


class VirshAgent(Agent):
    """`virsh [-c URI] qemu-agent-command DOMAIN JSON --timeout N` (libvirt syncs for us)."""

    def __init__(self, domain: str, connect: str | None = None, virsh: str = "virsh") -> None:
        self.domain, self.connect, self.virsh = domain, connect, virsh

    def execute(self, command: str, timeout: float, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        argv = [self.virsh] + (["-c", self.connect] if self.connect else [])
        argv += ["qemu-agent-command", self.domain, json.dumps(msg), "--timeout"]
        argv += [str(max(1, int(timeout)))]
        try:
            p = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout + 5, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AgentError(f"{command}: virsh: {e}") from None
        if p.returncode != 0:
            err = " ".join(p.stderr.split()) or f"virsh exit {p.returncode}"
            raise AgentError(f"{command}: {err}")
        try:
            reply: dict[str, Any] = json.loads(p.stdout)
        except ValueError:
            raise AgentError(f"{command}: virsh printed no JSON: {p.stdout[:80]!r}") from None
        if "error" in reply:
            raise AgentError(f"{command}: {_error_text(reply)}")
        return reply.get("return")

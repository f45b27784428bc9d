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
import binascii
import contextlib
import json
import os
import random
import select
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

# The longest reply line taken from the guest.  failoverctl's status document is a few KiB
# (base64 in guest-exec-status: 4/3 of it); anything longer is a flood, not an answer.
MAX_REPLY = 1 << 20


class AgentError(RuntimeError):
    """qemu-ga is absent, does not answer in time, floods the channel, or refused a
    command (the message says which)."""


class MalformedReply(RuntimeError):
    """The guest agent answered, but not with a qemu-ga reply: not JSON, nested too deep,
    a wrong type, bad base64 (the guest is not trusted: its data is checked, not assumed)."""


class ExecError(RuntimeError):
    """guest-exec could not start the program (not found, not executable)."""


@dataclass
class ExecResult:
    exitcode: int | None  # None: killed by a signal
    out: str
    err: str


def show(value: Any, limit: int = 60) -> str:
    """A guest value for a message: repr (escaped), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
        second: every request wakes the guest).  One deadline for the whole run; the last
        guest-exec-status may take up to 1 s past it."""
        deadline = time.monotonic() + timeout
        try:
            ret = self.execute(
                "guest-exec", timeout, path=argv[0], arg=argv[1:], **{"capture-output": True}
            )
        except AgentError as e:
            text = str(e)
            if "Failed to execute child process" in text or "No such file" in text:
                raise ExecError(f"{argv[0]}: cannot run it in the guest ({text})") from None
            raise
        pid = ret.get("pid") if isinstance(ret, dict) else None
        if type(pid) is not int:
            raise MalformedReply(f"guest-exec: no pid in its reply {show(ret)}")
        while True:
            left = deadline - time.monotonic()
            st = self.execute("guest-exec-status", max(1.0, left), pid=pid)
            if not isinstance(st, dict) or not isinstance(st.get("exited"), bool):
                raise MalformedReply(f"guest-exec-status: not a status {show(st)}")
            if st["exited"]:
                code, sig = st.get("exitcode"), st.get("signal")
                for key, v in (("exitcode", code), ("signal", sig)):
                    if v is not None and type(v) is not int:
                        raise MalformedReply(f"guest-exec-status: {key} {show(v)}")
                if code is None and sig is None:
                    code = 0
                return ExecResult(code, _b64(st, "out-data"), _b64(st, "err-data"))
            if left <= 0:
                raise AgentError(f"{' '.join(argv)}: still running after {timeout:g}s")
            time.sleep(min(poll, max(0.0, left)))
            poll = min(max_poll, poll * 1.5)


def _b64(st: dict[str, Any], key: str) -> str:
    data = st.get(key)
    if data is None or data == "":
        return ""
    if not isinstance(data, str):
        raise MalformedReply(f"guest-exec-status: {key} is not a string: {show(data)}")
    try:
        return base64.b64decode(data, validate=True).decode(errors="replace")
    except (binascii.Error, ValueError):
        raise MalformedReply(f"guest-exec-status: {key} is not base64: {show(data)}") from None


def decode(raw: bytes | str, command: str) -> Any:
    """One reply line as JSON; anything else (not JSON, nested too deep) is malformed."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise MalformedReply(f"{command}: a reply nested too deeply") from None
    except ValueError:
        raise MalformedReply(f"{command}: a reply that is not JSON: {show(raw)}") from None


def _answer(reply: Any, command: str) -> tuple[bool, Any]:
    """(True, value) for a reply, (False, None) for a line that answers nothing (skipped);
    an error reply raises AgentError with the guest's text."""
    if not isinstance(reply, dict):
        raise MalformedReply(f"{command}: a reply that is not an object: {show(reply)}")
    if "error" in reply:
        err = reply["error"]
        desc = err.get("desc") if isinstance(err, dict) else None
        cls = err.get("class", "error") if isinstance(err, dict) else None
        if not isinstance(desc, str) or not isinstance(cls, str):
            raise MalformedReply(f"{command}: an error reply without a text: {show(err)}")
        raise AgentError(f"{command}: {cls}: {desc}")
    if "return" in reply:
        return True, reply["return"]
    return False, None


class SocketAgent(Agent):
    def __init__(self, path: str, max_reply: int = MAX_REPLY) -> None:
        self.path, self.max_reply = path, max_reply
        self.sock: socket.socket | None = None
        self.lines: deque[bytes] = deque()  # complete lines not read yet
        self.partial = b""  # the line being received

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

    def _recv(self, deadline: float, what: str) -> bytes:
        """What the guest sent next.  The deadline holds even when the guest keeps the
        channel busy: it is checked before every read, not only when nothing comes."""
        assert self.sock is not None
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            raise AgentError(f"{what}: no answer from the guest agent within the timeout")
        try:
            chunk = self.sock.recv(65536)
        except OSError as e:
            raise AgentError(f"{what}: the guest agent channel: {e.strerror or e}") from None
        if not chunk:
            raise AgentError(f"{what}: the guest agent channel closed")
        return chunk

    def _add(self, chunk: bytes, what: str) -> None:
        *done, self.partial = (self.partial + chunk).split(b"\n")
        if len(self.partial) > self.max_reply:
            raise AgentError(
                f"{what}: the guest agent sent more than {self.max_reply} bytes without "
                "ending its reply"
            )
        self.lines.extend(done)

    def _line(self, deadline: float, what: str) -> bytes:
        while not self.lines:
            self._add(self._recv(deadline, what), what)
        if time.monotonic() > deadline:  # lines kept coming, none of them our answer
            raise AgentError(f"{what}: no answer from the guest agent within the timeout")
        return self.lines.popleft().strip()

    def sync(self, deadline: float) -> None:
        """guest-sync-delimited: discard everything up to the 0xFF and our id's reply."""
        sid = random.randrange(1, 2**31)
        self.lines.clear()
        self.partial = b""
        # A 0xFF first resets the agent's JSON parser after a half-written request.
        self._send(b"\xff")
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": sid}})
        what = "guest-sync-delimited"
        while True:  # an earlier client's replies, up to the 0xFF: dropped unread
            chunk = self._recv(deadline, what)
            if b"\xff" in chunk:
                self._add(chunk.rsplit(b"\xff", 1)[1], what)
                break
        while True:
            line = self._line(deadline, what)
            with contextlib.suppress(MalformedReply):
                msg = decode(line, what)
                if (
                    isinstance(msg, dict)
                    and type(msg.get("return")) is int
                    and msg["return"] == sid
                ):
                    return

    def execute(self, command: str, timeout: float, **args: Any) -> Any:
        deadline = time.monotonic() + timeout
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        try:
            if self.sock is None:
                self.sync(deadline)
            self._send(msg)
        except (AgentError, MalformedReply):
            self.close()
            raise
        while True:
            try:
                line = self._line(deadline, command)
                reply = decode(line, command) if line else None
            except (AgentError, MalformedReply):
                self.close()  # a late reply must not answer the next command: re-sync
                raise
            if reply is None:
                continue
            done, value = _answer(reply, command)
            if done:
                return value

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self.lines.clear()
        self.partial = b""


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
        code, out, err = run_capped(argv, max(1, int(timeout)) + 2, MAX_REPLY, command)
        if code != 0:
            text = " ".join(err.decode(errors="replace").split()) or f"virsh exit {code}"
            raise AgentError(f"{command}: {text}")
        done, value = _answer(decode(out, command), command)
        if not done:
            raise MalformedReply(f"{command}: virsh printed no reply: {show(out)}")
        return value


def run_capped(argv: list[str], timeout: float, cap: int, what: str) -> tuple[int, bytes, bytes]:
    """Run a program, its output kept up to `cap` bytes and its run up to `timeout` seconds
    (killed past either: its output comes from the guest)."""
    try:
        p = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as e:
        raise AgentError(f"{what}: {argv[0]}: {e.strerror or e}") from None
    assert p.stdout is not None and p.stderr is not None
    deadline = time.monotonic() + timeout
    out_fd, err_fd = p.stdout.fileno(), p.stderr.fileno()
    got: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    size = 0
    try:
        fds = list(got)
        while fds:
            left = deadline - time.monotonic()
            ready = select.select(fds, [], [], left)[0] if left > 0 else []
            if not ready:
                raise AgentError(f"{what}: {argv[0]} still running after {timeout:g}s")
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    fds.remove(fd)
                size += len(chunk)
                if size > cap:
                    raise AgentError(f"{what}: {argv[0]} printed more than {cap} bytes")
                got[fd].append(chunk)
        code = p.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AgentError(f"{what}: {argv[0]} still running after {timeout:g}s") from None
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    return code, b"".join(got[out_fd]), b"".join(got[err_fd])

"""The control socket: one JSON request per line in, one JSON reply per line out.

Served from the agent's own selector loop and never blocking it: reads and
writes are non-blocking, replies that do not fit the socket buffer wait for
the client to become writable, and an idle client is evicted when the slots
run out, so a slow or malicious client can never hold up a switch.  Only root,
or members of the configured group, may talk to it: checked with SO_PEERCRED
at accept (the file mode is a second fence, not the first).

Every failure becomes an error reply (`{"ok": false, "error": "..."}`) and
changes nothing: not JSON, not an object, truncated (the client closed before
the newline), over MAX_REQUEST bytes, unknown command, bad arguments.
"""

from __future__ import annotations

import grp as grpmod
import json
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REQUEST = 64 * 1024  # a request is a few hundred bytes; anything near this is abuse
MAX_CLIENTS = 64
IDLE_EVICT_S = 2.0  # when the slots are full, clients idle this long make room


class RequestError(ValueError):
    """A request we refuse: its message goes back to the client as the error."""


class AgentUnreachable(OSError):
    """No agent answers on the socket (absent, not running, no permission on the file)."""


class ReplyError(RuntimeError):
    """The agent answered something that is not a reply."""


def peer_creds(conn: socket.socket) -> tuple[int, int, int]:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _groups_of(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(x) for x in line.split()[1:]}
    except OSError:
        pass
    return set()


@dataclass
class _Client:
    conn: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""
    last: float = field(default_factory=time.monotonic)


class ControlServer:
    def __init__(
        self,
        path: str,
        handler: Callable[[dict[str, Any]], dict[str, Any]],
        group: str | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.gid = grpmod.getgrnam(group).gr_gid if group else None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a previous agent (the pin lock says we're alone)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        os.chmod(path, 0o660 if self.gid is not None else 0o600)
        if self.gid is not None:
            os.chown(path, 0, self.gid)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.sel: selectors.BaseSelector | None = None
        self.clients: dict[socket.socket, _Client] = {}

    def register(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        sel.register(self.sock, selectors.EVENT_READ, "control-listen")

    def allowed(self, conn: socket.socket) -> bool:
        pid, uid, gid = peer_creds(conn)
        if uid == 0:
            return True
        return self.gid is not None and (gid == self.gid or self.gid in _groups_of(pid))

    def on_ready(self, key: selectors.SelectorKey) -> None:
        if key.data == "control-listen":
            self._accept()
        elif key.data == "control-conn":
            client = self.clients.get(key.fileobj)  # type: ignore[call-overload]
            if client is None:
                return
            if client.outbuf:
                self._flush(client)
            else:
                self._read(client)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EMFILE and friends: the client sees a reset, we keep serving
        conn.setblocking(False)
        if not self.allowed(conn):
            self._send_once(
                conn, {"ok": False, "error": "permission denied (root or the control group only)"}
            )
            return
        if len(self.clients) >= MAX_CLIENTS and not self._evict_idle():
            self._send_once(conn, {"ok": False, "error": "too many clients"})
            return
        assert self.sel is not None
        self.clients[conn] = _Client(conn)
        self.sel.register(conn, selectors.EVENT_READ, "control-conn")

    def _evict_idle(self) -> bool:
        now = time.monotonic()
        oldest = min(self.clients.values(), key=lambda c: c.last)
        if now - oldest.last < IDLE_EVICT_S:
            return False
        self._drop(oldest)
        return True

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.conn.recv(MAX_REQUEST + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.last = time.monotonic()
        if not chunk:  # EOF: a request without its newline is truncated
            if client.inbuf:
                self._respond(client, {"ok": False, "error": "truncated request (no newline)"})
            else:
                self._drop(client)
            return
        client.inbuf += chunk
        nl = client.inbuf.find(b"\n")
        if nl < 0:
            if len(client.inbuf) > MAX_REQUEST:
                self._respond(client, {"ok": False, "error": f"request over {MAX_REQUEST} bytes"})
            return
        self._respond(client, self.dispatch(bytes(client.inbuf[:nl])))

    def dispatch(self, line: bytes) -> dict[str, Any]:
        """Never raises: every failure becomes an error reply, and changes nothing."""
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": f"request over {MAX_REQUEST} bytes"}
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return {"ok": False, "error": f"malformed request: not JSON ({e.__class__.__name__})"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "malformed request: not a JSON object"}
        try:
            return self.handler(req)
        except RequestError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not take the agent down with it
            return {"ok": False, "error": f"internal error: {e.__class__.__name__}: {e}"}

    def _respond(self, client: _Client, msg: dict[str, Any]) -> None:
        """Queue the one reply of this connection; it is closed once the reply is out."""
        client.inbuf = bytearray()
        client.outbuf = json.dumps(msg).encode() + b"\n"
        with suppress(OSError):
            client.conn.shutdown(socket.SHUT_RD)  # one request per connection
        if self.sel is not None:
            with suppress(KeyError, ValueError):
                self.sel.modify(client.conn, selectors.EVENT_WRITE, "control-conn")
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            n = client.conn.send(client.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.last = time.monotonic()
        client.outbuf = client.outbuf[n:]
        if not client.outbuf:
            self._drop(client)

    @staticmethod
    def _send_once(conn: socket.socket, msg: dict[str, Any]) -> None:
        """A short refusal on a fresh connection: fits any socket buffer, never waits."""
        with suppress(OSError):
            conn.send(json.dumps(msg).encode() + b"\n")
        conn.close()

    def _drop(self, client: _Client) -> None:
        if self.sel is not None:
            with suppress(KeyError, ValueError):
                self.sel.unregister(client.conn)
        self.clients.pop(client.conn, None)
        client.conn.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        with suppress(KeyError, ValueError):
            if self.sel is not None:
                self.sel.unregister(self.sock)
        self.sock.close()
        with suppress(FileNotFoundError):
            os.unlink(self.path)


def request(path: str, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side: send one request, read one reply.

    Raises AgentUnreachable when nothing answers on `path` (an OSError, as before),
    ReplyError when the answer is not a JSON object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            raise AgentUnreachable(e.errno, f"{path}: {e.strerror or e}") from e
        data = bytearray()
        try:
            # A refusal may come before our request is read; the reply still counts.
            with suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(json.dumps(msg).encode() + b"\n")
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError as e:
            raise AgentUnreachable(0, f"{path}: no reply within {timeout:g}s") from e
        except OSError as e:
            if not data:
                raise AgentUnreachable(e.errno, f"{path}: {e.strerror or e}") from e
    if not data:
        raise AgentUnreachable(0, f"{path}: connection closed without a reply")
    try:
        reply = json.loads(data)
    except ValueError as e:
        raise ReplyError(f"{path}: not a JSON reply: {bytes(data[:80])!r}") from e
    if not isinstance(reply, dict):
        raise ReplyError(f"{path}: reply is not a JSON object")
    return reply

"""The control socket: one JSON request per line in, one JSON reply per line out.

Served from the agent's own selector loop, non-blocking, so a slow or
malicious client can never hold up a switch.  Only root, or members of the
configured group, may talk to it (checked with SO_PEERCRED at accept).
"""

from __future__ import annotations

import grp as grpmod
import json
import os
import selectors
import socket
import struct
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

MAX_REQUEST = 64 * 1024  # a request is a few hundred bytes; anything near this is abuse
MAX_CLIENTS = 64


class RequestError(ValueError):
    """A request we refuse: its message goes back to the client as the error."""


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
        self.buffers: dict[socket.socket, bytearray] = {}

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
            self._read(key.fileobj)  # type: ignore[arg-type]

    def _accept(self) -> None:
        assert self.sel is not None
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        if not self.allowed(conn) or len(self.buffers) >= MAX_CLIENTS:
            why = "permission denied" if len(self.buffers) < MAX_CLIENTS else "too many clients"
            self._reply(conn, {"ok": False, "error": why})
            conn.close()
            return
        conn.setblocking(False)
        self.buffers[conn] = bytearray()
        self.sel.register(conn, selectors.EVENT_READ, "control-conn")

    def _read(self, conn: socket.socket) -> None:
        buf = self.buffers[conn]
        try:
            chunk = conn.recv(MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        buf += chunk
        if b"\n" not in buf:
            if len(buf) > MAX_REQUEST:
                self._reply(conn, {"ok": False, "error": f"request over {MAX_REQUEST} bytes"})
                self._drop(conn)
            return
        line = bytes(buf.split(b"\n", 1)[0])
        self._reply(conn, self.dispatch(line))
        self._drop(conn)

    def dispatch(self, line: bytes) -> dict[str, Any]:
        """Never raises: every failure becomes an error reply, and changes nothing."""
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": f"request over {MAX_REQUEST} bytes"}
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"malformed request: not JSON ({e.__class__.__name__})"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "malformed request: not a JSON object"}
        try:
            return self.handler(req)
        except RequestError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug must not take the agent down with it
            return {"ok": False, "error": f"internal error: {e}"}

    def _reply(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        with suppress(OSError):
            conn.setblocking(True)
            conn.settimeout(0.2)  # replies are small; never wait long on a client
            conn.sendall(json.dumps(msg).encode() + b"\n")

    def _drop(self, conn: socket.socket) -> None:
        if self.sel is not None:
            with suppress(KeyError, ValueError):
                self.sel.unregister(conn)
        self.buffers.pop(conn, None)
        conn.close()

    def close(self) -> None:
        for conn in list(self.buffers):
            self._drop(conn)
        with suppress(KeyError, ValueError):
            if self.sel is not None:
                self.sel.unregister(self.sock)
        self.sock.close()
        with suppress(FileNotFoundError):
            os.unlink(self.path)


def request(path: str, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side: send one request, read one reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(msg).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply

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

Who may do what: `status` (READ_ONLY) is for root and members of `control.group`;
every other command (set-primary, teardown) needs root or a member of
`control.admin_group`.  Supplementary groups come from SO_PEERGROUPS (the kernel's
copy at connect time; no /proc lookup, which races and fails across pid namespaces).

Slots: MAX_CLIENTS connections, the last ROOT_RESERVED of them for root only, at most
MAX_PER_UID per other user.  A connection has CLIENT_DEADLINE_S from accept to be done
(its bytes do not extend it): when the slots run out, overdue connections make room.

The socket's directory: created root's and 0755, or if it is there, owned by root and not
group/world-writable (not a symlink).  The socket file: a live socket at the path (another
agent) is never unlinked (lstat, S_ISSOCK, a connect probe); anything else there that is
not a socket is refused; the file is created with its final mode (umask around bind) and
chowned without following symlinks.
"""

from __future__ import annotations

import errno
import grp as grpmod
import json
import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REQUEST = 64 * 1024  # a request is a few hundred bytes; anything near this is abuse
MAX_CLIENTS = 64
ROOT_RESERVED = 4  # slots only root may take: a flood by one user never locks root out
MAX_PER_UID = 16  # connections of one non-root user
CLIENT_DEADLINE_S = 2.0  # accept -> reply sent; when the slots are full, older ones go
IDLE_EVICT_S = CLIENT_DEADLINE_S  # (the old name)
READ_ONLY = frozenset({"status"})  # commands for control.group; the rest need admin
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


class RequestError(ValueError):
    """A request we refuse: its message goes back to the client as the error."""


class AgentUnreachable(OSError):
    """No agent answers on the socket (absent, not running, no permission on the file)."""


class ReplyError(RuntimeError):
    """The agent answered something that is not a reply."""


class SocketInUse(RuntimeError):
    """The control socket path is taken (a live socket, or not a socket at all)."""


class SocketDirError(SocketInUse):
    """The control socket's directory is not safe to serve from."""


def short(value: object, limit: int = 40) -> str:
    """A client's value for an error line: its repr (one line, quotes escaped), cut short."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deep nesting; an int over Python's digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def peer_creds(conn: socket.socket) -> tuple[int, int, int]:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(conn: socket.socket) -> set[int]:
    """The peer's supplementary groups as the kernel recorded them at connect."""
    size = 4 * 64
    while True:
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < 4 * 65536:
                size *= 16
                continue
            return set()
        return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def group_id(name: str | None) -> int | None:
    return grpmod.getgrnam(name).gr_gid if name else None


def _socket_dir(d: Path) -> None:
    """The socket's directory: made root's, 0755, if it is not there; else it must be a
    directory (not a symlink) owned by root and not group/world-writable, since whoever
    can write in it can put their own socket in place of ours."""
    if not os.path.lexists(d):
        d.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileExistsError):
            d.mkdir(mode=0o755)
            os.chmod(d, 0o755)  # whatever the umask: the socket file's mode is the fence
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise SocketDirError(
            f"{d} (the control socket's directory) must be a directory owned by root and "
            f"not group/world-writable ({kind}, uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}): fix it or set control.socket elsewhere"
        )


def _clear_path(path: str) -> None:
    """Make room for our socket at `path`: nothing there, or a dead socket (removed).  A
    live socket or anything that is not a socket is refused, never removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket: remove it, or set control.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: a stale socket of an agent that is gone
            return
        except OSError as e:
            raise SocketInUse(f"{path}: cannot tell whether it is in use ({e})") from None
    raise SocketInUse(
        f"{path} is served by a live process (another failoverd?): not taking it over"
    )


@dataclass
class _Client:
    conn: socket.socket
    uid: int
    admin: bool
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""
    started: float = field(default_factory=time.monotonic)


class ControlServer:
    def __init__(
        self,
        path: str,
        handler: Callable[[dict[str, Any]], dict[str, Any]],
        group: str | None = None,
        admin_group: str | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.gid = group_id(group)
        self.admin_gid = group_id(admin_group)
        _socket_dir(Path(path).parent)
        _clear_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        file_gid = self.gid if self.gid is not None else self.admin_gid
        # Created with its final mode: no window in which it is wider.
        old_umask = os.umask(0o117 if file_gid is not None else 0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        if file_gid is not None:
            os.chown(path, 0, file_gid, follow_symlinks=False)
        self._ino = os.lstat(path).st_ino  # close() removes this file, not a successor
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.sel: selectors.BaseSelector | None = None
        self.clients: dict[socket.socket, _Client] = {}

    def register(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        sel.register(self.sock, selectors.EVENT_READ, "control-listen")

    def rights(self, conn: socket.socket) -> tuple[int, bool, bool]:
        """(uid, may connect, may change things) of the peer."""
        _pid, uid, gid = peer_creds(conn)
        if uid == 0:
            return uid, True, True
        groups = peer_groups(conn) | {gid}
        admin = self.admin_gid is not None and self.admin_gid in groups
        return uid, admin or (self.gid is not None and self.gid in groups), admin

    def allowed(self, conn: socket.socket) -> bool:
        return self.rights(conn)[1]

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
        uid, allowed, admin = self.rights(conn)
        if not allowed:
            self._send_once(
                conn, {"ok": False, "error": "permission denied (root or the control group only)"}
            )
            return
        refusal = self._admit(uid)
        if refusal:
            self._send_once(conn, {"ok": False, "error": refusal})
            return
        assert self.sel is not None
        self.clients[conn] = _Client(conn, uid, admin)
        self.sel.register(conn, selectors.EVENT_READ, "control-conn")

    def _admit(self, uid: int) -> str | None:
        """Room for one more connection of `uid`? None if so (overdue ones may have been
        dropped to make it), else why not."""
        if uid != 0:
            mine = sum(1 for c in self.clients.values() if c.uid == uid)
            if mine >= MAX_PER_UID and not self._drop_overdue(uid):
                return f"too many clients (uid {uid} has {MAX_PER_UID} connections)"
        limit = MAX_CLIENTS if uid == 0 else MAX_CLIENTS - ROOT_RESERVED
        if len(self.clients) >= limit and not self._drop_overdue(None):
            return "too many clients"
        return None

    def _drop_overdue(self, uid: int | None) -> bool:
        """Drop connections past their deadline (of `uid` only, if given); any dropped?"""
        now = time.monotonic()
        overdue = [
            c
            for c in self.clients.values()
            if now - c.started >= CLIENT_DEADLINE_S and (uid is None or c.uid == uid)
        ]
        for c in overdue:
            self._drop(c)
        return bool(overdue)

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.conn.recv(MAX_REQUEST + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
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
        self._respond(client, self.dispatch(bytes(client.inbuf[:nl]), admin=client.admin))

    def dispatch(self, line: bytes, admin: bool = True) -> dict[str, Any]:
        """Never raises: every failure becomes an error reply, and changes nothing."""
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": f"request over {MAX_REQUEST} bytes"}
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return {"ok": False, "error": f"malformed request: not JSON ({e.__class__.__name__})"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "malformed request: not a JSON object"}
        cmd = req.get("cmd")
        if cmd is not None and not isinstance(cmd, str):  # any JSON value: checked before use
            return {"ok": False, "error": f"malformed request: cmd is not a string: {short(cmd)}"}
        if not admin and cmd not in READ_ONLY:
            return {
                "ok": False,
                "error": f"permission denied: {short(cmd)} changes the agent "
                "(root or control.admin_group only; the control group may run status)",
            }
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
            if os.lstat(self.path).st_ino == self._ino:
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

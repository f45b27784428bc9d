"""A small blocking QMP client: commands with ids, events kept for wait_event().

One unix socket (QEMU's `-qmp unix:PATH,server=on,wait=off` or `-chardev socket` +
`-mon`); no threads: while a command waits for its reply, events read meanwhile are kept.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Callable
from typing import Any


class QMPError(RuntimeError):
    """The monitor refused a command, did not answer, or is not there."""


class QMP:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise QMPError(f"QMP socket {path}: {e.strerror or e}") from None
        self.buf = b""
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.next_id = 1
        greeting = self._read(timeout)
        if "QMP" not in greeting:
            self.close()
            raise QMPError(f"QMP socket {path}: not a QMP monitor ({str(greeting)[:80]})")
        self.cmd("qmp_capabilities", timeout=timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"QMP: no answer within {timeout:g}s")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise QMPError("QMP: the monitor closed the connection")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg: dict[str, Any] = json.loads(line)
        except ValueError:
            raise QMPError(f"QMP: not JSON: {line[:80]!r}") from None
        return msg

    def cmd(self, execute: str, timeout: float = 10.0, **args: Any) -> Any:
        rid = self.next_id
        self.next_id += 1
        msg: dict[str, Any] = {"execute": execute, "id": rid}
        if args:
            msg["arguments"] = args
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QMPError(f"QMP {execute}: {e.strerror or e}") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(max(0.0, deadline - time.monotonic()))
            if "event" in reply:
                self.events.append((time.monotonic(), reply))
            elif reply.get("id") == rid:
                break
        if "error" in reply:
            raise QMPError(f"QMP {execute}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def wait_event(
        self, name: str, timeout: float, match: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """The first event `name` (already received or still to come) that matches; consumed."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (_, ev) in enumerate(self.events):
                if ev.get("event") == name and (match is None or match(ev)):
                    del self.events[i]
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"QMP: no {name} event within {timeout:g}s")
            try:
                msg = self._read(left)
            except QMPError:
                if time.monotonic() >= deadline:
                    raise QMPError(f"QMP: no {name} event within {timeout:g}s") from None
                raise
            if "event" in msg:
                self.events.append((time.monotonic(), msg))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

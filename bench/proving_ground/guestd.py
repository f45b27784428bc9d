"""Command server inside the proving-ground guest (started by /sbin/pg-init).

One JSON request per line on the virtio-serial port named `pg`, one JSON reply per line
back, each carrying the request's `id`.  Requests are served one at a time; long-running
programs are spawned and then talked to (send a line, read a line, wait), so the host never
blocks the guest for longer than the timeout it asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from bpfailover.effects.ethtool import driver_of
from bpfailover.ops import api

PORT_NAME = "pg"
MAX_OUT = 1 << 20  # bytes of stdout/stderr returned per request


def find_port() -> str:
    for d in Path("/sys/class/virtio-ports").glob("*"):
        with contextlib.suppress(OSError):
            if (d / "name").read_text().strip() == PORT_NAME:
                return f"/dev/{d.name}"
    raise SystemExit(f"guestd: no virtio-serial port named {PORT_NAME}")


class Server:
    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.bufs: dict[int, bytearray] = {}

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        fn = getattr(self, f"op_{op}", None)
        if fn is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        try:
            out: dict[str, Any] = fn(req)
        except Exception as e:  # a bad request must not kill the guest's PID 1 child
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"ok": True, **out}

    # -- one-shot commands ------------------------------------------------------------------
    def op_run(self, req: dict[str, Any]) -> dict[str, Any]:
        argv = req["argv"] if "argv" in req else ["/bin/sh", "-c", req["sh"]]
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                argv,
                capture_output=True,
                timeout=float(req.get("timeout", 30)),
                check=False,
                env=self._env(req),
            )
        except subprocess.TimeoutExpired as e:
            return {"rc": None, "timeout": True, "out": _text(e.stdout), "err": _text(e.stderr)}
        return {
            "rc": p.returncode,
            "out": _text(p.stdout),
            "err": _text(p.stderr),
            "secs": time.monotonic() - t0,
        }

    def op_time(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"mono_ns": time.monotonic_ns(), "wall": time.time()}

    def op_read(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"data": Path(req["path"]).read_text(errors="replace")[-MAX_OUT:]}

    def op_write(self, req: dict[str, Any]) -> dict[str, Any]:
        Path(req["path"]).write_text(req["data"])
        return {}

    def op_poweroff(self, req: dict[str, Any]) -> dict[str, Any]:
        for p in self.procs.values():
            with contextlib.suppress(OSError):
                p.kill()
        os.sync()
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("o")
        return {}

    def op_links(self, req: dict[str, Any]) -> dict[str, Any]:
        """Every netdev: name, driver, MAC, carrier, admin up, master (read straight from /sys)."""
        out = []
        for d in sorted(Path("/sys/class/net").iterdir()):

            def attr(name: str, d: Path = d) -> str:
                try:
                    return (d / name).read_text().strip()
                except OSError:
                    return ""

            master = d / "master"
            out.append(
                {
                    "name": d.name,
                    "driver": driver_of(d.name),
                    "mac": attr("address"),
                    "carrier": attr("carrier") == "1",
                    "up": bool(int(attr("flags") or "0", 16) & 1),
                    "operstate": attr("operstate"),
                    "ifindex": int(attr("ifindex") or 0),
                    "master": os.path.basename(os.readlink(master)) if master.exists() else None,
                }
            )
        return {"links": out}

    def op_unix(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request to failoverd's control socket (its own client: api.request)."""
        return {"reply": api.request(req["path"], req["msg"], float(req.get("timeout", 5)))}

    # -- spawned programs ---------------------------------------------------------------------
    def _env(self, req: dict[str, Any]) -> dict[str, str]:
        return {**os.environ, **req.get("env", {})}

    def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        stdout: int | IO[bytes] = subprocess.PIPE
        stderr: int | IO[bytes] = subprocess.PIPE
        if req.get("log"):  # long-lived and chatty (failoverd): its output goes to a file
            stdout = stderr = open(req["log"], "ab")  # noqa: SIM115 - the child owns it
        p = subprocess.Popen(
            req["argv"],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=stderr,
            env=self._env(req),
            start_new_session=True,
        )
        self.procs[p.pid] = p
        self.bufs[p.pid] = bytearray()
        return {"h": p.pid}

    def op_send(self, req: dict[str, Any]) -> dict[str, Any]:
        """Write a line to a spawned program; `go: true` sends `GO <guest monotonic ns>`."""
        p = self.procs[req["h"]]
        assert p.stdin is not None
        data = f"GO {time.monotonic_ns()}\n" if req.get("go") else req["data"]
        p.stdin.write(data.encode())
        p.stdin.flush()
        return {}

    def op_readline(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self.procs[req["h"]]
        assert p.stdout is not None
        buf = self.bufs[p.pid]
        deadline = time.monotonic() + float(req.get("timeout", 10))
        fd = p.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"line": None}
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return {"line": None, "eof": True}
                buf += chunk
        line, _, rest = bytes(buf).partition(b"\n")
        self.bufs[p.pid] = bytearray(rest)
        return {"line": line.decode(errors="replace")}

    def op_wait(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self.procs[req["h"]]
        try:
            rc = p.wait(timeout=float(req.get("timeout", 10)))
        except subprocess.TimeoutExpired:
            return {"rc": None}
        out = bytes(self.bufs.pop(p.pid, b""))
        err = b""
        if p.stdout is not None:
            out += p.stdout.read()
        if p.stderr is not None:
            err = p.stderr.read()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        del self.procs[p.pid]
        return {"rc": rc, "out": _text(out), "err": _text(err)}

    def op_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self.procs.get(req["h"])
        if p is not None and p.poll() is None:
            p.send_signal(int(req.get("sig", signal.SIGKILL)))
        return {}


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    if isinstance(b, str):
        return b[-MAX_OUT:]
    return b[-MAX_OUT:].decode(errors="replace")


def main() -> int:
    path = find_port()
    fd = os.open(path, os.O_RDWR)
    server = Server()
    buf = bytearray()

    def reply(msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            n = os.write(fd, data)
            data = data[n:]

    reply({"id": 0, "ok": True, "ready": True, "kernel": os.uname().release})
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            time.sleep(0.05)  # host side not connected: the port reads EOF until it is
            continue
        buf += chunk
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf = bytearray(rest)
            try:
                req = json.loads(line)
            except ValueError:
                reply({"id": None, "ok": False, "error": "not JSON"})
                continue
            out = server.handle(req)
            out["id"] = req.get("id")
            reply(out)


if __name__ == "__main__":
    sys.exit(main())

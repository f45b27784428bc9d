"""A paced TCP stream that must survive a fault: client in the guest, server on the peer.

Stdlib only (it also runs as a plain script inside the guest).  The client connects,
prints CONNECTED, writes `size`-byte chunks at `rate` per second for `duration` seconds,
half-closes and waits for the server's byte count (with --stop-on-stdin, a `STOP` line on
stdin ends the writing early: a stream as long as something else takes).  The stream
survived when the count matches what was written, within the time limit, with no error on
the connection.
Both sides print one JSON line with their result; neither ever runs unbounded.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time


def server(bind: str, port: int, limit_s: float) -> int:
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(1)
    print("READY", flush=True)
    deadline = time.monotonic() + limit_s
    r, _, _ = select.select([ls], [], [], limit_s)
    if not r:
        print(json.dumps({"error": "no connection"}), flush=True)
        return 1
    conn, _ = ls.accept()
    ls.close()
    total, gap, last = 0, 0.0, time.monotonic()
    err = None
    while time.monotonic() < deadline:
        r, _, _ = select.select([conn], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        try:
            chunk = conn.recv(65536)
        except OSError as e:
            err = str(e)
            break
        now = time.monotonic()
        if not chunk:
            with_ack = True
            try:
                conn.sendall(json.dumps({"bytes": total}).encode() + b"\n")
            except OSError as e:
                err, with_ack = str(e), False
            print(
                json.dumps(
                    {"bytes": total, "max_gap_ms": gap * 1e3, "acked": with_ack, "error": err}
                ),
                flush=True,
            )
            conn.close()
            return 0
        gap = max(gap, now - last)
        last = now
        total += len(chunk)
    conn.close()
    err = err or "timed out before the client finished"
    print(
        json.dumps({"bytes": total, "max_gap_ms": gap * 1e3, "acked": False, "error": err}),
        flush=True,
    )
    return 0


def client(
    to: str,
    port: int,
    rate: int,
    size: int,
    duration_s: float,
    limit_s: float,
    stop_on_stdin: bool = False,
) -> int:
    start = time.monotonic()
    hard = start + limit_s
    out: dict[str, object] = {"sent": 0, "acked_bytes": None, "ok": False, "error": None}
    try:
        s = socket.create_connection((to, port), timeout=10)
        print("CONNECTED", flush=True)
        s.settimeout(None)
        s.setblocking(False)
        chunk = b"x" * size
        t0 = time.monotonic()
        total = int(rate * duration_s)
        pending = b""
        n = sent = 0
        while (n < total or pending) and time.monotonic() < hard:
            if stop_on_stdin and select.select([sys.stdin], [], [], 0)[0]:
                stop_on_stdin = False  # STOP, or EOF (the coordinator gone): write no more
                sys.stdin.readline()
                total = n
            due = min(total, int((time.monotonic() - t0) * rate) + 1)
            while n < due and len(pending) < 1 << 20:
                pending += chunk
                n += 1
            if pending:
                _, w, _ = select.select([], [s], [], 0.05)
                if w:
                    try:
                        k = s.send(pending)
                    except BlockingIOError:
                        k = 0
                    sent += k
                    out["sent"] = sent
                    pending = pending[k:]
            else:
                time.sleep(min(0.05, max(0.0, t0 + n / rate - time.monotonic())))
        if pending:
            raise TimeoutError(f"{len(pending)} bytes still unsent at the time limit")
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\n" not in buf:
            left = hard - time.monotonic()
            r, _, _ = select.select([s], [], [], max(0.0, left))
            if not r:
                raise TimeoutError("no byte count from the server in time")
            data = s.recv(4096)
            if not data:
                raise ConnectionError("server closed without a byte count")
            buf += data
        acked = json.loads(buf.split(b"\n", 1)[0])["bytes"]
        out["acked_bytes"] = acked
        out["ok"] = acked == out["sent"]
        s.close()
    except (OSError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["secs"] = time.monotonic() - start
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcpstream")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=9100)
    s.add_argument("--limit", type=float, default=60.0)
    c = sub.add_parser("client")
    c.add_argument("--to", required=True)
    c.add_argument("--port", type=int, default=9100)
    c.add_argument("--rate", type=int, default=100, help="writes per second")
    c.add_argument("--size", type=int, default=1000, help="bytes per write")
    c.add_argument("--duration", type=float, default=5.0)
    c.add_argument("--limit", type=float, default=60.0, help="hard time limit, seconds")
    c.add_argument(
        "--stop-on-stdin", action="store_true", help="a line on stdin ends the writing early"
    )
    a = p.parse_args(argv)
    if a.cmd == "server":
        return server(a.bind, a.port, a.limit)
    return client(a.to, a.port, a.rate, a.size, a.duration, a.limit, a.stop_on_stdin)


if __name__ == "__main__":
    sys.exit(main())

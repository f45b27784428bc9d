"""A fixed-rate, sequence-numbered UDP stream both ways that keeps every timestamp.

Like bpfailover_lab.traffic, but each endpoint writes its raw record to a file: the send
time of every sequence number and the (seq, arrival time) of everything received.
With those, the losses of one long stream are attributed to the trial (carrier drop,
set-primary, restart...) whose window they fall in, and the longest silence around
each trial is measured. Times are CLOCK_MONOTONIC ns (system-wide, so comparable with
the coordinator's own stamps). Endpoints are bounded: duration + HARD_EXTRA_S at most.

    python -m bench.stream endpoint --bind A --to B --rate R --duration S --out FILE
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bpfailover.netns import cmd_in

MAGIC = 0xBF0BE7C4
HEADER = struct.Struct("!IIQ")  # magic, stream id, seq
HARD_EXTRA_S = 10.0
READY_TIMEOUT_S = 10.0
MAX_BURST = 512
SO_RCVBUFFORCE = 33
IP_FREEBIND = 15


def endpoint(
    bind: str,
    to: str | None,
    port: int,
    sid: int,
    rate: int,
    duration: float,
    size: int,
    linger: float,
    out_path: str,
    ctl: IO[str],
    out: IO[str],
) -> int:
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    s.bind((bind, port))
    s.setblocking(False)
    print("READY", file=out, flush=True)
    r, _, _ = select.select([ctl], [], [], READY_TIMEOUT_S)
    line = ctl.readline() if r else ""
    if not line.startswith("GO"):
        return 1
    t0 = int(line.split()[1])
    total = int(rate * duration) if to else 0
    period = 1e9 / rate
    end_ns = t0 + int((duration + linger) * 1e9)
    hard_ns = time.monotonic_ns() + int((duration + HARD_EXTRA_S) * 1e9)
    buf = bytearray(max(size, HEADER.size))
    rbuf = bytearray(2048)
    sent_t = array("q")
    rseq = array("q")
    rt = array("q")
    errors = 0
    seq = 0
    dest = (to, port)
    pack, unpack, mono = HEADER.pack_into, HEADER.unpack_from, time.monotonic_ns
    recv, send = s.recv_into, s.sendto
    while True:
        now = mono()
        if now >= hard_ns or (now >= end_ns and seq >= total):
            break
        while True:
            try:
                n = recv(rbuf)
            except OSError:
                break
            if n >= HEADER.size:
                magic, rsid, q = unpack(rbuf)
                if magic == MAGIC and rsid == sid:
                    rseq.append(q)
                    rt.append(mono())
        if seq < total:
            due = min(total, int((now - t0) / period) + 1, seq + MAX_BURST)
            while seq < due:
                pack(buf, 0, MAGIC, sid, seq)
                sent_t.append(mono())
                try:
                    send(buf, dest)
                except OSError:
                    errors += 1
                seq += 1
            nxt = t0 + int(seq * period) if seq < total else end_ns
        else:
            nxt = end_ns
        wait = max(0, min(nxt, end_ns, hard_ns) - mono()) / 1e9
        select.select([s], [], [], wait)
    s.close()
    with open(out_path, "wb") as f:
        f.write(struct.pack("=qqqq", seq, len(rseq), errors, t0))
        sent_t.tofile(f)
        rseq.tofile(f)
        rt.tofile(f)
    print("DONE", file=out, flush=True)
    return 0


@dataclass
class Direction:
    """One direction: send time of each seq, arrivals (seq, time) in arrival order."""

    rate: int
    sent_t: array  # type: ignore[type-arg]
    rseq: array  # type: ignore[type-arg]
    rt: array  # type: ignore[type-arg]
    send_errors: int

    def __post_init__(self) -> None:
        got = bytearray(len(self.sent_t))
        for q in self.rseq:
            if 0 <= q < len(got):
                got[q] = 1
        self.got = got
        order = sorted(range(len(self.rt)), key=self.rt.__getitem__)
        self.arr_t = [self.rt[i] for i in order]

    @property
    def sent(self) -> int:
        return len(self.sent_t)

    @property
    def lost(self) -> int:
        return self.sent - sum(self.got)

    def lost_between(self, t_from: int, t_to: int) -> int:
        """Packets sent in [t_from, t_to) that never arrived."""
        lo = bisect.bisect_left(self.sent_t, t_from)
        hi = bisect.bisect_left(self.sent_t, t_to)
        return (hi - lo) - sum(self.got[lo:hi])

    def max_gap_between(self, t_from: int, t_to: int) -> tuple[float, int]:
        """Longest silence (ms) between consecutive arrivals overlapping [t_from, t_to),
        and when it began (ns)."""
        lo = max(bisect.bisect_left(self.arr_t, t_from) - 1, 0)
        hi = min(bisect.bisect_left(self.arr_t, t_to) + 1, len(self.arr_t))
        best, at = 0, t_from
        for i in range(lo + 1, hi):
            g = self.arr_t[i] - self.arr_t[i - 1]
            if g > best:
                best, at = g, self.arr_t[i - 1]
        return best / 1e6, at


@dataclass
class StreamResult:
    t0: int
    a_to_b: Direction
    b_to_a: Direction


class Stream:
    """Start with `Stream(...)`, do things, then `result()`. Kills its endpoints on close."""

    def __init__(
        self,
        a_ns: str,
        a_addr: str,
        b_ns: str,
        b_addr: str,
        rate: int,
        duration: float,
        size: int = 64,
        port: int = 9300,
        linger: float = 0.3,
    ) -> None:
        self.rate, self.duration = rate, duration
        self.dir = Path(tempfile.mkdtemp(prefix="bx-stream-"))
        sid = random.getrandbits(32)
        self.procs: list[subprocess.Popen[str]] = []
        self.outs = [self.dir / "a.bin", self.dir / "b.bin"]
        for ns, bind, to, outp in (
            (a_ns, a_addr, b_addr, self.outs[0]),
            (b_ns, b_addr, a_addr, self.outs[1]),
        ):
            argv = [
                sys.executable,
                "-m",
                "bench.stream",
                "endpoint",
                "--bind",
                bind,
                "--to",
                to,
                "--port",
                str(port),
                "--sid",
                str(sid),
                "--rate",
                str(rate),
                "--duration",
                str(duration),
                "--size",
                str(size),
                "--linger",
                str(linger),
                "--out",
                str(outp),
            ]
            self.procs.append(
                subprocess.Popen(
                    cmd_in(ns, argv),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                    cwd=str(Path(__file__).resolve().parent.parent),
                )
            )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            for p in self.procs:
                assert p.stdout is not None
                r, _, _ = select.select([p.stdout], [], [], max(deadline - time.monotonic(), 0))
                if not r or p.stdout.readline().strip() != "READY":
                    err = p.stderr.read() if p.poll() is not None and p.stderr else ""
                    raise RuntimeError(f"stream endpoint did not start: {err.strip()[-300:]}")
            self.t0 = time.monotonic_ns() + 20_000_000  # both sides start on the same tick
            for p in self.procs:
                assert p.stdin is not None
                p.stdin.write(f"GO {self.t0}\n")
                p.stdin.flush()
        except BaseException:
            self.close()
            raise

    def result(self) -> StreamResult:
        try:
            for p in self.procs:
                p.wait(timeout=self.duration + HARD_EXTRA_S + 5)
                if p.returncode != 0:
                    err = p.stderr.read() if p.stderr else ""
                    raise RuntimeError(f"stream endpoint failed: {err.strip()[-300:]}")
            a, b = (self._read(o) for o in self.outs)
        finally:
            self.close()
        # a's receive record is the b->a direction and vice versa
        return StreamResult(
            self.t0,
            Direction(self.rate, a[0], b[1], b[2], a[3]),
            Direction(self.rate, b[0], a[1], a[2], b[3]),
        )

    @staticmethod
    def _read(path: Path) -> tuple[array, array, array, int]:  # type: ignore[type-arg]
        raw = path.read_bytes()
        nsent, nrecv, errors, _t0 = struct.unpack_from("=qqqq", raw)
        off = 32
        sent_t, rseq, rt = array("q"), array("q"), array("q")
        sent_t.frombytes(raw[off : off + 8 * nsent])
        off += 8 * nsent
        rseq.frombytes(raw[off : off + 8 * nrecv])
        off += 8 * nrecv
        rt.frombytes(raw[off : off + 8 * nrecv])
        return sent_t, rseq, rt, errors

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("endpoint")
    e.add_argument("--bind", required=True)
    e.add_argument("--to")
    e.add_argument("--port", type=int, default=9300)
    e.add_argument("--sid", type=int, required=True)
    e.add_argument("--rate", type=int, required=True)
    e.add_argument("--duration", type=float, required=True)
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--linger", type=float, default=0.3)
    e.add_argument("--out", required=True)
    a = p.parse_args(argv)
    return endpoint(
        a.bind,
        a.to,
        a.port,
        a.sid,
        a.rate,
        a.duration,
        a.size,
        a.linger,
        a.out,
        sys.stdin,
        sys.stdout,
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

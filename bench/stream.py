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
from bpfailover_lab import traffic

READY_TIMEOUT_S = 10.0
BENCH_RCVBUF = 16 << 20
BENCH_MAX_BURST = 512


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
    """The lab's endpoint loop (bpfailover_lab.traffic.paced) keeping every send time;
    the raw record goes to `out_path`."""
    s = traffic.open_socket(bind, port, BENCH_RCVBUF)
    t0 = traffic.await_go(ctl, out)
    if t0 is None:
        return 1
    dest = (to, port) if to else None
    p = traffic.paced(
        s,
        dest,
        sid,
        rate,
        duration,
        linger,
        size,
        t0,
        keep_send_times=True,
        max_burst=BENCH_MAX_BURST,
    )
    s.close()
    with open(out_path, "wb") as f:
        f.write(struct.pack("=qqqq", p.sent, len(p.rseq), p.errors, t0))
        p.sent_t.tofile(f)
        p.rseq.tofile(f)
        p.rt.tofile(f)
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
                p.wait(timeout=self.duration + traffic.HARD_EXTRA_S + 5)
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
        sent_t, rseq, rt = array("Q"), array("Q"), array("Q")
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

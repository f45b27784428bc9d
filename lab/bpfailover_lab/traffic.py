"""Sequence-numbered UDP stream in both directions between two namespaces: loss, gap, reorder.

The coordinator (start_stream/run_stream) spawns one endpoint process per namespace
(`ip netns exec NS python -m bpfailover_lab.traffic endpoint ...`). Each endpoint binds its
receiver, prints READY, waits for `GO <t0_ns>` on stdin, then sends a paced stream to the
other side while recording (seq, arrival time) of what it receives. When time is up it
prints one JSON line. Times are CLOCK_MONOTONIC, which is system-wide (not per netns), so
gap times are relative to the coordinator's t0 and line up with e.g. Lab.migrate steps.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import IO, TYPE_CHECKING, Any

from bpfailover.netns import cmd_in

if TYPE_CHECKING:
    from bpfailover_lab.topology import Lab

MAGIC = 0xBF0F_A110
HEADER = struct.Struct("!IIQQ")  # magic, stream id, seq, send time (monotonic ns)
DEFAULT_LINGER_S = 0.5
HARD_EXTRA_S = 10.0  # an endpoint never lives longer than duration + this
READY_TIMEOUT_S = 10.0
MAX_BURST = 256  # cap on catch-up bursts after a stall, so a stall does not become a flood
RCVBUF = 8 << 20
IP_FREEBIND = 15  # not exported by the socket module
SO_RCVBUFFORCE = 33


@dataclass
class DirectionStats:
    """One direction of a stream; times in ms/s relative to the stream start t0."""

    sent: int = 0
    received: int = 0  # unique sequence numbers
    lost: int = 0  # sent - received
    duplicates: int = 0
    reordered: int = 0  # arrivals with seq below the highest seq seen before
    max_gap_ms: float = 0.0  # longest silence between consecutive arrivals
    max_gap_at_s: float = 0.0  # when that silence began
    first_arrival_s: float | None = None
    last_arrival_s: float | None = None
    send_errors: int = 0  # sends the local stack refused (counted in sent, so in lost)
    send_errnos: dict[str, int] = field(default_factory=dict)
    # the first HOLES_KEPT runs of sequence numbers missing below the highest one received,
    # [first, last] (seq n was sent n / rate seconds after t0): where in the stream loss fell
    holes: list[list[int]] = field(default_factory=list)

    def with_sender(
        self, sent: int, send_errors: int, send_errnos: dict[str, int]
    ) -> DirectionStats:
        return replace(
            self,
            sent=sent,
            lost=max(sent - self.received, 0),
            send_errors=send_errors,
            send_errnos=dict(send_errnos),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DirectionStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


HOLES_KEPT = 8


def _holes(seen: set[int], max_seq: int) -> list[list[int]]:
    out: list[list[int]] = []
    expect = 0
    for seq in sorted(seen):
        if seq > expect:
            out.append([expect, seq - 1])
            if len(out) == HOLES_KEPT:
                break
        expect = seq + 1
    return out


def analyze(arrivals: Iterable[tuple[int, int]], t0_ns: int, sent: int = 0) -> DirectionStats:
    """Stats from (seq, arrival monotonic ns) pairs in arrival order."""
    seen: set[int] = set()
    dup = reord = 0
    max_seq = -1
    prev_t: int | None = None
    first_t: int | None = None
    gap = 0
    gap_at: int | None = None
    for seq, t in arrivals:
        if seq in seen:
            dup += 1
        else:
            seen.add(seq)
            if seq < max_seq:
                reord += 1
        max_seq = max(max_seq, seq)
        if prev_t is None:
            first_t = t
        elif t - prev_t > gap:
            gap, gap_at = t - prev_t, prev_t
        prev_t = t
    return DirectionStats(
        sent=sent,
        received=len(seen),
        lost=max(sent - len(seen), 0),
        duplicates=dup,
        reordered=reord,
        max_gap_ms=gap / 1e6,
        max_gap_at_s=(gap_at - t0_ns) / 1e9 if gap_at is not None else 0.0,
        first_arrival_s=(first_t - t0_ns) / 1e9 if first_t is not None else None,
        last_arrival_s=(prev_t - t0_ns) / 1e9 if prev_t is not None else None,
        holes=_holes(seen, max_seq),
    )


@dataclass
class StreamReport:
    a_to_b: DirectionStats
    b_to_a: DirectionStats | None
    a: str = ""  # "ns addr" labels for the table
    b: str = ""
    rate_pps: int = 0
    duration_s: float = 0.0
    size: int = 0

    @property
    def directions(self) -> list[tuple[str, DirectionStats]]:
        out = [(f"{self.a} -> {self.b}", self.a_to_b)]
        if self.b_to_a is not None:
            out.append((f"{self.b} -> {self.a}", self.b_to_a))
        return out

    @property
    def total_lost(self) -> int:
        return sum(d.lost for _, d in self.directions)

    @property
    def max_gap_ms(self) -> float:
        return max(d.max_gap_ms for _, d in self.directions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "rate_pps": self.rate_pps,
            "duration_s": self.duration_s,
            "size": self.size,
            "a_to_b": asdict(self.a_to_b),
            "b_to_a": asdict(self.b_to_a) if self.b_to_a is not None else None,
            "total_lost": self.total_lost,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def format(self) -> str:
        head = (
            f"{'direction':<44} {'sent':>7} {'recv':>7} {'lost':>6} {'dup':>5} {'reord':>5} "
            f"{'gap ms':>8} {'gap at s':>8} {'senderr':>7}"
        )
        rows = [
            f"UDP stream {self.rate_pps} pps x {self.duration_s:g} s, {self.size} B payload",
            head,
        ]
        for name, d in self.directions:
            rows.append(
                f"{name:<44} {d.sent:>7} {d.received:>7} {d.lost:>6} {d.duplicates:>5} "
                f"{d.reordered:>5} {d.max_gap_ms:>8.2f} {d.max_gap_at_s:>8.3f} {d.send_errors:>7}"
            )
        return "\n".join(rows)


# ---- endpoint (runs inside a namespace) -----------------------------------------------------


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def open_socket(bind: str, port: int, rcvbuf: int = RCVBUF) -> socket.socket:
    """A non-blocking UDP socket bound to bind:port, with a forced large receive buffer."""
    s = socket.socket(_family(bind), socket.SOCK_DGRAM)
    # Freebind: the address may be on a device the datapath has not brought up yet.
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    try:  # root in CI: force a big buffer so bursts are not dropped in our own socket
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((bind, port))
    s.setblocking(False)
    return s


def await_go(control_in: IO[str], out: IO[str]) -> int | None:
    """Say READY, then wait (bounded) for the coordinator's `GO <t0_ns>`; None if it never
    comes (EOF when the coordinator died, or the timeout): an endpoint never hangs here."""
    print("READY", file=out, flush=True)
    r, _, _ = select.select([control_in], [], [], READY_TIMEOUT_S)
    line = control_in.readline() if r else ""
    return int(line.split()[1]) if line.startswith("GO") else None


@dataclass
class Paced:
    """What one endpoint did: sent count, send errors (by errno name), arrivals (seq, time),
    and the send time of every seq when asked for (benchmarks attribute losses by time)."""

    sent: int
    errors: int
    errnos: dict[str, int]
    rseq: array
    rt: array
    sent_t: array
    # how far the sender fell behind its schedule (ms): a starved sender, not the network
    behind_max_ms: float = 0.0
    # the first HOLES_KEPT runs of sequence numbers the local stack refused, [first, last],
    # and when each run began (seconds from t0: late sends show as a time past seq / rate)
    error_runs: list[list[int]] = field(default_factory=list)
    error_runs_at_s: list[float] = field(default_factory=list)


def paced(
    sock: socket.socket,
    dest: tuple[str, int] | None,
    stream_id: int,
    rate_pps: int,
    duration_s: float,
    linger_s: float,
    size: int,
    t0: int,
    control_in: IO[str] | None = None,
    keep_send_times: bool = False,
    max_burst: int = MAX_BURST,
) -> Paced:
    """The endpoint loop: send `rate_pps` from t0 for `duration_s` to `dest` (None: receive
    only), stamping every arrival of our stream id, until linger ends; bounded by
    duration + HARD_EXTRA_S whatever happens.  Stops early when `control_in` reaches EOF
    (the coordinator is gone).  A `STOP` line on `control_in` ends the sending there and
    then, and the receiving `linger_s` later (a stream as long as something else takes).
    What is queued on the socket at the end is still received."""
    total = int(round(rate_pps * duration_s)) if dest is not None else 0
    end_ns = t0 + int((duration_s + linger_s) * 1e9)
    hard_ns = time.monotonic_ns() + int((duration_s + HARD_EXTRA_S) * 1e9)
    buf = bytearray(max(size, HEADER.size))
    rbuf = bytearray(65536)
    rseq, rt, sent_t = array("Q"), array("Q"), array("Q")
    seq = errors = 0
    errnos: dict[str, int] = {}
    behind_ns = 0
    error_runs: list[list[int]] = []
    error_at: list[float] = []
    period_ns = 1e9 / rate_pps if rate_pps > 0 else 0.0
    watch: list[Any] = [sock] if control_in is None else [sock, control_in]
    pack, unpack, mono = HEADER.pack_into, HEADER.unpack_from, time.monotonic_ns
    recv, send, stamp = sock.recv_into, sock.sendto, sent_t.append
    while True:
        now = mono()
        if now >= hard_ns or (now >= end_ns and seq >= total):
            break
        # Receive everything that is queued, stamping each arrival.
        while True:
            try:
                n = recv(rbuf)
            except OSError:  # BlockingIOError: nothing more queued
                break
            if n >= HEADER.size:
                magic, sid, q, _ = unpack(rbuf)
                if magic == MAGIC and sid == stream_id:
                    rseq.append(q)
                    rt.append(mono())
        # Send what is due by elapsed time, so the mean rate is exact whatever the jitter.
        if seq < total:
            behind_ns = max(behind_ns, now - t0 - int(seq * period_ns))
            burst_end = min(total, int((now - t0) / period_ns) + 1, seq + max_burst)
            while seq < burst_end:
                t = mono()
                pack(buf, 0, MAGIC, stream_id, seq, t)
                if keep_send_times:
                    stamp(t)
                try:
                    send(buf, dest)  # type: ignore[arg-type]
                except OSError as e:  # ENETUNREACH/ENOBUFS/EAGAIN... count and keep going
                    errors += 1
                    name = errno.errorcode.get(e.errno or 0, str(e.errno))
                    errnos[name] = errnos.get(name, 0) + 1
                    if error_runs and error_runs[-1][1] == seq - 1:
                        error_runs[-1][1] = seq
                    elif len(error_runs) < HOLES_KEPT:
                        error_runs.append([seq, seq])
                        error_at.append(round((t - t0) / 1e9, 3))
                seq += 1
            next_ns = t0 + int(seq * period_ns) if seq < total else end_ns
        else:
            next_ns = end_ns
        wait = max(0.0, min(next_ns, end_ns, hard_ns) - mono()) / 1e9
        r, _, _ = select.select(watch, [], [], wait)
        if control_in is not None and control_in in r:
            line = control_in.readline()
            if not line:
                # Coordinator gone (stdin EOF): stop now rather than run on unobserved.
                watch = [sock]
                hard_ns = 0
            elif line.startswith("STOP"):
                total = min(total, seq)
                end_ns = min(end_ns, mono() + int(linger_s * 1e9))
    # What arrived while this process was not running (a starved guest) is not lost.
    while True:
        try:
            n = recv(rbuf)
        except OSError:
            break
        if n >= HEADER.size:
            magic, sid, q, _ = unpack(rbuf)
            if magic == MAGIC and sid == stream_id:
                rseq.append(q)
                rt.append(mono())
    behind_ms = round(behind_ns / 1e6, 1)
    return Paced(seq, errors, errnos, rseq, rt, sent_t, behind_ms, error_runs, error_at)


def endpoint(
    bind: str,
    to: str | None,
    port: int,
    stream_id: int,
    rate_pps: int,
    duration_s: float,
    size: int,
    linger_s: float,
    control_in: IO[str],
    out: IO[str],
) -> int:
    """One side: receive on bind:port, send to `to`:port (None: receive only). Returns 0."""
    sock = open_socket(bind, port)
    t0 = await_go(control_in, out)
    if t0 is None:
        print(json.dumps({"error": "no GO from coordinator"}), file=out, flush=True)
        return 1
    dest = (to, port) if to is not None else None
    p = paced(sock, dest, stream_id, rate_pps, duration_s, linger_s, size, t0, control_in)
    sock.close()
    rx = analyze(zip(p.rseq, p.rt, strict=True), t0)
    result = {
        "sent": p.sent,
        "send_errors": p.errors,
        "send_errnos": p.errnos,
        "send_error_runs": p.error_runs,
        "send_error_runs_at_s": p.error_runs_at_s,
        "behind_max_ms": p.behind_max_ms,
        "rx": asdict(rx),
    }
    print(json.dumps(result), file=out, flush=True)
    return 0


# ---- coordinator ----------------------------------------------------------------------------


class StreamError(RuntimeError):
    """The stream could not run; one-line message."""


@dataclass
class _Side:
    ns: str | None
    addr: str
    proc: subprocess.Popen[str]


class StreamHandle:
    """A running stream; `wait()` collects the report. Also a context manager (kills on exit)."""

    def __init__(
        self,
        sides: tuple[_Side, _Side],
        t0_ns: int,
        duration_s: float,
        linger_s: float,
        meta: dict[str, Any],
    ) -> None:
        self.sides = sides
        self.t0_ns = t0_ns
        self.duration_s = duration_s
        self.linger_s = linger_s
        self.meta = meta

    def elapsed_s(self) -> float:
        return (time.monotonic_ns() - self.t0_ns) / 1e9

    def wait(self) -> StreamReport:
        deadline = self.duration_s + HARD_EXTRA_S + 5.0
        results: list[dict[str, Any]] = []
        try:
            for side in self.sides:
                left = max(0.1, deadline - self.elapsed_s())
                # Not communicate(): it would close stdin, which endpoints take as "abort".
                try:
                    side.proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    raise StreamError(f"endpoint in {side.ns} did not finish in time") from None
                assert side.proc.stdout is not None and side.proc.stderr is not None
                results.append(_parse(side, side.proc.stdout.read(), side.proc.stderr.read()))
        finally:
            self.kill()
        a, b = results
        m = self.meta
        a_to_b = DirectionStats.from_dict(b["rx"]).with_sender(
            a["sent"], a["send_errors"], a["send_errnos"]
        )
        b_to_a = None
        if m["both_ways"]:
            b_to_a = DirectionStats.from_dict(a["rx"]).with_sender(
                b["sent"], b["send_errors"], b["send_errnos"]
            )
        return StreamReport(
            a_to_b,
            b_to_a,
            a=f"{self.sides[0].ns}:{self.sides[0].addr}",
            b=f"{self.sides[1].ns}:{self.sides[1].addr}",
            rate_pps=m["rate_pps"],
            duration_s=self.duration_s,
            size=m["size"],
        )

    def kill(self) -> None:
        for side in self.sides:
            if side.proc.poll() is None:
                side.proc.kill()
                side.proc.wait()
            for f in (side.proc.stdin, side.proc.stdout, side.proc.stderr):
                if f is not None:
                    # stdin of a dead endpoint: broken pipe on the flush in close()
                    with contextlib.suppress(OSError):
                        f.close()

    def __enter__(self) -> StreamHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _parse(side: _Side, out: str, err: str) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    try:
        res: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        why = err.strip().splitlines()[-1] if err.strip() else f"exit {side.proc.returncode}"
        raise StreamError(f"endpoint in {side.ns} ({side.addr}) gave no result: {why}") from None
    if "error" in res:
        raise StreamError(f"endpoint in {side.ns} ({side.addr}): {res['error']}")
    return res


def _spawn(ns: str | None, argv: list[str]) -> subprocess.Popen[str]:
    cmd = cmd_in(ns, [sys.executable, "-m", "bpfailover_lab.traffic", "endpoint", *argv])
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


def _await_ready(side: _Side, deadline: float) -> None:
    assert side.proc.stdout is not None
    left = deadline - time.monotonic()
    r, _, _ = select.select([side.proc.stdout], [], [], max(left, 0.0))
    line = side.proc.stdout.readline() if r else ""
    if line.strip() != "READY":
        side.proc.kill()
        _, err = side.proc.communicate()
        why = err.strip().splitlines()[-1] if err.strip() else (line.strip() or "timeout")
        raise StreamError(f"endpoint in {side.ns} ({side.addr}) failed to start: {why}")


def start_stream(
    a_ns: str | None,
    a_addr: str,
    b_ns: str | None,
    b_addr: str,
    rate_pps: int = 1000,
    duration_s: float = 2.0,
    size: int = 64,
    port: int = 9000,
    both_ways: bool = True,
    linger_s: float = DEFAULT_LINGER_S,
) -> StreamHandle:
    """Start a stream a->b (and b->a); returns once packets flow. Never runs unbounded."""
    if rate_pps <= 0 or duration_s <= 0:
        raise StreamError("rate and duration must be positive")
    if _family(a_addr) != _family(b_addr):
        raise StreamError(f"address families differ: {a_addr} and {b_addr}")
    sid = random.getrandbits(32)
    common = [
        "--port",
        str(port),
        "--stream-id",
        str(sid),
        "--rate",
        str(rate_pps),
        "--duration",
        str(duration_s),
        "--size",
        str(size),
        "--linger",
        str(linger_s),
    ]
    a = _Side(a_ns, a_addr, _spawn(a_ns, ["--bind", a_addr, "--to", b_addr, *common]))
    b_to = ["--to", a_addr] if both_ways else []
    b = _Side(b_ns, b_addr, _spawn(b_ns, ["--bind", b_addr, *b_to, *common]))
    sides = (a, b)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for side in sides:
            _await_ready(side, deadline)
        t0 = time.monotonic_ns()
        for side in sides:
            assert side.proc.stdin is not None
            side.proc.stdin.write(f"GO {t0}\n")
            side.proc.stdin.flush()
    except BaseException:
        for side in sides:
            if side.proc.poll() is None:
                side.proc.kill()
                side.proc.wait()
        raise
    meta = {"rate_pps": rate_pps, "size": size, "both_ways": both_ways}
    return StreamHandle(sides, t0, duration_s, linger_s, meta)


def run_stream(
    a_ns: str | None,
    a_addr: str,
    b_ns: str | None,
    b_addr: str,
    rate_pps: int = 1000,
    duration_s: float = 2.0,
    size: int = 64,
    port: int = 9000,
    both_ways: bool = True,
    linger_s: float = DEFAULT_LINGER_S,
) -> StreamReport:
    """Run a stream to completion (see start_stream)."""
    return start_stream(
        a_ns, a_addr, b_ns, b_addr, rate_pps, duration_s, size, port, both_ways, linger_s
    ).wait()


def run(
    lab: Lab,
    group: int = 0,
    rate_pps: int = 1000,
    duration_s: float = 2.0,
    size: int = 64,
    ipv6: bool = False,
    port: int = 9000,
) -> StreamReport:
    """Stream between the guest address of `group` (a) and the peer (b) of a lab."""
    g = lab.names(group)
    ga, pa = (g.guest_v6, g.peer_v6) if ipv6 else (g.guest_v4, g.peer_v4)
    return run_stream(lab.guest, ga, lab.peer, pa, rate_pps, duration_s, size, port)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpfailover_lab.traffic")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("endpoint", help="one side of a stream (spawned by start_stream)")
    e.add_argument("--bind", required=True)
    e.add_argument("--to")
    e.add_argument("--port", type=int, default=9000)
    e.add_argument("--stream-id", type=int, required=True)
    e.add_argument("--rate", type=int, default=1000)
    e.add_argument("--duration", type=float, default=2.0)
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--linger", type=float, default=DEFAULT_LINGER_S)
    args = p.parse_args(argv)
    try:
        return endpoint(
            args.bind,
            args.to,
            args.port,
            args.stream_id,
            args.rate,
            args.duration,
            args.size,
            args.linger,
            sys.stdin,
            sys.stdout,
        )
    except OSError as ex:
        print(f"endpoint {args.bind}: {ex.strerror or ex}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_main())

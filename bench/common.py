"""What every benchmark shares: labs that always go away, machine info, results, tables,
statistics, a fast carrier switch (raw rtnetlink) and a netlink probe.

Lab prefixes are `bx<tag><pid>`: unique per run, and a crashed run's leftovers are found
(their pid is gone) and removed by `sweep_stale()` at the next start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bpfailover import netns
from bpfailover.events import netlink
from bpfailover_lab.agent_run import BPFFS, AgentRun
from bpfailover_lab.topology import Lab

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
_STALE_RE = re.compile(r"^bx[a-z]{1,3}(\d{1,7})-(guest|hv|peer)$")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---- labs that always go away --------------------------------------------------------------


def prefix(tag: str) -> str:
    assert re.fullmatch(r"[a-z]{1,3}", tag), tag
    return f"bx{tag}{os.getpid()}"


def _is_bench(pid: int) -> bool:
    try:
        return b"bench" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def sweep_stale() -> list[str]:
    """Remove labs and pins of earlier bench runs whose process is gone."""
    removed: list[str] = []
    names = os.listdir(netns.NETNS_RUN_DIR) if os.path.isdir(netns.NETNS_RUN_DIR) else []
    for name in sorted(names):
        m = _STALE_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _is_bench(int(m.group(1))):
            netns.run_in(None, ["ip", "netns", "del", name], check=False)
            removed.append(name)
    for pin in BPFFS.glob("bpfailover-bx*"):
        m = re.match(r"bpfailover-bx[a-z]{1,3}(\d{1,7})", pin.name)
        if m and int(m.group(1)) != os.getpid() and not _is_bench(int(m.group(1))):
            shutil.rmtree(pin, ignore_errors=True)
            removed.append(str(pin))
    return removed


class BenchAgent(AgentRun):
    """AgentRun that can run another entry module (bench.traced_agent) and times start-up."""

    cwd = REPO  # bench.traced_agent lives outside the package
    poll_s = 0.01  # start-up is measured: look often

    def start(self, timeout: float = 90.0) -> BenchAgent:
        super().start(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class TracedAgent(BenchAgent):
    """The agent with timing probes on its event path (bench.traced_agent)."""

    module = "bench.traced_agent"


class LabRun:
    """A lab plus the agents started on it; `close()` removes all of it, never raises."""

    def __init__(self, tag: str, groups: int = 1) -> None:
        self.lab = Lab(prefix(tag), groups)
        self.agents: list[BenchAgent] = []

    def agent(
        self,
        overrides: dict[str, Any] | None = None,
        name: str | None = None,
        traced: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> BenchAgent:
        cls = TracedAgent if traced else BenchAgent
        a = cls(self.lab, group_overrides=overrides, name=name, settings=settings)
        self.agents.append(a)
        return a

    def close(self) -> None:
        for a in self.agents:
            with contextlib.suppress(Exception):
                a.cleanup()
        self.lab.down()
        for a in self.agents:
            shutil.rmtree(a.pin_dir, ignore_errors=True)


@contextlib.contextmanager
def lab_run(tag: str, groups: int = 1, up: bool = True) -> Iterator[LabRun]:
    run = LabRun(tag, groups)
    try:
        if up:
            run.lab.up()
        yield run
    finally:
        run.close()


# ---- machine, results, tables -------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine_info() -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "mem_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "iperf3": out(["iperf3", "--version"]).splitlines()[0]
        if out(["iperf3", "--version"])
        else "",
        "git": git_label(),
        "os": out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
    }


# What a benchmark measures: a change to any of these not yet committed means HEAD is not
# the code that ran.
MEASURED = ("bpf", "control", "lab", "bench")


def git_label() -> str:
    """HEAD's short hash, with `-dirty` when the measured code differs from it (then no
    commit contains what ran, and the label says so)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                *MEASURED,
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def save(name: str, data: dict[str, Any], meta: dict[str, Any]) -> Path:
    """bench/results/<name>.json with the machine and the command that produced it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"benchmark": name, **meta, "results": data}
    path.write_text(json.dumps(doc, indent=1, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if n and i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        a = abs(v)
        return f"{v:.3f}" if a < 10 else f"{v:.1f}" if a < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


# ---- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank-interpolated percentile (numpy's 'linear'); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# ---- carrier control without pyroute2's per-call cost -------------------------------------

_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
IFF_UP = 0x1


class LinkSetter:
    """Admin up/down of netdevs in one namespace over a raw rtnetlink socket (~50 us a
    call against several ms for a fresh pyroute2 IPRoute(netns=...))."""

    def __init__(self, ns: str) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, netlink.NETLINK_ROUTE
            )
            self.sock.bind((0, 0))
            self.ifindex = {lk.ifname: lk.ifindex for lk in netlink.dump_links()}
        self.ns = ns
        self.seq = 0

    def refresh(self) -> None:
        with netns.entered(self.ns):
            self.ifindex = {lk.ifname: lk.ifindex for lk in netlink.dump_links()}

    def send(self, dev: str, up: bool) -> None:
        """Fire the request without waiting for the ack (see wait_acks)."""
        self.seq += 1
        body = _IFINFO.pack(0, 0, self.ifindex[dev], IFF_UP if up else 0, IFF_UP)
        hdr = _NLMSG.pack(
            _NLMSG.size + len(body), netlink.RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, self.seq, 0
        )
        self.sock.send(hdr + body)

    def wait_acks(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.sock], [], [], max(left, 0))
            if not r:
                raise TimeoutError(f"rtnetlink: {got}/{n} acks in {timeout}s")
            buf = self.sock.recv(65536)
            off = 0
            while off + _NLMSG.size <= len(buf):
                length, mtype, _f, _s, _p = _NLMSG.unpack_from(buf, off)
                if mtype == netlink.NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", buf, off + _NLMSG.size)
                    if err:
                        raise OSError(-err, f"rtnetlink set link: {os.strerror(-err)}")
                    got += 1
                off += (length + 3) & ~3

    def set(self, dev: str, up: bool) -> None:
        self.send(dev, up)
        self.wait_acks(1)

    def close(self) -> None:
        self.sock.close()


class NetlinkProbe:
    """A thread that timestamps (CLOCK_MONOTONIC ns) every link event seen in a namespace:
    when an ordinary user-space listener learns of a carrier change."""

    def __init__(self, ns: str) -> None:
        with netns.entered(ns):
            self.events = netlink.EventSocket()
        self.records: list[tuple[int, str, int]] = []  # (t_ns, ifname, flags)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            r, _, _ = select.select([self.events], [], [], 0.2)
            if not r:
                continue
            t = time.monotonic_ns()
            with contextlib.suppress(netlink.Overflow, OSError):
                for ev in self.events.read():
                    if isinstance(ev, netlink.Link):
                        self.records.append((t, ev.ifname, ev.flags))

    def first_after(self, t_ns: int, ifname: str, carrier: bool) -> int | None:
        for t, name, flags in list(self.records):
            if t >= t_ns and name == ifname and bool(flags & netlink.IFF_LOWER_UP) == carrier:
                return t
        return None

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=1)
        self.events.close()


# ---- process accounting ---------------------------------------------------------------------


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the process (all threads), seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_ctxsw(pid: int) -> int:
    """Context switches of every thread of the process (wake-ups, so polling shows)."""
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    n += int(line.split()[1])
    return n


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

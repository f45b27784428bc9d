"""The scenario: the same faults under the same traffic, kernel net_failover vs bpfailover.

Per mode one guest boot; per trial every step runs under a sequence-numbered UDP stream both
ways (bpfailover_lab.traffic endpoints: the guest's runs inside the VM) and a paced TCP stream
(tcpstream.py), with the faults driven over QMP at fixed offsets from the stream start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.proving_ground.image import (
    GUEST_BIN,
    GUEST_REPO,
    GUEST_VENV,
    QGA_PIDFILE,
    QGA_START,
    Image,
)
from bench.proving_ground.vm import (
    E1000_MAX_NIC,
    GUEST_V4,
    MAC,
    PEER_V4,
    UDP_PORT,
    VM,
    Net,
    TapWatch,
    VMError,
)
from bpfailover import netns
from bpfailover_lab.traffic import DirectionStats

GUEST_PY = f"{GUEST_VENV}/bin/python3"
GUEST_CONFIG = "/etc/bpfailover/config.yaml"
AGENT_SOCK = "/run/bpfailover/control.sock"
GROUP = "fo0"
TCP_PORT = 9100
# How long each UDP endpoint keeps receiving after its last send.  The peer's is longer: a
# starved guest sender runs behind its schedule (its `behind_max_ms`), and what it sends
# late must not count as lost because the peer stopped listening first.
GUEST_LINGER_S = 0.5
PEER_LINGER_S = 3.0
END_WINDOW = 20  # the last N guest frames decide which lower carried traffic at the end


@dataclass
class Settings:
    trials: int = 10
    rate_pps: int = 500  # per direction; what the TCG guest sustains with room to spare
    tcp_rate: int = 50  # writes per second of 1000 bytes
    modes: tuple[str, ...] = ("kernel", "bpfailover")
    steps: tuple[str, ...] = ("baseline", "carrier", "flap", "unplug", "planned", "migration")
    # Namespaces pg-hv/pg-peer, taps pgsby/pgpri, /tmp/bpfailover-pg: two runs on one host
    # need two prefixes (BPFAILOVER_PG_PREFIX, at most 5 characters: the taps' names).
    prefix: str = os.environ.get("BPFAILOVER_PG_PREFIX", "pg")
    workdir: Path = Path(f"/tmp/bpfailover-{os.environ.get('BPFAILOVER_PG_PREFIX', 'pg')}")
    log: Callable[[str], None] = print
    # BPFAILOVER_PG_SAMPLE=1: the guest samples its stack during every step (_Sampler)
    sample: bool = os.environ.get("BPFAILOVER_PG_SAMPLE") == "1"
    accel: str = "tcg"  # accel.detect()


@dataclass
class StepResult:
    mode: str
    step: str
    trial: int
    lost_out: int = 0  # guest -> peer
    lost_in: int = 0  # peer -> guest
    sent_out: int = 0
    sent_in: int = 0
    gap_out_ms: float = 0.0
    gap_in_ms: float = 0.0
    duplicates: int = 0
    back_on_primary_ms: float | None = None
    end_on: str | None = None
    expected_end: str = "primary"
    tcp_survived: bool = False
    tcp_gap_ms: float | None = None
    tcp_error: str | None = None
    marks: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.lost_out + self.lost_in

    @property
    def gap_ms(self) -> float:
        return max(self.gap_out_ms, self.gap_in_ms)


class Mode:
    """One booted guest in one mode, with what the scenario needs from it."""

    def __init__(self, name: str, img: Image, net: Net, s: Settings) -> None:
        self.name, self.s, self.net = name, s, net
        self.vm = VM(img, net, name, s.workdir / name, accel=s.accel)
        self.agent_h: int | None = None
        self.timings: dict[str, float] = {}
        self.group = GROUP  # the failover device (the cloud variant: the standby's old name)
        self.datapath_check: str | None = None  # failoverd's per-packet lower check: on / why off

    @property
    def g(self) -> Any:
        assert self.vm.guest is not None
        return self.vm.guest

    def links(self) -> list[dict[str, Any]]:
        links: list[dict[str, Any]] = self.g.req("links")["links"]
        return links

    def by_driver(self, driver: str) -> dict[str, Any] | None:
        return next((lk for lk in self.links() if lk["driver"] == driver), None)

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.1)
        raise VMError(f"{self.name}: timed out ({timeout:.0f}s) waiting for {what}")

    # -- boot and set-up ---------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        self.vm.start()
        self.timings["boot_s"] = self.vm.boot_s
        self.g.sh("sysctl -qw net.ipv6.conf.default.disable_ipv6=1")
        self.wait(lambda: self.by_driver("e1000e"), 60, "the e1000e primary")
        if self.name == "kernel":
            master = self.wait(lambda: self.by_driver("net_failover"), 30, "net_failover master")
            self.g.sh(
                f"ip addr add {GUEST_V4}/24 dev {master['name']} && ip link set {master['name']} up"
            )
        else:
            for drv in ("virtio_net", "e1000e"):
                self.g.sh(f"ip link set {self.by_driver(drv)['name']} up")  # type: ignore[index]
            self.start_agent()
            self.g.sh(f"ip addr add {GUEST_V4}/24 dev {GROUP}")
        self.wait(self.on_primary, 60, "traffic on the primary")
        self.timings["ready_s"] = time.monotonic() - t0

    def start_agent(self) -> None:
        cfg = {
            "groups": [{"name": GROUP, "standby": {"driver": "virtio_net"}, "primary": "auto"}],
            "control": {"socket": AGENT_SOCK},
            "bpffs": "/sys/fs/bpf/bpfailover",
            "metrics": {"listen": None},
            "log": {"level": "info"},
        }
        # Where an operator puts it (the package's conffile; the disk is a snapshot), so the
        # package's failoverctl finds the socket there as on an installed guest.
        self.g.req("write", path=GUEST_CONFIG, data=json.dumps(cfg))
        t0 = time.monotonic()
        # The package's failoverd, config file, foreground, log to stderr.
        self.agent_h = self.g.req(
            "spawn",
            argv=[f"{GUEST_BIN}/failoverd", "--config", GUEST_CONFIG],
            log="/run/failoverd.log",
        )["h"]
        self.wait(lambda: self.agent_status() is not None, 240, "failoverd (bcc compile in TCG)")
        self.timings["agent_start_s"] = time.monotonic() - t0
        r = self.g.req("unix", path=AGENT_SOCK, msg={"cmd": "status"})["reply"]
        self.datapath_check = r.get("status", {}).get("datapath_check")
        self.s.log(f"[{self.name}] failoverd's datapath check: {self.datapath_check}")

    def agent_status(self) -> dict[str, Any] | None:
        try:
            r = self.g.req("unix", path=AGENT_SOCK, msg={"cmd": "status"})["reply"]
        except VMError:
            return None
        group: dict[str, Any] | None = r.get("status", {}).get("groups", {}).get(self.group)
        return group

    def fallback_frames(self) -> int | None:
        """Frames the datapath moved off a dead active lower on its own (tx + rx), so far."""
        st = self.agent_status() if self.name == "bpfailover" else None
        if not st or st.get("datapath_fallback") is None:
            return None
        return sum(f["tx_packets"] + f["rx_packets"] for f in st["datapath_fallback"])

    def agent(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = self.g.req("unix", path=AGENT_SOCK, msg=msg)["reply"]
        if not reply.get("ok"):
            raise VMError(f"failoverd {msg}: {reply.get('error')}")
        return reply

    def agent_log(self) -> str:
        return str(self.g.req("read", path="/run/failoverd.log")["data"])

    def on_primary(self) -> bool:
        """Normal state: primary present with carrier and (as far as we can see) in use."""
        pri = self.by_driver("e1000e")
        if pri is None or not pri["carrier"] or not pri["up"]:
            return False
        if self.name == "kernel":
            return bool(pri["master"])
        st = self.agent_status()
        return bool(st and st.get("active") == "primary")

    def standby_ready(self) -> bool:
        sby = self.by_driver("virtio_net")
        return bool(sby and sby["carrier"])

    def close(self) -> None:
        if self.vm.guest is not None and self.agent_h is not None:
            with contextlib.suppress(VMError, OSError):
                self.g.req("kill", h=self.agent_h, sig=15)
        self.vm.close()


# ---- streams ---------------------------------------------------------------------------------


class Streams:
    """UDP both ways + TCP guest->peer, started together; collect() returns the raw results.

    `stoppable`: the streams run until stop() (at most `duration`): as long as the step's
    own work takes, however long that is under TCG."""

    def __init__(self, m: Mode, duration: float, stoppable: bool = False) -> None:
        self.m, self.duration, self.stoppable = m, duration, stoppable
        s = m.s
        self.sid = random.getrandbits(32)
        common = [
            "--port",
            str(UDP_PORT),
            "--stream-id",
            str(self.sid),
            "--rate",
            str(s.rate_pps),
            "--duration",
            str(duration),
            "--size",
            "64",
        ]
        self.limit = duration + 30.0
        peer = m.net.peer
        host_py = sys.executable
        self.tcp_srv = subprocess.Popen(
            netns.cmd_in(
                peer,
                [
                    host_py,
                    "-m",
                    "bench.proving_ground.tcpstream",
                    "server",
                    "--bind",
                    PEER_V4,
                    "--port",
                    str(TCP_PORT),
                    "--limit",
                    str(self.limit),
                ],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._ready(self.tcp_srv, "READY")
        g = m.g
        argv = [
            GUEST_PY,
            "-m",
            "bpfailover_lab.traffic",
            "endpoint",
            "--bind",
            GUEST_V4,
            "--to",
            PEER_V4,
            *common,
            "--linger",
            str(GUEST_LINGER_S),
        ]
        self.udp_guest = g.req("spawn", argv=argv)["h"]
        self.tcp_cli = g.req(
            "spawn",
            argv=[
                GUEST_PY,
                f"{GUEST_REPO}/bench/proving_ground/tcpstream.py",
                "client",
                "--to",
                PEER_V4,
                "--port",
                str(TCP_PORT),
                "--rate",
                str(s.tcp_rate),
                "--size",
                "1000",
                "--duration",
                str(duration),
                "--limit",
                str(self.limit),
                *(["--stop-on-stdin"] if stoppable else []),
            ],
        )["h"]
        for h, want in ((self.udp_guest, "READY"), (self.tcp_cli, "CONNECTED")):
            # a Python start-up in the TCG guest: seconds, tens of them on a loaded host
            line = g.req("readline", h=h, timeout=120)["line"]
            if line is None or line.strip() != want:
                with contextlib.suppress(VMError):
                    g.req("kill", h=h)
                    line = f"{line!r}: {g.req('wait', h=h, timeout=5).get('err', '')[-300:]}"
                raise VMError(f"guest stream side did not start ({want}): {line}")
        # The peer's endpoint only now: it waits for GO no longer than 10 s after READY, and
        # the guest's start-ups above take longer than that on a loaded host.
        self.udp_peer = subprocess.Popen(
            netns.cmd_in(
                peer,
                [
                    host_py,
                    "-m",
                    "bpfailover_lab.traffic",
                    "endpoint",
                    "--bind",
                    PEER_V4,
                    "--to",
                    GUEST_V4,
                    *common,
                    "--linger",
                    str(PEER_LINGER_S),
                ],
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._ready(self.udp_peer, "READY")
        assert self.udp_peer.stdin is not None
        g.req("send", h=self.udp_guest, go=True)
        self.t0 = time.monotonic()
        self.udp_peer.stdin.write(f"GO {time.monotonic_ns()}\n")
        self.udp_peer.stdin.flush()
        self.stopped_at: float | None = None

    def stop(self) -> None:
        """End the stoppable streams now: the guest's senders first (its endpoint may be
        behind: what it sends up to its STOP, the peer still receives for its linger)."""
        assert self.stoppable and self.udp_peer.stdin is not None
        self.stopped_at = self.rel(time.monotonic())
        for h in (self.udp_guest, self.tcp_cli):
            self.m.g.req("send", h=h, data="STOP\n")
        self.udp_peer.stdin.write("STOP\n")
        self.udp_peer.stdin.flush()

    @staticmethod
    def _ready(p: subprocess.Popen[str], want: str) -> None:
        assert p.stdout is not None
        import select

        r, _, _ = select.select([p.stdout], [], [], 20)
        line = p.stdout.readline() if r else ""
        if line.strip() != want:
            p.kill()
            err = p.stderr.read() if p.stderr else ""
            raise VMError(f"peer stream side did not start: {line!r} {err}")

    def at(self, t_rel: float) -> None:
        """Sleep until t_rel seconds after the stream start."""
        time.sleep(max(0.0, self.t0 + t_rel - time.monotonic()))

    def rel(self, t: float) -> float:
        return round(t - self.t0, 4)

    def collect(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        g = self.m.g
        deadline = self.t0 + self.limit + 5
        try:
            left = max(1.0, deadline - time.monotonic())
            ug = g.req("wait", h=self.udp_guest, timeout=left)
            if ug.get("rc") is None:
                raise VMError("guest UDP endpoint did not finish")
            out, _ = self.udp_peer.communicate(timeout=max(1.0, deadline - time.monotonic()))
            tc = g.req("wait", h=self.tcp_cli, timeout=max(1.0, deadline - time.monotonic()))
            ts_out, _ = self.tcp_srv.communicate(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            self.kill()
        return (
            _last_json(ug.get("out", "")),
            _last_json(out),
            _last_json(tc.get("out", "")),
            _last_json(ts_out),
        )

    def kill(self) -> None:
        for p in (self.udp_peer, self.tcp_srv):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
        for h in (self.udp_guest, self.tcp_cli):
            with contextlib.suppress(VMError):
                self.m.g.req("kill", h=h)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            d: dict[str, Any] = json.loads(line)
            return d
    return {"error": f"no result: {text[-200:]!r}"}


# ---- steps -----------------------------------------------------------------------------------

# Stream length per step: the fault, e1000e's own link-up after a plug (~2.5-3 s under TCG:
# QEMU's autonegotiation timer and the driver's watchdog) and a margin to see where it ends.
STEP_DURATION = {"baseline": 2.0, "carrier": 3.0, "unplug": 4.5, "planned": 6.0, "migration": 5.5}
# flap: the guest sees the link back by FLAP_WAIT_UNTIL at the latest, then 0.1 s + 1.2 s
# to the restore, whose link-up takes up to ~2.5 s under TCG, and a margin.
FLAP_WAIT_UNTIL = 5.0
STEP_DURATION["flap"] = FLAP_WAIT_UNTIL + 1.3 + 2.5 + 1.2
# The refusals: the tool's own time (no qemu-ga: its 5 s timeout); host-migrate: as long as
# the tool takes (HM_STREAM_MAX_S).
STEP_DURATION |= {
    "refuse-no-qga": 12.0,
    "refuse-no-failoverd": 12.0,
    "refuse-standby-down": 12.0,
}


def _step_baseline(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    return None


def _step_carrier(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    st.at(0.5)
    marks["fault"] = st.rel(time.monotonic())
    m.vm.set_link("pri0", False)
    st.at(1.3)
    pri = m.by_driver("e1000e")  # the emulator must really have taken the link away
    marks["guest_saw_carrier_off"] = 0.0 if pri and pri["carrier"] else 1.0
    st.at(1.5)
    marks["restore"] = st.rel(time.monotonic())
    m.vm.set_link("pri0", True)


def _step_flap(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    """The e1000e's link off / on / off within a second, then back on.

    The second carrier loss comes right after the carrier came back: carrier-on is an
    "urgent" link-watch event that runs link-watch at once and sets its next run a second
    later; carrier-off of a real NIC is not urgent (net/core/link_watch.c), so the
    RTM_NEWLINK that tells failoverd waits for that run, while net_failover (and the
    datapath's per-packet check) read the carrier bit at once.  QEMU's e1000e brings the
    link up ~0.5 s after `set_link on` (its autonegotiation timer), so the second `off`
    waits until the guest has seen the carrier back (else the guest never sees a flap).
    """
    st.at(0.5)
    marks["fault"] = st.rel(time.monotonic())
    m.vm.set_link("pri0", False)
    st.at(0.9)
    marks["flap_on"] = st.rel(time.monotonic())
    m.vm.set_link("pri0", True)

    def carrier() -> bool:
        pri = m.by_driver("e1000e")
        return bool(pri and pri["carrier"])

    # Under TCG the guest's e1000e sees the link back after 0.5-4 s (its watchdog): wait,
    # bounded so that the rest of the step still fits in the stream.
    while not carrier() and st.rel(time.monotonic()) < FLAP_WAIT_UNTIL:
        time.sleep(0.02)
    marks["guest_carrier_on"] = st.rel(time.monotonic())
    marks["guest_saw_carrier_on"] = 1.0 if carrier() else 0.0  # 0: no flap, one loss
    st.at(marks["guest_carrier_on"] + 0.1)
    marks["flap_off"] = st.rel(time.monotonic())
    m.vm.set_link("pri0", False)
    st.at(marks["flap_off"] + 0.5)
    marks["guest_saw_carrier_off"] = 0.0 if carrier() else 1.0
    st.at(marks["flap_off"] + 1.2)
    marks["restore"] = st.rel(time.monotonic())
    m.vm.set_link("pri0", True)


def _unplug_and_replug(m: Mode, st: Streams, marks: dict[str, float], not_before: float) -> None:
    """The VF unplugged now, re-plugged 0.3 s after it is gone (not before `not_before`)."""
    t_req, t_del = m.vm.unplug()
    marks["fault"], marks["deleted"] = st.rel(t_req), st.rel(t_del)
    st.at(max(not_before, marks["deleted"] + 0.3))
    t_add, _ = m.vm.plug()
    marks["restore"] = st.rel(t_add)


def _step_unplug(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    st.at(0.5)
    _unplug_and_replug(m, st, marks, 1.0)


def _step_planned(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    """bpfailover only: set-primary to the standby, then unplug; back with --auto."""
    st.at(0.5)
    marks["set_standby"] = st.rel(time.monotonic())
    m.agent({"cmd": "set-primary", "group": m.group, "lower": "standby"})
    st.at(1.0)
    _unplug_and_replug(m, st, marks, 1.5)

    def registered() -> bool:
        s = m.agent_status()
        return bool(s and any(lw["role"] == "primary" and lw["usable"] for lw in s["lowers"]))

    m.wait(
        registered,
        max(1.0, st.duration - 0.5 - (time.monotonic() - st.t0)),
        "the re-plugged primary in failoverd",
    )
    marks["auto"] = st.rel(time.monotonic())
    m.agent({"cmd": "set-primary", "group": m.group})


def _step_migration(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    """net_failover.rst's script: standby link up, fdb del, VF unplug, migrate, plug, down."""
    st.at(0.3)
    marks["standby_up"] = st.rel(time.monotonic())
    m.vm.set_link("net0", True)
    st.at(0.6)
    m.net.fdb_del(MAC, m.net.tap_pri)
    t_req, t_del = m.vm.unplug()
    marks["fault"], marks["deleted"] = st.rel(t_req), st.rel(t_del)
    time.sleep(0.3)  # "virsh migrate --live" (its length changes nothing here)
    t_add, _ = m.vm.plug()
    marks["restore"] = st.rel(t_add)
    m.vm.set_link("net0", False)
    marks["standby_down"] = st.rel(time.monotonic())


# ---- host-orchestrated migration: failover-migrate (docs/host-migration.md) -----------------

# failoverctl under TCG starts in 2-6 s per guest-exec without a config file, and several
# times that with one (it validates the whole config: pydantic's start-up), as on every
# installed guest; the sequence runs three of them (status; set-primary standby --wait;
# set-primary --auto --wait).
FM_EXEC_TIMEOUT = 180.0
FM_AGENT_TIMEOUT = 5.0  # how long the tool waits for a qemu-ga that does not answer
FAILOVERCTL = f"{GUEST_BIN}/failoverctl"  # the package's (also on qemu-ga's PATH)
# host-migrate's streams run as long as the tool takes (Streams.stop), at most this long,
# and HM_TAIL_S longer: where the traffic ends up (the end-state check) after the tool.
HM_STREAM_MAX_S = 300.0
HM_TAIL_S = 3.0


def failover_migrate(m: Mode, *extra: str) -> tuple[int, dict[str, Any]]:
    """The host tool, as an operator runs it: its own monitor and the guest agent's socket."""
    w = m.vm.workdir
    args = m.vm.primary_args()
    spec = ",".join([args["driver"]] + [f"{k}={v}" for k, v in args.items() if k != "driver"])
    argv = [
        sys.executable,
        "-m",
        "bpfailover.host.migrate",
        "--qmp",
        str(w / "qmp-host.sock"),
        "--qga",
        str(w / "qga.sock"),
        "--device",
        spec,
        "--group",
        m.group,
        "--json",
        *extra,
    ]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    res = _last_json(p.stdout)
    res["stderr"] = p.stderr.strip()
    return p.returncode, res


def vf_attached(m: Mode) -> bool:
    assert m.vm.qmp is not None
    kids = m.vm.qmp.cmd("qom-list", path="/machine/peripheral")
    return any(k.get("name") == "pri0" for k in kids)


def _step_host_migrate(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    """The seed's migration with failover-migrate driving the guest through qemu-ga.  A
    failed tool run is this trial's result (exit code in the marks), not the run's end."""
    st.at(0.5)
    t0 = st.rel(time.monotonic())
    marks["fault"] = t0
    code, res = failover_migrate(
        m, "--exec-timeout", str(FM_EXEC_TIMEOUT), "--pause", "0.3", "--return-timeout", "120"
    )
    marks["tool_s"] = round(st.rel(time.monotonic()) - t0, 3)
    m.vm.plugged = vf_attached(m)
    if m.vm.plugged:
        m.vm.probes += 1
    for k, v in res.get("marks", {}).items():
        marks[f"fm_{k}"] = round(t0 + v, 3)
    if "fm_migrated" in marks:
        marks["restore"] = marks["fm_migrated"]  # just before its device_add
    if code != 0:
        marks["fm_exit"] = float(code)
        m.s.log(f"[{m.name}] failover-migrate exit {code}: {res.get('stderr', '')[-300:]}")
    st.at(st.rel(time.monotonic()) + HM_TAIL_S)
    st.stop()


def _refusal(m: Mode, marks: dict[str, float], expect: int) -> None:
    """failover-migrate must refuse with `expect`, and the VF must still be attached."""
    code, res = failover_migrate(
        m, "--exec-timeout", str(FM_EXEC_TIMEOUT), "--agent-timeout", str(FM_AGENT_TIMEOUT)
    )
    attached = vf_attached(m)
    marks["exit"] = float(code)
    marks["vf_attached"] = 1.0 if attached else 0.0
    marks["check_ok"] = 1.0 if code == expect and attached else 0.0
    m.s.log(f"[{m.name}] failover-migrate exit {code} (want {expect}): {res.get('stderr')}")
    if not attached:
        m.vm.plugged = False


def _step_refuse_no_qga(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    st.at(0.3)
    m.g.sh(f"kill $(cat {QGA_PIDFILE}) && while [ -e {QGA_PIDFILE} ]; do sleep 0.1; done")
    _refusal(m, marks, 3)


def _step_refuse_no_failoverd(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    st.at(0.3)
    assert m.agent_h is not None
    m.g.req("kill", h=m.agent_h, sig=15)  # systemctl stop
    if m.g.req("wait", h=m.agent_h, timeout=60).get("rc") is None:
        m.s.log(f"[{m.name}] failoverd still running 60 s after SIGTERM: SIGKILL")
        m.g.req("kill", h=m.agent_h, sig=9)
        m.g.req("wait", h=m.agent_h, timeout=30)
    m.agent_h = None
    _refusal(m, marks, 4)


def _step_refuse_standby_down(m: Mode, st: Streams, marks: dict[str, float]) -> None:
    st.at(0.3)
    m.vm.set_link("net0", False)

    def unusable() -> bool:
        s = m.agent_status()
        return bool(s and not any(lw["role"] == "standby" and lw["usable"] for lw in s["lowers"]))

    m.wait(unusable, 10, "the standby unusable in failoverd")
    _refusal(m, marks, 5)


def _restart_qga(m: Mode) -> None:
    m.g.sh(QGA_START)


def _standby_back(m: Mode) -> None:
    m.vm.set_link("net0", True)


STEPS: dict[str, Callable[[Mode, Streams, dict[str, float]], None]] = {
    "baseline": _step_baseline,
    "carrier": _step_carrier,
    "flap": _step_flap,
    "unplug": _step_unplug,
    "planned": _step_planned,
    "migration": _step_migration,
    "host-migrate": _step_host_migrate,
    "refuse-no-qga": _step_refuse_no_qga,
    "refuse-standby-down": _step_refuse_standby_down,
    "refuse-no-failoverd": _step_refuse_no_failoverd,  # last: its restart is the next settle's
}
# Put back after the stream, also when the step failed (a restart under the stream would
# measure the bcc compile's CPU use, not the refusal).
# failoverd, stopped by refuse-no-failoverd, is restarted by the next step's _settle (the
# bcc compile takes a minute under TCG: not worth it when nothing follows).
AFTER_STEP: dict[str, Callable[[Mode], None]] = {
    "refuse-no-qga": _restart_qga,
    "refuse-standby-down": _standby_back,
}
REFUSALS = {"refuse-no-qga", "refuse-standby-down", "refuse-no-failoverd"}
BPFAILOVER_ONLY = {"planned", "host-migrate"} | REFUSALS
ONCE_PER_BOOT = {"baseline"} | REFUSALS  # checks, not measurements
# Steps whose standby starts with its link down (the seed's script), and steps whose streams
# run as long as the step's work takes (Streams.stop); the libvirt variant adds its own.
STANDBY_DOWN_AT_START = {"migration"}
STOPPABLE = {"host-migrate"}


def _settle(m: Mode, step: str) -> None:
    """Back to the normal state before a step (and the step's own starting state)."""
    if m.name == "bpfailover" and m.agent_h is None:
        m.start_agent()  # stopped by refuse-no-failoverd
    if not m.vm.plugged:
        m.vm.plug()
    m.vm.set_link("pri0", True)
    sby_down = step in STANDBY_DOWN_AT_START  # the seed's standby starts with link down
    m.vm.set_link("net0", not sby_down)
    if m.name == "bpfailover":
        st = m.agent_status()
        if st and st.get("override"):
            m.agent({"cmd": "set-primary", "group": m.group})
    m.wait(m.on_primary, 60, "the primary back in use")
    if sby_down:
        m.wait(lambda: not m.standby_ready(), 20, "standby carrier down")
    else:
        m.wait(m.standby_ready, 20, "standby carrier up")
    time.sleep(0.3)


class _Sampler:
    """BPFAILOVER_PG_SAMPLE=1: where the guest's UDP sender's skbs are, every 0.1 s during
    a step (bench/proving_ground/stacksample.py: the socket's charged bytes, per netdev TX
    and BQL in flight, softnet drops; the qdiscs when the socket is deep).  It costs the
    guest some CPU: a diagnostic, not for measured runs.  Saved as
    WORKDIR/sample-MODE-STEP-TRIAL.jsonl, the first line giving the guest's monotonic time
    at the stream start."""

    def __init__(self, m: Mode) -> None:
        self.m = m
        self.host0 = time.monotonic()
        self.guest0 = m.g.req("time")["mono_ns"] / 1e9
        argv = [GUEST_PY, f"{GUEST_REPO}/bench/proving_ground/stacksample.py"]
        argv += ["--port", str(UDP_PORT), "--interval", "0.1"]
        m.g.req("write", path="/run/pg-sample.jsonl", data="")
        self.h = m.g.req("spawn", argv=argv, log="/run/pg-sample.jsonl")["h"]

    def stop(self) -> None:
        with contextlib.suppress(VMError):
            self.m.g.req("kill", h=self.h)

    def save(self, st: Streams, name: str) -> None:
        self.stop()
        with contextlib.suppress(VMError):
            data = self.m.g.req("read", path="/run/pg-sample.jsonl")["data"]
            t0 = self.guest0 + getattr(st, "t0", self.host0) - self.host0
            path = self.m.s.workdir / f"sample-{self.m.name}-{name}.jsonl"
            path.write_text(json.dumps({"stream_t0_guest": round(t0, 3)}) + "\n" + data)
            self.m.s.log(f"[{self.m.name}] sampled the guest's stack: {path}")


def run_step(m: Mode, watch: TapWatch, step: str, trial: int) -> StepResult:
    res = StepResult(m.name, step, trial)
    _settle(m, step)
    watch.reset()
    fb0 = m.fallback_frames()
    sampler = _Sampler(m) if m.s.sample else None
    try:
        if step in STOPPABLE:
            st = Streams(m, HM_STREAM_MAX_S, stoppable=True)
        else:
            st = Streams(m, STEP_DURATION[step])
    except BaseException:
        if sampler is not None:
            sampler.stop()  # nothing to save: the streams never started
        raise
    try:
        try:
            STEPS[step](m, st, res.marks)
        except Exception:
            st.kill()
            raise
        ug, up, tc, ts = st.collect()
    finally:
        if sampler is not None:
            sampler.save(st, f"{step}-{trial + 1}")
        if step in AFTER_STEP:
            AFTER_STEP[step](m)
    fb1 = m.fallback_frames() if fb0 is not None else None
    if fb0 is not None and fb1 is not None:  # a restarted agent's counters start again
        res.marks["dp_fallback"] = float(fb1 - fb0 if fb1 >= fb0 else fb1)
    for side in (ug, up):
        if "error" in side:
            raise VMError(f"{m.name}/{step}: UDP endpoint: {side['error']}")
    out = DirectionStats.from_dict(up["rx"]).with_sender(
        ug["sent"], ug["send_errors"], ug["send_errnos"]
    )
    inn = DirectionStats.from_dict(ug["rx"]).with_sender(
        up["sent"], up["send_errors"], up["send_errnos"]
    )
    res.sent_out, res.lost_out, res.gap_out_ms = out.sent, out.lost, round(out.max_gap_ms, 1)
    res.sent_in, res.lost_in, res.gap_in_ms = inn.sent, inn.lost, round(inn.max_gap_ms, 1)
    res.duplicates = out.duplicates + inn.duplicates
    for key, d in (("out", out), ("in", inn)):  # where loss fell: seconds from stream start
        if d.holes:
            res.notes.append(
                f"lost {key} at "
                + ", ".join(f"{h[0] / m.s.rate_pps:.3f}s+{h[1] - h[0] + 1}" for h in d.holes)
            )
    if out.send_errors:
        runs = zip(ug.get("send_error_runs", []), ug.get("send_error_runs_at_s", []), strict=True)
        # seq n is due n / rate s after the start; a late sender refused at a later time
        at = ", ".join(
            f"{a / m.s.rate_pps:.3f}s+{b - a + 1} (sent at {t:.3f}s)" for (a, b), t in runs
        )
        res.notes.append(f"guest send errors {out.send_errnos}" + (f" at {at}" if at else ""))
        res.marks["send_errors_out"] = float(out.send_errors)  # in lost_out: never left
    # how far each sender fell behind its schedule: the guest's, a starved vCPU
    res.marks["guest_behind_ms"] = float(ug.get("behind_max_ms", 0.0))
    res.marks["peer_behind_ms"] = float(up.get("behind_max_ms", 0.0))
    res.tcp_survived = bool(tc.get("ok"))
    res.tcp_gap_ms = round(ts["max_gap_ms"], 1) if "max_gap_ms" in ts else None
    res.tcp_error = tc.get("error") or ts.get("error")
    pri, sby = watch.times[m.net.tap_pri], watch.times[m.net.tap_sby]
    if "restore" in res.marks:
        t_restore = st.t0 + res.marks["restore"]
        after = [t for t in pri if t >= t_restore]
        if after:
            res.back_on_primary_ms = round((after[0] - t_restore) * 1e3, 1)
    last = sorted(
        [(t, "primary") for t in pri[-END_WINDOW:]] + [(t, "standby") for t in sby[-END_WINDOW:]]
    )[-END_WINDOW:]
    kinds = {k for _, k in last}
    res.end_on = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)
    return res


# ---- the whole run ---------------------------------------------------------------------------


def run(img: Image, s: Settings) -> dict[str, Any]:
    results: list[StepResult] = []
    timings: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    dp_check: dict[str, str | None] = {}
    net = Net(s.prefix)
    for mode in s.modes:
        net.up()
        watch: TapWatch | None = None
        m = Mode(mode, img, net, s)
        t_mode = time.monotonic()
        try:
            watch = TapWatch(net)
            s.log(f"[{mode}] booting the guest ({s.accel.upper()})")
            m.start()
            s.log(
                f"[{mode}] ready: boot {m.timings['boot_s']:.1f}s, "
                f"set-up {m.timings['ready_s']:.1f}s, kernel {m.vm.guest.hello['kernel']}"
            )  # type: ignore[union-attr]
            if mode == "bpfailover":
                dp_check[mode] = m.datapath_check
            steps = [st for st in s.steps if not (st in BPFAILOVER_ONLY and mode == "kernel")]
            plugs = sum(
                1 for st in steps if st in ("unplug", "planned", "migration", "host-migrate")
            )
            for trial in range(s.trials):
                if m.vm.probes + plugs > E1000_MAX_NIC:
                    s.log(f"[{mode}] rebooting the guest ({m.vm.probes} e1000e probes so far)")
                    m.close()
                    m = Mode(mode, img, net, s)
                    m.start()
                for step in steps:
                    if step in ONCE_PER_BOOT and trial > 0:
                        continue  # the no-fault reference and the refusals: once per boot
                    r = run_step(m, watch, step, trial)
                    results.append(r)
                    s.log(
                        f"[{mode}] trial {trial + 1}/{s.trials} {step:<9} lost {r.lost_out:>4}"
                        f"/{r.lost_in:<4} gap {r.gap_out_ms:>7.1f}/{r.gap_in_ms:<7.1f}ms "
                        f"back {r.back_on_primary_ms} end {r.end_on} tcp "
                        f"{'ok' if r.tcp_survived else 'FAILED ' + str(r.tcp_error)}"
                    )
        except Exception as e:
            failures.append(f"{mode}: {e}")
            s.log(f"[{mode}] FAILED: {e}")
            if mode == "bpfailover" and m.vm.guest is not None:
                with contextlib.suppress(Exception):
                    s.log("failoverd log tail:\n" + "\n".join(m.agent_log().splitlines()[-15:]))
        finally:
            if mode == "bpfailover" and m.vm.guest is not None:
                with contextlib.suppress(Exception):
                    (s.workdir / "failoverd.log").write_text(m.agent_log())
            m.close()
            if watch is not None:
                watch.close()
            net.down()
        timings[mode] = {**m.timings, "total_s": time.monotonic() - t_mode}
    return {
        "results": results,
        "timings": timings,
        "failures": failures,
        "datapath_check": dp_check.get("bpfailover"),
    }


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def summarize(results: list[StepResult]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted(
        {(r.mode, r.step) for r in results},
        key=lambda k: (list(STEPS).index(k[1]), k[0] != "kernel"),
    )
    for mode, step in keys:
        rs = [r for r in results if r.mode == mode and r.step == step]
        back = [r.back_on_primary_ms for r in rs if r.back_on_primary_ms is not None]
        rows.append(
            {
                "mode": mode,
                "step": step,
                "trials": len(rs),
                "lost_p50": statistics.median(r.lost for r in rs),
                "lost_max": max(r.lost for r in rs),
                "lost_out_p50": statistics.median(r.lost_out for r in rs),
                "lost_in_p50": statistics.median(r.lost_in for r in rs),
                "gap_ms_p50": statistics.median(r.gap_ms for r in rs),
                "gap_ms_max": max(r.gap_ms for r in rs),
                "back_on_primary_ms_p50": statistics.median(back) if back else None,
                "back_on_primary_ms_max": max(back) if back else None,
                "back_missing": sum(
                    1 for r in rs if "restore" in r.marks and r.back_on_primary_ms is None
                ),
                "end_state_ok": sum(1 for r in rs if r.end_on == r.expected_end),
                "tcp_survived": sum(1 for r in rs if r.tcp_survived),
                "duplicates_max": max(r.duplicates for r in rs),
                "dp_fallback_p50": statistics.median(fb)
                if (fb := [r.marks["dp_fallback"] for r in rs if "dp_fallback" in r.marks])
                else None,
                "guest_missed_flap": sum(
                    1 for r in rs if r.marks.get("guest_saw_carrier_on") == 0.0
                ),
                "guest_missed_carrier_off": sum(
                    1 for r in rs if r.marks.get("guest_saw_carrier_off") == 0.0
                ),
                # refusal checks: failover-migrate's exit code as expected and the VF attached
                "checks_failed": sum(1 for r in rs if r.marks.get("check_ok") == 0.0),
                "exit_codes": sorted({int(r.marks["exit"]) for r in rs if "exit" in r.marks}),
                "send_errors_out_max": max(int(r.marks.get("send_errors_out", 0)) for r in rs),
                "lost_beyond_send_errors_max": max(
                    r.lost - int(r.marks.get("send_errors_out", 0)) for r in rs
                ),
                "tool_s_p50": statistics.median(tool)
                if (tool := [r.marks["tool_s"] for r in rs if "tool_s" in r.marks])
                else None,
                "tool_s_max": max(tool) if tool else None,
                "tool_failed": sum(1 for r in rs if r.marks.get("fm_exit")),
                "guest_behind_ms_max": max(r.marks.get("guest_behind_ms", 0.0) for r in rs),
                "lost_both_ways_zero": sum(1 for r in rs if r.lost == 0),
            }
        )
    return rows


def fmt(v: Any, unit: str = "") -> str:
    """A report cell: – for none, whole numbers from 10 up (and 0), one decimal below."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.0f}{unit}" if v >= 10 or v == 0 else f"{v:.1f}{unit}"
    return f"{v}{unit}"


def steps_table(summary: list[dict[str, Any]], mode_header: str = "mode") -> list[str]:
    """The markdown table of summarize()'s rows, one per step and mode."""
    lines = [
        f"| step | {mode_header} | trials | lost p50 (out/in) | lost max | longest gap p50 / "
        "max (ms) | back on primary p50 / max (ms) | end state ok | TCP survived |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        back = (
            f"{fmt(r['back_on_primary_ms_p50'])} / {fmt(r['back_on_primary_ms_max'])}"
            if r["back_on_primary_ms_p50"] is not None
            else "–"
        )
        if r.get("back_missing"):
            back += f" ({r['back_missing']} never)"
        lines.append(
            f"| {r['step']} | {r['mode']} | {r['trials']} | {fmt(r['lost_p50'])} "
            f"({fmt(r['lost_out_p50'])}/{fmt(r['lost_in_p50'])}) | {r['lost_max']} | "
            f"{fmt(r['gap_ms_p50'])} / {fmt(r['gap_ms_max'])} | {back} | "
            f"{r['end_state_ok']}/{r['trials']} | {r['tcp_survived']}/{r['trials']} |"
        )
    return lines

"""Host side: namespaces, taps, QEMU, its QMP monitor and the guest command channel.

Layout (the lab's addresses, README "The lab"):
  {p}-hv    bridge br0; taps {p}sby (virtio-net, standby) and {p}pri (e1000e, primary);
            veth peer0 to the peer; QEMU runs here, so its taps live here.
  {p}-peer  eth0 198.18.0.2/24, 2001:db8::2/64.
The guest (TCG unless accel.detect() found a KVM that boots it) has virtio-net and e1000e
with the same MAC on two PCIe root ports.
Everything started here is stopped by VM.close() (also on failure) with bounded waits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.proving_ground.image import REPO, Image
from bpfailover import netns

MAC = "52:54:00:00:12:53"
GUEST_V4, PEER_V4 = "198.18.0.1", "198.18.0.2"
GUEST_V6, PEER_V6 = "2001:db8::1", "2001:db8::2"
UDP_PORT = 9000
BOOT_TIMEOUT_S = 180.0
# e1000e's module parameters are per board, and every probe (each hot-plug) takes the next
# board number: the INTx setting (docs/proving-ground.md, finding 1) must be given for all
# E1000_MAX_NIC of them, and a guest must be rebooted before it has probed more than that.
E1000_MAX_NIC = 32
INTX_ALL = ",".join(["0"] * E1000_MAX_NIC)


class VMError(RuntimeError):
    pass


def sh(argv: list[str], ns: str | None = None, timeout: float = 30.0, check: bool = True) -> str:
    p = subprocess.run(
        netns.cmd_in(ns, argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and p.returncode != 0:
        raise VMError(f"{' '.join(argv)} (netns {ns}): {p.stderr.strip() or p.returncode}")
    return p.stdout


@dataclass
class Net:
    """The hypervisor and peer namespaces with the bridge and the two taps."""

    prefix: str = "pg"
    hv: str = field(init=False)
    peer: str = field(init=False)
    tap_sby: str = field(init=False)
    tap_pri: str = field(init=False)

    def __post_init__(self) -> None:
        self.hv, self.peer = f"{self.prefix}-hv", f"{self.prefix}-peer"
        self.tap_sby, self.tap_pri = f"{self.prefix}sby", f"{self.prefix}pri"

    def up(self) -> None:
        self.down()
        try:
            for ns in (self.hv, self.peer):
                sh(["ip", "netns", "add", ns])
                sh(["ip", "link", "set", "lo", "up"], ns)
            hv = self.hv
            sh(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], hv)
            sh(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], hv)
            sh(["ip", "link", "add", "br0", "type", "bridge"], hv)
            sh(
                [
                    "ip",
                    "link",
                    "add",
                    "peer0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    self.peer,
                ],
                hv,
            )
            sh(["ip", "link", "set", "peer0", "master", "br0", "up"], hv)
            for tap in (self.tap_sby, self.tap_pri):
                sh(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], hv)
                sh(["ip", "link", "set", tap, "master", "br0", "up"], hv)
            sh(["ip", "link", "set", "br0", "up"], hv)
            p = self.peer
            sh(["ip", "addr", "add", f"{PEER_V4}/24", "dev", "eth0"], p)
            sh(["ip", "addr", "add", f"{PEER_V6}/64", "dev", "eth0", "nodad"], p)
            sh(["ip", "link", "set", "eth0", "up"], p)
        except Exception:
            self.down()
            raise

    def down(self) -> None:
        for ns in (self.hv, self.peer):
            if netns.exists(ns):
                sh(["ip", "netns", "del", ns], check=False)

    def fdb_del(self, mac: str, port: str) -> None:
        sh(["bridge", "fdb", "del", mac, "dev", port, "master"], self.hv, check=False)


def connect_unix(path: Path, timeout: float, what: str) -> socket.socket:
    """Connect to a unix socket QEMU creates when it gets to it, waiting up to timeout."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sock.close()
                raise VMError(f"{what} {path} never came up") from None
            time.sleep(0.05)


class QMP:
    """QMP over a unix socket; a reader thread stamps every event with time.monotonic()."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = connect_unix(path, timeout, "QMP socket")
        self.f = self.sock.makefile("rwb", buffering=0)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.next_id = 1
        self.closed = False
        json.loads(self.f.readline())  # greeting
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()
        self.cmd("qmp_capabilities")

    def _reader(self) -> None:
        try:
            for line in self.f:
                msg = json.loads(line)
                with self.cond:
                    if "event" in msg:
                        self.events.append((time.monotonic(), msg))
                    elif "id" in msg:
                        self.replies[msg["id"]] = msg
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def cmd(self, execute: str, timeout: float = 30.0, **args: Any) -> Any:
        with self.cond:
            rid = self.next_id
            self.next_id += 1
        msg: dict[str, Any] = {"execute": execute, "id": rid}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        with self.cond:
            while rid not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise VMError(f"QMP {execute}: no reply")
                self.cond.wait(left)
            reply = self.replies.pop(rid)
        if "error" in reply:
            raise VMError(f"QMP {execute} {args}: {reply['error'].get('desc')}")
        return reply.get("return")

    def wait_event(
        self,
        name: str,
        after: float,
        timeout: float,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> float:
        """Time (monotonic) of the first event `name` at or after `after`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, ev in self.events:
                    if t >= after and ev["event"] == name and (match is None or match(ev)):
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise VMError(f"no QMP event {name} within {timeout}s")
                self.cond.wait(left)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Guest:
    """The command channel to guestd (virtio-serial port `pg`, a unix socket on the host)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = connect_unix(path, timeout, "guest channel")
        self.buf = b""
        self.next_id = 1
        self.lock = threading.Lock()
        self.hello: dict[str, Any] = {}

    def _line(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMError(f"guest did not answer within {timeout:.0f}s")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise VMError("guest channel closed (guest died?)")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self._line(max(0.1, deadline - time.monotonic()))
            if msg.get("ready"):
                self.hello = msg
                return msg

    def req(self, op: str, timeout: float = 30.0, **kw: Any) -> dict[str, Any]:
        with self.lock:
            rid = self.next_id
            self.next_id += 1
            # guestd's own waits (readline, wait, run, unix) get the same timeout: its
            # defaults (10 s) were shorter than ours, too short on a loaded host
            msg = {"id": rid, "op": op, "timeout": timeout, **kw}
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                msg = self._line(timeout + 10.0)
                if msg.get("id") == rid:
                    break
        if not msg.get("ok"):
            raise VMError(f"guest {op}: {msg.get('error')}")
        return msg

    def sh(self, cmd: str, timeout: float = 30.0, check: bool = True) -> str:
        r = self.req("run", timeout=timeout, sh=cmd)
        if check and r.get("rc") != 0:
            raise VMError(f"guest `{cmd}`: rc {r.get('rc')}: {r.get('err', '').strip()[-300:]}")
        return str(r.get("out", ""))

    def close(self) -> None:
        self.sock.close()


class VM:
    """One QEMU guest in the hypervisor namespace; `mode` is kernel or bpfailover."""

    def __init__(
        self, img: Image, net: Net, mode: str, workdir: Path, mem_mb: int = 1536, accel: str = "tcg"
    ):
        self.img, self.net, self.mode, self.workdir = img, net, mode, workdir
        self.mem_mb = mem_mb
        self.accel = accel  # accel.detect(): KVM only where a stock kernel boots under it
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self.guest: Guest | None = None
        self.boot_s = 0.0
        self.plugged = True
        self.probes = 0  # e1000e probes in this boot (see E1000_MAX_NIC)

    @property
    def failover(self) -> bool:
        return self.mode == "kernel"

    def primary_args(self) -> dict[str, Any]:
        args = {"driver": "e1000e", "netdev": "hpri", "mac": MAC, "id": "pri0", "bus": "rp2"}
        if self.failover:
            args["failover_pair_id"] = "net0"
        return args

    def argv(self) -> list[str]:
        w = self.workdir
        pri = ",".join(f"{k}={v}" for k, v in self.primary_args().items() if k != "driver")
        return [
            "qemu-system-x86_64",
            "-accel",
            self.accel,
            "-machine",
            "q35",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            str(self.mem_mb),
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
            "-kernel",
            str(self.img.kernel),
            "-initrd",
            str(self.img.initrd),
            "-append",
            "console=ttyS0 root=/dev/vda rw init=/sbin/pg-init panic=-1 "
            f"net.ifnames=0 quiet loglevel=4 e1000e.IntMode={INTX_ALL}",
            "-drive",
            f"file={self.img.disk},format=raw,if=virtio,snapshot=on",
            "-serial",
            f"file:{w / 'console.log'}",
            "-qmp",
            f"unix:{w / 'qmp.sock'},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=vser",
            "-chardev",
            f"socket,id=pgch,path={w / 'guest.sock'},server=on,wait=off",
            "-device",
            "virtserialport,chardev=pgch,name=pg",
            # the guest agent's channel, as libvirt sets it up (docs/host-migration.md)
            "-chardev",
            f"socket,id=qgach,path={w / 'qga.sock'},server=on,wait=off",
            "-device",
            "virtserialport,chardev=qgach,name=org.qemu.guest_agent.0",
            # a second monitor for failover-migrate (the first is the proving ground's own)
            "-chardev",
            f"socket,id=qmp2,path={w / 'qmp-host.sock'},server=on,wait=off",
            "-mon",
            "chardev=qmp2,mode=control",
            "-virtfs",
            f"local,path={REPO},mount_tag=repo,security_model=none,readonly=on",
            "-device",
            "pcie-root-port,id=rp1,chassis=1,slot=1",
            "-device",
            "pcie-root-port,id=rp2,chassis=2,slot=2",
            "-netdev",
            f"tap,id=hsby,ifname={self.net.tap_sby},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=hsby,mac={MAC},id=net0,bus=rp1,"
            f"failover={'on' if self.failover else 'off'}",
            "-netdev",
            f"tap,id=hpri,ifname={self.net.tap_pri},script=no,downscript=no",
        ] + ([] if self.failover else ["-device", f"e1000e,{pri}"])

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("qmp.sock", "guest.sock", "console.log", "qga.sock", "qmp-host.sock"):
            (self.workdir / name).unlink(missing_ok=True)
        t0 = time.monotonic()
        log = open(self.workdir / "qemu.log", "wb")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            netns.cmd_in(self.net.hv, self.argv()),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.qmp = QMP(self.workdir / "qmp.sock")
        if self.failover:
            # QEMU 7.2 keeps the QemuOpts of a failover primary given with -device for good:
            # after device_del it can never be plugged again ("Duplicate ID", and a new id is
            # "more than one primary").  Added over QMP it can, so kernel mode starts that way;
            # virtio-net keeps it hidden until the guest driver acks VIRTIO_NET_F_STANDBY.
            self.qmp.cmd("device_add", **self.primary_args())
        self.guest = Guest(self.workdir / "guest.sock")
        try:
            self.guest.wait_ready(BOOT_TIMEOUT_S)
        except VMError as e:
            raise VMError(f"{e}; console: {self.console_tail()}") from e
        self.boot_s = time.monotonic() - t0
        self.plugged = True
        self.probes = 1

    def console_tail(self, n: int = 6) -> str:
        try:
            text = (self.workdir / "console.log").read_text(errors="replace")
        except OSError:
            return "(none)"
        return " | ".join(text.strip().splitlines()[-n:])

    # -- faults ------------------------------------------------------------------------------
    def set_link(self, dev: str, up: bool) -> None:
        assert self.qmp is not None
        self.qmp.cmd("set_link", name=dev, up=up)

    def unplug(self, timeout: float = 30.0) -> tuple[float, float]:
        """device_del of the primary; returns (requested, DEVICE_DELETED) monotonic times."""
        assert self.qmp is not None
        t = time.monotonic()
        self.qmp.cmd("device_del", id="pri0")
        done = self.qmp.wait_event(
            "DEVICE_DELETED", t, timeout, lambda ev: ev.get("data", {}).get("device") == "pri0"
        )
        self.plugged = False
        return t, done

    def plug(self) -> tuple[float, float]:
        assert self.qmp is not None
        t = time.monotonic()
        self.qmp.cmd("device_add", **self.primary_args())
        self.plugged = True
        self.probes += 1
        return t, time.monotonic()

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit", timeout=5)
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


# ---- where the guest's frames leave: a packet socket on each tap -------------------------------

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_SOCKET = 1
SO_ATTACH_FILTER = 26


def _udp_from_guest_filter(port: int) -> bytes:
    """Classic BPF: frames the guest sent (not outgoing on the tap), IPv4/UDP to `port`."""
    ins = [
        (0x20, 0, 0, 0xFFFFF004),  # ld pkttype (SKF_AD_OFF + SKF_AD_PKTTYPE)
        (0x15, 7, 0, PACKET_OUTGOING),  # jeq outgoing -> drop
        (0x28, 0, 0, 12),  # ldh ethertype
        (0x15, 0, 5, 0x0800),  # jne IPv4 -> drop
        (0x30, 0, 0, 23),  # ldb ip proto
        (0x15, 0, 3, 17),  # jne UDP -> drop
        (0x28, 0, 0, 36),  # ldh udp dport (no IP options in our frames)
        (0x15, 0, 1, port),  # jne port -> drop
        (0x06, 0, 0, 64),  # accept 64 bytes
        (0x06, 0, 0, 0),  # drop
    ]
    return b"".join(struct.pack("HBBI", *i) for i in ins)


class TapWatch:
    """Records when the guest's UDP stream frames leave through each tap (host monotonic)."""

    def __init__(self, net: Net, port: int = UDP_PORT) -> None:
        self.socks: dict[str, socket.socket] = {}
        prog = _udp_from_guest_filter(port)
        buf = ctypes.create_string_buffer(prog)
        fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))
        with netns.entered(net.hv):
            for tap in (net.tap_sby, net.tap_pri):
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.setsockopt(SOL_SOCKET, SO_ATTACH_FILTER, fprog)
                s.bind((tap, 0))
                s.setblocking(False)
                self.socks[tap] = s
        self.times: dict[str, list[float]] = {t: [] for t in self.socks}
        self.stop_flag = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        by_fd = {s.fileno(): tap for tap, s in self.socks.items()}
        while not self.stop_flag:
            r, _, _ = select.select(list(by_fd), [], [], 0.1)
            now = time.monotonic()
            for fd in r:
                tap = by_fd[fd]
                s = self.socks[tap]
                while True:
                    try:
                        s.recv(64)
                    except BlockingIOError:
                        break
                    self.times[tap].append(now)

    def reset(self) -> None:
        for v in self.times.values():
            v.clear()

    def close(self) -> None:
        self.stop_flag = True
        self.thread.join(timeout=2)
        for s in self.socks.values():
            s.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

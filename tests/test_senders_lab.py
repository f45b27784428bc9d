"""Every sender on the failover device reaches its active lower, with either tx_path, in the
lab with failoverd: senders that skip the device's clsact egress (PACKET_QDISC_BYPASS,
AF_XDP in copy mode, netpoll/netconsole) and what a user's XDP program on it sends back
(XDP_TX, a redirect out of the same device).  Each is counted where it must come out: at
the far host, exactly as many as were sent (none lost, none handled twice), and in the
datapath's counters of the active lower."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bpfailover import netns
from bpfailover.datapath import attach, kheaders
from bpfailover.effects.ethtool import set_gro
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab
from tests.labutil import bring_up

pytestmark = pytest.mark.root

ETH_P_TEST = 0x88B5  # IEEE local experimental ethertype: nothing else in the lab sends it
N = 50
SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20


@pytest.fixture
def agent_factory(lab: Lab) -> Iterator[list[AgentRun]]:
    runs: list[AgentRun] = []
    yield runs
    for run in runs:
        run.cleanup()


def _up(lab: Lab, runs: list[AgentRun], tx_path: str) -> AgentRun:
    run = bring_up(lab, tx_path=tx_path)
    runs.append(run)
    return run


def _mac(ns: str, dev: str) -> bytes:
    out = netns.run_in(ns, ["ip", "-j", "link", "show", "dev", dev]).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def _frame(dst: bytes, src: bytes, tag: bytes, i: int) -> bytes:
    payload = tag + struct.pack("!I", i)
    return (dst + src + struct.pack("!H", ETH_P_TEST) + payload).ljust(60, b"\0")


def _active_tx(run: AgentRun) -> tuple[str, int]:
    """The active lower's name and the datapath's transmit packet count for it."""
    (lw,) = [lw for lw in run.group()["lowers"] if lw["active"]]
    return lw["name"], lw["tx_packets"]


# -- counting at the far host ------------------------------------------------------------------
_COUNT = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(int(sys.argv[2])))
    s.bind((sys.argv[1], 0))
    s.settimeout(0.2)
    tag, want, deadline = sys.argv[3].encode(), int(sys.argv[4]), float(sys.argv[5])
    print("ready", flush=True)
    seen = set()
    got = 0
    end = time.monotonic() + deadline
    while time.monotonic() < end and got < want:
        try:
            data, addr = s.recvfrom(2048)
        except TimeoutError:
            continue
        if addr[2] != 4 and data[14:14 + len(tag)] == tag:  # not PACKET_OUTGOING
            got += 1
            seen.add(data[14 + len(tag):18 + len(tag)])
    # a frame handled twice would show up late: look a little longer once all are in
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(2048)
        except TimeoutError:
            continue
        if addr[2] != 4 and data[14:14 + len(tag)] == tag:
            got += 1
    print(got, len(seen), flush=True)
    """
)


@contextmanager
def _counting(ns: str, dev: str, tag: bytes, want: int) -> Iterator[list[int]]:
    """A packet socket on `dev` in `ns` counts the ETH_P_TEST frames carrying `tag` that
    arrive (at most `want` waited for, 10 s): yields a list that holds [frames, distinct]
    after the block."""
    argv = [sys.executable, "-c", _COUNT, dev, str(ETH_P_TEST), tag.decode(), str(want), "10"]
    p = subprocess.Popen(netns.cmd_in(ns, argv), stdout=subprocess.PIPE, text=True)
    result: list[int] = []
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield result
        out, _ = p.communicate(timeout=30)
        result.extend(int(x) for x in out.split())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _assert_reached(run: AgentRun, lower: str, tx0: int, got: list[int], sender: str) -> None:
    name, tx1 = _active_tx(run)
    assert name == lower, f"the active lower changed during the test ({lower} -> {name})"
    assert got == [N, N], f"{sender}: the far host got {got} (frames, distinct) of {N}"
    assert tx1 - tx0 >= N, f"{sender}: the datapath sent {tx1 - tx0} through {lower}"


# -- PACKET_QDISC_BYPASS ---------------------------------------------------------------------
@pytest.mark.parametrize("tx_path", ["direct", "veth"])
def test_packet_qdisc_bypass_reaches_the_active_lower(
    lab: Lab, agent_factory: list[AgentRun], tx_path: str
) -> None:
    """An AF_PACKET socket with PACKET_QDISC_BYPASS transmits through dev_direct_xmit,
    which skips the failover device's clsact egress: its frames still leave through the
    active lower, each once."""
    run = _up(lab, agent_factory, tx_path)
    n = lab.names(0)
    dst = _mac(lab.peer, "eth0")
    src = bytes.fromhex(n.mac.replace(":", ""))
    lower, tx0 = _active_tx(run)
    with _counting(lab.peer, "eth0", b"qdisc-bypass", N) as got:
        with netns.entered(lab.guest):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            s.bind((n.failover, 0))
            for i in range(N):
                s.send(_frame(dst, src, b"qdisc-bypass", i))
        finally:
            s.close()
    _assert_reached(run, lower, tx0, got, "PACKET_QDISC_BYPASS")


# -- a user's XDP program on the failover device -------------------------------------------------
_XDP_SRC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

/* Send ETH_P_TEST frames tagged "xdp-ping" back where they came from, tagged "xdp-pong". */
int reflect(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    unsigned char *tag = data + sizeof(*eth), mac[ETH_ALEN];

    if ((void *)(tag + 8) > end || eth->h_proto != bpf_htons(0x88B5))
        return XDP_PASS;
    if (tag[0] != 'x' || tag[4] != 'p' || tag[5] != 'i')
        return XDP_PASS;
    __builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, mac, ETH_ALEN);
    tag[5] = 'o';
    tag[6] = 'n';
    tag[7] = 'g';
    return ACTION;
}
"""


@contextmanager
def _headers_env() -> Iterator[None]:
    """The kernel headers bcc needs for a program a test compiles itself; the environment
    is put back after the compile, so later tests see it as they would alone."""
    saved = os.environ.copy()
    os.environ.update(kheaders.find().env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def _user_xdp(lab: Lab, dev: str, action: str) -> Iterator[None]:
    """The reflecting program on `dev` in the guest (native XDP), removed after.  (Generic
    XDP never sees what the lowers' filters redirect up: the kernel passes redirected skbs
    by it.)"""
    from bcc import BPF

    with netns.entered(lab.guest):
        ifindex = socket.if_nametoindex(dev)
    act = "XDP_TX" if action == "tx" else f"bpf_redirect({ifindex}, 0)"
    with _headers_env():
        b = BPF(text=_XDP_SRC, cflags=[f"-DACTION={act}"])
    flags = BPF.XDP_FLAGS_DRV_MODE
    try:
        with netns.entered(lab.guest):
            b.attach_xdp(dev, b.load_func("reflect", BPF.XDP), flags)
        try:
            yield
        finally:
            with netns.entered(lab.guest):
                b.remove_xdp(dev, flags)
    finally:
        b.cleanup()


@pytest.mark.parametrize("tx_path", ["direct", "veth"])
@pytest.mark.parametrize("action", ["redirect", "tx"])
def test_user_xdp_on_the_failover_device_sends_through_the_active_lower(
    lab: Lab, agent_factory: list[AgentRun], tx_path: str, action: str
) -> None:
    """A user's XDP program on the failover device that sends a frame back (XDP_TX, or a
    redirect out of the same device) transmits into the hidden peer without passing the
    device's clsact egress: the frame still leaves through the active lower, once.  (For
    XDP_TX the agent puts its pass program on the peer, which makes veth wake the peer.)"""
    run = _up(lab, agent_factory, tx_path)
    n = lab.names(0)
    with _user_xdp(lab, n.failover, action):
        lower, tx0 = _active_tx(run)
        with _counting(lab.peer, "eth0", b"xdp-pong", N) as got:
            _pings(lab)
    _assert_reached(run, lower, tx0, got, f"XDP {action}")


def _pings(lab: Lab) -> None:
    """N frames tagged "xdp-ping" from the far host to the failover device's MAC."""
    src = _mac(lab.peer, "eth0")
    dst = bytes.fromhex(lab.names(0).mac.replace(":", ""))
    with netns.entered(lab.peer):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.bind(("eth0", 0))
        for i in range(N):
            s.send(_frame(dst, src, b"xdp-ping", i))
    finally:
        s.close()


def _features(ns: str, dev: str) -> tuple[str, str]:
    """(the peer's XDP program name or "", the device's TSO state) in `ns`."""
    info = json.loads(netns.run_in(ns, ["ip", "-j", "-d", "link", "show", "dev", dev]).stdout)[0]
    prog = info.get("xdp", {}).get("prog", {}).get("name", "")
    out = netns.run_in(ns, ["ethtool", "-k", dev]).stdout
    tso = [ln.split(":")[1].split()[0] for ln in out.splitlines() if ln.startswith("tcp-segm")]
    return prog, tso[0] if tso else "?"


def _settled(fn: Callable[[], str], want: str, what: str, tries: int = 100) -> None:
    """fn() becomes `want` (the agent acts on the kernel's event): waited for generously."""
    got = fn()
    for _ in range(tries):
        if got == want:
            return
        time.sleep(0.1)
        got = fn()
    assert got == want, f"{what}: {got}, expected {want}"


def test_the_peer_pass_program_follows_the_user_xdp_program(
    lab: Lab, agent_factory: list[AgentRun]
) -> None:
    """The agent's pass program sits on the hidden peer only while the failover device has
    a native XDP program: it comes with the user's program and goes with it, and the
    failover device gets its segmentation offload (which veth takes off while the peer
    has a program) back.  What changed while no agent ran is put right at start-up."""
    run = _up(lab, agent_factory, "direct")
    n = lab.names(0)
    peer = attach.peer_name(n.failover)

    def peer_prog() -> str:
        return _features(lab.guest, peer)[0]

    def tso() -> str:
        return _features(lab.guest, n.failover)[1]

    assert (peer_prog(), tso()) == ("", "on"), "no program on the peer without a user's"
    with _user_xdp(lab, n.failover, "tx"):
        _settled(peer_prog, "fo_peer_pass", "the peer's XDP program with the user's on")
        assert tso() == "off", "veth takes GSO off the failover device (the cost, stated)"
        run.stop()
    _settled(peer_prog, "fo_peer_pass", "left by the stopped agent")
    run.start()  # the user's program went while no agent ran: removed at start-up
    _settled(peer_prog, "", "the peer's XDP program at start without a user's")
    run.stop()
    with _user_xdp(lab, n.failover, "tx"):
        run.start()  # one there at start-up: served
        _settled(peer_prog, "fo_peer_pass", "the peer's XDP program at start with the user's")
    _settled(peer_prog, "", "the peer's XDP program once the user's is removed")
    assert tso() == "on", "the failover device's segmentation offload back"
    attached = [e.get("attached") for e in run.events("peer_pass")]
    assert attached[-2:] == [True, False], attached


BPF_LINK_CREATE, BPF_XDP = 28, 37


def _xdp_link(ns: str, prog_fd: int, ifindex: int) -> int:
    """BPF_LINK_CREATE: `prog_fd` on `ifindex` in `ns` in native mode; the link's fd."""
    from bpfailover.datapath import bpfsys

    attr = ctypes.create_string_buffer(bpfsys.ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, prog_fd, ifindex, BPF_XDP, attach.XDP_FLAGS_DRV_MODE)
    with netns.entered(ns):  # the ifindex is looked up in the caller's netns
        fd = _libc.syscall(bpfsys.SYS_BPF, BPF_LINK_CREATE, attr, bpfsys.ATTR_SIZE)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_LINK_CREATE")
    return int(fd)


def test_a_user_xdp_program_attached_through_a_bpf_link_is_served(
    lab: Lab, agent_factory: list[AgentRun]
) -> None:
    """An XDP program attached to the failover device through a bpf_link (libbpf's
    bpf_program__attach_xdp) sends no link event for the device itself, only for its peer,
    whose features veth changes: the agent's pass program comes with it (no re-read timer
    here) and goes when the link is closed, and its XDP_TX reaches the active lower."""
    from bcc import BPF

    run = bring_up(lab, tx_path="direct", address_resync_s=0)  # events only: no re-read timer
    agent_factory.append(run)
    n = lab.names(0)
    peer = attach.peer_name(n.failover)
    with _headers_env():
        b = BPF(text=_XDP_SRC, cflags=["-DACTION=XDP_TX"])
    try:
        fn = b.load_func("reflect", BPF.XDP)
        with netns.entered(lab.guest):
            ifindex = socket.if_nametoindex(n.failover)
        link_fd = _xdp_link(lab.guest, fn.fd, ifindex)
        try:
            _settled(lambda: _features(lab.guest, peer)[0], "fo_peer_pass", "with the link")
            lower, tx0 = _active_tx(run)
            with _counting(lab.peer, "eth0", b"xdp-pong", N) as got:
                _pings(lab)
            _assert_reached(run, lower, tx0, got, "XDP_TX (bpf_link)")
        finally:
            os.close(link_fd)  # the link's last fd: the program comes off
        _settled(lambda: _features(lab.guest, peer)[0], "", "once the link is closed")
    finally:
        b.cleanup()


# -- AF_XDP in copy mode -----------------------------------------------------------------------
AF_XDP = 44
SOL_XDP = 283
XDP_MMAP_OFFSETS, XDP_TX_RING, XDP_UMEM_REG = 1, 3, 4
XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING = 5, 6
XDP_COPY = 1 << 1
XDP_PGOFF_TX_RING = 0x80000000
XDP_UMEM_PGOFF_COMPLETION_RING = 0x180000000
FRAME = 2048
MAP_PRIVATE_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
RING = 64  # descriptors per ring (a power of two), >= N
_libc = ctypes.CDLL(None, use_errno=True)


def _sockopt(fd: int, opt: int, value: bytes) -> None:
    buf = ctypes.create_string_buffer(value, len(value))
    if _libc.setsockopt(fd, SOL_XDP, opt, buf, len(value)) != 0:
        raise OSError(ctypes.get_errno(), f"setsockopt(SOL_XDP, {opt})")


def _xsk_send(ifindex: int, frames: list[bytes]) -> int:
    """Send `frames` from an AF_XDP socket bound in copy mode to queue 0 of `ifindex` (in
    the calling thread's netns); returns how many completed.  The kernel's copy mode is
    xsk_generic_xmit -> __dev_direct_xmit: no qdisc, no clsact egress."""
    fd = _libc.socket(AF_XDP, socket.SOCK_RAW, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "socket(AF_XDP)")
    # the UMEM must be page-aligned: an anonymous mapping of its own
    mm = _libc.mmap
    mm.restype, mm.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long],
    )
    umem = mm(None, FRAME * RING, mmap.PROT_READ | mmap.PROT_WRITE, MAP_PRIVATE_ANON, -1, 0)
    maps: list[mmap.mmap] = []
    try:
        # struct xdp_umem_reg: addr, len, chunk_size, headroom, flags, tx_metadata_len
        reg = struct.pack("QQIIII", umem, FRAME * RING, FRAME, 0, 0, 0)
        _sockopt(fd, XDP_UMEM_REG, reg)
        for opt in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_TX_RING):
            _sockopt(fd, opt, struct.pack("I", RING))
        off = ctypes.create_string_buffer(128)
        size = ctypes.c_uint32(128)
        if _libc.getsockopt(fd, SOL_XDP, XDP_MMAP_OFFSETS, off, ctypes.byref(size)) != 0:
            raise OSError(ctypes.get_errno(), "getsockopt(XDP_MMAP_OFFSETS)")
        o = struct.unpack("16Q", off.raw)  # rx, tx, fill, completion: producer, consumer,
        tx_prod, tx_cons, tx_desc = o[4:7]  # desc, flags each
        cr_prod, cr_desc = o[12], o[14]
        tx = mmap.mmap(fd, tx_desc + RING * 16, offset=XDP_PGOFF_TX_RING)
        cr = mmap.mmap(fd, cr_desc + RING * 8, offset=XDP_UMEM_PGOFF_COMPLETION_RING)
        maps += [tx, cr]
        # struct sockaddr_xdp: family, flags, ifindex, queue_id, shared_umem_fd
        sxdp = struct.pack("HHIII", AF_XDP, XDP_COPY, ifindex, 0, 0)
        if _libc.bind(fd, sxdp, len(sxdp)) != 0:
            raise OSError(ctypes.get_errno(), "bind(AF_XDP, XDP_COPY)")
        for i, f in enumerate(frames):
            ctypes.memmove(umem + i * FRAME, f, len(f))
            struct.pack_into("QII", tx, tx_desc + i * 16, i * FRAME, len(f), 0)
        struct.pack_into("I", tx, tx_prod, len(frames))
        done = 0
        for _ in range(200):  # each kick sends what the kernel's budget allows
            _libc.sendto(fd, None, 0, socket.MSG_DONTWAIT, None, 0)
            done = struct.unpack_from("I", cr, cr_prod)[0]
            if done >= len(frames):
                break
        assert struct.unpack_from("I", tx, tx_cons)[0] == len(frames)
        return int(done)
    finally:
        for m in maps:
            m.close()
        os.close(fd)
        _libc.munmap(ctypes.c_void_p(umem), ctypes.c_size_t(FRAME * RING))


@pytest.mark.parametrize("tx_path", ["direct", "veth"])
def test_af_xdp_copy_mode_reaches_the_active_lower(
    lab: Lab, agent_factory: list[AgentRun], tx_path: str
) -> None:
    """An AF_XDP socket in copy mode transmits through __dev_direct_xmit, which skips the
    failover device's clsact egress: its frames still leave through the active lower."""
    run = _up(lab, agent_factory, tx_path)
    n = lab.names(0)
    dst = _mac(lab.peer, "eth0")
    src = bytes.fromhex(n.mac.replace(":", ""))
    lower, tx0 = _active_tx(run)
    frames = [_frame(dst, src, b"af-xdp-copy", i) for i in range(N)]
    with _counting(lab.peer, "eth0", b"af-xdp-copy", N) as got, netns.entered(lab.guest):
        done = _xsk_send(socket.if_nametoindex(n.failover), frames)
    assert done == N, f"AF_XDP completed {done} of {N}"
    _assert_reached(run, lower, tx0, got, "AF_XDP copy mode")


# -- netconsole (netpoll) ------------------------------------------------------------------------
_UDP_COUNT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.settimeout(10)
    tag, want, got = sys.argv[3].encode(), int(sys.argv[4]), 0
    print("ready", flush=True)
    try:
        while got < want:
            got += tag in s.recv(2048)
    except TimeoutError:
        pass
    print(got, flush=True)
    """
)
NETCONSOLE_PORT = 6666


def _netconsole_available() -> str | None:
    """Why netconsole cannot be used here, or None."""
    if "configfs" not in Path("/proc/filesystems").read_text():
        return "the kernel has no configfs (CONFIG_CONFIGFS_FS), which netconsole's targets need"
    if Path("/sys/module/netconsole").is_dir():
        return None
    if subprocess.run(["modprobe", "netconsole"], capture_output=True).returncode != 0:
        return "the kernel has no netconsole (CONFIG_NETCONSOLE) and no module to load"
    return None


@pytest.mark.parametrize("tx_path", ["direct", "veth"])
def test_netconsole_reaches_the_active_lower(
    lab: Lab, agent_factory: list[AgentRun], tx_path: str
) -> None:
    """netpoll (netconsole) calls the device's ndo_start_xmit directly, past qdisc and
    clsact egress: kernel messages still reach the far host through the active lower."""
    why = _netconsole_available()
    if why is not None:
        pytest.skip(why)
    run = _up(lab, agent_factory, tx_path)
    n = lab.names(0)
    lower, tx0 = _active_tx(run)
    cfg = Path("/sys/kernel/config")
    if not (cfg / "netconsole").is_dir():
        subprocess.run(["mount", "-t", "configfs", "configfs", str(cfg)], check=True)
    target = cfg / "netconsole" / f"bpfailover-{lab.prefix}"
    tag, count = "bpfailover-netconsole", 5
    argv = [sys.executable, "-c", _UDP_COUNT, n.peer_v4, str(NETCONSOLE_PORT), tag, str(count)]
    srv = subprocess.Popen(netns.cmd_in(lab.peer, argv), stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        target.mkdir()
        for key, value in (
            ("dev_name", n.failover),
            ("local_ip", n.guest_v4),
            ("remote_ip", n.peer_v4),
            ("remote_mac", _mac(lab.peer, "eth0").hex(":")),
            ("remote_port", str(NETCONSOLE_PORT)),
        ):
            (target / key).write_text(value)
        # netpoll looks its device up in the netns of whoever enables the target
        with netns.entered(lab.guest):
            (target / "enabled").write_text("1")
        with open("/dev/kmsg", "w") as kmsg:
            for i in range(count):
                kmsg.write(f"{tag} {i}\n")
                kmsg.flush()
        out, _ = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        if target.is_dir():
            (target / "enabled").write_text("0")
            target.rmdir()
    name, tx1 = _active_tx(run)
    assert int(out.split()[-1]) == count, f"the far host got {out.strip()} of {count} messages"
    assert name == lower and tx1 - tx0 >= count, f"{name}: {tx1 - tx0} sent"


# -- an older datapath on restart --------------------------------------------------------------
def test_restart_attaches_the_peer_program_an_older_agent_left_out(
    lab: Lab, agent_factory: list[AgentRun]
) -> None:
    """A datapath adopted on restart from an agent that put the transmit program on the
    failover device's egress only (tx_path direct) gets it on the hidden peer as well."""
    from pyroute2 import IPRoute

    run = _up(lab, agent_factory, "direct")
    n = lab.names(0)
    peer = attach.peer_name(n.failover)
    with netns.entered(lab.guest), IPRoute() as ipr:
        peer_ifx = ipr.link_lookup(ifname=peer)[0]
        master_ifx = ipr.link_lookup(ifname=n.failover)[0]
        assert attach.tc_attached(ipr, peer_ifx, "ingress")
        run.stop()
        attach.detach_tc(ipr, peer_ifx, "ingress")  # what an older agent left
        assert not attach.tc_attached(ipr, peer_ifx, "ingress")
        set_gro(peer, False)
    run.start()
    with netns.entered(lab.guest), IPRoute() as ipr:
        assert attach.tc_attached(ipr, peer_ifx, "ingress"), "the peer's program at restart"
        assert attach.tc_attached(ipr, master_ifx, "egress"), "the egress program kept"
    assert run.group()["tx_path"] == "direct"
    out = netns.run_in(lab.guest, ["ethtool", "-k", peer]).stdout
    assert "generic-receive-offload: on" in out, "GRO on the peer (an XDP redirect target)"


def test_a_datapath_pinned_without_the_peer_pass_program_gets_it(pin_dir: Path) -> None:
    """A datapath an older loader pinned has no pass program for the hidden peer: the agent
    opening it makes one (no compiler needed) and pins it next to the others."""
    from bpfailover.datapath import bpfsys
    from bpfailover.datapath.loader import PEER_PASS
    from bpfailover.datapath.maps import Datapath

    Datapath.open(pin_dir).close()
    (pin_dir / PEER_PASS).unlink()  # what an older loader left
    with Datapath.open(pin_dir, load=False) as dp:
        assert (pin_dir / PEER_PASS).exists(), "pinned again"
        info = bpfsys.prog_info(dp.prog_fd(PEER_PASS))
        assert (info.type, info.name) == (bpfsys.BPF_PROG_TYPE_XDP, "fo_peer_pass")
        run = bpfsys.prog_test_run(dp.prog_fd(PEER_PASS), bytes(64))
        assert run.retval == bpfsys.XDP_PASS
    with Datapath.open(pin_dir, load=False) as again:  # and adopted from the pin after
        assert again.prog_id(PEER_PASS) == info.id

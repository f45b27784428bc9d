"""`python -m bench.proving_ground.vlan`: a VLAN on the failover device, through real drivers.

The e1000e (like a VF) and QEMU's virtio-net (with VIRTIO_NET_F_CTRL_VLAN) filter VLAN ids:
a VLAN on the failover device receives nothing through them unless its id is in their
filters (net_failover: ndo_vlan_rx_add_vid on both lowers; bpfailover: one admin-down VLAN
device per lower, docs/operators.md).  Per mode (kernel net_failover, bpfailover), one boot:

  1. VLAN 100 on the failover device: tagged echo requests from the peer answered through
     the e1000e (bpfailover: with failoverd stopped, SIGSTOP, so nothing is programmed);
  2. the e1000e unplugged (`device_del`), the bridge's entry for its port deleted (the
     migration script's step): answered through virtio (bpfailover: first still stopped,
     the control; then resumed, it programs virtio's filter);
  3. the e1000e plugged again: its filter gets the id too, answered through it.

The lab kernel on the host has no 8021q, so the peer speaks VLAN through a packet socket:
tagged ICMP echo requests out, echo replies from the guest's VLAN address counted in.  The
guest's neighbour entry for the peer is static (no tagged ARP needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.proving_ground import image
from bench.proving_ground.run import GROUP, Mode, Settings
from bench.proving_ground.vm import MAC, Net, VMError, sh

VID = 100
GUEST_VLAN_V4 = "198.18.100.1"
PEER_VLAN_V4 = "198.18.100.2"
RESULTS = image.REPO / "bench" / "results"

PEER = r"""
import socket, struct, sys, time
ifname, dst_mac, vid, src_ip, dst_ip, count = sys.argv[1:7]
vid, count = int(vid), int(count)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
s.settimeout(0.05)
src_mac = s.getsockname()[4]
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack(f"!{len(b)//2}H", b)); t = (t >> 16) + (t & 0xFFFF); t += t >> 16
    return ~t & 0xFFFF
def frame(seq):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq) + b"vlan" * 8
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return (bytes.fromhex(dst_mac.replace(":", "")) + src_mac + struct.pack("!HH", 0x8100, vid)
            + b"\x08\x00" + ip + icmp)
got = set()
for seq in range(count):
    s.send(frame(seq))
    end = time.monotonic() + 0.1
    while time.monotonic() < end:
        try:
            data = s.recv(2048)
        except TimeoutError:
            continue
        off = 18 if data[12:14] == b"\x81\x00" else 14  # tag in the frame or in metadata
        if data[off - 2:off] != b"\x08\x00" or len(data) < off + 28:
            continue
        ip = data[off:]
        if ip[9] == 1 and ip[12:16] == socket.inet_aton(dst_ip) and ip[20] == 0:
            if struct.unpack("!H", ip[24:26])[0] == 0x4242:
                got.add(struct.unpack("!H", ip[26:28])[0])
print(len(got), flush=True)
"""


def _answers(net: Net, mac: str, count: int = 20) -> int:
    out = sh(
        [
            sys.executable,
            "-c",
            PEER,
            "eth0",
            mac,
            str(VID),
            PEER_VLAN_V4,
            GUEST_VLAN_V4,
            str(count),
        ],
        net.peer,
        timeout=60,
    )
    return int(out.strip().splitlines()[-1])


def _peer_mac(net: Net) -> str:
    return sh(["cat", "/sys/class/net/eth0/address"], net.peer).strip()


def _master(m: Mode) -> str:
    if m.name == "kernel":
        return str(m.by_driver("net_failover")["name"])  # type: ignore[index]
    return GROUP


def _vlan_up(m: Mode, peer_mac: str) -> None:
    dev = _master(m)
    m.g.sh(
        f"ip link add link {dev} name vl{VID} type vlan id {VID} && "
        f"ip addr add {GUEST_VLAN_V4}/24 dev vl{VID} && ip link set vl{VID} up && "
        f"ip neigh replace {PEER_VLAN_V4} lladdr {peer_mac} dev vl{VID} nud permanent"
    )


def _active_standby(m: Mode) -> bool:
    if m.name == "kernel":
        pri = m.by_driver("e1000e")
        return pri is not None and not pri["carrier"]
    st = m.agent_status()
    return bool(st and st.get("active") == "standby")


def _unplug(m: Mode, net: Net) -> None:
    """The VF hot-unplugged (as for a migration); the bridge forgets its port, as the
    migration script does (net_failover sends no GARP)."""
    m.vm.unplug()
    net.fdb_del(MAC, net.tap_pri)
    time.sleep(1.0)


def check(mode: str, img: image.Image, s: Settings) -> dict[str, Any]:
    net = Net(s.prefix)
    net.up()
    m = Mode(mode, img, net, s)
    out: dict[str, Any] = {"mode": mode}
    try:
        m.start()
        out["guest_kernel"] = m.vm.guest.hello["kernel"]  # type: ignore[union-attr]
        mac, peer_mac = _group_mac(m), _peer_mac(net)
        if mode == "bpfailover":
            # the control: nobody programs the lowers' filters while failoverd is stopped
            # (the datapath's own per-packet check still moves traffic off the unplugged VF)
            assert m.agent_h is not None
            m.g.req("kill", h=m.agent_h, sig=19)  # SIGSTOP
            _vlan_up(m, peer_mac)
            time.sleep(1.0)
            out["no_filter_e1000e"] = _answers(net, mac)
            _unplug(m, net)
            out["no_filter_virtio"] = _answers(net, mac)
            m.g.req("kill", h=m.agent_h, sig=18)  # SIGCONT: failoverd sees the VLAN
            m.wait(lambda: _active_standby(m), 30, "failoverd on the standby")
            m.wait(lambda: "vlan_filter" in m.agent_log(), 30, "failoverd's vlan_filter event")
            time.sleep(0.5)
            out["virtio"] = _answers(net, mac)
        else:
            _vlan_up(m, peer_mac)
            time.sleep(1.0)
            out["e1000e"] = _answers(net, mac)
            _unplug(m, net)
            out["virtio"] = _answers(net, mac)
        # a VF plugged later: its filter gets the id too (net_failover: vlan_vids_add_by_dev)
        m.vm.plug()
        m.wait(m.on_primary, 90, "traffic on the re-plugged primary")
        net.fdb_del(MAC, net.tap_sby)  # (the guest sends nothing unasked: forget virtio's port)
        time.sleep(1.0)
        out["e1000e_replugged"] = _answers(net, mac)
        out["vlan_devices"] = m.g.sh("ip -br link show type vlan", check=False)
        if mode == "bpfailover":
            out["agent_events"] = [ln for ln in m.agent_log().splitlines() if '"vlan_filter' in ln][
                -4:
            ]
    except (VMError, OSError, AssertionError) as e:
        out["error"] = str(e)
    finally:
        m.close()
        net.down()
    return out


def _group_mac(m: Mode) -> str:
    pri = m.by_driver("e1000e")
    assert pri is not None
    return str(pri["mac"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="kernel,bpfailover")
    ap.add_argument("--prefix", default="pg")
    args = ap.parse_args(argv)
    img, _ = image.ensure_image()
    s = Settings(prefix=args.prefix, workdir=Path(f"/tmp/bpfailover-{args.prefix}-vlan"))
    s.workdir.mkdir(parents=True, exist_ok=True)
    res = [check(mode, img, s) for mode in args.modes.split(",")]
    print(json.dumps(res, indent=2))
    (RESULTS / "proving_ground_vlan.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0 if all("error" not in r for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Peer notification after a switch: gratuitous ARP and unsolicited neighbour adverts.

Sent through the new active lower itself (an AF_PACKET socket bound to it),
so the switch in front of the VM learns the MAC on the new port at once —
bonding's num_grat_arp / num_unsol_na; net_failover has none.
"""

from __future__ import annotations

import socket
import struct

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ALL_NODES_MAC = bytes.fromhex("333300000001")
ALL_NODES = socket.inet_pton(socket.AF_INET6, "ff02::1")


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def garp(mac: str, ip: str) -> bytes:
    """ARP request with sender = target = ip (what bonding and the kernel send)."""
    m, a = mac_bytes(mac), socket.inet_aton(ip)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + m + a + b"\0" * 6 + a
    return (BROADCAST + m + struct.pack("!H", ETH_P_ARP) + arp).ljust(60, b"\0")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unsolicited_na(mac: str, ip6: str) -> bytes:
    """Neighbour advertisement to all-nodes, Override set, with our link-layer address."""
    m, target = mac_bytes(mac), socket.inet_pton(socket.AF_INET6, ip6)
    # type 136, code 0, checksum, flags: Override (0x20000000); target; option 2 (TLLA)
    icmp = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + target + struct.pack("!BB", 2, 1) + m
    pseudo = target + ALL_NODES + struct.pack("!I3xB", len(icmp), 58)
    icmp = icmp[:2] + struct.pack("!H", _checksum(pseudo + icmp)) + icmp[4:]
    ip6h = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + target + ALL_NODES
    return ALL_NODES_MAC + m + struct.pack("!H", ETH_P_IPV6) + ip6h + icmp


def frames_for(mac: str, addresses: list[tuple[int, str]]) -> list[bytes]:
    out = []
    for family, addr in addresses:
        if family == socket.AF_INET:
            out.append(garp(mac, addr))
        elif family == socket.AF_INET6:
            out.append(unsolicited_na(mac, addr))
    return out


_sock: socket.socket | None = None


def send(ifname: str, frames: list[bytes]) -> int:
    """Send raw frames out of ifname; returns how many went.

    One unbound AF_PACKET socket for the agent's life: closing a packet socket waits for
    an RCU grace period (~16 ms measured), which a socket per switch put on the event loop.
    """
    global _sock
    if not frames:
        return 0
    if _sock is None:
        # protocol 0: a send-only socket, nothing is queued to it on receive
        _sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    for frame in frames:
        _sock.sendto(frame, (ifname, 0))
    return len(frames)

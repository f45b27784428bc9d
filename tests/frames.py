"""Crafted frames for BPF_PROG_TEST_RUN tests: Ethernet + ARP / IPv4 / IPv6 (checksums
are not checked by our programs, so they are left zero except where noted)."""

from __future__ import annotations

import socket
import struct

MAC = "52:54:00:00:12:53"
PEER_MAC = "52:54:00:00:99:02"


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def eth(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    frame = mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload
    return frame.ljust(60, b"\0")  # minimum Ethernet frame without FCS


def arp_request(src_mac: str, src_ip: str, dst_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac_bytes(src_mac)
    body += socket.inet_aton(src_ip) + b"\0" * 6 + socket.inet_aton(dst_ip)
    return eth("ff:ff:ff:ff:ff:ff", src_mac, 0x0806, body)


def ipv4_udp(dst_mac: str, src_mac: str, src: str, dst: str, payload: bytes = b"x" * 18) -> bytes:
    udp = struct.pack("!HHHH", 9000, 9000, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        1,
        0,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return eth(dst_mac, src_mac, 0x0800, ip + udp)


def ipv6_udp(dst_mac: str, src_mac: str, src: str, dst: str, payload: bytes = b"y" * 18) -> bytes:
    udp = struct.pack("!HHHH", 9000, 9000, 8 + len(payload), 0) + payload
    ip6 = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64)
    ip6 += socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    return eth(dst_mac, src_mac, 0x86DD, ip6 + udp)

"""Link-layer multicast sync: the failover device's list onto both lowers.

net_failover does dev_mc_sync_multiple(); a real VF filters what it receives,
so a group joined on the failover device must be joined on the lowers too.
Only the addresses we added are ever removed from a lower.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCADDMULTI = 0x8931
SIOCDELMULTI = 0x8932
DEV_MCAST = "/proc/net/dev_mcast"


def read_lists(path: str = DEV_MCAST) -> dict[str, set[str]]:
    """ifname -> link-layer multicast addresses (as `ip maddr` shows them)."""
    out: dict[str, set[str]] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5:
                hexaddr = parts[4]
                mac = ":".join(hexaddr[i : i + 2] for i in range(0, len(hexaddr), 2))
                out.setdefault(parts[1], set()).add(mac)
    return out


def _ioctl(req: int, ifname: str, mac: str) -> None:
    hw = bytes(int(x, 16) for x in mac.split(":"))
    ifr = struct.pack("16sH14s", ifname.encode(), socket.AF_UNSPEC, hw)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), req, ifr)


def sync(master: str, lowers: dict[int, str], added: dict[int, set[str]]) -> dict[int, set[str]]:
    """Make each lower carry the master's list; returns what we have added per lower."""
    lists = read_lists()
    want = lists.get(master, set())
    result: dict[int, set[str]] = {}
    for ifindex, name in lowers.items():
        have = lists.get(name, set())
        ours = set(added.get(ifindex, set()))
        for mac in sorted(want - have):
            _ioctl(SIOCADDMULTI, name, mac)
            ours.add(mac)
        for mac in sorted(ours - want):
            _ioctl(SIOCDELMULTI, name, mac)
            ours.discard(mac)
        result[ifindex] = ours & want
    return result

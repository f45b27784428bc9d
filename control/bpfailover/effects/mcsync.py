"""Link-layer address lists: the failover device's multicast and unicast lists onto both
lowers.

net_failover does dev_mc_sync_multiple() and dev_uc_sync_multiple(): a real VF filters
what it receives, so a group joined on the failover device (an application's IGMP/MLD
join, `ip maddr add`) and a unicast address on its list (a macvlan on top of it) must be
on the lowers' lists too.  Only the addresses we added are ever removed from a lower.

From user space the two lists are reached differently:
* multicast: read in /proc/net/dev_mcast, written with SIOCADDMULTI/SIOCDELMULTI;
* unicast: neither /proc nor an ioctl has it.  The FDB "self" entries of rtnetlink are
  the device's own lists (`bridge fdb show dev X self`; the kernel's default
  ndo_fdb_dump lists dev->uc and dev->mc), and `bridge fdb add MAC dev X self permanent`
  is dev_uc_add_excl() (ndo_dflt_fdb_add) -- the driver then programs its filter (a VF
  asks its PF for the MAC filter, e1000e writes a receive-address register) or goes
  promiscuous if it has none.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

SIOCADDMULTI = 0x8931
SIOCDELMULTI = 0x8932
DEV_MCAST = "/proc/net/dev_mcast"

AF_BRIDGE = 7
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
NDA_LLADDR = 2
NTF_SELF = 0x02
NUD_PERMANENT = 0x80
_NLMSG = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BBHiHBB")
_RTA = struct.Struct("=HH")


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
    """Make each lower carry the master's multicast list; returns what we have added."""
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


def remove(name: str, macs: set[str]) -> None:
    """Take the multicast addresses we added off a lower that leaves its group
    (net_failover's dev_mc_unsync); one already gone is no error."""
    for mac in sorted(macs):
        try:
            _ioctl(SIOCDELMULTI, name, mac)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


# -- unicast: the FDB "self" entries -----------------------------------------------------------
def _mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _is_unicast(mac: str) -> bool:
    return not int(mac[:2], 16) & 1


def _request(sock: socket.socket, mtype: int, flags: int, payload: bytes) -> list[bytes]:
    """Send one request; the bodies of the answer's messages (a dump's entries)."""
    sock.send(_NLMSG.pack(_NLMSG.size + len(payload), mtype, flags, 1, 0) + payload)
    bodies: list[bytes] = []
    while True:
        buf = sock.recv(1 << 16)
        off = 0
        while off + _NLMSG.size <= len(buf):
            length, t, _f, _seq, _pid = _NLMSG.unpack_from(buf, off)
            if length < _NLMSG.size:
                return bodies
            body = buf[off + _NLMSG.size : off + length]
            if t == NLMSG_DONE:
                return bodies
            if t == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", body)
                if err:
                    raise OSError(-err, os.strerror(-err))
                return bodies
            bodies.append(body)
            off += (length + 3) & ~3


def _socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    s.bind((0, 0))
    return s


def read_uc_lists() -> dict[int, set[str]]:
    """ifindex -> unicast addresses on its list (dev->uc; the device's own address, which
    is not on that list, is not included)."""
    out: dict[int, set[str]] = {}
    with _socket() as s:
        bodies = _request(
            s, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, _NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0, 0, 0)
        )
    for body in bodies:
        if len(body) < _NDMSG.size:
            continue
        _fam, _p1, _p2, ifindex, _state, flags, _type = _NDMSG.unpack_from(body)
        if not flags & NTF_SELF:
            continue  # a bridge's learned entries, not the device's own list
        off = _NDMSG.size
        while off + 4 <= len(body):
            alen, atype = _RTA.unpack_from(body, off)
            if alen < 4:
                break
            if atype == NDA_LLADDR and alen == 10:
                mac = _mac_str(body[off + 4 : off + 10])
                if _is_unicast(mac):
                    out.setdefault(ifindex, set()).add(mac)
            off += (alen + 3) & ~3
    return out


def _fdb(mtype: int, ifindex: int, mac: str) -> None:
    hw = bytes(int(x, 16) for x in mac.split(":"))
    attr = _RTA.pack(4 + 6, NDA_LLADDR) + hw + b"\0\0"
    nd = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT, NTF_SELF, 0)
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if mtype == RTM_NEWNEIGH else 0)
    with _socket() as s:
        _request(s, mtype, flags, nd + attr)


def uc_add(ifindex: int, mac: str) -> bool:
    """`bridge fdb add MAC dev IFINDEX self permanent`; False if it was already there
    (someone else's: then it is not ours to remove)."""
    try:
        _fdb(RTM_NEWNEIGH, ifindex, mac)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return False
        raise
    return True


def uc_del(ifindex: int, mac: str) -> None:
    try:
        _fdb(RTM_DELNEIGH, ifindex, mac)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def remove_uc(ifindex: int, macs: set[str]) -> None:
    """The same for the unicast addresses we added (net_failover's dev_uc_unsync)."""
    for mac in sorted(macs):
        uc_del(ifindex, mac)


def sync_uc(master: int, lowers: dict[int, str], added: dict[int, set[str]]) -> dict[int, set[str]]:
    """Make each lower carry the master's unicast list; returns what we have added."""
    lists = read_uc_lists()
    want = lists.get(master, set())
    result: dict[int, set[str]] = {}
    for ifindex in lowers:
        have = lists.get(ifindex, set())
        ours = set(added.get(ifindex, set()))
        for mac in sorted(want - have):
            if uc_add(ifindex, mac):
                ours.add(mac)
        for mac in sorted(ours - want):
            uc_del(ifindex, mac)
            ours.discard(mac)
        result[ifindex] = ours & want
    return result

"""The ethtool ioctls bpfailover needs, without the ethtool binary.

An ioctl answers for the caller's network namespace even where /sys belongs to
another one (failoverd --netns), and for netdevs with no device in /sys."""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GSET = 0x01
ETHTOOL_GDRVINFO = 0x03
ETHTOOL_SGRO = 0x2C
DRVINFO_SIZE = 196  # struct ethtool_drvinfo; the driver name is bytes 4..36
# struct ethtool_cmd (ETHTOOL_GSET, 44 bytes): speed (low 16 bits) at 12, duplex at 14,
# speed_hi at 28.  The legacy call, answered from get_link_ksettings by every kernel.
_CMD = struct.Struct("=IIIHBBBBBBIIHBBI8x")
SPEED_UNKNOWN = 0xFFFFFFFF
DUPLEX = {0: "half", 1: "full"}


def _ioctl(ifname: str, buf: ctypes.Array[ctypes.c_char]) -> None:
    ifr = struct.pack("16sQ", ifname.encode()[:15], ctypes.addressof(buf))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)


def driver_of(ifname: str) -> str | None:
    """`ethtool -i IFNAME`'s driver, or None if the netdev is gone or will not say."""
    info = ctypes.create_string_buffer(struct.pack("=I", ETHTOOL_GDRVINFO), DRVINFO_SIZE)
    try:
        _ioctl(ifname, info)
    except OSError:
        return None
    return info.raw[4:36].split(b"\0", 1)[0].decode() or None


def set_gro(ifname: str, on: bool) -> None:
    """`ethtool -K IFNAME gro on|off`; raises OSError if the netdev refuses."""
    _ioctl(ifname, ctypes.create_string_buffer(struct.pack("=II", ETHTOOL_SGRO, int(on))))


def link_speed(ifname: str) -> tuple[int | None, str | None]:
    """`ethtool IFNAME`'s Speed (Mb/s) and Duplex; None where the driver does not know
    (no carrier, virtio_net without a configured speed) or the netdev is gone."""
    buf = ctypes.create_string_buffer(_CMD.pack(ETHTOOL_GSET, *([0] * 15)), _CMD.size)
    try:
        _ioctl(ifname, buf)
    except OSError:
        return None, None
    f = _CMD.unpack(buf.raw)
    speed = f[3] | (f[12] << 16)
    if speed in (0, SPEED_UNKNOWN, 0xFFFF):
        return None, DUPLEX.get(f[4])
    return speed, DUPLEX.get(f[4])

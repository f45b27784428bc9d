"""The two ethtool ioctls bpfailover needs, without the ethtool binary.

An ioctl answers for the caller's network namespace even where /sys belongs to
another one (failoverd --netns), and for netdevs with no device in /sys."""

from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x03
ETHTOOL_SGRO = 0x2C
DRVINFO_SIZE = 196  # struct ethtool_drvinfo; the driver name is bytes 4..36


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

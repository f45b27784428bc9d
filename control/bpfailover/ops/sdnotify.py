"""systemd's notify protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET.

No library: the protocol is a text datagram to a Unix socket (a path, or `@name` for an
abstract one).  Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send e.g. "READY=1" or "WATCHDOG=1"; False when there is nobody to tell."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(1.0)  # a datagram to a live systemd never waits this long
            s.sendto(message.encode(), target)
    except OSError:
        return False
    return True


def watchdog_interval_ms() -> int | None:
    """Half of WatchdogSec (systemd's advice), if the watchdog is on and meant for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return max(1, int(usec) // 2000)

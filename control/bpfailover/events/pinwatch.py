"""Pins removed by hand while the agent runs (`rm -r /sys/fs/bpf/bpfailover`).

Forwarding never depends on the pins: attached programs and the agent's open fds keep
programs and maps alive.  But without them the next failoverd would load a fresh datapath
(counters and override lost), and without the directory its lock is gone, so a second
agent could start writing.  An inotify watch on the pin directory tells the agent, which
pins everything back from its own fds and locks the directory again (Datapath.repin).
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_MOVED_FROM = 0x40
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(None, use_errno=True)


class PinWatch:
    """Non-blocking inotify fd watching one directory for removals (for a selector)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.wd = -1
        self.watch()

    def watch(self) -> None:
        """(Re)arm the watch on the directory (again after it was re-created)."""
        mask = IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF
        self.wd = _libc.inotify_add_watch(self.fd, str(self.path).encode(), mask)
        if self.wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {self.path}")

    def fileno(self) -> int:
        return self.fd

    def read(self) -> tuple[bool, bool]:
        """Drain the queue: (a pin went, the directory itself went)."""
        pin_gone = dir_gone = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return pin_gone, dir_gone
            off = 0
            while off + _EVENT.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                off += _EVENT.size + length
                if mask & (IN_DELETE | IN_MOVED_FROM):
                    pin_gone = True
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                    dir_gone = True

    def close(self) -> None:
        os.close(self.fd)

"""inotify(7) through libc: what the agent's two directory watches share (udev's database,
the pin directory).  The fds are non-blocking and close-on-exec, for the agent's selector."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from pathlib import Path

IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

_libc = ctypes.CDLL(None, use_errno=True)


def init() -> int:
    fd: int = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    return fd


def add_watch(fd: int, path: Path, mask: int) -> int:
    wd: int = _libc.inotify_add_watch(fd, str(path).encode(), mask)
    if wd < 0:
        raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
    return wd


def rm_watch(fd: int, wd: int) -> None:
    _libc.inotify_rm_watch(fd, wd)


def drain(fd: int) -> Iterator[tuple[int, str]]:
    """Every queued event as (mask, name: '' for the watched directory itself), until the
    queue is empty."""
    while True:
        try:
            buf = os.read(fd, 65536)
        except BlockingIOError:
            return
        off = 0
        while off + _EVENT.size <= len(buf):
            _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
            raw = buf[off + _EVENT.size : off + _EVENT.size + length]
            off += _EVENT.size + length
            yield mask, raw.rstrip(b"\0").decode(errors="replace")

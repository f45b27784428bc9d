"""Pins removed by hand while the agent runs (`rm -r /sys/fs/bpf/bpfailover`).

Forwarding never depends on the pins: attached programs and the agent's open fds keep
programs and maps alive.  But without them the next failoverd would load a fresh datapath
(counters and override lost), and without the directory its lock is gone, so a second
agent could start writing.  An inotify watch on the pin directory tells the agent, which
pins everything back from its own fds and locks the directory again (Datapath.repin).
"""

from __future__ import annotations

import os
from pathlib import Path

from bpfailover.events import inotify
from bpfailover.events.inotify import (
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
)


class PinWatch:
    """Non-blocking inotify fd watching one directory for removals (for a selector)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = inotify.init()
        self.wd = -1
        self.watch()

    def watch(self) -> None:
        """(Re)arm the watch on the directory (again after it was re-created)."""
        mask = IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF
        self.wd = inotify.add_watch(self.fd, self.path, mask)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> tuple[bool, bool]:
        """Drain the queue: (a pin went, the directory itself went)."""
        pin_gone = dir_gone = False
        for mask, _name in inotify.drain(self.fd):
            if mask & (IN_DELETE | IN_MOVED_FROM):
                pin_gone = True
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                dir_gone = True
        return pin_gone, dir_gone

    def close(self) -> None:
        os.close(self.fd)

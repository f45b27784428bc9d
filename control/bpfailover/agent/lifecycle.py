"""The process around the agent's loop: signals, stop(), systemd's readiness and watchdog.

Signals come in through one wake-up pipe (signal.set_wakeup_fd: the C handler writes the
signal's number), and stop() writes a 0: the loop acts on them between events, not in a
handler that interrupts a switch half done.  A handler alone would not end a select() with
no timers either (PEP 475 retries it).  systemd (Type=notify) hears READY=1 once every
failover device forwards, and WATCHDOG=1 from the loop itself: a stalled loop stops the pings.
"""

from __future__ import annotations

import contextlib
import os

from bpfailover.ops import sdnotify


class Lifecycle:
    def __init__(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watchdog_ms = sdnotify.watchdog_interval_ms()
        self.watchdog_due_ms: int | None = None  # a timer of the loop

    def fileno(self) -> int:
        """The pipe's read end, for the loop's selector."""
        return self.wake_r

    def signals(self) -> bytes:
        """The signal numbers that came in (0: stop()), drained."""
        try:
            return os.read(self.wake_r, 512)
        except BlockingIOError:
            return b""

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed
            os.write(self.wake_w, b"\0")

    def ready(self, groups: int, now_ms: int) -> None:
        sdnotify.notify(f"READY=1\nSTATUS=serving {groups} group(s)\nMAINPID={os.getpid()}")
        if self.watchdog_ms is not None:
            sdnotify.notify("WATCHDOG=1")
            self.watchdog_due_ms = now_ms + self.watchdog_ms

    def tick(self, now_ms: int) -> None:
        """The watchdog's ping, when due."""
        if self.watchdog_due_ms is not None and self.watchdog_due_ms <= now_ms:
            assert self.watchdog_ms is not None
            sdnotify.notify("WATCHDOG=1")
            self.watchdog_due_ms = now_ms + self.watchdog_ms

    def stopping(self) -> None:
        sdnotify.notify("STOPPING=1")

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

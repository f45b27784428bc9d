"""Pins removed by hand (`rm -r` of the pin directory, or one pin): put back.

The pinned maps and programs keep forwarding while the agent holds their fds; the pins are
only names.  One pin gone may be the start of an `rm -r`: wait for it to finish (500 ms)
rather than fight it; the directory gone means it is done: put everything back now.
"""

from __future__ import annotations

from bpfailover.datapath.maps import Datapath, DatapathError
from bpfailover.events.pinwatch import PinWatch
from bpfailover.ops.eventlog import event

SETTLE_MS = 500


class Pins:
    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.watch = PinWatch(dp.pin_dir)
        self.due_ms: int | None = None  # when to put the pins back (a timer of the loop)

    def fileno(self) -> int:
        return self.watch.fileno()

    def on_ready(self, now_ms: int) -> None:
        pin_gone, dir_gone = self.watch.read()
        if dir_gone:
            self.repin()  # `rm -r` is done: put everything back now
        elif pin_gone and self.due_ms is None:
            # a pin went: maybe the start of an `rm -r`; let it finish rather than fight it
            self.due_ms = now_ms + SETTLE_MS

    def repin(self) -> None:
        self.due_ms = None
        dir_gone = not self.dp.pin_dir.is_dir()
        try:
            done = self.dp.repin()
            if dir_gone:
                self.watch.watch()
        except (OSError, DatapathError) as e:
            event(
                "pins_restore_error",
                pin_dir=self.dp.pin_dir,
                error=str(e),
                action="forwarding goes on; restart failoverd to re-pin",
            )
            return
        if done:
            event("pins_restored", pin_dir=self.dp.pin_dir, pins=done, relocked=dir_gone)

    def close(self) -> None:
        self.watch.close()

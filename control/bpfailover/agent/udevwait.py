"""New lowers held back until udev has named them (events/udev.py says why).

A netdev that carries a group's MAC and appears while udev handles our namespace is not
registered, opened or matched by name until udev has renamed it (its RTM_NEWLINK with the
new name) or its database has it: the entry being written wakes the loop (an inotify
watch, armed only while something is held), and a timer (HOLD_MS) lets it go anyway where
udev does not do its part, said in the log.  Where udev does not run, nothing is held: the
lower is registered in the event that announced it, as before.  At idle nothing is held and
nothing wakes.
"""

from __future__ import annotations

import contextlib
import selectors
from dataclasses import dataclass

from bpfailover.events import netlink
from bpfailover.events.udev import UdevDb
from bpfailover.ops.eventlog import event

HOLD_MS = 5000  # udev names a hot-plugged NIC in milliseconds; seconds under an emulator


@dataclass
class Held:
    group: str
    link: netlink.Link  # its latest state, from the events that followed
    since_ms: int
    due_ms: int


class UdevWait:
    def __init__(
        self, udev: UdevDb | None, sel: selectors.BaseSelector, hold_ms: int = HOLD_MS
    ) -> None:
        self.udev = udev
        self.sel = sel
        self.hold_ms = hold_ms
        self.held: dict[int, Held] = {}  # ifindex -> the lower waiting for udev
        self.registered = False  # the watch's fd is in the selector

    def holds(self, group: str, link: netlink.Link, now_ms: int) -> bool:
        """True when `link`, a new lower of `group`, must be left alone for now.  Asked
        for every event about it: udev's entry may have been written meanwhile, or udev
        may have renamed it (its rename is the one thing a lower opened too early loses:
        once renamed, it is let go at once, the database entry follows later)."""
        held = self.held.get(link.ifindex)
        if held is not None and link.ifname != held.link.ifname:
            held.link = link
            self.release(link.ifindex, now_ms, "rename")
            return False
        if held is None:
            if self.udev is None or not self.udev.running():
                return False  # no udev for our netdevs: no wait (the lab, containers)
            if self.udev.initialized(link.ifindex):
                return False  # the usual case (processed before we looked): no watch touched
            self._arm()  # before looking again: an entry written in between still wakes us
        assert self.udev is not None
        if self.udev.initialized(link.ifindex):
            if held is not None:
                held.link = link
                self.release(link.ifindex, now_ms, "database")
            else:
                self._disarm_if_idle()
            return False
        if held is not None:
            held.link = link
            return True
        self.held[link.ifindex] = Held(group, link, now_ms, now_ms + self.hold_ms)
        event(
            "lower_udev_wait",
            group=group,
            lower=link.ifname,
            ifindex=link.ifindex,
            why="udev has not named it yet",
            timeout_ms=self.hold_ms,
        )
        return True

    def forget(self, ifindex: int) -> None:
        """The netdev is gone: nothing to wait for."""
        if self.held.pop(ifindex, None) is not None:
            self._disarm_if_idle()

    def release(self, ifindex: int, now_ms: int, why: str) -> Held | None:
        held = self.held.pop(ifindex, None)
        if held is None:
            return None
        self._disarm_if_idle()
        waited = now_ms - held.since_ms
        if why != "timeout":  # udev's database entry, or its rename
            event(
                "lower_udev_ready",
                group=held.group,
                lower=held.link.ifname,
                by=why,
                waited_ms=waited,
            )
        else:
            event(
                "lower_udev_timeout",
                group=held.group,
                lower=held.link.ifname,
                ifindex=ifindex,
                waited_ms=waited,
                action="taken as it is: udev did not process it in time",
            )
        return held

    def on_ready(self, now_ms: int) -> list[Held]:
        """The watch fired: the held lowers whose entries were written, released."""
        assert self.udev is not None
        written = self.udev.read()
        out = []
        for ifindex in list(self.held):
            if (written is None or ifindex in written) and self.udev.initialized(ifindex):
                held = self.release(ifindex, now_ms, "database")
                if held is not None:
                    out.append(held)
        return out

    def due(self, now_ms: int) -> list[Held]:
        """The held lowers whose time is up, released."""
        out = []
        for ifindex, held in list(self.held.items()):
            if held.due_ms <= now_ms:
                released = self.release(ifindex, now_ms, "timeout")
                if released is not None:
                    out.append(released)
        return out

    def next_due_ms(self) -> int | None:
        return min((h.due_ms for h in self.held.values()), default=None)

    def _arm(self) -> None:
        assert self.udev is not None
        try:
            self.udev.arm()
        except OSError as e:  # no database directory yet: the timer alone lets it go
            event("udev_watch_error", error=str(e), action="waiting on the timer alone")
            return
        if not self.registered:
            self.sel.register(self.udev, selectors.EVENT_READ, "udev")
            self.registered = True

    def _disarm_if_idle(self) -> None:
        if not self.held and self.udev is not None:
            self.udev.disarm()

    def close(self) -> None:
        if self.udev is not None:
            if self.registered:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(self.udev)
                self.registered = False
            self.udev.close()

"""Has udev taken a new netdev in yet?  Its database entry says so, an inotify watch says when.

A NIC that appears (a re-plugged VF) carries the kernel's name (`eth0`) until udev renames
it (`enp2s0`).  Opened before that, it keeps `eth0`: kernels before 6.2 refuse to rename a
netdev that is up (EBUSY), and udev before systemd 253 does not even try.  So a new lower is
left alone until udev has processed it, as systemd-networkd (`link_check_initialized`) and
NetworkManager (udev's "initialized") wait for it: udev writes the entry
`/run/udev/data/n<ifindex>` (a temporary file renamed into place) after its rules ran and
the device was renamed (systemd 252, Debian 12).  Later systemd versions also write it
before the rename, marked `E:ID_RENAMING=1` / `E:ID_PROCESSING=1` until udev is done, and
networkd waits for those marks to go: so does failoverd.

Why the database and not udev's monitor socket (netlink group "udev", what libudev's
monitor reads): the entry is what "initialized" means to libudev and sd-device themselves,
its write is one inotify event, and the monitor's wire format (libudev's header) is udev's
private business.

Where udev does not run (`/run/udev/control` absent: the lab, most containers) or runs for
another network namespace (its database describes that namespace's ifindexes), nothing
waits.  The watch is armed only while a netdev is being waited for: at idle it costs no
wake-up.
"""

from __future__ import annotations

import os
from pathlib import Path

from bpfailover.events import inotify
from bpfailover.events.inotify import IN_CREATE, IN_MOVED_TO, IN_Q_OVERFLOW

RUN_UDEV = Path("/run/udev")


def entry_name(ifindex: int) -> str:
    """udev's database entry of a netdev: `n<ifindex>`."""
    return f"n{ifindex}"


def ifindex_of(name: str) -> int | None:
    """The ifindex a database entry name is for (`n12` -> 12), None for any other entry."""
    if name.startswith("n") and name[1:].isdigit():
        return int(name[1:])
    return None


BUSY_MARKS = ("E:ID_RENAMING=1", "E:ID_PROCESSING=1")  # newer udev: not done with it yet


def settled(entry: str) -> bool:
    """Whether a database entry's text says udev is done with the device: no mark of a
    rename or of rules still being processed (newer systemd; 252 writes neither)."""
    lines = entry.splitlines()
    return not any(mark in lines for mark in BUSY_MARKS)


def serves(control_exists: bool, own_netns: str | None, init_netns: str | None) -> bool:
    """Whether udev handles this namespace's netdevs: it runs (its control socket exists)
    and we are in the namespace it runs in, PID 1's.  When PID 1's namespace cannot be read
    (a hardened unit: no ptrace access to PID 1), it is taken to be ours."""
    if not control_exists:
        return False
    return init_netns is None or own_netns is None or own_netns == init_netns


def _netns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


class UdevDb:
    """udev's view of the netdevs, from its run directory (`/run/udev`)."""

    def __init__(self, root: Path = RUN_UDEV, check_netns: bool = True) -> None:
        self.control = root / "control"
        self.data = root / "data"
        # our namespace is fixed for the agent's life (--netns enters it before this)
        self.same_netns = not check_netns or serves(True, _netns("self"), _netns("1"))
        self.fd = -1
        self.wd = -1

    def running(self) -> bool:
        """udev handles our netdevs now (one stat, asked when a new lower appears)."""
        return self.same_netns and os.path.lexists(self.control)

    def initialized(self, ifindex: int) -> bool:
        """udev has processed the netdev (its database entry exists and is settled)."""
        try:
            return settled((self.data / entry_name(ifindex)).read_text(errors="replace"))
        except FileNotFoundError:
            return False
        except OSError:
            return True  # unreadable (not ours to read): do not wait on what we cannot see

    # -- the watch (a selector's: readable when an entry was written) --------------------
    def fileno(self) -> int:
        if self.fd < 0:
            self.fd = inotify.init()
        return self.fd

    def arm(self) -> None:
        """Watch the database directory for entries written (new files, renames into it)."""
        if self.wd >= 0:
            return
        self.wd = inotify.add_watch(self.fileno(), self.data, IN_MOVED_TO | IN_CREATE)

    def disarm(self) -> None:
        """Nothing waited for: no watch, no wake-ups."""
        if self.wd >= 0:
            inotify.rm_watch(self.fd, self.wd)
            self.wd = -1

    def read(self) -> set[int] | None:
        """Drain the watch: the ifindexes whose entries were written, None when the queue
        overflowed (any entry may have been written)."""
        out: set[int] | None = set()
        for mask, name in inotify.drain(self.fd):
            if mask & IN_Q_OVERFLOW:
                out = None
            elif (ifindex := ifindex_of(name)) is not None and out is not None:
                out.add(ifindex)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = self.wd = -1

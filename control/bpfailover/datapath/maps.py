"""The pinned datapath: open (or load once) the programs and maps, attach them, flip.

Everything here works on the pins under the configured bpffs directory, so a
restarted agent adopts a running datapath without touching traffic: the maps
keep their contents and counters, and attaching what is already attached is a
no-op.  bcc is used only by the one-shot loader (loader.py), in a child process.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpfailover.datapath import bpfsys, layout, layout_gen
from bpfailover.datapath.layout_gen import (
    FO_ABI_VERSION,
    FO_DIR_RX,
    FO_DIR_TX,
    FO_DROPS_IDX,
    FO_F_TOLD_MASK,
    FO_F_TOLD_SHIFT,
    FO_LOWER_IDX,
    FO_MAX_GROUPS,
    FO_META_ABI,
    FO_META_DP_CHECK,
    FO_NDIRS,
    FO_NDROPS,
    FO_NHOOKS,
    FO_NSLOTS,
    FO_SLOT_NONE,
    FO_STATS_IDX,
    MAP_SHAPES,
    fo_counter,
    fo_dev,
    fo_group,
    names,
)
from bpfailover.datapath.loader import (
    MAPS,
    PEER_PASS,
    PROGS,
    TEST_MAPS,
    LoadError,
    check_bpffs,
)

log = logging.getLogger("bpfailover.datapath")


LOCK_DIR = Path("/run/bpfailover")  # the single-instance locks (root's, 0600)


class DatapathError(RuntimeError):
    pass


@dataclass(frozen=True)
class Counter:
    packets: int = 0
    bytes: int = 0

    def __add__(self, other: Counter) -> Counter:
        return Counter(self.packets + other.packets, self.bytes + other.bytes)


def _u32(v: int) -> bytes:
    return struct.pack("=I", v)


class Datapath:
    """Maps and programs of one pin directory (one datapath serves every group)."""

    # failover.h's constants (the generated module), for callers that hold only a Datapath
    L = layout_gen

    def __init__(self, pin_dir: Path, fds: dict[str, int]) -> None:
        self.pin_dir = pin_dir
        self.fds = fds
        self._ncpus = bpfsys.possible_cpus()
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._check_abi()

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        pin_dir: str | Path,
        load: bool = True,
        test_hooks: bool = False,
        read_only: bool = False,
        loader_args: tuple[str, ...] = (),
    ) -> Datapath:
        """Adopt the datapath pinned at pin_dir, loading it first if there is none.
        read_only: the maps only, through fds that cannot write (the exporter's)."""
        pin_dir = Path(pin_dir)
        check_bpffs(pin_dir)  # a path anywhere else is never loaded into nor adopted
        if not os.path.lexists(pin_dir):
            if not load:
                raise DatapathError(f"no datapath pinned at {pin_dir}")
            run_loader(pin_dir, test_hooks, loader_args)
        check_owner(pin_dir)
        names = MAPS + (TEST_MAPS if test_hooks else ())
        if not read_only:
            names += tuple(p for p in PROGS if p != PEER_PASS)
        flags = bpfsys.BPF_F_RDONLY if read_only else 0
        fds: dict[str, int] = {}
        try:
            for name in names:
                fds[name] = bpfsys.obj_get(str(pin_dir / name), flags if name in MAPS else 0)
        except OSError as e:
            for fd in fds.values():
                os.close(fd)
            raise DatapathError(
                f"{pin_dir} is not a complete bpfailover datapath ({e}); {_fix(pin_dir)}"
            ) from e
        if not read_only:
            fds[PEER_PASS] = _peer_pass(pin_dir)
        return cls(pin_dir, fds)

    def _check_abi(self) -> None:
        """The version number, then every map's shape (key and value size, entries) against
        the layout this build reads and writes with: a mismatch is never adopted."""
        abi = self._meta(FO_META_ABI)
        if abi != FO_ABI_VERSION:
            raise DatapathError(
                f"{self.pin_dir} holds datapath ABI {abi}, this is ABI {FO_ABI_VERSION}: "
                "tear it down first (failoverctl teardown GROUP)"
            )
        for name, fd in self.fds.items():
            want = MAP_SHAPES.get(name)
            if want is None:
                continue  # a program
            info = bpfsys.map_info(fd)
            got = (info.key_size, info.value_size, info.max_entries)
            if got != want:
                raise DatapathError(
                    f"{self.pin_dir}/{name}: key/value size and entries {got}, this build "
                    f"expects {want}: tear it down first (failoverctl teardown GROUP)"
                )

    def _meta(self, key: int) -> int:
        raw = bpfsys.map_lookup(self.fds["fo_meta"], _u32(key), 4)
        return struct.unpack("=I", raw)[0] if raw else 0

    def datapath_check(self) -> str:
        """State of the per-packet lower check: "on", or why it is off ("off": not compiled
        in, "refused", "probe_failed", "mismatch": turned itself off at run time)."""
        state = self._meta(FO_META_DP_CHECK)
        states = names("FO_DPC_")
        return states[state] if state < len(states) else f"unknown({state})"

    def lock(self, lock_dir: Path = LOCK_DIR) -> None:
        """Become the single writer of this pin directory: an exclusive flock on a root-only
        file under /run (not on the pin directory, which others may open and flock), named
        by the directory's identity (pin_identity), not by the path it was given."""
        path = lock_path(self.pin_dir, lock_dir)
        fd = take_lock(path, create=True)
        if fd is None:
            theirs = recorded_pin_dir(path)
            held = str(self.pin_dir)
            if theirs and theirs != str(self.pin_dir.absolute()):
                held = f"{theirs}, which is {self.pin_dir} here"  # another mount of it
            raise DatapathError(
                f"another agent holds {held} (lock {path}; only one failoverd per pin "
                "directory, whatever the path)"
            )
        os.ftruncate(fd, 0)  # who holds it: read by held_pin_dirs() (another agent's check)
        os.pwrite(fd, str(self.pin_dir.absolute()).encode(), 0)
        self._lock_fd, self._lock_path = fd, path

    def repin(self) -> list[str]:
        """Pin again, from our own fds, whatever was removed from the pin directory by hand
        (the directory too: then it is created and locked again).  Returns what was pinned."""
        try:  # bpffs unmounted: never leave a plain directory where the pins were
            check_bpffs(self.pin_dir)
        except LoadError as e:
            raise DatapathError(str(e)) from None
        if not os.path.lexists(self.pin_dir):
            self.pin_dir.mkdir(mode=0o700)  # the lock (by path in the bpffs) still holds
        # pinned into only what would be adopted: a directory (not a symlink to one) that
        # is root's and not writable by others, holding nothing of anyone else's
        check_owner(self.pin_dir)
        done = []
        for name, fd in self.fds.items():
            path = self.pin_dir / name
            if not os.path.lexists(path):
                bpfsys.obj_pin(fd, str(path))
                done.append(name)
        return done

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        if self._lock_fd is not None and self._lock_path is not None:
            release_lock(self._lock_fd, self._lock_path)
            self._lock_fd = self._lock_path = None

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prog_fd(self, pin_name: str) -> int:
        return self.fds[pin_name]

    def prog_id(self, pin_name: str) -> int:
        return bpfsys.prog_info(self.fds[pin_name]).id

    # -- netdevs ----------------------------------------------------------------------
    def set_dev(self, ifindex: int, group: int, role: int) -> None:
        bpfsys.map_update(self.fds["fo_dev"], _u32(ifindex), bytes(fo_dev(group, role)))

    def del_dev(self, ifindex: int) -> None:
        bpfsys.map_delete(self.fds["fo_dev"], _u32(ifindex))

    def devs(self) -> dict[int, tuple[int, int]]:
        """ifindex -> (group, role) of every registered netdev."""
        out: dict[int, tuple[int, int]] = {}
        size = ctypes.sizeof(fo_dev)
        for key in bpfsys.map_keys(self.fds["fo_dev"], 4):
            raw = bpfsys.map_lookup(self.fds["fo_dev"], key, size)
            if raw is not None:
                d = fo_dev.from_buffer_copy(raw)
                out[struct.unpack("=I", key)[0]] = (d.group, d.role)
        return out

    # -- groups -----------------------------------------------------------------------
    def group(self, g: int) -> fo_group:
        raw = bpfsys.map_lookup(self.fds["fo_group"], _u32(g), ctypes.sizeof(fo_group))
        assert raw is not None  # an array map has every index
        return fo_group.from_buffer_copy(raw)

    def update_group(self, g: int, **fields: int | str) -> None:
        """Rewrite some fields of fo_group[g] (single writer: read-modify-write is safe).
        `name` is a str; `mac` a MAC string, stored as the words the programs compare."""
        rec = self.group(g)
        for key, value in fields.items():
            if key == "name":
                rec.name = str(value).encode()
            elif key == "mac":
                raw = bytes(int(x, 16) for x in str(value).split(":"))
                rec.mac_hi, rec.mac_lo = struct.unpack("=IH", raw)
            else:
                setattr(rec, key, int(value))
        bpfsys.map_update(self.fds["fo_group"], _u32(g), bytes(rec))

    def told(self, g: int) -> int:
        """The slot whose peers were last told of it (GARP/NA), 0: none."""
        return (self.group(g).flags & FO_F_TOLD_MASK) >> FO_F_TOLD_SHIFT

    def set_told(self, g: int, slot: int) -> None:
        flags = self.group(g).flags & ~FO_F_TOLD_MASK
        self.update_group(g, flags=flags | (slot << FO_F_TOLD_SHIFT))

    def groups(self) -> dict[str, int]:
        """name -> group id of every group in use."""
        out = {}
        for g in range(FO_MAX_GROUPS):
            rec = self.group(g)
            if rec.name:
                out[rec.name.decode()] = g
        return out

    def alloc_group(self, name: str) -> int:
        """The group id of `name`, adopting an existing one, else a fresh zeroed slot."""
        existing = self.groups()
        if name in existing:
            return existing[name]
        for g in range(FO_MAX_GROUPS):
            if g not in existing.values():
                self.reset_group(g)
                self.update_group(g, name=name)
                return g
        raise DatapathError(f"all {FO_MAX_GROUPS} datapath groups are in use")

    def reset_group(self, g: int) -> None:
        """Forget group g: no active lower, no lowers, counters zeroed, devs removed."""
        self.flip(g, FO_SLOT_NONE)
        for slot in range(FO_NSLOTS):
            self.set_lower(g, slot, 0)
        for ifindex, (grp, _role) in self.devs().items():
            if grp == g:
                self.del_dev(ifindex)
        zero = bytes(ctypes.sizeof(fo_counter)) * self._ncpus
        for slot in range(FO_NSLOTS):
            for d in range(FO_NDIRS):
                idx = FO_STATS_IDX(g, slot, d)
                bpfsys.map_update(self.fds["fo_stats"], _u32(idx), zero)
                bpfsys.map_update(self.fds["fo_fallback"], _u32(idx), zero)
        for hook in range(FO_NHOOKS):
            for reason in range(FO_NDROPS):
                idx = FO_DROPS_IDX(g, hook, reason)
                bpfsys.map_update(self.fds["fo_drops"], _u32(idx), zero)
        bpfsys.map_delete(self.fds["fo_xdp_up"], _u32(g))
        bpfsys.map_update(self.fds["fo_group"], _u32(g), bytes(ctypes.sizeof(fo_group)))

    # -- lowers and the flip ------------------------------------------------------------
    def set_lower(self, g: int, slot: int, ifindex: int) -> None:
        idx = FO_LOWER_IDX(g, slot)
        bpfsys.map_update(self.fds["fo_lower"], _u32(idx), _u32(ifindex))

    def lower(self, g: int, slot: int) -> int:
        idx = FO_LOWER_IDX(g, slot)
        raw = bpfsys.map_lookup(self.fds["fo_lower"], _u32(idx), 4)
        return struct.unpack("=I", raw)[0] if raw else 0

    def flip(self, g: int, slot: int) -> None:
        """Make `slot` the group's active lower: one update of a 4-byte array element, which
        the programs read with one load (every CPU sees the old slot or the new)."""
        bpfsys.map_update(self.fds["fo_active"], _u32(g), _u32(slot))

    def active(self, g: int) -> int:
        raw = bpfsys.map_lookup(self.fds["fo_active"], _u32(g), 4)
        return struct.unpack("=I", raw)[0] if raw else 0

    def set_xdp_up(self, g: int, peer_ifindex: int) -> None:
        bpfsys.map_update(self.fds["fo_xdp_up"], _u32(g), _u32(peer_ifindex))

    # -- counters -----------------------------------------------------------------------
    def _percpu_sum(self, map_name: str, idx: int) -> Counter:
        size = ctypes.sizeof(fo_counter)  # 16: already 8-byte aligned per CPU
        raw = bpfsys.map_lookup(self.fds[map_name], _u32(idx), size * self._ncpus)
        total = Counter()
        if raw:
            for cpu in range(self._ncpus):
                c = fo_counter.from_buffer_copy(raw, cpu * size)
                total += Counter(c.packets, c.bytes)
        return total

    def stats(self, g: int, slot: int, direction: int) -> Counter:
        return self._percpu_sum("fo_stats", FO_STATS_IDX(g, slot, direction))

    def drops(self, g: int, hook: int, reason: int) -> Counter:
        return self._percpu_sum("fo_drops", FO_DROPS_IDX(g, hook, reason))

    def fallback(self, g: int, from_slot: int, direction: int) -> Counter:
        """Packets the datapath moved on its own while `from_slot` was active and dead."""
        return self._percpu_sum("fo_fallback", FO_STATS_IDX(g, from_slot, direction))

    def fallback_summary(self, g: int) -> list[dict[str, Any]]:
        """Per dead active lower: packets the datapath sent through (tx) or took from (rx)
        the other lower on its own, before the agent switched."""
        out = []
        for from_slot, name in layout.SLOT_NAMES.items():
            to = next(n for s, n in layout.SLOT_NAMES.items() if s != from_slot)
            tx = self.fallback(g, from_slot, FO_DIR_TX).packets
            rx = self.fallback(g, from_slot, FO_DIR_RX).packets
            out.append({"from": name, "to": to, "tx_packets": tx, "rx_packets": rx})
        return out

    def last_redirect(self) -> int:
        """Test builds only: the target of the last redirect."""
        raw = bpfsys.map_lookup(self.fds["fo_last_redirect"], _u32(0), 4)
        return struct.unpack("=I", raw)[0] if raw else 0


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path field: space, tab, newline and backslash are octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def pin_identity(pin_dir: Path) -> str:
    """Which directory pin_dir is, the same through every mount of its filesystem: the
    filesystem's device number and the directory's path inside that filesystem (the mount's
    root within it, then the path under the mount point).  `/sys/fs/bpf/x` and
    `/host/bpffs/x` (a bind mount of the same bpffs, as a container sees it) are one
    directory; two bpffs instances are two.  Not the directory's own inode: it does not
    exist before the first start, and a pin directory removed by hand is re-created (repin)
    with a new one while its agent still holds the lock, which must keep a second agent out."""
    real = os.path.realpath(pin_dir)  # symlinks resolved as far as the path exists
    best: tuple[str, str, str] | None = None  # (major:minor, root in the fs, mount point)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                dev, root, mnt = fields[2], _unescape(fields[3]), _unescape(fields[4])
                under = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                # the longest mount point wins; among equal ones the last (it is on top)
                if under and (best is None or len(mnt) >= len(best[2])):
                    best = (dev, root, mnt)
    except (OSError, IndexError):
        best = None
    if best is None:  # no /proc: the path is all we know
        return f"path:{real}"
    dev, root, mnt = best
    inside = os.path.normpath(os.path.join(root, os.path.relpath(real, mnt)))
    return f"{dev}:{inside}"


PROC_LOCKS = Path("/proc/locks")


def lock_path(pin_dir: Path, lock_dir: Path = LOCK_DIR) -> Path:
    digest = hashlib.sha256(pin_identity(Path(pin_dir)).encode()).hexdigest()[:16]
    return lock_dir / f"pins-{digest}.lock"


def recorded_pin_dir(path: Path) -> str:
    """The pin directory the lock file at path names (as its holder spelled it), or ""."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)


_TAKE_TRIES = 100


def take_lock(path: Path, create: bool = False, probe: bool = False) -> int | None:
    """An fd holding the exclusive flock of the lock file at path, or None while another
    holds it (never waits).  create: make the file if missing (the agent's); without it a
    missing file raises FileNotFoundError (nobody holds it).  probe: a shared flock, only
    to learn whether someone holds it (two probes never see each other).
    A holder removes its lock file before it lets go (release_lock), so a flock taken on a
    file that is no longer the one at path guards nothing: open again and take that one."""
    for _ in range(_TAKE_TRIES):
        if create:
            fd = open_lock(path)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if probe else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _is_at(fd, path):
            return fd
        os.close(fd)  # removed (and maybe re-created) between our open and our flock
    raise DatapathError(f"lock {path}: removed and re-created {_TAKE_TRIES} times while taken")


def _is_at(fd: int, path: Path) -> bool:
    """fd is the file at path (not one since removed or replaced)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def release_lock(fd: int, path: Path) -> None:
    """Let go of a lock taken with take_lock, removing its file first while still holding
    it (take_lock's re-check makes that safe), so lock files do not pile up under /run."""
    try:
        if _is_at(fd, path):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def lock_held(pin_dir: Path, lock_dir: Path = LOCK_DIR) -> bool:
    """A running agent (or a teardown) holds pin_dir's single-instance lock (probed
    without waiting).  No lock file: nobody holds it.  One we may not open (not root):
    PermissionError, since we cannot tell (callers say what they did not check)."""
    try:
        fd = take_lock(lock_path(pin_dir, lock_dir), probe=True)
    except PermissionError:
        raise
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)  # closing drops the probe's lock
    return False


def remove_lock(pin_dir: Path, lock_dir: Path = LOCK_DIR) -> bool:
    """Remove pin_dir's lock file unless someone holds it; False (nothing done) if held."""
    path = lock_path(pin_dir, lock_dir)
    try:
        fd = take_lock(path)
    except FileNotFoundError:
        return True
    if fd is None:
        return False
    release_lock(fd, path)
    return True


def lock_holder(pin_dir: Path, lock_dir: Path = LOCK_DIR, locks: Path = PROC_LOCKS) -> int | None:
    """The pid holding pin_dir's single-instance lock (its flock, as /proc/locks lists
    it), or None: not held, or not known."""
    try:
        st = os.stat(lock_path(pin_dir, lock_dir), follow_symlinks=False)
        lines = locks.read_text().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        f = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF" (a blocked waiter: "1: -> FLOCK")
        if len(f) >= 6 and f[1] == "FLOCK" and f[3] == "WRITE" and f[5] == want:
            return int(f[4]) if f[4].isdigit() else None
    return None


def held_pin_dirs(lock_dir: Path = LOCK_DIR, besides: Path | None = None) -> list[Path]:
    """The pin directories a running agent holds right now: each lock file under lock_dir
    that is flocked (probed without waiting), read for the pin directory it names.
    besides: a pin directory left out, by identity (whatever path its holder gave)."""
    skip = lock_path(besides, lock_dir) if besides is not None else None
    out = []
    for path in sorted(lock_dir.glob("pins-*.lock")):
        if path == skip:
            continue
        try:
            fd = take_lock(path, probe=True)
        except (OSError, DatapathError):
            continue
        if fd is not None:
            os.close(fd)  # nobody holds it (closing drops the probe's lock)
            continue
        name = recorded_pin_dir(path)
        if name:
            out.append(Path(name))
    return out


def pinned_prog_ids(pin_dir: str | Path) -> set[int]:
    """The ids of the programs pinned in pin_dir (none when it holds no datapath yet)."""
    ids = set()
    for pin in PROGS:
        try:
            fd = bpfsys.obj_get(str(Path(pin_dir) / pin))
        except OSError:
            continue
        try:
            ids.add(bpfsys.prog_info(fd).id)
        finally:
            os.close(fd)
    return ids


def live_programs(own_pin_dir: str | Path) -> dict[int, Path]:
    """Program id -> pin directory, for the datapaths other running agents hold (their
    single-instance lock is taken); our own pin directory left out by identity (the same
    bpffs directory through another mount is ours too)."""
    return {pid: d for d in held_pin_dirs(besides=Path(own_pin_dir)) for pid in pinned_prog_ids(d)}


def open_lock(path: Path) -> int:
    """The lock file, root's and 0600, in a directory only root may write to."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = os.lstat(path.parent)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise DatapathError(
            f"{path.parent} (for the single-instance lock) must be owned by root and not "
            f"group/world-writable (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DatapathError(f"lock {path}: {e.strerror}") from None
    return fd


PIN_NAMES = frozenset((*MAPS, *TEST_MAPS, *PROGS))  # every name failoverd pins


def _fix(pin_dir: Path) -> str:
    """What to do about a pin directory that is not adopted.  Removing it is suggested only
    when it is root's and holds nothing but names failoverd pins: never for a directory
    someone else made or filled (a typo in bpffs must not cost anyone their files)."""
    try:
        st = os.lstat(pin_dir)
        names = sorted(os.listdir(pin_dir)) if stat.S_ISDIR(st.st_mode) else None
    except OSError:
        return "set bpffs to a directory of failoverd's own"
    if names is None:
        return "bpffs must name a directory: set it to one of failoverd's own"
    if st.st_uid != os.geteuid():
        return "not failoverd's: set bpffs to a directory of its own"
    if not names:
        return f"an empty directory: rmdir {pin_dir}, or set bpffs to another path"
    others = [n for n in names if n not in PIN_NAMES]
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return f"it holds what failoverd never pins ({shown}): set bpffs to a directory of its own"
    return f"remove it (rm -r {pin_dir}; failoverd loads a fresh datapath)"


def _peer_pass(pin_dir: Path) -> int:
    """fd of the pinned pass program for the hidden peer; a datapath an older loader pinned
    has none: made here (two instructions, no compiler) and pinned next to the others."""
    path = str(pin_dir / PEER_PASS)
    try:
        return bpfsys.obj_get(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
    fd = bpfsys.prog_load_xdp_pass(PROGS[PEER_PASS][0])
    try:
        bpfsys.obj_pin(fd, path)
    except OSError as e:
        if e.errno != errno.EEXIST:  # (another opener pinned it meanwhile)
            os.close(fd)
            raise
    return fd


def check_owner(pin_dir: Path) -> None:
    """Pins are adopted only from a directory only root could have filled: owned by root
    (us), not a symlink, not group/world-writable; the same for every entry in it."""
    st = os.lstat(pin_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise DatapathError(
            f"{pin_dir} is not a directory (a symlink?): not adopted; {_fix(pin_dir)}"
        )
    entries = [(pin_dir, st)] + [(e, os.lstat(e)) for e in sorted(pin_dir.iterdir())]
    for path, est in entries:
        if est.st_uid != os.geteuid() or est.st_mode & 0o022:
            raise DatapathError(
                f"{path} is owned by uid {est.st_uid} with mode "
                f"{stat.S_IMODE(est.st_mode):04o}: pins are adopted only when owned by root "
                f"and not group/world-writable; {_fix(pin_dir)}"
            )


def run_loader(
    pin_dir: Path, test_hooks: bool = False, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Compile and pin in a child process (the agent itself never holds LLVM).  `-P` and
    cwd `/`: a `bpfailover/` in the caller's directory cannot shadow the package."""
    argv = [sys.executable, "-P", "-m", "bpfailover.datapath.loader", str(pin_dir), *extra]
    if test_hooks:
        argv.append("--test-hooks")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd="/")
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise LoadError(lines[-1] if lines else f"loader exited {proc.returncode}")
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("%s", json.dumps({"event": "datapath_loaded", **info}))  # a JSON log event
    if info.get("datapath_check") != "on":
        event = {
            "event": "datapath_check_off",
            "state": info.get("datapath_check"),
            "why": info.get("datapath_check_note"),
            "effect": "failover waits for the agent",
        }
        log.warning("%s", json.dumps(event))
    return info


def remove_pins(pin_dir: Path) -> None:
    """Unpin everything (programs stay alive while still attached somewhere)."""
    shutil.rmtree(pin_dir, ignore_errors=True)

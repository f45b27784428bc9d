"""The pinned datapath: open (or load once) the programs and maps, attach them, flip.

Everything here works on the pins under the configured bpffs directory, so a
restarted agent adopts a running datapath without touching traffic: the maps
keep their contents and counters, and attaching what is already attached is a
no-op.  bcc is used only by the one-shot loader (loader.py), in a child process.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpfailover.datapath import bpfsys, layout
from bpfailover.datapath.loader import MAPS, PROGS, TEST_MAPS, LoadError, check_bpffs

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

    def __init__(self, pin_dir: Path, fds: dict[str, int]) -> None:
        self.pin_dir = pin_dir
        self.fds = fds
        self.L = layout.load()
        self._ncpus = bpfsys.possible_cpus()
        self._lock_fd: int | None = None
        self._s_dev = self.L.structs["fo_dev"]
        self._s_group = self.L.structs["fo_group"]
        self._s_counter = self.L.structs["fo_counter"]
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
            names += tuple(PROGS)
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
        return cls(pin_dir, fds)

    def _check_abi(self) -> None:
        """The version number, then every map's shape (key and value size, entries) against
        the layout this build reads and writes with: a mismatch is never adopted."""
        abi = self._meta(self.L.FO_META_ABI)
        if abi != self.L.FO_ABI_VERSION:
            raise DatapathError(
                f"{self.pin_dir} holds datapath ABI {abi}, this is ABI {self.L.FO_ABI_VERSION}: "
                "tear it down first (failoverctl teardown GROUP)"
            )
        for name, fd in self.fds.items():
            want = self.L.maps.get(name)
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
        state = self._meta(self.L.FO_META_DP_CHECK)
        names = self.L.names("FO_DPC_")
        return names[state] if state < len(names) else f"unknown({state})"

    def lock(self, lock_dir: Path = LOCK_DIR) -> None:
        """Become the single writer of this pin directory: an exclusive flock on a root-only
        file under /run (not on the pin directory, which others may open and flock)."""
        path = lock_path(self.pin_dir, lock_dir)
        fd = open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatapathError(
                f"another agent holds {self.pin_dir} (lock {path}; only one failoverd per "
                "pin directory)"
            ) from None
        os.ftruncate(fd, 0)  # who holds it: read by held_pin_dirs() (another agent's check)
        os.pwrite(fd, str(self.pin_dir.absolute()).encode(), 0)
        self._lock_fd = fd

    def repin(self) -> list[str]:
        """Pin again, from our own fds, whatever was removed from the pin directory by hand
        (the directory too: then it is created and locked again).  Returns what was pinned."""
        try:  # bpffs unmounted: never leave a plain directory where the pins were
            check_bpffs(self.pin_dir)
        except LoadError as e:
            raise DatapathError(str(e)) from None
        if not os.path.lexists(self.pin_dir):
            self.pin_dir.mkdir(mode=0o700)  # the lock is under /run: it still holds
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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
        bpfsys.map_update(self.fds["fo_dev"], _u32(ifindex), bytes(self._s_dev(group, role)))

    def del_dev(self, ifindex: int) -> None:
        bpfsys.map_delete(self.fds["fo_dev"], _u32(ifindex))

    def devs(self) -> dict[int, tuple[int, int]]:
        """ifindex -> (group, role) of every registered netdev."""
        out: dict[int, tuple[int, int]] = {}
        size = ctypes.sizeof(self._s_dev)
        for key in bpfsys.map_keys(self.fds["fo_dev"], 4):
            raw = bpfsys.map_lookup(self.fds["fo_dev"], key, size)
            if raw is not None:
                d = self._s_dev.from_buffer_copy(raw)
                out[struct.unpack("=I", key)[0]] = (d.group, d.role)
        return out

    # -- groups -----------------------------------------------------------------------
    def group(self, g: int) -> Any:
        raw = bpfsys.map_lookup(self.fds["fo_group"], _u32(g), ctypes.sizeof(self._s_group))
        assert raw is not None  # an array map has every index
        return self._s_group.from_buffer_copy(raw)

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

    def groups(self) -> dict[str, int]:
        """name -> group id of every group in use."""
        out = {}
        for g in range(self.L.FO_MAX_GROUPS):
            rec = self.group(g)
            if rec.name:
                out[rec.name.decode()] = g
        return out

    def alloc_group(self, name: str) -> int:
        """The group id of `name`, adopting an existing one, else a fresh zeroed slot."""
        existing = self.groups()
        if name in existing:
            return existing[name]
        for g in range(self.L.FO_MAX_GROUPS):
            if g not in existing.values():
                self.reset_group(g)
                self.update_group(g, name=name)
                return g
        raise DatapathError(f"all {self.L.FO_MAX_GROUPS} datapath groups are in use")

    def reset_group(self, g: int) -> None:
        """Forget group g: no active lower, no lowers, counters zeroed, devs removed."""
        self.flip(g, self.L.FO_SLOT_NONE)
        for slot in range(self.L.FO_NSLOTS):
            self.set_lower(g, slot, 0)
        for ifindex, (grp, _role) in self.devs().items():
            if grp == g:
                self.del_dev(ifindex)
        zero = bytes(ctypes.sizeof(self._s_counter)) * self._ncpus
        for slot in range(self.L.FO_NSLOTS):
            for d in range(self.L.FO_NDIRS):
                idx = self.L.index("FO_STATS_IDX", g, slot, d)
                bpfsys.map_update(self.fds["fo_stats"], _u32(idx), zero)
                bpfsys.map_update(self.fds["fo_fallback"], _u32(idx), zero)
        for hook in range(self.L.FO_NHOOKS):
            for reason in range(self.L.FO_NDROPS):
                idx = self.L.index("FO_DROPS_IDX", g, hook, reason)
                bpfsys.map_update(self.fds["fo_drops"], _u32(idx), zero)
        bpfsys.map_delete(self.fds["fo_xdp_up"], _u32(g))
        bpfsys.map_update(self.fds["fo_group"], _u32(g), bytes(ctypes.sizeof(self._s_group)))

    # -- lowers and the flip ------------------------------------------------------------
    def set_lower(self, g: int, slot: int, ifindex: int) -> None:
        idx = self.L.index("FO_LOWER_IDX", g, slot)
        bpfsys.map_update(self.fds["fo_lower"], _u32(idx), _u32(ifindex))

    def lower(self, g: int, slot: int) -> int:
        idx = self.L.index("FO_LOWER_IDX", g, slot)
        raw = bpfsys.map_lookup(self.fds["fo_lower"], _u32(idx), 4)
        return struct.unpack("=I", raw)[0] if raw else 0

    def flip(self, g: int, slot: int) -> None:
        """Make `slot` the group's active lower: one aligned 4-byte store, every CPU at once."""
        bpfsys.map_update(self.fds["fo_active"], _u32(g), _u32(slot))

    def active(self, g: int) -> int:
        raw = bpfsys.map_lookup(self.fds["fo_active"], _u32(g), 4)
        return struct.unpack("=I", raw)[0] if raw else 0

    def set_xdp_up(self, g: int, peer_ifindex: int) -> None:
        bpfsys.map_update(self.fds["fo_xdp_up"], _u32(g), _u32(peer_ifindex))

    # -- counters -----------------------------------------------------------------------
    def _percpu_sum(self, map_name: str, idx: int) -> Counter:
        size = ctypes.sizeof(self._s_counter)  # 16: already 8-byte aligned per CPU
        raw = bpfsys.map_lookup(self.fds[map_name], _u32(idx), size * self._ncpus)
        total = Counter()
        if raw:
            for cpu in range(self._ncpus):
                c = self._s_counter.from_buffer_copy(raw, cpu * size)
                total += Counter(c.packets, c.bytes)
        return total

    def stats(self, g: int, slot: int, direction: int) -> Counter:
        return self._percpu_sum("fo_stats", self.L.index("FO_STATS_IDX", g, slot, direction))

    def drops(self, g: int, hook: int, reason: int) -> Counter:
        return self._percpu_sum("fo_drops", self.L.index("FO_DROPS_IDX", g, hook, reason))

    def fallback(self, g: int, from_slot: int, direction: int) -> Counter:
        """Packets the datapath moved on its own while `from_slot` was active and dead."""
        return self._percpu_sum(
            "fo_fallback", self.L.index("FO_STATS_IDX", g, from_slot, direction)
        )

    def fallback_summary(self, g: int) -> list[dict[str, Any]]:
        """Per dead active lower: packets the datapath sent through (tx) or took from (rx)
        the other lower on its own, before the agent switched."""
        out = []
        for from_slot, name in layout.SLOT_NAMES.items():
            to = next(n for s, n in layout.SLOT_NAMES.items() if s != from_slot)
            tx = self.fallback(g, from_slot, self.L.FO_DIR_TX).packets
            rx = self.fallback(g, from_slot, self.L.FO_DIR_RX).packets
            out.append({"from": name, "to": to, "tx_packets": tx, "rx_packets": rx})
        return out

    def last_redirect(self) -> int:
        """Test builds only: the target of the last redirect."""
        raw = bpfsys.map_lookup(self.fds["fo_last_redirect"], _u32(0), 4)
        return struct.unpack("=I", raw)[0] if raw else 0


def lock_path(pin_dir: Path, lock_dir: Path = LOCK_DIR) -> Path:
    digest = hashlib.sha256(str(Path(pin_dir).absolute()).encode()).hexdigest()[:16]
    return lock_dir / f"pins-{digest}.lock"


def held_pin_dirs(lock_dir: Path = LOCK_DIR) -> list[Path]:
    """The pin directories a running agent holds right now: each lock file under lock_dir
    that is flocked (probed without waiting), read for the pin directory it names."""
    out = []
    for path in sorted(lock_dir.glob("pins-*.lock")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            continue  # nobody holds it (closing drops the probe's lock)
        except BlockingIOError:
            name = os.pread(fd, 4096, 0).decode(errors="replace")
            if name:
                out.append(Path(name))
        finally:
            os.close(fd)
    return out


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

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
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpfailover import bpfsys, layout
from bpfailover.ethtool import set_gro
from bpfailover.loader import MAPS, PROGS, TEST_MAPS, LoadError

log = logging.getLogger("bpfailover.datapath")

TC_PRIO = 0xFA11  # our filters' priority and handle on clsact: found again on adoption
TC_HANDLE = 0xFA11
CLSACT_INGRESS = "ffff:fff2"
CLSACT_EGRESS = "ffff:fff3"
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


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
    def open(cls, pin_dir: str | Path, load: bool = True, test_hooks: bool = False) -> Datapath:
        """Adopt the datapath pinned at pin_dir, loading it first if there is none."""
        pin_dir = Path(pin_dir)
        if not pin_dir.exists():
            if not load:
                raise DatapathError(f"no datapath pinned at {pin_dir}")
            run_loader(pin_dir, test_hooks)
        names = MAPS + (TEST_MAPS if test_hooks else ()) + tuple(PROGS)
        fds: dict[str, int] = {}
        try:
            for name in names:
                fds[name] = bpfsys.obj_get(str(pin_dir / name))
        except OSError as e:
            for fd in fds.values():
                os.close(fd)
            raise DatapathError(
                f"{pin_dir} is not a complete bpfailover datapath ({e}); "
                f"remove it with: rm -r {pin_dir}"
            ) from e
        return cls(pin_dir, fds)

    def _check_abi(self) -> None:
        raw = bpfsys.map_lookup(self.fds["fo_meta"], _u32(0), 4)
        abi = struct.unpack("=I", raw)[0] if raw else 0
        if abi != self.L.FO_ABI_VERSION:
            raise DatapathError(
                f"{self.pin_dir} holds datapath ABI {abi}, this is ABI {self.L.FO_ABI_VERSION}: "
                "tear it down first (failoverctl teardown GROUP)"
            )

    def lock(self) -> None:
        """Become the single writer: an exclusive flock on the pin directory."""
        fd = os.open(self.pin_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatapathError(
                f"another agent holds {self.pin_dir} (only one failoverd per pin directory)"
            ) from None
        self._lock_fd = fd

    def repin(self) -> list[str]:
        """Pin again, from our own fds, whatever was removed from the pin directory by hand
        (the directory too: then it is created and locked again).  Returns what was pinned."""
        relock = False
        if not self.pin_dir.is_dir():
            self.pin_dir.mkdir()
            relock = self._lock_fd is not None
        done = []
        for name, fd in self.fds.items():
            path = self.pin_dir / name
            if not path.exists():
                bpfsys.obj_pin(fd, str(path))
                done.append(name)
        if relock:
            assert self._lock_fd is not None
            os.close(self._lock_fd)  # the lock of a directory that is gone
            self._lock_fd = None
            self.lock()
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

    def last_redirect(self) -> int:
        """Test builds only: the target of the last redirect."""
        raw = bpfsys.map_lookup(self.fds["fo_last_redirect"], _u32(0), 4)
        return struct.unpack("=I", raw)[0] if raw else 0


def run_loader(pin_dir: Path, test_hooks: bool = False) -> dict[str, Any]:
    """Compile and pin in a child process (the agent itself never holds LLVM)."""
    argv = [sys.executable, "-m", "bpfailover.loader", str(pin_dir)]
    if test_hooks:
        argv.append("--test-hooks")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise LoadError(lines[-1] if lines else f"loader exited {proc.returncode}")
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("datapath loaded: %s", info)
    return info


def remove_pins(pin_dir: Path) -> None:
    """Unpin everything (programs stay alive while still attached somewhere)."""
    shutil.rmtree(pin_dir, ignore_errors=True)


# -- attaching with rtnetlink ----------------------------------------------------------------
def _ignore_exists(fn: Any, *args: Any, **kwargs: Any) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        fn(*args, **kwargs)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def _our_filters(ipr: Any, ifindex: int, parent: str) -> Iterator[Any]:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        for f in ipr.get_filters(index=ifindex, parent=int(parent.replace(":", ""), 16)):
            if f.get_attr("TCA_KIND") == "bpf" and (f["info"] >> 16) == TC_PRIO:
                yield f
    except NetlinkError as e:
        if e.code not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            raise


def attach_tc(ipr: Any, ifindex: int, direction: str, prog_fd: int, label: str) -> bool:
    """Attach (or atomically replace) our clsact filter; no-op if `label` is already there.

    The label carries the program id, so adoption after a restart finds the same
    program attached and changes nothing.  Returns True when it wrote."""
    parent = CLSACT_EGRESS if direction == "egress" else CLSACT_INGRESS
    for f in _our_filters(ipr, ifindex, parent):
        opts = f.get_attr("TCA_OPTIONS")
        if opts is not None and opts.get_attr("TCA_BPF_NAME") == label:
            return False
    _ignore_exists(ipr.tc, "add", "clsact", ifindex)
    ipr.tc(
        "replace-filter",
        "bpf",
        ifindex,
        TC_HANDLE,
        fd=prog_fd,
        name=label,
        parent=parent,
        prio=TC_PRIO,
        direct_action=True,
        classid=1,
    )
    return True


def detach_tc(ipr: Any, ifindex: int, direction: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    parent = CLSACT_EGRESS if direction == "egress" else CLSACT_INGRESS
    with suppress(NetlinkError):
        ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=parent, prio=TC_PRIO)


def tc_attached(ipr: Any, ifindex: int, direction: str) -> bool:
    parent = CLSACT_EGRESS if direction == "egress" else CLSACT_INGRESS
    return any(True for _ in _our_filters(ipr, ifindex, parent))


def xdp_prog_id(ipr: Any, ifindex: int) -> int:
    link = ipr.get_links(ifindex)[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return 0
    return int(xdp.get_attr("IFLA_XDP_PROG_ID") or 0)


def attach_xdp(ipr: Any, ifindex: int, prog_fd: int, prog_id: int) -> bool:
    """Native XDP on a lower; False when the driver has none (the TC path serves it)."""
    from pyroute2.netlink.exceptions import NetlinkError

    if xdp_prog_id(ipr, ifindex) == prog_id:
        return True
    try:
        ipr.link(
            "set",
            index=ifindex,
            xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]},
        )
    except NetlinkError as e:
        log.warning("native XDP refused on ifindex %d (%s): TC receive path only", ifindex, e)
        return False
    return True


def detach_xdp(ipr: Any, ifindex: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    with suppress(NetlinkError):
        ipr.link(
            "set",
            index=ifindex,
            xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]},
        )


def disable_ipv6(ifname: str) -> None:
    """A lower or the hidden peer must not speak for itself (no link-local, no DAD/RS)."""
    with suppress(OSError), open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
        f.write("1")


def keep_neighbours_without_carrier(ifname: str) -> None:
    """The failover device's carrier drops while no lower is usable, often only for the
    moment a new VF takes to come up. By default the kernel then flushes the device's ARP
    and ND entries, and the next packets wait in INCOMPLETE for the 1 s solicit timer: in
    the lab a 50 ms carrier gap cost ~1 s of guest->peer traffic. The peers are the same
    L2 neighbours through either lower, so keep them (what the knobs exist for: Wi-Fi
    roaming). net_failover hides the flush behind link-watch's delay for non-urgent
    devices; a veth's carrier events are urgent. Kernels before 5.16 lack the knobs."""
    for knob in (
        f"ipv4/conf/{ifname}/arp_evict_nocarrier",
        f"ipv6/conf/{ifname}/ndisc_evict_nocarrier",
    ):
        try:
            with open(f"/proc/sys/net/{knob}", "w") as f:
                f.write("0")
        except OSError as e:
            log.warning("%s: %s (neighbours are flushed when carrier drops)", knob, e.strerror)


# -- a group's netdevs -----------------------------------------------------------------------
def peer_name(name: str) -> str:
    """The hidden veth peer of failover device `name` (its admin state is our carrier)."""
    return f"{name[:12]}_fo"


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def create_failover_dev(ipr: Any, name: str, mac: str, mtu: int | None = None) -> tuple[int, int]:
    """The failover netdev as a veth pair (name, hidden peer); adopted if it exists.

    Returns (ifindex, peer ifindex).  The failover device carries the group MAC."""
    peer = peer_name(name)
    master = _index(ipr, name)
    if master is None:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer})
        master = _index(ipr, name)
        assert master is not None
        ipr.link("set", index=master, address=mac)
    peer_ifx = _index(ipr, peer)
    link = ipr.get_links(master)[0]
    if peer_ifx is None or link.get_attr("IFLA_LINK") != peer_ifx:
        raise DatapathError(
            f"{name} exists but is not a bpfailover failover device (veth + {peer})"
        )
    if link.get_attr("IFLA_ADDRESS") != mac:
        raise DatapathError(
            f"{name} has MAC {link.get_attr('IFLA_ADDRESS')}, the group's MAC is {mac}"
        )
    if mtu:
        ipr.link("set", index=peer_ifx, mtu=mtu)
        ipr.link("set", index=master, mtu=mtu)
    disable_ipv6(peer)
    ipr.link("set", index=master, state="up")
    return master, peer_ifx


def set_carrier(ipr: Any, peer_ifindex: int, on: bool) -> None:
    """The failover device has carrier iff its veth peer is admin up."""
    ipr.link("set", index=peer_ifindex, state="up" if on else "down")


class Wiring:
    """Wires groups, lowers and programs together (maps + rtnetlink)."""

    def __init__(self, dp: Datapath, ipr: Any) -> None:
        self.dp = dp
        self.ipr = ipr
        self.L = dp.L

    def _label(self, pin_name: str) -> str:
        return f"bpfailover:{PROGS[pin_name][0]}:{self.dp.prog_id(pin_name)}"

    def setup_group(
        self,
        name: str,
        mac: str,
        inactive_rx_drop: bool = False,
        rx_path: str = "tc",
        mtu: int | None = None,
    ) -> int:
        """Create/adopt the failover device and its group; returns the group id."""
        g = self.dp.alloc_group(name)
        master, peer = create_failover_dev(self.ipr, name, mac, mtu)
        keep_neighbours_without_carrier(name)
        flags = self.L.FO_F_INACTIVE_RX_DROP if inactive_rx_drop else 0
        self.dp.update_group(
            g, master_ifindex=master, peer_ifindex=peer, flags=flags, mac=mac
        )  # (override_slot is kept: it survives restarts)
        self.dp.set_dev(master, g, self.L.FO_ROLE_MASTER)
        if rx_path == "xdp":
            # veth needs NAPI (GRO) on the failover device for frames XDP-redirected
            # into its peer to be received at all.
            set_gro(name, True)
            self.dp.set_xdp_up(g, peer)
        self.attach_master(master)
        return g

    def attach_master(self, master: int) -> bool:
        pin = "prog_fo_egress"
        return attach_tc(self.ipr, master, "egress", self.dp.prog_fd(pin), self._label(pin))

    def register_lower(self, g: int, slot: int, ifindex: int, rx_path: str = "tc") -> None:
        """Make ifindex the group's lower in `slot` (never the active slot's ifindex
        while it is active: the caller flips away first)."""
        disable_ipv6(self.ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME"))
        self.dp.set_dev(ifindex, g, slot)
        self.dp.set_lower(g, slot, ifindex)
        pin = "prog_lower_ingress"
        attach_tc(self.ipr, ifindex, "ingress", self.dp.prog_fd(pin), self._label(pin))
        if rx_path == "xdp":
            xpin = "prog_xdp_lower_rx"
            attach_xdp(self.ipr, ifindex, self.dp.prog_fd(xpin), self.dp.prog_id(xpin))

    def unregister_lower(self, g: int, slot: int, ifindex: int, gone: bool = False) -> None:
        if self.dp.lower(g, slot) == ifindex:
            self.dp.set_lower(g, slot, 0)
        self.dp.del_dev(ifindex)
        if not gone:
            detach_tc(self.ipr, ifindex, "ingress")
            detach_xdp(self.ipr, ifindex)

    def teardown_group(self, name: str) -> bool:
        """Remove a group's datapath: filters, XDP, the failover device, map state."""
        g = self.dp.groups().get(name)
        if g is None:
            return False
        rec = self.dp.group(g)
        self.dp.flip(g, self.L.FO_SLOT_NONE)
        for ifindex, (grp, role) in self.dp.devs().items():
            if grp != g or role == self.L.FO_ROLE_MASTER:
                continue
            with suppress(Exception):
                detach_tc(self.ipr, ifindex, "ingress")
                detach_xdp(self.ipr, ifindex)
        if rec.master_ifindex:
            from pyroute2.netlink.exceptions import NetlinkError

            with suppress(NetlinkError):  # deleting one veth end deletes both
                self.ipr.link("del", index=rec.master_ifindex)
        self.dp.reset_group(g)
        return True

"""The network-namespace lab that stands in for a VM with a VF primary and a virtio standby.

Three namespaces (README, "The lab"): `{prefix}-guest` holds the lowers of every group (standby
`ens{10+10i}nsby`, primary `ens{11+10i}`, same MAC), `{prefix}-hv` holds bridge `br0` with the
far ends of the lowers (`tapNN`, `vfport`), `{prefix}-peer` holds a host on `br0`. A lower's
carrier is the admin state of its far end, so the hypervisor's actions map to `ip link` in hv.
The failover device itself is left to the datapath/agent.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bpfailover import netns
from bpfailover_lab import agent_config

Role = Literal["primary", "standby"]
MAX_GROUPS = 64  # keeps names short and addresses inside 198.18.0.0/15
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_NODAD = 0x02
_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,11}$")


class LabError(RuntimeError):
    """A lab operation failed; the message is one line meant for the user."""


@dataclass(frozen=True)
class GroupNames:
    """Names and addresses of failover group `index` (see module doc)."""

    index: int
    failover: str
    standby: str
    primary: str
    mac: str
    tap: str
    vfport: str
    guest_v4: str
    guest_v6: str
    peer_v4: str
    peer_v6: str
    prefixlen_v4: int = 24
    prefixlen_v6: int = 64


@dataclass(frozen=True)
class Step:
    """One logged migration step; `t_mono` is time.monotonic() when it started."""

    n: int
    text: str
    t_mono: float


def group_names(i: int) -> GroupNames:
    base = 10 + 10 * i
    return GroupNames(
        index=i,
        failover=f"ens{base}",
        standby=f"ens{base}nsby",
        primary=f"ens{base + 1}",
        mac=f"52:54:00:00:12:{0x53 + i:02x}",
        tap=f"tap{i + 1:02d}",
        vfport="vfport" if i == 0 else f"vfport{i}",
        guest_v4=f"198.18.{i}.1",
        guest_v6=f"2001:db8:{i}::1",
        peer_v4=f"198.18.{i}.2",
        peer_v6=f"2001:db8:{i}::2",
    )


def _err(e: BaseException) -> str:
    """Short text of an exception, netlink errors included ("(19, 'No such device')")."""
    if isinstance(e, NetlinkError):
        return f"{e.args[1] if len(e.args) > 1 else e} (errno {e.code})"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class Lab:
    """Create, drive and remove the lab; every method addresses group `i` (0-based)."""

    def __init__(self, prefix: str = "fo", groups: int = 1) -> None:
        if not _PREFIX_RE.match(prefix):
            raise LabError(f"bad prefix {prefix!r}: use 1-12 of [a-z0-9_], starting alnum")
        if not 1 <= groups <= MAX_GROUPS:
            raise LabError(f"groups must be 1..{MAX_GROUPS}, got {groups}")
        self.prefix = prefix
        self.groups = groups
        self.guest = f"{prefix}-guest"
        self.hv = f"{prefix}-hv"
        self.peer = f"{prefix}-peer"
        # the lab's own agent (`up` prints how to run it): config, socket, pins
        self.agent_config = agent_config.config_path(prefix)
        self.agent_socket = agent_config.socket_path(prefix)
        self.agent_pins = agent_config.pins_path(prefix)

    # ---- bookkeeping -------------------------------------------------------------------

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.guest, self.hv, self.peer)

    def names(self, i: int) -> GroupNames:
        if not 0 <= i < self.groups:
            raise LabError(f"group {i} out of range: lab {self.prefix} has {self.groups}")
        return group_names(i)

    def exists(self) -> bool:
        return any(netns.exists(ns) for ns in self.namespaces)

    @contextmanager
    def _ipr(self, ns: str) -> Iterator[IPRoute]:
        if not netns.exists(ns):
            raise LabError(f"netns {ns} does not exist: run `failover-lab up` first")
        with IPRoute(netns=ns) as ipr:
            yield ipr

    @staticmethod
    def _index(ipr: IPRoute, ns: str, dev: str) -> int:
        idx = ipr.link_lookup(ifname=dev)
        if not idx:
            raise LabError(f"no device {dev} in netns {ns}")
        return int(idx[0])

    @staticmethod
    def _sysctl(ns: str, key: str, value: str) -> None:
        # /proc/sys/net follows the calling thread's netns, so setns is enough (no fork).
        path = "/proc/sys/" + key.replace(".", "/")
        with netns.entered(ns), open(path, "w") as f:
            f.write(value)

    def _no_ipv6(self, ns: str, dev: str) -> None:
        # Before the device goes up, so no link-local address or RS/MLD ever leaves it.
        self._sysctl(ns, f"net.ipv6.conf.{dev}.disable_ipv6", "1")

    # ---- up / down ---------------------------------------------------------------------

    def up(self, standby_link: bool = True) -> None:
        """Build the lab; on any failure remove what was built and raise LabError."""
        present = [ns for ns in self.namespaces if netns.exists(ns)]
        if present:
            raise LabError(
                f"lab {self.prefix} already exists (netns {', '.join(present)}): "
                f"run `failover-lab down --prefix {self.prefix}` first"
            )
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        try:
            self._build(standby_link)
            agent_config.write_config(self.prefix)
        except Exception as e:
            self.down()
            raise LabError(f"lab up failed: {_err(e)}") from e

    def _build(self, standby_link: bool) -> None:
        for ns in self.namespaces:
            netns.run_in(None, ["ip", "netns", "add", ns])
            with self._ipr(ns) as ipr:
                ipr.link("set", index=self._index(ipr, ns, "lo"), state="up")
        with self._ipr(self.hv) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            self._no_ipv6(self.hv, "br0")
            ipr.link("set", index=self._index(ipr, self.hv, "br0"), state="up")
        self._hv_port("peer0", self.peer, "eth0")
        with self._ipr(self.hv) as ipr:
            ipr.link("set", index=self._index(ipr, self.hv, "peer0"), state="up")
        with self._ipr(self.peer) as ipr:
            eth0 = self._index(ipr, self.peer, "eth0")
            for i in range(self.groups):
                g = group_names(i)
                ipr.addr("add", index=eth0, address=g.peer_v4, prefixlen=g.prefixlen_v4)
                ipr.addr(
                    "add",
                    index=eth0,
                    address=g.peer_v6,
                    prefixlen=g.prefixlen_v6,
                    flags=IFA_F_NODAD,
                )
            ipr.link("set", index=eth0, state="up")
        # A real wire carries finished checksums; veth hands on CHECKSUM_PARTIAL skbs, which
        # XDP (which sees bytes, not skb metadata) would pass up unfinished. Make the peer
        # host finish its checksums in software, as a NIC on a wire would have.
        netns.run_in(self.peer, ["ethtool", "-K", "eth0", "tx", "off"])
        for i in range(self.groups):
            g = group_names(i)
            self._lower(g.tap, g.standby, g.mac, far_up=standby_link)
            self._lower(g.vfport, g.primary, g.mac, far_up=True)

    def _hv_port(self, port: str, ns: str, dev: str) -> None:
        """veth `port` in hv (enslaved to br0, ipv6 off) with its other end `dev` in ns."""
        with self._ipr(self.hv) as ipr:
            # hv ports get ifindexes from 1000 up: when a veth end and its peer have the
            # same ifindex (in different namespaces) the kernel's link-watch takes the
            # pair for a non-stacked device and delays its carrier events by up to 1 s,
            # which left a freshly plugged VF port disabled in br0 after the guest used it.
            index = max([1000] + [int(x["index"]) + 1 for x in ipr.get_links()])
            ipr.link(
                "add", ifname=port, kind="veth", index=index, peer={"ifname": dev, "net_ns_fd": ns}
            )
            self._no_ipv6(self.hv, port)
            br = self._index(ipr, self.hv, "br0")
            ipr.link("set", index=self._index(ipr, self.hv, port), master=br)

    def _lower(self, far: str, dev: str, mac: str, far_up: bool) -> None:
        """A guest lower `dev` (MAC, no IPv6, admin up) wired to hv far end `far`."""
        self._hv_port(far, self.guest, dev)
        with self._ipr(self.guest) as ipr:
            idx = self._index(ipr, self.guest, dev)
            ipr.link("set", index=idx, address=mac)
            self._no_ipv6(self.guest, dev)
            ipr.link("set", index=idx, state="up")
        with self._ipr(self.hv) as ipr:
            idx = self._index(ipr, self.hv, far)
            ipr.link("set", index=idx, state="up" if far_up else "down")

    def down(self) -> None:
        """Remove the three namespaces (and so every device in them) and the agent's config;
        never raises."""
        agent_config.remove_config(self.prefix)
        for ns in self.namespaces:
            if netns.exists(ns):
                # A half-removed ns (mount gone, file left) still deserves a cleanup try.
                netns.run_in(None, ["ip", "netns", "del", ns], check=False)
                if os.path.exists(netns.path_of(ns)):
                    with suppress(OSError):
                        os.unlink(netns.path_of(ns))

    # ---- hypervisor actions ------------------------------------------------------------

    def far_end(self, i: int, role: Role) -> str:
        g = self.names(i)
        if role == "primary":
            return g.vfport
        if role == "standby":
            return g.tap
        raise LabError(f"role must be primary or standby, got {role!r}")

    def lower(self, i: int, role: Role) -> str:
        g = self.names(i)
        self.far_end(i, role)  # validates role
        return g.primary if role == "primary" else g.standby

    def set_far_end(self, i: int, role: Role, up: bool) -> None:
        """Carrier control: the guest lower has carrier iff its far end in hv is admin up."""
        far = self.far_end(i, role)
        with self._ipr(self.hv) as ipr:
            ipr.link("set", index=self._index(ipr, self.hv, far), state="up" if up else "down")

    def unplug_vf(self, i: int) -> None:
        """Hot-unplug: delete the guest primary; the veth's hv end (vfport) goes with it."""
        g = self.names(i)
        with self._ipr(self.guest) as ipr:
            ipr.link("del", index=self._index(ipr, self.guest, g.primary))
        # Deletion of the peer end is synchronous with the netlink reply; check to be sure.
        with self._ipr(self.hv) as ipr:
            if ipr.link_lookup(ifname=g.vfport):
                raise LabError(f"{g.vfport} still in {self.hv} after unplugging {g.primary}")

    def plug_vf(self, i: int) -> None:
        """Hot-plug: a new primary (same MAC, new ifindex) with its far end in br0, up."""
        g = self.names(i)
        with self._ipr(self.guest) as ipr:
            if ipr.link_lookup(ifname=g.primary):
                raise LabError(f"{g.primary} already plugged in {self.guest}: unplug it first")
        self._lower(g.vfport, g.primary, g.mac, far_up=True)

    def fdb_del(self, i: int) -> None:
        """`bridge fdb del MAC dev vfport master`; a missing entry is fine (already aged)."""
        g = self.names(i)
        argv = ["bridge", "fdb", "del", g.mac, "dev", g.vfport, "master"]
        proc = netns.run_in(self.hv, argv, check=False)
        err = proc.stderr.strip()
        if proc.returncode != 0 and "No such file or directory" not in err:
            raise LabError(f"{' '.join(argv)} in {self.hv} failed: {err or proc.returncode}")

    def fdb_ports(self, i: int) -> list[str]:
        """The br0 ports on which the group MAC is currently learned (for checks and logs)."""
        g = self.names(i)
        proc = netns.run_in(self.hv, ["bridge", "fdb", "show", "br", "br0"])
        return sorted(
            {ln.split()[2] for ln in proc.stdout.splitlines() if ln.startswith(g.mac + " dev")}
        )

    # ---- guest addressing --------------------------------------------------------------

    def _address(self, i: int, dev: str) -> None:
        g = self.names(i)
        with self._ipr(self.guest) as ipr:
            idx = self._index(ipr, self.guest, dev)
            ipr.addr("add", index=idx, address=g.guest_v4, prefixlen=g.prefixlen_v4)
            ipr.addr(
                "add", index=idx, address=g.guest_v6, prefixlen=g.prefixlen_v6, flags=IFA_F_NODAD
            )

    def address_failover(self, i: int) -> None:
        """Put the guest addresses on the failover device (once the datapath created it)."""
        self._address(i, self.names(i).failover)

    def address_lower_directly(self, i: int, role: Role = "primary") -> None:
        """The "no failover" baseline: guest addresses straight on one lower.

        The other lower is set admin down in the guest: with the same MAC and a weak-host
        stack it would otherwise answer ARP too and deliver flooded copies as duplicates.
        """
        dev = self.lower(i, role)
        other = self.lower(i, "standby" if role == "primary" else "primary")
        self._sysctl(self.guest, f"net.ipv6.conf.{dev}.disable_ipv6", "0")
        self._address(i, dev)
        with self._ipr(self.guest) as ipr:
            idx = ipr.link_lookup(ifname=other)
            if idx:
                ipr.link("set", index=idx[0], state="down")

    # ---- migration (net_failover.rst seed script) --------------------------------------

    def migration_steps(self, i: int, pause_s: float = 0.5) -> list[tuple[str, Callable[[], None]]]:
        """The seed script as (description, action) pairs, in order; tests may interleave."""
        g = self.names(i)
        return [
            (
                f"standby far end {g.tap} up (virsh domif-setlink $DOMAIN {g.tap} up)",
                lambda: self.set_far_end(i, "standby", True),
            ),
            (
                f"bridge fdb del {g.mac} dev {g.vfport} master",
                lambda: self.fdb_del(i),
            ),
            (
                f"VF unplug: {g.primary} leaves the guest (virsh detach-device $DOMAIN $VF_XML)",
                lambda: self.unplug_vf(i),
            ),
            (
                "ip link set $PF vf $VF_NUM mac 00:00:00:00:00:00 (no PF in the lab: no-op)",
                lambda: None,
            ),
            (
                f"migration pause {pause_s:g}s (virsh migrate --live)",
                lambda: time.sleep(pause_s),
            ),
            (
                f"VF plug on the destination: new {g.primary}, MAC {g.mac} (virsh attach-device)",
                lambda: self.plug_vf(i),
            ),
            (
                f"standby far end {g.tap} down (virsh domif-setlink $DOMAIN {g.tap} down)",
                lambda: self.set_far_end(i, "standby", False),
            ),
        ]

    def migrate(
        self, i: int = 0, pause_s: float = 0.5, log: Callable[[str], Any] = print
    ) -> list[Step]:
        """Replay the seed migration script for group i, logging each step with a timestamp."""
        steps = self.migration_steps(i, pause_s)
        t0 = time.monotonic()
        done: list[Step] = []
        for n, (text, action) in enumerate(steps, 1):
            now, wall = time.monotonic(), time.time()
            stamp = (
                time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1e3) % 1000:03d}"
            )
            log(f"{stamp} +{now - t0:7.3f}s step {n}/{len(steps)}: {text}")
            done.append(Step(n, text, now))
            action()
        return done

    # ---- inspection --------------------------------------------------------------------

    def link(self, ns: str, dev: str) -> dict[str, Any] | None:
        """ifindex, flags, MAC, operstate of dev in ns; None when it does not exist."""
        with self._ipr(ns) as ipr:
            idx = ipr.link_lookup(ifname=dev)
            if not idx:
                return None
            msg = ipr.get_links(idx[0])[0]
            return {
                "ifindex": int(msg["index"]),
                "flags": int(msg["flags"]),
                "mac": msg.get("address"),
                "operstate": msg.get("operstate"),
                "master": msg.get("master"),
            }

    def has_carrier(self, i: int, role: Role) -> bool:
        info = self.link(self.guest, self.lower(i, role))
        return bool(info and info["flags"] & IFF_LOWER_UP)

    def describe(self) -> str:
        """`ip -br link` and `ip -br addr` of every namespace, for humans."""
        out: list[str] = []
        for ns in self.namespaces:
            if not netns.exists(ns):
                out.append(f"== {ns}: absent")
                continue
            out.append(f"== {ns}")
            out += netns.run_in(ns, ["ip", "-br", "addr"]).stdout.rstrip().splitlines()
        return "\n".join(out)

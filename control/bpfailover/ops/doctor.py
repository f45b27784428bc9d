"""failoverctl doctor: the known net_failover pains, each finding with its fix.

Checks (each a function of a `Host`, whose paths tests point at fixtures):
addresses or IPv6 on a lower; DHCP clients or ifupdown stanzas for a lower;
lowers managed by NetworkManager or systemd-networkd; a lower enslaved to
another master (the kernel's own net_failover, a bond, a bridge); bpffs not
mounted; no kernel headers for bcc; missing root/capabilities; a second
agent (two failoverd in one netns, or a pin lock held by an agent that does
not answer); orphaned pin directories (a datapath no running agent holds);
cloud guests (docs/cloud-guest.md): the hypervisor's `failover=on`,
cloud-init without the duplicate-MAC shim, the failover device unmanaged by NetworkManager,
its hidden peer managed by NetworkManager or systemd-networkd, a netplan MAC match (which
never matches the failover device).
Exit code 0: nothing found; 4: findings (printed with fixes).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bpfailover import netns
from bpfailover.datapath import kheaders
from bpfailover.effects import sysctl
from bpfailover.model import config as configmod
from bpfailover.model.lowers import lower_role
from bpfailover.model.status import AgentStatus, StatusFormatError
from bpfailover.ops import api

DHCP_CLIENTS = {"dhclient", "dhcpcd", "dhcpcd5", "udhcpc", "pump", "dhcpcd-bin"}
AGENT_PROGRAM = "failoverd"
AGENT_MODULES = {"bpfailover.agent", "bpfailover.agent.__main__", "bpfailover.agent.core"}
_PYTHON = re.compile(r"^python[0-9.]*$")
_PY_OPTS_WITH_VALUE = {"-W", "-X", "-Q"}
PERMISSION_FIX = "run as root or as a member of the config's control.group"
ROOT_FIX = "run as root"
CAPS = {
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_NICE": 23,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}
NEIGH_KNOBS = (
    "sys/net/ipv4/conf/all/arp_evict_nocarrier",
    "sys/net/ipv6/conf/all/ndisc_evict_nocarrier",
)
SNIPPETS = "deploy/ in the bpfailover sources (or /usr/share/doc/bpfailover/deploy)"
TC_H_ROOT = 0xFFFFFFFF  # a qdisc's parent when it is the root one


@dataclass(frozen=True)
class Finding:
    check: str
    subject: str
    problem: str
    fix: str


@dataclass
class LinkInfo:
    ifindex: int
    name: str
    mac: str
    kind: str | None = None
    master: int | None = None
    addrs: list[tuple[str, str]] = field(default_factory=list)  # (address/prefix, scope)
    root_qdisc: str | None = None  # the kind of its root qdisc ("noqueue": veth's own)


@dataclass
class Host:
    """Where the checks look; tests replace the paths with fixtures."""

    proc: Path = Path("/proc")
    run: Path = Path("/run")
    etc: Path = Path("/etc")
    src_dir: Path = Path("/usr/src")
    modules: Path = Path("/lib/modules")
    mounts: Path = Path("/proc/self/mounts")
    self_status: Path = Path("/proc/self/status")
    btf: Path = Path("/sys/kernel/btf/vmlinux")
    release: str = field(default_factory=lambda: os.uname().release)
    euid: int = field(default_factory=os.geteuid)
    netns: str | None = None
    # NM/networkd state files and cloud-init describe the host's own netns only
    check_managers: bool = True
    sys: Path = Path("/sys")  # /sys/class/net describes the host netns only (check_managers)
    var_log: Path = Path("/var/log")
    usr_lib: Path = Path("/usr/lib")
    bpffs: Path = Path("/sys/fs/bpf")  # where orphaned pin directories are looked for


@dataclass
class Lower:
    group: str
    role: str
    link: LinkInfo


def _exists(path: Path) -> bool:
    """Path.exists() that says False where we may not look (it raises EACCES)."""
    try:
        return path.exists()
    except OSError:
        return False


def _present(path: Path) -> bool:
    """It exists, or we may not look (then it may well: say what we could not read)."""
    try:
        return path.exists()
    except PermissionError:
        return True


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def is_init_netns(ns: str, proc: Path = Path("/proc")) -> bool:
    """The named netns is the host's own: pid 1's, or where that is hidden (a container
    without CAP_SYS_PTRACE) the one doctor runs in; False when neither can be read."""
    try:
        ino = os.stat(netns.path_of(ns)).st_ino
    except OSError:
        return False
    for pid in ("1", "self"):
        try:
            return f"net:[{ino}]" == os.readlink(proc / pid / "ns" / "net")
        except OSError:
            continue
    return False


def host_for(ns: str | None) -> Host:
    """The host as doctor inspects it for `--netns ns`: the host's own state files (NM,
    networkd, /sys/class/net, cloud-init) only when that is the host's own netns."""
    return Host(netns=ns, check_managers=ns is None or is_init_netns(ns))


# -- gathering -------------------------------------------------------------------------------


def dump_links(ns: str | None) -> dict[int, LinkInfo]:
    from pyroute2 import IPRoute

    out: dict[int, LinkInfo] = {}
    with netns.entered(ns), IPRoute() as ipr:
        for msg in ipr.get_links():
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            out[msg["index"]] = LinkInfo(
                msg["index"],
                msg.get_attr("IFLA_IFNAME"),
                msg.get_attr("IFLA_ADDRESS") or "",
                kind,
                msg.get_attr("IFLA_MASTER"),
            )
        for q in ipr.get_qdiscs():
            link = out.get(q["index"])
            if link is not None and q["parent"] == TC_H_ROOT:
                link.root_qdisc = q.get_attr("TCA_KIND")
        scopes = {0: "global", 200: "site", 253: "link", 254: "host"}
        for a in ipr.get_addr():
            link = out.get(a["index"])
            if link is not None:
                addr = a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL")
                link.addrs.append((f"{addr}/{a['prefixlen']}", scopes.get(a["scope"], "?")))
    return out


def find_lowers(
    cfg: configmod.Config | None, links: dict[int, LinkInfo], status: AgentStatus | None
) -> list[Lower]:
    """Lowers by the agent's word when it answers, else by config and the agent's rule
    (model/lowers.py): the netdevs with the group's MAC but stacked devices."""
    by_index: dict[int, Lower] = {}
    if status is not None:
        for gs in status.groups:
            for lw in gs.lowers:
                link = links.get(lw.ifindex)
                if link is not None:
                    by_index[link.ifindex] = Lower(gs.name, lw.role, link)
    if cfg is not None:
        names = {lk.name: lk for lk in links.values()}
        for g in cfg.groups:
            standby = names.get(g.standby_name) if g.standby_name else None
            mac = g.mac if g.mac != "auto" else (standby.mac if standby else None)
            if mac is None:
                continue
            hidden = {g.name, configmod.peer_name(g.name)}
            for lk in links.values():
                if lk.name in hidden or lk.ifindex in by_index:
                    continue
                # the agent's rule; doctor does not ask drivers (a standby given by driver
                # is then not told apart, as before)
                role = lower_role(g, mac, lk.name, lk.mac, lk.kind, lambda _name: None)
                if role is not None:
                    by_index[lk.ifindex] = Lower(g.name, role, lk)
    return sorted(by_index.values(), key=lambda lw: (lw.group, lw.link.name))


def _procs(host: Host) -> Iterator[tuple[int, list[str]]]:
    try:
        entries = list(host.proc.iterdir())
    except OSError:
        return
    for d in entries:
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if argv:
            yield int(d.name), argv


def _exe(host: Host, pid: int) -> str | None:
    try:
        return os.readlink(host.proc / str(pid) / "exe")
    except OSError:
        return None  # another user's process as non-root, a kernel thread, a fixture


def is_agent(argv: list[str], exe: str | None = None) -> bool:
    """failoverd by what runs, never by a word of its arguments: the executable (or argv[0])
    is `failoverd`, or a Python running the `failoverd` script or `-m bpfailover.agent`.
    `timeout 60 failoverd`, `sudo failoverd`, `failoverctl doctor` are not agents."""
    progs = {os.path.basename(p) for p in (exe, argv[0] if argv else None) if p}
    if AGENT_PROGRAM in progs:
        return True
    if not any(_PYTHON.match(p) for p in progs):
        return False
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return i + 1 < len(argv) and argv[i + 1] in AGENT_MODULES
        if arg.startswith("-m"):
            return arg[2:] in AGENT_MODULES
        if arg == "-c" or arg.startswith("-c") or arg == "-":
            return False
        if arg.startswith("-"):
            i += 2 if arg in _PY_OPTS_WITH_VALUE else 1
            continue
        return os.path.basename(arg) == AGENT_PROGRAM  # the script: .../bin/failoverd
    return False


def netns_name(host: Host, ns_id: str | None) -> str | None:
    """The name under /run/netns of the namespace `net:[ino]`, if it has one."""
    if ns_id is None:
        return None
    try:
        entries = sorted((host.run / "netns").iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if f"net:[{entry.stat().st_ino}]" == ns_id:
                return entry.name
        except OSError:
            continue
    return None


def describe_netns(host: Host) -> str:
    """The namespace doctor inspects, for its first line."""
    if host.netns is not None:
        return f"network namespace {host.netns}"
    ns_id = _netns_id(host, None)
    name = netns_name(host, ns_id)
    return f"this process's network namespace ({name or ns_id or 'unknown'})"


def _netns_id(host: Host, pid: int | None) -> str | None:
    """The netns a process is in (`net:[ino]`), or of host.netns / ourselves for None."""
    try:
        if pid is None:
            if host.netns is not None:
                return f"net:[{os.stat(netns.path_of(host.netns)).st_ino}]"
            return os.readlink(host.proc / "self" / "ns" / "net")
        return os.readlink(host.proc / str(pid) / "ns" / "net")
    except OSError:
        return None


def _same_netns(host: Host, pid: int) -> bool:
    ours, theirs = _netns_id(host, None), _netns_id(host, pid)
    return ours is None or theirs is None or ours == theirs


# -- checks ------------------------------------------------------------------------------------


def check_addresses(lowers: list[Lower]) -> Iterator[Finding]:
    for lw in lowers:
        for addr, scope in lw.link.addrs:
            what = "IPv6 link-local address" if scope == "link" else "address"
            yield Finding(
                "lower-address",
                lw.link.name,
                f"{what} {addr} on {lw.group}'s {lw.role} lower: traffic sourced from a lower "
                "bypasses the failover device and is lost when it goes away",
                f"ip addr flush dev {lw.link.name}; sysctl -w net.ipv6.conf.{lw.link.name}."
                f"disable_ipv6=1; configure addresses on {lw.group} only",
            )


def check_dhcp(host: Host, lowers: list[Lower]) -> Iterator[Finding]:
    names = {lw.link.name: lw for lw in lowers}
    for pid, argv in _procs(host):
        prog = os.path.basename(argv[0])
        if prog not in DHCP_CLIENTS or not _same_netns(host, pid):
            continue
        hit = [a for a in argv[1:] if a in names]
        ifaces = [a for a in argv[1:] if not a.startswith("-") and "/" not in a and "." not in a]
        if not hit and prog == "dhclient" and not ifaces and names:
            hit = sorted(names)  # dhclient without interfaces runs on all of them
        for name in hit:
            yield Finding(
                "lower-dhcp",
                name,
                f"DHCP client {prog} (pid {pid}) runs on lower {name}",
                f"stop it (kill {pid}) and run DHCP on {names[name].group} instead; "
                "make sure nothing starts it again (ifupdown, NetworkManager, networkd)",
            )
    for path in [
        host.etc / "network" / "interfaces",
        *sorted((host.etc / "network" / "interfaces.d").glob("*")),
    ]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for name, lw in names.items():
            m = re.search(rf"^\s*iface\s+{re.escape(name)}\s+inet6?\s+(\w+)", text, re.M)
            if m and m.group(1) not in ("manual",):
                yield Finding(
                    "lower-ifupdown",
                    name,
                    f"{path} configures lower {name} ({m.group(0).strip()})",
                    f"change it to `iface {name} inet manual` (or remove it) and configure "
                    f"{lw.group} instead",
                )


def _keyfile_value(text: str, key: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(key)}\s*=\s*(.*?)\s*$", text, re.M)
    return m.group(1) if m else None


def _networkd_managed(host: Host, ifindex: int) -> tuple[str, str] | None:
    """(state, .network file) when systemd-networkd manages netdev `ifindex` (its state file
    under /run/systemd/netif/links says so), None when it does not or there is none."""
    try:
        text = (host.run / "systemd" / "netif" / "links" / str(ifindex)).read_text(errors="replace")
    except OSError:
        return None
    state = _keyfile_value(text, "ADMIN_STATE")
    if state is None or state in ("unmanaged", "linger"):
        return None
    return state, _keyfile_value(text, "NETWORK_FILE") or "a .network file"


def check_managers(host: Host, lowers: list[Lower]) -> Iterator[Finding]:
    if not host.check_managers:
        return
    for lw in lowers:
        nm = host.run / "NetworkManager" / "devices" / str(lw.link.ifindex)
        try:
            managed = _keyfile_value(nm.read_text(errors="replace"), "managed")
        except OSError:
            managed = None
        if managed is not None and managed.lower() in ("true", "1", "yes"):
            yield Finding(
                "lower-networkmanager",
                lw.link.name,
                f"NetworkManager manages lower {lw.link.name} (it may add addresses, DHCP, "
                "or take it down)",
                "install deploy/networkmanager/90-bpfailover-lowers.conf (or the udev rule "
                f"deploy/udev/80-bpfailover-lowers.rules) and `nmcli device set {lw.link.name} "
                "managed no`",
            )
        by_networkd = _networkd_managed(host, lw.link.ifindex)
        if by_networkd is not None:
            state, net = by_networkd
            yield Finding(
                "lower-networkd",
                lw.link.name,
                f"systemd-networkd manages lower {lw.link.name} (state {state}, from {net})",
                "install deploy/networkd/00-bpfailover-lowers.network in /etc/systemd/network "
                "(match the failover device by Name=, never by MAC) and `networkctl reload`",
            )


def check_masters(lowers: list[Lower], links: dict[int, LinkInfo]) -> Iterator[Finding]:
    for lw in lowers:
        if lw.link.master:
            m = links.get(lw.link.master)
            mname = m.name if m else f"ifindex {lw.link.master}"
            kind = (m.kind if m else None) or "a master device (the kernel's net_failover?)"
            yield Finding(
                "lower-enslaved",
                lw.link.name,
                f"lower {lw.link.name} is enslaved to {mname} ({kind}): two failover "
                "mechanisms fight over it",
                "boot the guest without the kernel's failover: virtio-net `failover=off` on "
                "the hypervisor side (see the hypervisor-failover-on finding; net_failover "
                f"cannot be blacklisted), or release it: ip link set {lw.link.name} nomaster",
            )


def check_bpffs(host: Host, pin_dir: str) -> Iterator[Finding]:
    try:
        lines = host.mounts.read_text().splitlines()
    except OSError as e:
        yield Finding("bpffs", str(host.mounts), f"cannot read mounts: {e}", "run as root")
        return
    points = [ln.split()[1] for ln in lines if len(ln.split()) > 2 and ln.split()[2] == "bpf"]
    if not any(pin_dir == p or pin_dir.startswith(p.rstrip("/") + "/") for p in points):
        parent = str(Path(pin_dir).parent)
        yield Finding(
            "bpffs",
            parent,
            f"no bpf filesystem mounted at {parent}: pins (and a restart without loss) "
            "are impossible",
            f"mount -t bpf bpf {parent} (persist: `bpf {parent} bpf defaults 0 0` in "
            "/etc/fstab; systemd mounts /sys/fs/bpf by itself)",
        )


def check_headers(host: Host) -> Iterator[Finding]:
    build = host.modules / host.release / "build" / "include"
    if _is_dir(build) or os.environ.get("BCC_KERNEL_SOURCE"):
        return
    if kheaders._debian_pair(host.src_dir) is not None:
        return
    yield Finding(
        "kernel-headers",
        host.release,
        f"no kernel headers: neither {host.modules}/{host.release}/build nor "
        f"{host.src_dir}/linux-headers-*: the datapath cannot be compiled",
        f"apt-get install linux-headers-amd64 (or linux-headers-{host.release}); in a "
        "container mount /lib/modules and /usr/src read-only",
    )


def check_datapath_check(host: Host, status: AgentStatus | None) -> Iterator[Finding]:
    """The datapath's per-packet lower check: what the running agent says, else whether
    this kernel has the BTF it needs."""
    state = status.datapath_check if status is not None else None
    if state is None:
        if _exists(host.btf):
            return
        problem = f"no kernel BTF at {host.btf}: the datapath cannot check lowers per packet"
    elif state == "on":
        return
    else:
        problem = f"the datapath's per-packet lower check is {state}"
    yield Finding(
        "datapath-check",
        host.release,
        problem + " (failover waits for the agent: link-watch can delay it up to 1 s)",
        "a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's is); failoverd's log says "
        "why the check is off",
    )


def _kernel_has_cap_bpf(release: str) -> bool:
    nums = [int(x) for x in re.findall(r"\d+", release)[:2]] + [0, 0]
    return (nums[0], nums[1]) >= (5, 8)


def check_privileges(host: Host) -> Iterator[Finding]:
    if host.euid != 0:
        yield Finding(
            "privileges",
            f"euid {host.euid}",
            "not root: failoverd refuses to start",
            "run failoverd as root (systemd unit deploy/systemd/failoverd.service)",
        )
    eff = _cap_eff(host)
    if eff is None:
        return
    need = ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_PERFMON", "CAP_BPF"]
    if not _kernel_has_cap_bpf(host.release):
        need = ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"]
    missing = [c for c in need if not eff >> CAPS[c] & 1]
    if missing:
        yield Finding(
            "capabilities",
            "effective set",
            f"missing {', '.join(missing)}: loading, attaching or notifying will fail",
            "grant them (container: --cap-add " + " --cap-add ".join(missing) + ", or "
            "--privileged; systemd: AmbientCapabilities=/CapabilityBoundingSet=)",
        )


def _cap_eff(host: Host) -> int | None:
    try:
        m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", host.self_status.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1), 16) if m else None


def check_realtime(host: Host, cfg: configmod.Config | None) -> Iterator[Finding]:
    prio = cfg.scheduling.realtime_priority if cfg is not None else 10
    eff = _cap_eff(host)
    if prio and eff is not None and not eff >> CAPS["CAP_SYS_NICE"] & 1:
        yield Finding(
            "realtime",
            "CAP_SYS_NICE",
            f"missing: the event loop cannot take SCHED_FIFO {prio} and runs at normal "
            "priority (failoverd logs scheduling_refused); a busy guest delays failover",
            "grant CAP_SYS_NICE (container: --cap-add SYS_NICE; the systemd unit has it), "
            "or set scheduling.realtime_priority: 0 to run normally on purpose",
        )


def check_neighbour_knobs(host: Host) -> Iterator[Finding]:
    missing = [k.split("/")[-1] for k in NEIGH_KNOBS if not _exists(host.proc / k)]
    if missing:
        yield Finding(
            "kernel-neighbours",
            host.release,
            f"no {' or '.join(missing)} (kernels before 5.16/5.18): whenever no lower is "
            "usable for a moment the failover device's ARP/ND entries are flushed, and "
            "traffic then waits up to 1 s to resolve them again",
            "a newer kernel; until then move traffic before unplugging a VF "
            "(failoverctl set-primary GROUP STANDBY) so a lower stays usable",
        )


def check_sysctl_net(host: Host) -> Iterator[Finding]:
    """/proc/sys read-only (a container runtime's default): the agent runs, but cannot set
    its devices' sysctls.  Only as root: nobody else may write there anyway."""
    why = sysctl.writable(host.proc / "sys" / "net") if host.euid == 0 else ""
    if why:
        yield Finding(
            "sysctl",
            str(host.proc / "sys" / "net"),
            f"not writable ({why}): failoverd cannot set its devices' sysctls: "
            + "; ".join(sysctl.COSTS.values()),
            sysctl.FIX,
        )


def check_agent_netns(host: Host, status: AgentStatus | None) -> Iterator[Finding]:
    """The agent that answers runs in another namespace than the one inspected: its lowers
    are not where doctor looks."""
    if status is None:
        return
    pid = status.pid
    try:
        raw = (host.proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return  # not in our pid namespace (a container): nothing to compare
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not is_agent(argv, _exe(host, pid)):
        return  # that pid is someone else here: the agent has its own pid namespace
    ours, theirs = _netns_id(host, None), _netns_id(host, pid)
    if ours is None or theirs is None or ours == theirs:
        return
    name = netns_name(host, theirs)
    yield Finding(
        "agent-netns",
        f"pid {pid}",
        f"failoverd runs in network namespace {name or theirs}, doctor checked "
        f"{describe_netns(host)}: the agent's lowers were not checked",
        f"failoverctl doctor --netns {name}"
        if name
        else f"run doctor in the agent's namespace: nsenter -t {pid} -n failoverctl doctor",
    )


def check_agents(
    host: Host, pin_dir: str, sock: str | None, denied: bool = False
) -> Iterator[Finding]:
    mine = os.getpid()
    ours = _netns_id(host, None)
    agents, unknown = [], []
    for pid, argv in _procs(host):
        if pid == mine or not is_agent(argv, _exe(host, pid)):
            continue
        theirs = _netns_id(host, pid)
        if ours is not None and theirs is None:
            unknown.append(str(pid))  # another user's process, as non-root: we cannot tell
        elif ours is None or theirs == ours:
            agents.append((pid, " ".join(argv)))
    if unknown:
        yield _not_checked(
            "second-agent",
            f"pid {', '.join(unknown)}",
            "which network namespace these failoverd processes run in",
        )
    if len(agents) > 1:
        listed = "; ".join(f"{p}: {c[:80]}" for p, c in agents)
        yield Finding(
            "second-agent",
            "failoverd",
            f"{len(agents)} failoverd processes in this network namespace ({listed}): two "
            "writers fight over the same lowers",
            "run exactly one (systemctl status failoverd; kill the stray one by its pid)",
        )
    pins = Path(pin_dir)
    try:
        if not pins.is_dir():
            return
    except PermissionError:
        yield _not_checked("second-agent", pin_dir, "whether an agent holds these pins")
        return
    from bpfailover.datapath.maps import lock_held, lock_path  # under /run, not the pins

    lock = str(lock_path(pins))
    try:
        locked = lock_held(pins)
    except PermissionError:
        yield _not_checked("second-agent", lock, f"whether an agent holds {pin_dir}")
        return
    if locked and sock is not None and not denied:  # denied: said by [control-socket]
        try:
            api.request(sock, {"cmd": "status"}, timeout=2.0)
        except (api.AgentUnreachable, api.ReplyError):
            yield Finding(
                "second-agent",
                pin_dir,
                f"an agent holds the pin lock of {pin_dir} but none answers on {sock}: a "
                "second agent with another socket, or a hung one",
                "find it (fuser -v " + lock + "), stop it, then start failoverd once",
            )


def _not_checked(check: str, path: str, what: str) -> Finding:
    """A check we may not do as this user: what was not read, and how to get it."""
    return Finding(check, path, f"permission denied: {what} was not checked", ROOT_FIX)


def check_orphaned_pins(host: Host, netns_hint: str | None) -> Iterator[Finding]:
    """bpfailover datapaths under the bpffs that no running agent holds: their programs
    may still be attached and forwarding, with nobody to fail over.  One whose failover
    device another running agent adopted (with pins of its own) is that agent's: not an
    orphan, judged in the namespace the devices are in."""
    from bpfailover.ops import orphans

    denied: list[Path] = []
    try:
        with netns.entered(netns_hint):
            found = orphans.find(host.bpffs, denied)
    except OSError:  # cannot enter it: the devices are not checked
        denied = []
        found = orphans.find(host.bpffs, denied)
    if denied:
        paths = ", ".join(str(p) for p in denied)
        yield _not_checked("orphaned-pins", paths, "whether a datapath there is orphaned")
    for d in found:
        ns = f" --netns {netns_hint}" if netns_hint else " [--netns NAME]"
        yield Finding(
            "orphaned-pins",
            str(d),
            "a bpfailover datapath that no running agent holds (its agent is gone): its "
            "programs and failover devices stay until removed",
            f"failoverctl teardown --pins {d} --all{ns} (--yes while a failover device has "
            "carrier and addresses); or start its failoverd again to adopt it",
        )


# -- cloud guests (docs/cloud-guest.md) ----------------------------------------------------------

VIRTIO_NET_F_STANDBY = 62
CLOUD_INIT_SHIM = "bpfailover/cloud-init/sitecustomize.py"
CLOUD_INIT_UNITS = ("cloud-init-local", "cloud-init", "cloud-config", "cloud-final")


def _peer(name: str) -> str:
    return f"{name[:12]}_fo"  # bpfailover.datapath.attach.peer_name (no datapath import here)


def check_kernel_failover(host: Host, links: dict[int, LinkInfo]) -> Iterator[Finding]:
    """A virtio NIC with the STANDBY feature: the hypervisor runs `failover=on`, so the
    guest's virtio_net creates net_failover's master and takes the lowers itself."""
    if not host.check_managers:
        return
    for lk in sorted(links.values(), key=lambda lk: lk.name):
        try:
            features = (host.sys / "class/net" / lk.name / "device/features").read_text().strip()
        except OSError:
            continue
        if len(features) > VIRTIO_NET_F_STANDBY and features[VIRTIO_NET_F_STANDBY] == "1":
            yield Finding(
                "hypervisor-failover-on",
                lk.name,
                f"virtio NIC {lk.name} has the STANDBY feature (virtio-net `failover=on`): the "
                "kernel's net_failover takes its lowers, bpfailover cannot (and net_failover "
                "cannot be blacklisted: virtio_net needs its symbols)",
                "set `failover=off` on the virtio-net device (QEMU `-device virtio-net-pci,...,"
                "failover=off` and no `failover_pair_id` on the VF; libvirt: no <teaming> "
                "elements) and reboot the guest.  What it costs: QEMU no longer unplugs the VF "
                "by itself when migration starts (and re-plugs it on failure): the management "
                "layer detaches the VF before `migrate` and attaches one on the destination "
                "(docs/cloud-guest.md)",
            )


def check_cloud_init(host: Host, lowers: list[Lower]) -> Iterator[Finding]:
    """cloud-init installed and enabled for the lowers' duplicate MAC without the shim.
    cloud-init configures the host's own netns only: lowers in another one are not its."""
    if not host.check_managers or not lowers or not _exists(host.etc / "cloud" / "cloud.cfg"):
        return
    if _exists(host.etc / "cloud" / "cloud-init.disabled"):
        return
    shim = host.usr_lib / CLOUD_INIT_SHIM
    missing = []
    for unit in CLOUD_INIT_UNITS:
        d = host.etc / "systemd" / "system" / f"{unit}.service.d"
        texts = [_read(p) for p in sorted(d.glob("*.conf"))]
        if not any(str(shim.parent) in t and "PYTHONPATH" in t for t in texts):
            missing.append(unit)
    try:
        log = (host.var_log / "cloud-init.log").read_text(errors="replace")
    except OSError:
        log = ""
    dup = re.search(r"duplicate mac found![^\n]*", log)
    if missing or not _exists(shim) or dup:
        names = ", ".join(sorted({lw.link.name for lw in lowers}))
        seen = f"; its log says: {dup.group(0)}" if dup else ""
        yield Finding(
            "cloud-init-duplicate-mac",
            names,
            f"cloud-init sees the lowers ({names}) as NICs with the failover device's MAC: "
            "`get_interfaces_by_mac` raises 'duplicate mac found!' (network-config v2, "
            f"OpenStack, EC2) and MAC-matched config may land on a lower{seen}",
            f"install deploy/cloud-init/sitecustomize.py as {shim} and "
            "deploy/cloud-init/10-bpfailover.conf as a drop-in of "
            + ", ".join(f"{u}.service" for u in (missing or CLOUD_INIT_UNITS))
            + " (docs/cloud-guest.md), then `systemctl daemon-reload`",
        )


def _nm_managed(host: Host, ifindex: int) -> bool | None:
    try:
        text = (host.run / "NetworkManager" / "devices" / str(ifindex)).read_text(errors="replace")
    except OSError:
        return None
    managed = _keyfile_value(text, "managed")
    return None if managed is None else managed.lower() in ("true", "1", "yes")


def _udev_prop(host: Host, ifindex: int, key: str) -> str | None:
    try:
        text = (host.run / "udev" / "data" / f"n{ifindex}").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(rf"^E:{re.escape(key)}=(.*)$", text, re.M)
    return m.group(1) if m else None


def check_failover_devices(
    host: Host, cfg: configmod.Config | None, links: dict[int, LinkInfo]
) -> Iterator[Finding]:
    """The failover device left unmanaged by NetworkManager; its hidden peer managed."""
    if not host.check_managers or cfg is None:
        return
    names = {lk.name: lk for lk in links.values()}
    nm_running = _is_dir(host.run / "NetworkManager")
    for g in cfg.groups:
        dev = names.get(g.name)
        if dev is not None and nm_running and _udev_prop(host, dev.ifindex, "NM_UNMANAGED") == "1":
            yield Finding(
                "failover-device-nm-unmanaged",
                g.name,
                f"NetworkManager never manages failover device {g.name}: udev marks it "
                "NM_UNMANAGED=1 (NetworkManager's 85-nm-unmanaged.rules does so for every veth)",
                "install deploy/udev/86-bpfailover-nm-managed.rules (the group's MAC in it), "
                "`udevadm control --reload && udevadm trigger --subsystem-match=net "
                "--action=change`",
            )
        peer = names.get(_peer(g.name))
        if peer is None:
            continue
        if _nm_managed(host, peer.ifindex):
            yield Finding(
                "peer-managed",
                peer.name,
                f"NetworkManager manages {peer.name}, the hidden peer of failover device "
                f"{g.name} (its admin state is the failover device's carrier)",
                f"`nmcli device set {peer.name} managed no` and add "
                "`unmanaged-devices=interface-name:*_fo` to a NetworkManager conf.d file",
            )
        by_networkd = _networkd_managed(host, peer.ifindex)
        if by_networkd is not None:
            state, net = by_networkd
            yield Finding(
                "peer-managed",
                peer.name,
                f"systemd-networkd manages {peer.name}, the hidden peer of failover device "
                f"{g.name} (state {state}, from {net}: a Name= glob such as en* catches it)",
                "install deploy/networkd/00-bpfailover-peer.network in /etc/systemd/network "
                "and `networkctl reload`",
            )


def check_bypassed_qdisc(
    cfg: configmod.Config | None, links: dict[int, LinkInfo]
) -> Iterator[Finding]:
    """A root qdisc on a failover device with tx_path direct: its transmit never reaches it
    (the datapath redirects at clsact egress, before the qdisc and the taps)."""
    if cfg is None:
        return
    names = {lk.name: lk for lk in links.values()}
    for g in cfg.groups:
        dev = names.get(g.name)
        if g.tx_path != "direct" or dev is None or dev.root_qdisc in (None, "noqueue"):
            continue
        yield Finding(
            "qdisc-bypassed",
            g.name,
            f"root qdisc {dev.root_qdisc} on failover device {g.name} never sees its transmit: "
            "with tx_path direct the datapath redirects at clsact egress, before any qdisc",
            f"put the qdisc on the lowers (`tc qdisc add dev LOWER root ...`), or set "
            f"`tx_path: veth` for group {g.name} (one backlog trip more per packet)",
        )


def check_netplan_mac_match(
    host: Host, cfg: configmod.Config | None, links: dict[int, LinkInfo]
) -> Iterator[Finding]:
    """netplan (0.105+) renders `match: {macaddress: M}` as networkd's PermanentMACAddress=M;
    the failover device (a veth) has no permanent MAC, so such an entry configures nothing
    (or, without 00-bpfailover-lowers.network, the lowers)."""
    if cfg is None:
        return
    import yaml

    names = {lk.name: lk for lk in links.values()}
    macs = {names[g.name].mac.lower(): g.name for g in cfg.groups if g.name in names}
    macs.update({g.mac: g.name for g in cfg.groups if g.mac != "auto"})
    for path in sorted((host.etc / "netplan").glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text(errors="replace"))
        except (OSError, yaml.YAMLError):
            continue
        net = doc.get("network") if isinstance(doc, dict) else None
        ethernets = net.get("ethernets") if isinstance(net, dict) else None
        for key, entry in (ethernets or {}).items():
            match = entry.get("match") if isinstance(entry, dict) else None
            mac = str(match.get("macaddress", "")).lower() if isinstance(match, dict) else ""
            if mac in macs:
                yield Finding(
                    "netplan-mac-match",
                    f"{path}:{key}",
                    f"netplan entry {key} matches MAC {mac}: netplan renders it as "
                    "PermanentMACAddress=, which failover device "
                    f"{macs[mac]} (a veth) does not have, so it configures no device or a lower",
                    f"match the failover device by name (`match: {{name: {macs[mac]}}}`, no "
                    "set-name); for cloud-init's file install deploy/cloud-init/ "
                    "(docs/cloud-guest.md), then `netplan apply`",
                )


# -- running -------------------------------------------------------------------------------------


def run_checks(
    host: Host,
    cfg: configmod.Config | None,
    sock: str | None,
    links: dict[int, LinkInfo] | None = None,
) -> list[Finding]:
    findings: list[Finding] = []
    status = None
    denied = False
    if sock is not None:
        try:
            reply = api.request(sock, {"cmd": "status"}, timeout=2.0)
            status = AgentStatus.from_json(reply.get("status")) if reply.get("ok") else None
            # the agent's own refusal (SO_PEERCRED): a socket file anyone may open
            denied = not reply.get("ok") and "permission denied" in str(reply.get("error"))
        except api.AgentUnreachable as e:
            denied = e.errno in (errno.EACCES, errno.EPERM)
        except (api.ReplyError, StatusFormatError):
            status = None  # then the lowers are found by the config
        if denied:
            findings.append(
                Finding(
                    "control-socket",
                    sock,
                    "permission denied: the running agent's lowers and state were not checked",
                    PERMISSION_FIX,
                )
            )
    if links is None:
        try:
            links = dump_links(host.netns)
        except OSError as e:
            where = f"network namespace {host.netns}" if host.netns else "the links"
            problem = (
                f"permission denied: cannot enter {where}"
                if e.errno in (errno.EACCES, errno.EPERM)
                else f"cannot list links: {e.strerror or e}"
            )
            findings.append(Finding("links", host.netns or "host", problem, "run as root"))
            links = {}
    elsewhere = list(check_agent_netns(host, status))
    findings.extend(elsewhere)
    # an agent in another namespace: its ifindexes mean other devices here
    lowers = find_lowers(cfg, links, None if elsewhere else status)
    pin_dir = cfg.bpffs if cfg is not None else "/sys/fs/bpf/bpfailover"
    checks: Iterable[Iterable[Finding]] = (
        check_addresses(lowers),
        check_dhcp(host, lowers),
        check_managers(host, lowers),
        check_masters(lowers, links),
        check_bpffs(host, pin_dir),
        check_headers(host),
        check_datapath_check(host, status),
        check_privileges(host),
        check_realtime(host, cfg),
        check_neighbour_knobs(host),
        check_sysctl_net(host),
        check_agents(host, pin_dir, sock, denied),
        check_orphaned_pins(host, host.netns),
        check_kernel_failover(host, links),
        check_cloud_init(host, lowers),
        check_failover_devices(host, cfg, links),
        check_netplan_mac_match(host, cfg, links),
        check_bypassed_qdisc(cfg, links),
    )
    for found in checks:
        findings.extend(found)
    return findings


def format_findings(findings: list[Finding]) -> str:
    if not findings:
        return "doctor: no problems found"
    out = []
    for f in findings:
        out.append(f"[{f.check}] {f.subject}: {f.problem}\n    fix: {f.fix}")
    out.append(f"doctor: {len(findings)} finding{'s' if len(findings) != 1 else ''}")
    return "\n".join(out)


def main_for_cli(args: argparse.Namespace, cli_socket: str | None) -> int:
    """`failoverctl doctor`: 0 when nothing is found, 4 when something is, 2 on a bad config."""
    netns_name_ = args.netns
    cfg: configmod.Config | None = None
    pre: list[Finding] = []
    path = configmod.config_path(args.config)
    try:
        cfg = configmod.load_config(path)
    except configmod.ConfigError as e:
        if args.config or os.environ.get(configmod.CONFIG_ENV) or _present(path):
            for line in str(e).splitlines():
                print(f"failoverctl: {line}", file=sys.stderr)
            return 2
        pre.append(
            Finding(
                "config",
                str(path),
                "no agent config: lowers are guessed only from a running agent",
                f"write {path} (keys: {configmod.REFERENCE}), or give the agent's: "
                "failoverctl --config FILE doctor",
            )
        )
    sock = cli_socket or (cfg.control.socket if cfg else "/run/bpfailover/control.sock")
    host = host_for(netns_name_)
    if cfg is not None:
        host.bpffs = Path(cfg.bpffs).parent  # where this config's pins live
    findings = pre + run_checks(host, cfg, sock)
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        print(f"doctor: checking {describe_netns(host)}")
        print(format_findings(findings))
    return 4 if findings else 0

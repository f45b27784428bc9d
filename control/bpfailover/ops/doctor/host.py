"""What the checks look at: the `Host` (its paths, which tests point at fixtures), the
namespace's links and the config's lowers, processes and network namespaces; `Finding`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bpfailover import netns
from bpfailover.model import config as configmod
from bpfailover.model.lowers import lower_role
from bpfailover.model.status import AgentStatus

PERMISSION_FIX = "run as root or as a member of the config's control.group"

ROOT_FIX = "run as root"

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


def exists(path: Path) -> bool:
    """Path.exists() that says False where we may not look (it raises EACCES)."""
    try:
        return path.exists()
    except OSError:
        return False


def present(path: Path) -> bool:
    """It exists, or we may not look (then it may well: say what we could not read)."""
    try:
        return path.exists()
    except PermissionError:
        return True


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def read(path: Path) -> str:
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


def procs(host: Host) -> Iterator[tuple[int, list[str]]]:
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


def exe(host: Host, pid: int) -> str | None:
    try:
        return os.readlink(host.proc / str(pid) / "exe")
    except OSError:
        return None  # another user's process as non-root, a kernel thread, a fixture


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
    ns_id = netns_id(host, None)
    name = netns_name(host, ns_id)
    return f"this process's network namespace ({name or ns_id or 'unknown'})"


def netns_id(host: Host, pid: int | None) -> str | None:
    """The netns a process is in (`net:[ino]`), or of host.netns / ourselves for None."""
    try:
        if pid is None:
            if host.netns is not None:
                return f"net:[{os.stat(netns.path_of(host.netns)).st_ino}]"
            return os.readlink(host.proc / "self" / "ns" / "net")
        return os.readlink(host.proc / str(pid) / "ns" / "net")
    except OSError:
        return None


def same_netns(host: Host, pid: int) -> bool:
    ours, theirs = netns_id(host, None), netns_id(host, pid)
    return ours is None or theirs is None or ours == theirs

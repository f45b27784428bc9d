"""The machine: bpffs, kernel headers, privileges and capabilities, realtime scheduling,
the neighbour and net sysctls."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from bpfailover.datapath import kheaders
from bpfailover.effects import sysctl
from bpfailover.model import config as configmod
from bpfailover.ops.doctor.host import Finding, Host, exists, is_dir

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
    if is_dir(build) or os.environ.get("BCC_KERNEL_SOURCE"):
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
    missing = [k.split("/")[-1] for k in NEIGH_KNOBS if not exists(host.proc / k)]
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

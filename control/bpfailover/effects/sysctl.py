"""The sysctls failoverd sets: only its own devices', all under /proc/sys/net.

A container runtime mounts /proc/sys read-only (docker without --privileged), and a unit
may too: then none of them can be set, and the agent says so once (`sysctl_read_only`,
naming the first knob and what each costs) instead of failing silently on every device.
`failoverctl doctor` reports the same before the agent runs.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

log = logging.getLogger("bpfailover.effects")

PROC_SYS_NET = Path("/proc/sys/net")
# errors that mean "this /proc/sys is not writable for us", not "no such knob here"
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
# what failoverd loses when /proc/sys/net cannot be written, knob by knob
COSTS = {
    "disable_ipv6": "the lowers, hidden peers and filter VLANs keep IPv6 (their own "
    "link-local address, DAD and router solicitations)",
    "evict_nocarrier": "the failover device's ARP/ND entries are flushed when its carrier "
    "drops (about 1 s of traffic after a short carrier gap)",
}
FIX = (
    "run failoverd with /proc/sys/net writable (systemd: ReadWritePaths=/proc/sys/net; "
    "docker mounts /proc/sys read-only: --security-opt systempaths=unconfined), "
    "or accept the cost"
)
_said = False


def cost(knob: str) -> str:
    return next((c for k, c in COSTS.items() if knob.endswith(k)), "")


def set_net(knob: str, value: str) -> bool:
    """Write /proc/sys/net/<knob>.  False (logged once per process) when /proc/sys/net is
    read-only; other errors (a knob this kernel or device lacks) raise OSError."""
    global _said
    try:
        with open(PROC_SYS_NET / knob, "w") as f:
            f.write(value)
        return True
    except OSError as e:
        if e.errno not in READ_ONLY_ERRNOS:
            raise
        if not _said:
            _said = True
            log.warning(
                "%s",
                json.dumps(
                    {
                        "event": "sysctl_read_only",
                        "knob": f"net.{knob.replace('/', '.')}",
                        "error": e.strerror,
                        "effect": "; ".join(COSTS.values()),
                        "fix": FIX,
                    }
                ),
            )
        return False


def writable(root: Path = PROC_SYS_NET) -> str:
    """ "" when /proc/sys/net (root) can be written, else why not (for doctor).  Probed by
    opening a knob for writing, which changes nothing."""
    probe = root / "ipv4" / "conf" / "default" / "arp_ignore"
    try:
        with open(probe, "r+"):
            return ""
    except OSError as e:
        if e.errno in READ_ONLY_ERRNOS:
            return f"{probe}: {e.strerror}"
        return ""  # no such knob here: nothing to say about the mount

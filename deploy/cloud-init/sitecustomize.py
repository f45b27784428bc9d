"""bpfailover: cloud-init ignores the lowers of a bpfailover failover device.

cloud-init (22.4, Debian 12) skips the lowers of the kernel's net_failover with
`cloudinit.net.is_netfailover()`, which needs a `master` link and virtio's STANDBY feature.
bpfailover needs `failover=off` and makes no master, so the virtio standby, the VF and the
failover device all show the same MAC: `get_interfaces_by_mac()` raises "duplicate mac
found!" (network-config v2 parsing, OpenStack, EC2, ...), `_rename_interfaces` and the
fallback NIC may pick a lower.

This file, on PYTHONPATH of cloud-init's units only (10-bpfailover.conf), extends
`is_netfailover()` (and rewrites netplan's MAC matches, see rewrite_netplan): a NIC with a bus device whose MAC is carried by a bpfailover failover
device (a veth whose peer is "<name[:12]>_fo") is a lower and is ignored, exactly as
net_failover's primary and standby are.  The failover device itself stays, so MAC-matched
network config applies to it.  Reads sysfs only; imports nothing from bpfailover (cloud-init
runs on the system Python).  The upstream fix is proposed in docs/cloud-guest.md.

It takes its own directory off PYTHONPATH as soon as it is imported, so nothing cloud-init
starts (user scripts, package hooks, other Pythons) inherits it.  It patches only the
cloud-init versions it was checked against (KNOWN_VERSIONS); under any other it does
nothing and says so in one line on stderr (the unit's journal).
"""

from __future__ import annotations

import os
import sys

SYS_NET = "/sys/class/net"
# cloud-init releases (major.minor) whose is_netfailover() and netplan renderer this was
# checked against; add one only after checking it (docs/cloud-guest.md)
KNOWN_VERSIONS = ("22.4",)


def _scrub_pythonpath() -> None:
    """Our directory off PYTHONPATH: only the unit's own process needs the shim."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    keep = [p for p in parts if p and os.path.abspath(p) != here]
    if keep:
        os.environ["PYTHONPATH"] = os.pathsep.join(keep)
    else:
        os.environ.pop("PYTHONPATH", None)


def _read(root: str, dev: str, attr: str) -> str:
    try:
        with open(os.path.join(root, dev, attr)) as f:
            return f.read().strip()
    except OSError:
        return ""


def peer_name(name: str) -> str:
    """failoverd's hidden peer name (bpfailover.datapath.attach.peer_name)."""
    return f"{name[:12]}_fo"


def failover_macs(root: str = SYS_NET) -> dict[str, str]:
    """{MAC: failover device} for every bpfailover failover device in `root`."""
    try:
        devs = os.listdir(root)
    except OSError:
        return {}
    by_index = {_read(root, d, "ifindex"): d for d in devs}
    out: dict[str, str] = {}
    for d in devs:
        if os.path.exists(os.path.join(root, d, "device")):
            continue  # a bus device, never a veth
        iflink, ifindex = _read(root, d, "iflink"), _read(root, d, "ifindex")
        if iflink and iflink != ifindex and by_index.get(iflink) == peer_name(d):
            mac = _read(root, d, "address").lower()
            if mac:
                out[mac] = d
    return out


def is_lower(devname: str, root: str = SYS_NET) -> bool:
    """A bus NIC that carries the MAC of a bpfailover failover device."""
    if not os.path.exists(os.path.join(root, devname, "device")):
        return False
    return _read(root, devname, "address").lower() in failover_macs(root)


def rewrite_netplan(doc: dict, macs: dict[str, str]) -> list[str]:
    """netplan (0.105+) turns `match: {macaddress: M}` into networkd's PermanentMACAddress=M.
    The failover device is a veth: it has no permanent MAC, so a MAC-matched entry would
    configure no device at all (the lowers are taken by 00-bpfailover-lowers.network).  An
    entry matching a failover MAC is rewritten to match the failover device by name; a
    `set-name` is dropped (failoverd names that device).  Returns what was changed."""
    changed = []
    ethernets = (doc.get("network") or {}).get("ethernets") or {}
    for key, entry in ethernets.items():
        match = entry.get("match") if isinstance(entry, dict) else None
        mac = str((match or {}).get("macaddress", "")).lower()
        if mac in macs:
            entry["match"] = {"name": macs[mac]}
            entry.pop("set-name", None)
            changed.append(f"{key}: match macaddress {mac} -> name {macs[mac]}")
    return changed


def _install_netplan() -> None:
    try:
        import yaml
        from cloudinit.net import netplan
    except ImportError:
        return

    orig = netplan.Renderer._render_content
    if getattr(orig, "bpfailover", False):
        return

    def _render_content(self, network_state):  # type: ignore[no-untyped-def]
        content = orig(self, network_state)
        macs = failover_macs()
        doc = yaml.safe_load(content) if macs else None
        if not isinstance(doc, dict):
            return content
        changed = rewrite_netplan(doc, macs)
        if not changed:
            return content
        note = "".join(f"# bpfailover: {c}\n" for c in changed)
        return note + yaml.safe_dump(doc, default_flow_style=False)

    _render_content.bpfailover = True  # type: ignore[attr-defined]
    netplan.Renderer._render_content = _render_content


def _install() -> None:
    import cloudinit.net as cnet

    _install_netplan()

    orig = cnet.is_netfailover
    if getattr(orig, "bpfailover", False):
        return

    def is_netfailover(devname, driver=None):  # type: ignore[no-untyped-def]
        return orig(devname, driver) or is_lower(devname)

    is_netfailover.bpfailover = True  # type: ignore[attr-defined]
    cnet.is_netfailover = is_netfailover


def _chain_system_sitecustomize() -> None:
    """Python imports only the first sitecustomize on sys.path: run the system's one too."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in sys.path:
        if not d or os.path.abspath(d) == here:
            continue
        path = os.path.join(d, "sitecustomize.py")
        if os.path.isfile(path):
            with open(path) as f:
                code = compile(f.read(), path, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": path})
            return


def _is_cloud_init() -> bool:
    # sys.argv may not be set yet while site runs: read what the kernel has.
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().split(b"\0")[:2]
    except OSError:
        return False
    return any(os.path.basename(a) == b"cloud-init" for a in argv)


def cloud_init_version() -> str:
    try:
        from cloudinit import version
    except ImportError:
        return ""
    get = getattr(version, "version_string", None)
    return str(get() if callable(get) else getattr(version, "__VERSION__", ""))


def _activate() -> bool:
    """Patch cloud-init if it is a version this shim knows; else one line on stderr."""
    found = cloud_init_version()
    if ".".join(found.split(".")[:2]) not in KNOWN_VERSIONS:
        print(
            f"bpfailover cloud-init shim not active: cloud-init {found or '(unknown version)'} "
            f"is not a version it was checked against ({', '.join(KNOWN_VERSIONS)}); "
            "the failover device's lowers are not hidden from cloud-init",
            file=sys.stderr,
        )
        return False
    try:
        _install()
    except Exception as e:  # never break cloud-init itself
        print(f"bpfailover cloud-init shim not active: {e}", file=sys.stderr)
        return False
    return True


_scrub_pythonpath()
if _is_cloud_init():
    _activate()
_chain_system_sitecustomize()

"""Cloud guests (docs/cloud-guest.md): the hypervisor's `failover=on`, cloud-init without
the duplicate-MAC shim, the failover device and its peer under a network manager, a
netplan MAC match."""

from __future__ import annotations

import re
from collections.abc import Iterator

from bpfailover.model import config as configmod
from bpfailover.ops.doctor.host import Finding, Host, LinkInfo, Lower, exists, is_dir, read
from bpfailover.ops.doctor.lowers import keyfile_value, networkd_managed

SNIPPETS = "deploy/ in the bpfailover sources (or /usr/share/doc/bpfailover/deploy)"

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
    if not host.check_managers or not lowers or not exists(host.etc / "cloud" / "cloud.cfg"):
        return
    if exists(host.etc / "cloud" / "cloud-init.disabled"):
        return
    shim = host.usr_lib / CLOUD_INIT_SHIM
    missing = []
    for unit in CLOUD_INIT_UNITS:
        d = host.etc / "systemd" / "system" / f"{unit}.service.d"
        texts = [read(p) for p in sorted(d.glob("*.conf"))]
        if not any(str(shim.parent) in t and "PYTHONPATH" in t for t in texts):
            missing.append(unit)
    try:
        log = (host.var_log / "cloud-init.log").read_text(errors="replace")
    except OSError:
        log = ""
    dup = re.search(r"duplicate mac found![^\n]*", log)
    if missing or not exists(shim) or dup:
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
    managed = keyfile_value(text, "managed")
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
    nm_running = is_dir(host.run / "NetworkManager")
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
        by_networkd = networkd_managed(host, peer.ifindex)
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

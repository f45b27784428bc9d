"""Cloud guests (docs/cloud-guest.md): the shipped naming and manager snippets, the cloud-init
shim and doctor's cloud-guest findings, each against fixtures (no root, no udev needed).

The udev rules are evaluated by a small interpreter of the keys they use, so a rule that
renames the wrong device (or none) fails here; the proving ground's cloud variant runs them
in real udev, networkd, NetworkManager and cloud-init."""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from bpfailover.datapath.attach import peer_name
from bpfailover.model import config
from bpfailover.ops import doctor
from bpfailover.ops.doctor import Host, LinkInfo

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MAC = "52:54:00:00:12:53"
OTHER = "52:54:00:aa:bb:cc"

# ---- a tiny udev rule interpreter (the keys the shipped rules use) ---------------------------

_TOKEN = re.compile(r'\s*([A-Z]+)(?:\{([^}]*)\})?\s*(==|!=|:=|\+=|=)\s*"([^"]*)"\s*,?')


def parse_rules(path: Path) -> list[list[tuple[str, str | None, str, str]]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        toks = [(m.group(1), m.group(2), m.group(3), m.group(4)) for m in _TOKEN.finditer(line)]
        assert sum(len(m.group(0)) for m in _TOKEN.finditer(line)) == len(line), line
        rules.append(toks)
    return rules


def _glob(pattern: str, value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in pattern.split("|"))


def apply_rules(path: Path, dev: dict[str, Any]) -> dict[str, Any]:
    """dev: action, kernel (name), subsystem, drivers (list up the chain), attrs, env."""
    env = dict(dev.get("env", {}))
    out: dict[str, Any] = {"env": env, "name": None}
    for rule in parse_rules(path):
        ok = True
        for key, arg, op, val in rule:
            if op not in ("==", "!="):
                continue
            if key == "ACTION":
                got: list[str] = [dev["action"]]
            elif key == "SUBSYSTEM":
                got = [dev["subsystem"]]
            elif key == "KERNEL":
                got = [dev["kernel"]]
            elif key == "DRIVERS":
                got = dev.get("drivers", [])
            elif key == "ATTR":
                got = [dev["attrs"].get(arg, "")]
            elif key == "ENV":
                got = [env.get(arg, "")]
            else:
                raise AssertionError(f"interpreter does not know {key}")
            hit = any(_glob(val, g) for g in got)
            if (op == "==") != hit:
                ok = False
                break
        if not ok:
            continue
        for key, arg, op, val in rule:
            if op in ("==", "!="):
                continue
            val = re.sub(r"\$env\{([^}]*)\}", lambda m: env.get(m.group(1), ""), val)
            if key == "NAME":
                out["name"] = val
            elif key == "ENV":
                env[arg] = val
    return out


def netdev(kernel: str, mac: str, drivers: list[str], **env: str) -> dict[str, Any]:
    return {
        "action": "add",
        "subsystem": "net",
        "kernel": kernel,
        "drivers": drivers,
        "attrs": {"address": mac},
        "env": env,
    }


NAMING = DEPLOY / "udev/81-bpfailover-standby-name.rules"
NM_MANAGED = DEPLOY / "udev/86-bpfailover-nm-managed.rules"
LOWERS = DEPLOY / "udev/80-bpfailover-lowers.rules"


def test_standby_is_renamed_name_nsby_so_the_failover_device_takes_name() -> None:
    virtio = netdev("eth0", MAC, ["virtio_net", "virtio-pci"], ID_NET_NAME="enp1s0")
    assert apply_rules(NAMING, virtio)["name"] == "enp1s0nsby"
    # The name the guest's config expects is then free for the failover device.
    cfg = config.parse_config("groups: [{name: enp1s0, standby: {driver: virtio_net}}]")
    assert cfg.groups[0].name == "enp1s0"


def test_naming_leaves_the_vf_other_macs_and_kernel_standby_alone() -> None:
    vf = netdev("eth1", MAC, ["e1000e"], ID_NET_NAME="enp2s0")
    assert apply_rules(NAMING, vf)["name"] is None
    other = netdev("eth2", OTHER, ["virtio_net"], ID_NET_NAME="enp3s0")
    assert apply_rules(NAMING, other)["name"] is None
    # failover=on: udev already named it from phys_port_name "sby" -- never "nsbynsby".
    kernel_sby = netdev("eth0", MAC, ["virtio_net"], ID_NET_NAME="enp1s0nsby")
    assert apply_rules(NAMING, kernel_sby)["name"] is None
    # Renames happen on "add" only: a "change" event never renames a running NIC.
    change = {**netdev("enp1s0", MAC, ["virtio_net"], ID_NET_NAME="enp1s0"), "action": "change"}
    assert apply_rules(NAMING, change)["name"] is None
    # The failover device (a veth, no bus driver) and udev without a chosen name: untouched.
    assert apply_rules(NAMING, netdev("enp1s0", MAC, [], ID_NET_DRIVER="veth"))["name"] is None
    assert apply_rules(NAMING, netdev("eth0", MAC, ["virtio_net"]))["name"] is None


def nm_85(dev: dict[str, Any]) -> dict[str, Any]:
    """NetworkManager's 85-nm-unmanaged.rules, the veth line (read from NM 1.42)."""
    env = dict(dev["env"])
    if env.get("ID_NET_DRIVER") == "veth" and not fnmatch.fnmatchcase(dev["kernel"], "eth[0-9]*"):
        env["NM_UNMANAGED"] = "1"
    return {**dev, "env": env}


def test_nm_manages_the_failover_device_but_not_its_peer_or_the_lowers() -> None:
    fo = nm_85(netdev("enp1s0", MAC, [], ID_NET_DRIVER="veth"))
    assert fo["env"]["NM_UNMANAGED"] == "1"  # NetworkManager alone: never managed
    assert apply_rules(NM_MANAGED, fo)["env"]["NM_UNMANAGED"] == "0"
    peer = nm_85(netdev(peer_name("enp1s0"), MAC, [], ID_NET_DRIVER="veth"))
    assert apply_rules(NM_MANAGED, peer)["env"]["NM_UNMANAGED"] == "1"
    other_veth = nm_85(netdev("vethab12", OTHER, [], ID_NET_DRIVER="veth"))
    assert apply_rules(NM_MANAGED, other_veth)["env"]["NM_UNMANAGED"] == "1"
    for lower in (
        netdev("enp1s0nsby", MAC, ["virtio_net"], ID_NET_DRIVER="virtio_net"),
        netdev("enp2s0", MAC, ["e1000e"], ID_NET_DRIVER="e1000e"),
    ):
        got = apply_rules(NM_MANAGED, apply_rules(LOWERS, lower) | {"env": {}} | lower)
        assert got["env"].get("NM_UNMANAGED") != "0"
        assert apply_rules(LOWERS, lower)["env"]["NM_UNMANAGED"] == "1"


def _network(path: Path) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read_string(path.read_text())
    return p


# ---- which .network / .link file networkd and udev pick ---------------------------------------
# systemd reads /etc, /run and /usr/lib/systemd/network (a name in an earlier directory masks
# the same name in a later one), sorts the files by name and applies the first whose [Match]
# fits the device.  The snippets are installed in /etc/systemd/network (docs/cloud-guest.md),
# next to what a cloud guest has: netplan's rendering of cloud-init's network config, an
# operator's catch-all, systemd's 99-default.link and whatever this machine's systemd ships.
ETC, RUN, LIB = "/etc/systemd/network", "/run/systemd/network", "/usr/lib/systemd/network"
NETPLAN_BY_NAME = "[Match]\nName=enp1s0\n\n[Network]\nDHCP=ipv4\n"  # with the shim
NETPLAN_BY_MAC = f"[Match]\nMACAddress={MAC}\n\n[Network]\nDHCP=ipv4\n"  # what clouds send
USER_GLOB = "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n"
DEFAULT_LINK = (
    "[Match]\nOriginalName=*\n\n[Link]\nNamePolicy=keep kernel database onboard slot path\n"
    "AlternativeNamesPolicy=database onboard slot path\nMACAddressPolicy=persistent\n"
)


def guest_files(netplan: str) -> dict[str, str]:
    """path -> text: the shipped snippets where the docs install them, and the others."""
    files = {f"{LIB}/{f.name}": f.read_text() for f in sorted(Path(LIB).glob("*")) if f.is_file()}
    files |= {
        f"{RUN}/10-netplan-nic0.network": netplan,
        f"{ETC}/50-dhcp.network": USER_GLOB,
        f"{LIB}/99-default.link": DEFAULT_LINK,
    }
    files |= {f"{ETC}/{f.name}": f.read_text() for f in (DEPLOY / "networkd").iterdir()}
    return files


def _fits(patterns: str, value: str | None) -> bool:
    neg = patterns.startswith("!")
    hit = value is not None and any(
        fnmatch.fnmatchcase(value, p) for p in patterns.lstrip("!").split()
    )
    return hit != neg


def first_match(files: dict[str, str], suffix: str, dev: dict[str, str]) -> str | None:
    """The file name systemd applies to `dev` (name, mac, driver, kind), or None."""
    by_name: dict[str, str] = {}
    for d in (ETC, RUN, LIB):  # highest priority first
        for path, text in files.items():
            name = path.rsplit("/", 1)[1]
            if path.rsplit("/", 1)[0] == d and name.endswith(suffix):
                by_name.setdefault(name, text)
    for name in sorted(by_name):  # strcmp order, as systemd's conf_files_list
        p = configparser.ConfigParser(strict=False, interpolation=None)
        p.optionxform = str  # type: ignore[assignment,method-assign]
        p.read_string(by_name[name])
        match = dict(p["Match"]) if p.has_section("Match") else {}
        value = {
            "Name": dev["name"],
            "OriginalName": dev["name"],
            "MACAddress": dev["mac"],
            "Driver": dev.get("driver"),
            "Kind": dev.get("kind"),
        }
        if all(_fits(v, value[k]) for k, v in match.items()):
            return name
    return None


def _dev(name: str, driver: str, kind: str = "") -> dict[str, str]:
    return {"name": name, "mac": MAC, "driver": driver, "kind": kind}


def test_networkd_peer_file_catches_the_peer_and_sorts_before_globs() -> None:
    f = DEPLOY / "networkd/00-bpfailover-peer.network"
    p = _network(f)
    pattern = p["Match"]["Name"]
    assert fnmatch.fnmatchcase(peer_name("enp1s0"), pattern)
    assert fnmatch.fnmatchcase(peer_name("averylongname0"), pattern)
    assert not fnmatch.fnmatchcase("enp1s0", pattern)
    assert not fnmatch.fnmatchcase("enp1s0nsby", pattern)
    assert p["Match"]["Kind"] == "veth" and p["Link"]["Unmanaged"] == "yes"
    # networkd takes the first match in lexical order: before netplan's and a user's en* glob.
    peer = _dev(peer_name("enp1s0"), "veth", "veth")
    for netplan in (NETPLAN_BY_NAME, NETPLAN_BY_MAC):
        assert first_match(guest_files(netplan), ".network", peer) == f.name


def test_networkd_lowers_file_takes_bus_nics_with_the_mac_never_the_veth() -> None:
    f = DEPLOY / "networkd/00-bpfailover-lowers.network"
    p = _network(f)
    assert p["Match"]["MACAddress"] == MAC
    assert p["Match"]["Driver"] == "!veth"
    assert p["Link"]["Unmanaged"] == "yes"
    # ahead of netplan's file (which matches them by MAC too) and a user's en* glob
    for netplan in (NETPLAN_BY_NAME, NETPLAN_BY_MAC):
        files = guest_files(netplan)
        for lower in (_dev("enp1s0nsby", "virtio_net"), _dev("enp2s0", "e1000e")):
            assert first_match(files, ".network", lower) == f.name
        # the failover device (a veth with the MAC) is left to the guest's config
        fo = _dev("enp1s0", "veth", "veth")
        assert first_match(files, ".network", fo) == "10-netplan-nic0.network"


def test_every_snippet_names_the_same_group_mac() -> None:
    files = [NAMING, NM_MANAGED, LOWERS, *sorted((DEPLOY / "networkd").glob("*lowers*"))]
    files.append(DEPLOY / "networkmanager/90-bpfailover-lowers.conf")
    for f in files:
        macs = set(
            re.findall(r"(?<![0-9a-f])(?:[0-9a-f]{2}:){5}[0-9a-f]{2}(?![0-9a-f:])", f.read_text())
        )
        assert macs == {MAC}, f


def test_failoverd_unit_orders_before_the_managers_and_cloud_init() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    text = (DEPLOY / "systemd/failoverd.service").read_text()
    before = " ".join(re.findall(r"^Before=(.*)$", text, re.M)).split()
    after = " ".join(re.findall(r"^After=(.*)$", text, re.M)).split()
    wants = " ".join(re.findall(r"^Wants=(.*)$", text, re.M)).split()
    for u in (
        "network-pre.target",
        "systemd-networkd.service",
        "NetworkManager.service",
        "cloud-init-local.service",
    ):
        assert u in before, u
    assert "network-pre.target" in wants
    assert "systemd-udev-trigger.service" in after  # the standby has its final name
    assert "DefaultDependencies=no" in text  # cloud-init-local runs before sysinit.target
    dropin = (DEPLOY / "cloud-init/10-bpfailover.conf").read_text()
    assert "After=failoverd.service" in dropin
    assert "PYTHONPATH=/usr/lib/bpfailover/cloud-init" in dropin


# ---- the cloud-init shim -----------------------------------------------------------------------


def load_shim() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bpfailover_ci_shim", DEPLOY / "cloud-init/sitecustomize.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_sysfs(root: Path, devs: list[tuple[str, int, int, str, bool]]) -> Path:
    """(name, ifindex, iflink, mac, has a bus device)"""
    net = root / "class" / "net"
    for name, ifindex, iflink, mac, bus in devs:
        d = net / name
        d.mkdir(parents=True)
        (d / "ifindex").write_text(f"{ifindex}\n")
        (d / "iflink").write_text(f"{iflink}\n")
        (d / "address").write_text(f"{mac}\n")
        if bus:
            (d / "device").mkdir()
    return net


GUEST = [
    ("lo", 1, 1, "00:00:00:00:00:00", False),
    ("enp1s0nsby", 2, 2, MAC, True),
    ("enp2s0", 3, 3, MAC, True),
    ("enp1s0", 4, 5, MAC, False),
    ("enp1s0_fo", 5, 4, "aa:bb:cc:dd:ee:ff", False),
    ("enp3s0", 6, 6, OTHER, True),
]


def test_shim_ignores_the_lowers_keeps_the_failover_device(tmp_path: Path) -> None:
    shim = load_shim()
    net = fake_sysfs(tmp_path, GUEST)
    assert shim.peer_name("averylongname0") == peer_name("averylongname0")
    assert shim.failover_macs(str(net)) == {MAC: "enp1s0"}
    lowers = [d for d, *_ in GUEST if shim.is_lower(d, str(net))]
    assert lowers == ["enp1s0nsby", "enp2s0"]


def test_shim_does_nothing_without_a_failover_device(tmp_path: Path) -> None:
    shim = load_shim()
    # failoverd not up: a veth pair that is not ours, the lowers stay visible (cloud-init
    # then reports the duplicate MAC, and doctor explains it).
    net = fake_sysfs(
        tmp_path,
        [
            ("enp1s0", 2, 2, MAC, True),
            ("enp2s0", 3, 3, MAC, True),
            ("veth0", 4, 5, MAC, False),
            ("veth1", 5, 4, OTHER, False),
        ],
    )
    assert shim.failover_macs(str(net)) == {}
    assert not shim.is_lower("enp1s0", str(net))


def test_shim_extends_cloud_inits_is_netfailover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shim = load_shim()
    net = fake_sysfs(tmp_path, GUEST)
    cnet = types.ModuleType("cloudinit.net")
    cnet.is_netfailover = lambda devname, driver=None: devname == "kernel-sby"  # type: ignore[attr-defined]
    pkg = types.ModuleType("cloudinit")
    pkg.net = cnet  # type: ignore[attr-defined]
    netplan = types.ModuleType("cloudinit.net.netplan")

    class Renderer:
        def _render_content(self, network_state: object) -> str:
            return (
                "network:\n  version: 2\n  ethernets:\n    nic0:\n      match:\n"
                f"        macaddress: '{MAC}'\n      dhcp4: true\n"
            )

    netplan.Renderer = Renderer  # type: ignore[attr-defined]
    cnet.netplan = netplan  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cloudinit", pkg)
    monkeypatch.setitem(sys.modules, "cloudinit.net", cnet)
    monkeypatch.setitem(sys.modules, "cloudinit.net.netplan", netplan)
    monkeypatch.setattr(shim, "SYS_NET", str(net))
    monkeypatch.setattr(shim.is_lower, "__defaults__", (str(net),))
    monkeypatch.setattr(shim.failover_macs, "__defaults__", (str(net),))
    shim._install()
    shim._install()  # idempotent
    f = cnet.is_netfailover  # type: ignore[attr-defined]
    assert [d for d, *_ in GUEST if f(d)] == ["enp1s0nsby", "enp2s0"]
    assert f("kernel-sby")  # net_failover's own lowers still ignored
    import yaml

    out = Renderer()._render_content(None)
    assert out.startswith("# bpfailover: nic0: match macaddress")
    assert yaml.safe_load(out)["network"]["ethernets"]["nic0"]["match"] == {"name": "enp1s0"}


# ---- doctor's cloud-guest findings ----------------------------------------------------------


def guest_links() -> dict[int, LinkInfo]:
    return {
        1: LinkInfo(1, "lo", "00:00:00:00:00:00"),
        2: LinkInfo(2, "enp1s0nsby", MAC),
        3: LinkInfo(3, "enp2s0", MAC),
        4: LinkInfo(4, "enp1s0", MAC, "veth"),
        5: LinkInfo(5, "enp1s0_fo", "aa:bb:cc:dd:ee:ff", "veth"),
    }


CFG = config.parse_config(f"groups: [{{name: enp1s0, standby: enp1s0nsby, mac: '{MAC}'}}]")


def cloud_host(tmp: Path) -> Host:
    return Host(
        proc=tmp / "proc",
        run=tmp / "run",
        etc=tmp / "etc",
        sys=tmp / "sys",
        var_log=tmp / "log",
        usr_lib=tmp / "usrlib",
        euid=0,
    )


def found(host: Host, cfg: config.Config = CFG) -> list[tuple[str, str]]:
    links = guest_links()
    lowers = doctor.find_lowers(cfg, links, None)
    out = [
        *doctor.check_kernel_failover(host, links),
        *doctor.check_cloud_init(host, lowers),
        *doctor.check_failover_devices(host, cfg, links),
        *doctor.check_netplan_mac_match(host, cfg, links),
    ]
    for f in out:
        assert f.fix and "\n" not in f.problem
    return sorted((f.check, f.subject) for f in out)


def test_clean_cloud_guest_has_no_findings(tmp_path: Path) -> None:
    host = cloud_host(tmp_path)
    assert found(host) == []
    # cloud-init installed with the shim and every drop-in: still clean.
    (host.etc / "cloud").mkdir(parents=True)
    (host.etc / "cloud/cloud.cfg").write_text("{}\n")
    shim = host.usr_lib / doctor.CLOUD_INIT_SHIM
    shim.parent.mkdir(parents=True)
    shim.write_text("#\n")
    dropin = (
        (DEPLOY / "cloud-init/10-bpfailover.conf")
        .read_text()
        .replace("/usr/lib", str(host.usr_lib))
    )
    for u in doctor.CLOUD_INIT_UNITS:
        d = host.etc / "systemd/system" / f"{u}.service.d"
        d.mkdir(parents=True)
        (d / "10-bpfailover.conf").write_text(dropin)
    assert found(host) == []
    (host.var_log).mkdir()
    (host.var_log / "cloud-init.log").write_text("DEBUG all fine\n")
    assert found(host) == []


def test_cloud_init_without_the_shim_is_the_duplicate_mac_finding(tmp_path: Path) -> None:
    host = cloud_host(tmp_path)
    (host.etc / "cloud").mkdir(parents=True)
    (host.etc / "cloud/cloud.cfg").write_text("{}\n")
    assert found(host) == [("cloud-init-duplicate-mac", "enp1s0nsby, enp2s0")]
    (host.var_log).mkdir()
    (host.var_log / "cloud-init.log").write_text(
        "RuntimeError: duplicate mac found! both 'enp2s0' and 'enp1s0nsby' have mac 'x'\n"
    )
    f = list(doctor.check_cloud_init(host, doctor.find_lowers(CFG, guest_links(), None)))
    assert "both 'enp2s0'" in f[0].problem and "10-bpfailover.conf" in f[0].fix
    (host.etc / "cloud/cloud-init.disabled").write_text("")
    assert found(host) == []


def test_failover_on_is_found_with_the_right_advice(tmp_path: Path) -> None:
    host = cloud_host(tmp_path)
    feats = ["0"] * 64
    d = host.sys / "class/net/enp1s0nsby/device"
    d.mkdir(parents=True)
    (d / "features").write_text("".join(feats) + "\n")
    assert found(host) == []
    feats[doctor.VIRTIO_NET_F_STANDBY] = "1"
    (d / "features").write_text("".join(feats) + "\n")
    assert found(host) == [("hypervisor-failover-on", "enp1s0nsby")]
    f = next(doctor.check_kernel_failover(host, guest_links()))
    assert "failover=off" in f.fix and "blacklist" not in f.fix
    assert "unplugs the VF" in f.fix  # what failover=off costs
    # A lower still enslaved to net_failover gets the same advice, never "blacklist".
    links = guest_links()
    links[2].master = 9
    links[9] = LinkInfo(9, "enp1s0", MAC)
    enslaved = list(doctor.check_masters(doctor.find_lowers(CFG, links, None), links))
    assert enslaved and "failover=off" in enslaved[0].fix
    assert "cannot be blacklisted" in enslaved[0].fix


def test_failover_device_unmanaged_by_nm_and_peer_managed(tmp_path: Path) -> None:
    host = cloud_host(tmp_path)
    (host.run / "NetworkManager/devices").mkdir(parents=True)
    (host.run / "udev/data").mkdir(parents=True)
    (host.run / "udev/data/n4").write_text("E:ID_NET_DRIVER=veth\nE:NM_UNMANAGED=1\n")
    assert found(host) == [("failover-device-nm-unmanaged", "enp1s0")]
    (host.run / "udev/data/n4").write_text("E:ID_NET_DRIVER=veth\nE:NM_UNMANAGED=0\n")
    assert found(host) == []
    (host.run / "NetworkManager/devices/5").write_text("[device]\nmanaged=true\n")
    assert found(host) == [("peer-managed", "enp1s0_fo")]
    (host.run / "NetworkManager/devices/5").write_text("[device]\nmanaged=false\n")
    links_dir = host.run / "systemd/netif/links"
    links_dir.mkdir(parents=True)
    (links_dir / "5").write_text(
        "ADMIN_STATE=configured\nNETWORK_FILE=/etc/systemd/network/50-en.network\n"
    )
    f = list(doctor.check_failover_devices(host, CFG, guest_links()))
    assert [(x.check, x.subject) for x in f] == [("peer-managed", "enp1s0_fo")]
    assert "50-en.network" in f[0].problem and "00-bpfailover-peer.network" in f[0].fix
    (links_dir / "5").write_text("ADMIN_STATE=unmanaged\n")
    assert found(host) == []
    # Not the host's netns: sysfs and the managers' state describe another one.
    host.check_managers = False
    (links_dir / "5").write_text("ADMIN_STATE=configured\n")
    assert found(host) == []


def test_shim_rewrites_netplan_mac_matches_to_the_failover_device() -> None:
    """netplan 0.106 renders `match: macaddress` as PermanentMACAddress=, which a veth never
    has: the cloud's entry is pointed at the failover device by name; others stay."""
    shim = load_shim()
    doc = {
        "network": {
            "version": 2,
            "ethernets": {
                "nic0": {"match": {"macaddress": MAC.upper()}, "set-name": "eth0", "dhcp4": True},
                "nic1": {"match": {"macaddress": OTHER}, "dhcp4": True},
                "enp9s0": {"dhcp4": True},
            },
        }
    }
    changed = shim.rewrite_netplan(doc, {MAC: "enp1s0"})
    eth = doc["network"]["ethernets"]
    assert eth["nic0"] == {"match": {"name": "enp1s0"}, "dhcp4": True}
    assert eth["nic1"] == {"match": {"macaddress": OTHER}, "dhcp4": True}
    assert eth["enp9s0"] == {"dhcp4": True}
    assert changed == [f"nic0: match macaddress {MAC} -> name enp1s0"]
    assert shim.rewrite_netplan({"network": {"version": 2}}, {MAC: "enp1s0"}) == []


def test_netplan_mac_match_is_found_name_match_is_not(tmp_path: Path) -> None:
    host = cloud_host(tmp_path)
    (host.etc / "netplan").mkdir(parents=True)
    f = host.etc / "netplan/50-cloud-init.yaml"
    f.write_text(
        f"network:\n  version: 2\n  ethernets:\n    nic0:\n      match:\n"
        f"        macaddress: '{MAC.upper()}'\n      dhcp4: true\n"
    )
    assert found(host) == [("netplan-mac-match", f"{f}:nic0")]
    auto = config.parse_config("groups: [{name: enp1s0, standby: {driver: virtio_net}}]")
    assert found(host, auto) == [("netplan-mac-match", f"{f}:nic0")]  # MAC from the device
    f.write_text(
        "network:\n  version: 2\n  ethernets:\n    nic0:\n      match:\n"
        "        name: enp1s0\n      dhcp4: true\n"
    )
    assert found(host) == []
    f.write_text("network: [not, a, mapping\n")
    assert found(host) == []


class _Msg:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs

    def get_attr(self, key: str) -> Any:
        return self.attrs.get(key)


class _AltnameIpr:
    """The kernel answers a lookup of `enp1s0` with the standby that has it as altname."""

    def link_lookup(self, ifname: str) -> list[int]:
        return [3] if ifname in ("enp1s0", "enp1s0nsby") else []

    def get_links(self, index: int) -> list[_Msg]:
        return [_Msg({"IFLA_IFNAME": "enp1s0nsby", "IFLA_ADDRESS": MAC})]

    def link(self, *a: Any, **kw: Any) -> None:
        raise AssertionError("nothing may be created or changed")


def test_failover_name_taken_by_an_altname_is_one_clear_error() -> None:
    from bpfailover.datapath.attach import create_failover_dev
    from bpfailover.datapath.maps import DatapathError

    with pytest.raises(DatapathError) as e:
        create_failover_dev(_AltnameIpr(), "enp1s0", MAC)
    assert "alternative name of enp1s0nsby" in str(e.value)
    assert "10-bpfailover-standby.link" in str(e.value)


def test_standby_link_file_keeps_naming_and_drops_altnames() -> None:
    p = _network(DEPLOY / "networkd/10-bpfailover-standby.link")
    assert p["Match"]["MACAddress"] == MAC and p["Match"]["Driver"] == "virtio_net"
    assert p["Link"]["AlternativeNamesPolicy"] == ""
    assert p["Link"]["NamePolicy"].split() == [
        "keep",
        "kernel",
        "database",
        "onboard",
        "slot",
        "path",
    ]
    # udev applies the first matching .link file: this one, not 99-default.link, names the
    # standby (eth0, the kernel's name, when udev sees it); any other NIC keeps the default
    files = guest_files(NETPLAN_BY_MAC)
    assert first_match(files, ".link", _dev("eth0", "virtio_net")) == "10-bpfailover-standby.link"
    assert first_match(files, ".link", _dev("eth1", "e1000e")) == "99-default.link"


def test_headers_behind_protectkernelmodules_fall_back_not_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd's ProtectKernelModules=yes and no CAP_DAC_OVERRIDE: stat() under /lib/modules
    is EACCES for root; failoverd crashed on it at start-up in the cloud guest."""
    from bpfailover.datapath import kheaders

    real_is_dir = Path.is_dir

    def is_dir(self: Path) -> bool:
        if str(self).startswith("/lib/modules/"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    with pytest.raises(kheaders.HeadersError, match="no kernel headers"):
        kheaders.find("6.1.0-test", src_dir=tmp_path / "src", cache=tmp_path / "cache")


def test_shim_leaves_pythonpath_to_no_child(tmp_path: Path) -> None:
    """The drop-in's PYTHONPATH brings the shim into the unit's process; what that process
    starts (cloud-init's user scripts, hooks, other Pythons) does not get it."""
    shim_dir = str(DEPLOY / "cloud-init")
    probe = "import os; print(repr(os.environ.get('PYTHONPATH')))"
    for given, left in (
        (shim_dir, "None"),
        (f"{shim_dir}{os.pathsep}{tmp_path}", repr(str(tmp_path))),
    ):
        p = subprocess.run(
            ["/usr/bin/python3", "-c", probe],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": given},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert p.returncode == 0 and p.stdout.strip() == left, (given, p.stdout, p.stderr)


def test_shim_off_for_a_cloud_init_it_does_not_know(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shim = load_shim()
    cnet = types.ModuleType("cloudinit.net")
    orig = lambda devname, driver=None: False  # noqa: E731
    cnet.is_netfailover = orig  # type: ignore[attr-defined]
    ver = types.ModuleType("cloudinit.version")
    pkg = types.ModuleType("cloudinit")
    pkg.net, pkg.version = cnet, ver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cloudinit", pkg)
    monkeypatch.setitem(sys.modules, "cloudinit.net", cnet)
    monkeypatch.setitem(sys.modules, "cloudinit.version", ver)
    netplan = types.ModuleType("cloudinit.net.netplan")
    netplan.Renderer = type("Renderer", (), {"_render_content": lambda self, ns: ""})  # type: ignore[attr-defined]
    cnet.netplan = netplan  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cloudinit.net.netplan", netplan)
    ver.version_string = lambda: "24.1.3"  # type: ignore[attr-defined]
    assert shim._activate() is False
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cloud-init 24.1.3 is not a version" in err[0], err
    assert cnet.is_netfailover is orig
    ver.version_string = lambda: "22.4.2"  # type: ignore[attr-defined]
    assert shim._activate() is True
    assert capsys.readouterr().err == ""
    assert cnet.is_netfailover is not orig

"""The proving ground's guest under libvirt: libvirtd defines and runs it, virsh drives it.

libvirtd (Debian 12: libvirt 9.0) is started here, inside the hypervisor namespace (QEMU runs
where libvirtd runs, so the domain's taps are that namespace's), in a mount namespace of its
own: its /run, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and
/etc/libvirt are directories under the proving ground's workdir, so nothing of the
machine's libvirt (configuration, sockets, domains) is read or touched.  virsh reaches it at
`qemu+unix:///system?socket=WORKDIR/libvirtd-NAME/run/libvirt-sock`.

The domain (type='qemu': TCG) is built from deploy/libvirt/ verbatim: the virtio standby
(standby-interface.xml: the VF's MAC, link down, on br0) and the guest agent's channel
(qemu-ga-channel.xml).  The VF is an emulated e1000e standing in for the hostdev (QEMU 7.2
here has no SR-IOV device): an `<interface type='ethernet'>` on the proving ground's tap
with the same MAC, attached with `virsh attach-device` after the start, as the seed's
destination does.  Kernel mode adds net_failover's pairing the libvirt way: `<teaming
type='persistent'/>` on the standby (QEMU's failover=on); the VF stand-in cannot carry
the `<teaming type='transient'>` half (vf_xml()).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from xml.sax.saxutils import escape, quoteattr

from bench.proving_ground.image import REPO, Image, _run
from bench.proving_ground.vm import BOOT_TIMEOUT_S, MAC, VM, Guest, Net, TapWatch, VMError, sh
from bpfailover import netns

DEPLOY = REPO / "deploy" / "libvirt"
HOST_PACKAGES = ("libvirt-daemon-system", "libvirt-clients")
# libvirt finds an interface to detach by its MAC, which the VF shares with the standby
# ("multiple devices matching MAC address"): the alias tells them apart (vf-interface.xml)
VF_ALIAS = "ua-sriov-vf0"

LIBVIRTD_CONF = """\
# the proving ground's own libvirtd: root only, no auth on its private socket
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"""
# QEMU as root with no labelling, cgroups or private /dev: nothing here to confine it with
# (no systemd, no AppArmor profile loaded for these paths); stdio to files (no virtlogd).
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
# Run by `ip netns exec HV sh -c SCRIPT sh DIR`: ip netns exec has given the shell a mount
# namespace of its own (slave to the host's), so these mounts are libvirtd's alone.
START = """\
set -e
d=$1
hostname "$2"
mount -t tmpfs -o mode=0755 pg-libvirt /run
mkdir -p /run/libvirt
mount --bind "$d/run" /run/libvirt
mount --bind "$d/lib" /var/lib/libvirt
mount --bind "$d/cache" /var/cache/libvirt
mount --bind "$d/log" /var/log/libvirt
mount --bind "$d/etc" /etc/libvirt
exec libvirtd --config /etc/libvirt/libvirtd.conf
"""


def ensure_host_packages() -> None:
    """libvirtd and virsh, as the proving ground installs QEMU: on demand."""
    missing = [
        p
        for p in HOST_PACKAGES
        if subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode != 0
    ]
    if missing:
        print(f"installing host packages: {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], 300, print, env=env)
        _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            900,
            print,
            env=env,
        )


class Libvirtd:
    """One libvirtd in namespace `ns`, everything of it under `base`."""

    def __init__(self, ns: str, base: Path, host_uuid: str, hostname: str, mig_addr: str) -> None:
        self.ns, self.base, self.host_uuid = ns, base, host_uuid
        self.hostname, self.mig_addr = hostname, mig_addr
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.base / 'run' / 'libvirt-sock'}"

    def start(self) -> None:
        for sub in ("run", "lib/qemu", "cache/qemu", "log/qemu", "etc/qemu"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        # two daemons on one machine: migration needs two host UUIDs, and the incoming
        # migration's QEMU listens on this "host's" address on the migration network
        conf = LIBVIRTD_CONF + f'host_uuid = "{self.host_uuid}"\n'
        (self.base / "etc" / "libvirtd.conf").write_text(conf)
        mig = f'migration_address = "{self.mig_addr}"\nmigration_host = "{self.mig_addr}"\n'
        (self.base / "etc" / "qemu.conf").write_text(QEMU_CONF + mig)
        (self.base / "run" / "libvirt-sock").unlink(missing_ok=True)
        log = open(self.base / "libvirtd.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            # a UTS namespace too: each "host" its own hostname, as migration expects
            netns.cmd_in(
                self.ns, ["unshare", "-u", "sh", "-c", START, "sh", str(self.base), self.hostname]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 120
        while True:
            # the first start probes QEMU's capabilities: tens of seconds on a loaded host
            with contextlib.suppress(VMError):
                if self.run("version", check=False, timeout=60).returncode == 0:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.base / "libvirtd.log").read_text(errors="replace")[-600:]
                self.close()
                raise VMError(f"libvirtd in {self.ns} did not come up: {tail}")
            time.sleep(0.3)

    def run(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        try:
            p = subprocess.run(
                ["virsh", "-c", self.uri, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise VMError(f"virsh {args[0]}: no answer within {timeout:.0f}s") from None
        if check and p.returncode != 0:
            raise VMError(f"virsh {args[0]}: {' '.join(p.stderr.split()) or p.returncode}")
        return p

    def virsh(self, *args: str, timeout: float = 60.0) -> str:
        return self.run(*args, timeout=timeout).stdout

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # libvirtd leaves its guests running when it exits: destroy them first
            with contextlib.suppress(Exception):
                names = self.run("list", "--all", "--name", check=False, timeout=20).stdout
                for name in filter(None, (n.strip() for n in names.splitlines())):
                    self.run("destroy", name, check=False, timeout=30)
                    self.run("undefine", name, check=False, timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


class Hosts:
    """Two "hypervisors" on one machine: the proving ground's Net (its hv namespace, the
    peer) and a second namespace {p}-hv2 with its own br0 and the same two taps.  The two
    bridges are joined by a veth (one L2 segment, as two hosts on a switch), and a second
    veth carries the migration stream between the two (198.18.1.1 / 198.18.1.2)."""

    MIG = ("198.18.1.1", "198.18.1.2")

    def __init__(self, net: Net) -> None:
        self.net = net
        self.hv2 = f"{net.prefix}-hv2"

    def up(self) -> None:
        self.net.up()
        try:
            hv, hv2, p = self.net.hv, self.hv2, self.net.prefix
            if netns.exists(hv2):
                sh(["ip", "netns", "del", hv2])
            sh(["ip", "netns", "add", hv2])
            sh(["ip", "link", "set", "lo", "up"], hv2)
            sh(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], hv2)
            sh(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], hv2)
            sh(["ip", "link", "add", "br0", "type", "bridge"], hv2)
            for tap in (self.net.tap_sby, self.net.tap_pri):
                sh(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], hv2)
                sh(["ip", "link", "set", tap, "master", "br0", "up"], hv2)
            for link, addr in ((f"{p}l2", None), (f"{p}mig", self.MIG)):
                sh(
                    ["ip", "link", "add", link, "type", "veth", "peer", "name", link, "netns", hv2],
                    hv,
                )
                for ns in (hv, hv2):
                    if addr is None:
                        sh(["ip", "link", "set", link, "master", "br0"], ns)
                    else:
                        a = addr[0] if ns == hv else addr[1]
                        sh(["ip", "addr", "add", f"{a}/24", "dev", link], ns)
                    sh(["ip", "link", "set", link, "up"], ns)
            sh(["ip", "link", "set", "br0", "up"], hv2)
        except Exception:
            self.down()
            raise

    def down(self) -> None:
        if netns.exists(self.hv2):
            sh(["ip", "netns", "del", self.hv2], check=False)
        self.net.down()

    def watch(self) -> MultiWatch:
        second = SimpleNamespace(hv=self.hv2, tap_sby=self.net.tap_sby, tap_pri=self.net.tap_pri)
        return MultiWatch(self.net, [TapWatch(self.net), TapWatch(second)])  # type: ignore[arg-type]


class MultiWatch:
    """TapWatch over both hypervisors: the guest's frames per role, wherever it runs."""

    def __init__(self, net: Net, watches: list[TapWatch]) -> None:
        self.net, self.watches = net, watches

    @property
    def times(self) -> dict[str, list[float]]:
        return {
            tap: sorted(t for w in self.watches for t in w.times[tap])
            for tap in (self.net.tap_sby, self.net.tap_pri)
        }

    def reset(self) -> None:
        for w in self.watches:
            w.reset()

    def close(self) -> None:
        for w in self.watches:
            w.close()


def deploy_xml(name: str) -> ET.Element:
    """A snippet of deploy/libvirt/ as it is (comments dropped by the parser)."""
    return ET.parse(DEPLOY / name).getroot()


def standby_xml(tap: str, failover: bool) -> ET.Element:
    """deploy/libvirt/standby-interface.xml with one change, its host side: the proving
    ground's own tap (type='ethernet', made beforehand in each hypervisor namespace, where the
    frames are watched) for the snippet's bridge port, which libvirt would name vnetN."""
    sby = deploy_xml("standby-interface.xml")
    src = sby.find("./source")
    if src is not None:
        sby.remove(src)
    sby.set("type", "ethernet")
    ET.SubElement(sby, "target", dev=tap, managed="no")
    if failover:  # net_failover: QEMU's VIRTIO_NET_F_STANDBY, the libvirt way
        ET.SubElement(sby, "teaming", type="persistent")
    return sby


def vf_xml(tap: str) -> str:
    """The VF stand-in: an emulated e1000e on the proving ground's tap, the standby's MAC.
    No `<teaming type='transient'>` in kernel mode either: libvirt 9.0 takes it on a hostdev
    interface only ("virtio-net teaming transient interface must be type='hostdev', not
    'ethernet'").  The guest's net_failover pairs the two by their MAC all the same; what the
    stand-in lacks is QEMU unplugging it by itself for a migration, which the seed's script
    does itself (detach-device) before it migrates."""
    return (
        f"<interface type='ethernet'><mac address='{MAC}'/>"
        f"<target dev='{tap}' managed='no'/><model type='e1000e'/>"
        f"<alias name='{VF_ALIAS}'/></interface>\n"
    )


def domain_xml(name: str, vm: VM, overlay: Path) -> str:
    """The guest of vm.argv() as a libvirt domain: same kernel, command line and memory.
    No 9p share of the repository (QEMU refuses to migrate a guest with 9p mounted): the
    guest runs the image's copy of it.  The guest command channel, the console and the guest
    agent's socket are where libvirt puts them, in each daemon's own directories, so the
    destination's do not replace the source's during a migration."""
    argv = vm.argv()
    cmdline = argv[argv.index("-append") + 1].replace(" rw ", " ro ")  # a read-only disk
    sby = standby_xml(vm.net.tap_sby, vm.failover)
    qga = deploy_xml("qemu-ga-channel.xml")
    # root ports for libvirt to place the devices on, and free ones for the VF's hot-plug
    ports = "".join(
        f"<controller type='pci' index='{i}' model='pcie-root-port'/>" for i in range(1, 9)
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{vm.mem_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(vm.img.kernel))}</kernel>
    <initrd>{escape(str(vm.img.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(overlay))}/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
    </disk>
    {ports}
    {ET.tostring(sby, encoding="unicode").strip()}
    <serial type='file'><source path='/var/log/libvirt/qemu/pg-console.log'/></serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='pg'/>
    </channel>
    {ET.tostring(qga, encoding="unicode").strip()}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtVM(VM):
    """VM's guest, defined and started by libvirtd; its faults through virsh.  `daemon` is
    the one that runs it now (a migration moves it to the other one)."""

    def __init__(
        self,
        img: Image,
        net: Net,
        mode: str,
        workdir: Path,
        daemons: list[Libvirtd],
        name: str,
    ) -> None:
        super().__init__(img, net, mode, workdir)
        self.daemons, self.daemon, self.name = daemons, daemons[0], name
        self.vf_file = workdir / "vf.xml"

    def other(self) -> Libvirtd:
        return next(d for d in self.daemons if d is not self.daemon)

    def start(self) -> None:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        # The image itself, read-only: libvirt 9.0 migrates a disk on a local file system
        # only when it is read-only ("Migration without shared storage is unsafe": it knows
        # no local file system as shared, and a raw <shareable/> disk is refused alike).  The
        # guest needs no writes to its root (its /run and /tmp are tmpfs).
        overlay = self.img.disk
        (w / "domain.xml").write_text(domain_xml(self.name, self, overlay))
        self.vf_file.write_text(vf_xml(self.net.tap_pri))
        t0 = time.monotonic()
        d = self.daemon
        d.virsh("define", str(w / "domain.xml"))
        d.virsh("start", self.name)
        # QEMU 7.2 cannot re-plug a failover primary it was started with (vm.py): the VF is
        # attached after the start, in both modes, as the seed's destination attaches it.
        self.plug()
        self.connect_guest()
        try:
            assert self.guest is not None
            self.guest.wait_ready(BOOT_TIMEOUT_S)
        except VMError as e:
            raise VMError(f"{e}; console: {self.console_tail()}") from e
        self.boot_s = time.monotonic() - t0
        self.probes = 1

    def live_xml(self) -> ET.Element:
        return ET.fromstring(self.daemon.virsh("dumpxml", self.name))

    def connect_guest(self) -> None:
        """The guest command channel where this daemon put it."""
        for ch in self.live_xml().findall("./devices/channel"):
            t, src = ch.find("./target"), ch.find("./source")
            if t is not None and t.get("name") == "pg" and src is not None:
                path = src.get("path", "")
                break
        else:
            raise VMError(f"domain {self.name!r}: no guest command channel")
        host = self.daemon.base / "lib" / Path(path).relative_to("/var/lib/libvirt")
        if self.guest is not None:
            self.guest.close()
        self.guest = Guest(host)

    def locate(self) -> None:
        """After a migration (or a failed one): which daemon runs the guest now."""
        for d in self.daemons:
            p = d.run("domstate", self.name, check=False, timeout=20)
            if p.returncode == 0 and p.stdout.strip() == "running":
                if d is not self.daemon:
                    self.daemon = d
                    self.connect_guest()
                return
        raise VMError(f"domain {self.name!r} runs on neither libvirtd")

    def vf_present(self) -> bool:
        return any(
            (m := i.find("./model")) is not None and m.get("type") == "e1000e"
            for i in self.live_xml().findall("./devices/interface")
        )

    # -- faults, the seed's way -------------------------------------------------------------
    def set_link(self, dev: str, up: bool) -> None:
        tap = self.net.tap_sby if dev == "net0" else self.net.tap_pri
        self.daemon.virsh("domif-setlink", self.name, tap, "up" if up else "down")

    def unplug(self, timeout: float = 30.0) -> tuple[float, float]:
        t = time.monotonic()
        self.daemon.virsh("detach-device", self.name, str(self.vf_file), "--live")
        deadline = t + timeout
        while self.vf_present():
            if time.monotonic() > deadline:
                raise VMError(f"the VF still in {self.name!r} {timeout:.0f}s after detach-device")
            time.sleep(0.05)
        self.plugged = False
        return t, time.monotonic()

    def plug(self) -> tuple[float, float]:
        t = time.monotonic()
        self.daemon.virsh("attach-device", self.name, str(self.vf_file), "--live")
        self.plugged = True
        self.probes += 1
        return t, time.monotonic()

    def console_tail(self, n: int = 6) -> str:
        out = []
        for name in ("pg-console.log", f"{self.name}.log"):
            with contextlib.suppress(OSError):
                text = (self.daemon.base / "log" / "qemu" / name).read_text(errors="replace")
                out += text.strip().splitlines()[-n:]
        return " | ".join(out) or "(none)"

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        for d in self.daemons:
            d.run("destroy", self.name, check=False, timeout=30)
            d.run("undefine", self.name, check=False, timeout=30)

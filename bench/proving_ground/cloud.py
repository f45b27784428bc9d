"""The cloud-guest variant: a real boot (systemd, udev, cloud-init, netplan/networkd or
NetworkManager), predictable names, DHCP from the hypervisor side, bpfailover installed.

`python -m bench.proving_ground.cloud` (or `make proving-ground-cloud`):
  per network stack (networkd: netplan.io + systemd-networkd; nm: NetworkManager) and mode
  (bpfailover: failover=off + failoverd.service; kernel: failover=on, net_failover, no
  bpfailover) one boot with a NoCloud seed (cloud-localds) carrying a network-config v2 that
  matches by MAC; records cloud-init's final status, where the address ended up, who manages
  which device; then the carrier, unplug and planned steps (run.py) under the same streams.
Results: bench/results/proving_ground_cloud.{json,md}.  docs/cloud-guest.md explains it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from bench.proving_ground import image
from bench.proving_ground import vm as vm_mod
from bench.proving_ground.run import (
    Mode,
    Settings,
    StepResult,
    run_step,
    steps_table,
    summarize,
)
from bench.proving_ground.vm import (
    E1000_MAX_NIC,
    GUEST_V4,
    INTX_ALL,
    MAC,
    VM,
    Net,
    TapWatch,
    VMError,
    sh,
)

RECIPE = "pg-cloud-2"  # bump when the build steps below change
# The proving ground's package list as of this variant (pinned: the base list may grow for
# other variants without rebuilding this one).
BASE_PACKAGES = (
    "linux-image-amd64",
    "linux-headers-amd64",
    "kmod",
    "iproute2",
    "python3",
    "python3-venv",
    "python3-bpfcc",
    "ethtool",
    "iputils-ping",
    "procps",
    "ca-certificates",
)
CLOUD_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "netplan.io",
    "network-manager",
)
STACKS = ("networkd", "nm")
REPLUG_STEPS = ("unplug", "planned")  # the VF unplugged and plugged back during the step
MODES = ("bpfailover", "kernel")
CLOUD_STEPS = ("baseline", "carrier", "unplug", "planned")
# q35: the virtio NIC sits behind root port rp1 (bus 1), the e1000e behind rp2 (bus 2), so
# udev's path policy names them enp1s0 and enp2s0.  The standby becomes enp1s0nsby
# (deploy/udev/81-bpfailover-standby-name.rules) and the failover device takes enp1s0.
GROUP_NAME = "enp1s0"
CLOUD_INIT_TIMEOUT_S = 900.0  # a real boot under TCG, bcc compiling, another guest beside it
BOOT_TIMEOUT_S = 600.0  # to guestd (a systemd service here)
HV_V4 = "198.18.0.254"  # br0 in the hypervisor namespace: dnsmasq's address
RESULTS = image.REPO / "bench" / "results"

# Units baked into the image (in the key).  bpfailover itself is the package (image.py,
# installed as a cloud image gets it: apt in the image build, the unit enabled); at boot
# bench/proving_ground/cloud_guest.sh (pg-deploy.service, from the 9p repository) copies the
# package's snippets into /etc as an operator would, and writes the config.
PG_DEPLOY = f"""#!/bin/sh
mountpoint -q {image.GUEST_REPO} || \\
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose repo {image.GUEST_REPO}
exec /bin/sh {image.GUEST_REPO}/bench/proving_ground/cloud_guest.sh
"""
UNITS = {
    "pg-deploy.service": """[Unit]
Description=proving ground: the repository (9p); bpfailover's snippets and config
DefaultDependencies=no
After=systemd-modules-load.service systemd-remount-fs.service
Before=systemd-udev-trigger.service cloud-init-local.service failoverd.service
Before=systemd-networkd.service NetworkManager.service pg-guestd.service sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/pg-deploy

[Install]
WantedBy=sysinit.target
""",
    "pg-guestd.service": f"""[Unit]
Description=proving ground: command server on the virtio-serial port
DefaultDependencies=no
After=pg-deploy.service
Requires=pg-deploy.service

[Service]
Environment=PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH={image.GUEST_PYTHONPATH}
ExecStart={image.GUEST_VENV}/bin/python3 {image.GUEST_REPO}/bench/proving_ground/guestd.py
Restart=always

[Install]
WantedBy=sysinit.target
""",
    # The package's unit; "started" also waits for the control socket.
    "failoverd.service.d/pg.conf": """[Unit]
After=pg-deploy.service
Requires=pg-deploy.service

[Service]
ExecStartPost=/bin/sh -c 'i=0; while [ $$i -lt 1200 ]; do \\
  [ -S /run/bpfailover/control.sock ] && exit 0; i=$$((i+1)); sleep 0.1; done; exit 1'
TimeoutStartSec=300
""",
}
CLOUD_CFG = {
    "90-pg.cfg": "datasource_list: [NoCloud]\n",
}
MODULES = "9pnet_virtio\n9p\nvirtio_console\nsch_ingress\ncls_bpf\nveth\n"


def _key() -> str:
    import hashlib

    # What goes into the image: the package built from the working tree (its sources), not
    # image.RECIPE/INIT (pg-init is not used by this boot).
    h = hashlib.sha256()
    h.update(image.package_key().encode())
    h.update(RECIPE.encode())
    h.update(" ".join(BASE_PACKAGES + CLOUD_PACKAGES).encode())
    h.update(PG_DEPLOY.encode())
    h.update(json.dumps([UNITS, CLOUD_CFG, MODULES]).encode())
    return "cloud-" + h.hexdigest()[:12]


def _customize(root: Path, log: Any) -> None:
    """The baked part: units, links, cloud-init's datasource, IPv6 off, modules.  The
    package already put failoverd.service (enabled) and cloud-init's drop-ins in place."""
    sysd = root / "etc/systemd/system"
    for name, text in UNITS.items():
        (sysd / name).parent.mkdir(parents=True, exist_ok=True)
        (sysd / name).write_text(text)
    enabled = sysd / "multi-user.target.wants/failoverd.service"
    if os.readlink(enabled) != "/lib/systemd/system/failoverd.service":
        raise image.ImageError("the package did not enable failoverd.service")
    for unit, target in (
        ("pg-deploy.service", "sysinit.target"),
        ("pg-guestd.service", "sysinit.target"),
    ):
        wants = sysd / f"{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit).unlink(missing_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
    # systemd-networkd is not enabled by default on Debian.
    net_wants = sysd / "multi-user.target.wants"
    (net_wants / "systemd-networkd.service").unlink(missing_ok=True)
    (net_wants / "systemd-networkd.service").symlink_to(
        "/lib/systemd/system/systemd-networkd.service"
    )
    sock_wants = sysd / "sockets.target.wants"
    sock_wants.mkdir(parents=True, exist_ok=True)
    (sock_wants / "systemd-networkd.socket").unlink(missing_ok=True)
    (sock_wants / "systemd-networkd.socket").symlink_to(
        "/lib/systemd/system/systemd-networkd.socket"
    )
    sbin = root / "usr/local/sbin/pg-deploy"
    sbin.write_text(PG_DEPLOY)
    sbin.chmod(0o755)
    for name, text in CLOUD_CFG.items():
        (root / "etc/cloud/cloud.cfg.d" / name).write_text(text)
    (root / "etc/modules-load.d/pg.conf").write_text(MODULES)
    (root / "etc/sysctl.d/90-pg.conf").write_text(
        "net.ipv6.conf.all.disable_ipv6=1\nnet.ipv6.conf.default.disable_ipv6=1\n"
    )
    (root / "etc/bpfailover").mkdir(exist_ok=True)
    status = (root / "var/lib/dpkg/status").read_text()
    versions: dict[str, str] = {}
    for para in status.split("\n\n"):
        fields = dict(ln.split(": ", 1) for ln in para.splitlines() if ": " in ln and ln[0] != " ")
        if fields.get("Package") in ("cloud-init", "netplan.io", "systemd", "network-manager"):
            versions[fields["Package"]] = fields.get("Version", "?")
    (root.parent / "versions.json").write_text(json.dumps(versions))


def _build(out: Path, log: Any) -> None:
    image._build(out, log, image.GUEST_PACKAGES + CLOUD_PACKAGES, customize=_customize, key=_key())


def ensure_cloud_image(log: Any = print, rebuild: bool = False) -> tuple[image.Image, float]:
    return image.ensure_image(log, rebuild, key=_key(), build=_build)


# ---- host side --------------------------------------------------------------------------


class CloudVM(VM):
    """A real boot: systemd as init, predictable names, the NoCloud seed as a second disk."""

    def __init__(self, img: image.Image, net: Net, mode: str, stack: str, workdir: Path) -> None:
        super().__init__(img, net, mode, workdir)
        self.stack = stack
        self.seed = workdir / "seed.img"

    def cmdline(self) -> str:
        masks = ["systemd-networkd.service" if self.stack == "nm" else "NetworkManager.service"]
        if self.mode == "kernel":
            masks.append("failoverd.service")
        return (
            "console=ttyS0 root=/dev/vda rw panic=-1 loglevel=4 "
            f"e1000e.IntMode={INTX_ALL} pgstack={self.stack} pgmode={self.mode} "
            + " ".join(f"systemd.mask={m}" for m in masks)
        )

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("-append") + 1] = self.cmdline()
        i = argv.index("-drive") + 2
        argv[i:i] = ["-drive", f"file={self.seed},format=raw,if=virtio,readonly=on"]
        return argv


def network_config() -> str:
    """What a cloud sends: network-config v2, the NIC matched by MAC, DHCP."""
    return (
        f"version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: '{MAC}'\n    dhcp4: true\n"
    )


def make_seed(path: Path, instance: str) -> None:
    d = path.parent
    (d / "user-data").write_text("#cloud-config\n{}\n")
    (d / "meta-data").write_text(f"instance-id: {instance}\nlocal-hostname: pg-guest\n")
    (d / "network-config").write_text(network_config())
    subprocess.run(
        [
            "cloud-localds",
            "--network-config",
            str(d / "network-config"),
            str(path),
            str(d / "user-data"),
            str(d / "meta-data"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


class Dnsmasq:
    """DHCP on the hypervisor side: br0 gets HV_V4, the group MAC always gets GUEST_V4."""

    def __init__(self, net: Net, workdir: Path) -> None:
        sh(["ip", "addr", "add", f"{HV_V4}/24", "dev", "br0"], net.hv)
        self.log = workdir / "dnsmasq.log"
        self.log.unlink(missing_ok=True)  # dnsmasq appends: an earlier run's ACKs would count
        (workdir / "dnsmasq.leases").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                net.hv,
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=br0",
                "--bind-interfaces",
                "--dhcp-authoritative",
                "--dhcp-range=198.18.0.100,198.18.0.199,255.255.255.0,1h",
                f"--dhcp-host={MAC},{GUEST_V4}",
                f"--dhcp-leasefile={workdir / 'dnsmasq.leases'}",
                "--log-dhcp",
                f"--log-facility={self.log}",
                "--pid-file=",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def leases(self) -> int:
        try:
            text = self.log.read_text()
        except OSError:
            return 0
        return text.count("DHCPACK(")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class CloudMode(Mode):
    """One real boot in one stack and mode; `boot_report` is what the guest's tools did."""

    def __init__(self, mode: str, stack: str, img: image.Image, net: Net, s: Settings) -> None:
        super().__init__(mode, img, net, s)
        wd = s.workdir / f"{stack}-{mode}"
        wd.mkdir(parents=True, exist_ok=True)
        self.cvm = CloudVM(img, net, mode, stack, wd)
        self.vm = self.cvm
        self.stack = stack
        self.group = GROUP_NAME
        self.boot_report: dict[str, Any] = {}

    def start(self) -> None:
        t0 = time.monotonic()
        make_seed(self.cvm.seed, f"pg-{self.stack}-{self.name}-{int(time.time())}")
        self.vm.start()
        self.timings["boot_s"] = self.vm.boot_s

        # cloud-final writes result.json when cloud-init is done: a cheap poll (a Python
        # start-up per `cloud-init status` is slow under TCG while bcc compiles).
        def finished() -> bool:
            try:
                return "yes" in self.g.sh("test -e /run/cloud-init/result.json && echo yes; true")
            except VMError:
                return False

        self.wait(finished, CLOUD_INIT_TIMEOUT_S, "cloud-init to finish")
        out = self.g.sh("cloud-init status --long; true", timeout=300)
        self.timings["cloud_init_done_s"] = time.monotonic() - t0
        rep = self.boot_report
        rep["cloud_init_status_long"] = out.strip()
        rep["cloud_init_status"] = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("status:")),
            None,
        )
        with contextlib.suppress(VMError, ValueError):
            result = json.loads(self.g.sh("cat /run/cloud-init/result.json"))["v1"]
            rep["cloud_init_errors"] = result.get("errors", [])
            rep["cloud_init_datasource"] = result.get("datasource")
        rep["cloud_init_log_warnings"] = [
            ln
            for ln in self.g.sh(
                "grep -E 'WARNING|Traceback|duplicate mac' /var/log/cloud-init.log; true"
            ).splitlines()
        ][:20]
        self.wait(self.address_somewhere, 120, f"{GUEST_V4} on some device (DHCP)")
        self.wait(self.by_driver_e1000e_present, 60, "the e1000e primary")
        self.wait(self.on_primary, 90, "traffic on the primary")
        self.inspect()
        self.timings["ready_s"] = time.monotonic() - t0

    def by_driver_e1000e_present(self) -> bool:
        return self.by_driver("e1000e") is not None

    def address_somewhere(self) -> bool:
        return GUEST_V4 in self.g.sh("ip -4 -o addr show")

    def inspect(self) -> None:
        """Where the address is, who manages what, names, the failover device's state."""
        rep = self.boot_report
        addrs: dict[str, list[str]] = {}
        for ln in self.g.sh("ip -4 -o addr show").splitlines():
            parts = ln.split()
            if parts[1] != "lo":
                addrs.setdefault(parts[1], []).append(parts[3])
        rep["ipv4_by_device"] = addrs
        rep["address_on"] = [
            d for d, a in addrs.items() if any(x.startswith(GUEST_V4 + "/") for x in a)
        ]
        rep["links"] = {
            lk["name"]: {"driver": lk["driver"], "mac": lk.get("mac"), "up": lk["up"]}
            for lk in self.links()
        }
        if self.stack == "networkd":
            rep["manager"] = self.g.sh("networkctl list --no-legend --no-pager; true").strip()
        else:
            rep["manager"] = self.g.sh("nmcli -t -f DEVICE,TYPE,STATE device; true").strip()
        rep["netplan"] = self.g.sh("cat /etc/netplan/*.yaml 2>/dev/null; true").strip()
        rep["failoverd"] = self.g.sh("systemctl is-active failoverd.service; true").strip()
        if self.name == "bpfailover":
            expect = [self.group]
        else:
            master = self.by_driver("net_failover")
            expect = [master["name"]] if master else []
        rep["address_expected_on"] = expect
        rep["address_ok"] = rep["address_on"] == expect
        rep["dhcp_acks"] = self.dnsmasq_acks
        rep["doctor"] = (
            self.g.sh(f"{image.GUEST_BIN}/failoverctl doctor 2>&1; true", timeout=120).strip()[
                -3000:
            ]
            if self.name == "bpfailover"
            else None
        )

    dnsmasq_acks: int = 0

    def record_vf_name(self, step: str, trial: int) -> None:
        """The re-plugged VF's name once the step is over: udev's predictable name, not
        the kernel's `eth<N>` (failoverd waits for udev before it opens a new lower)."""
        vf = self.by_driver("e1000e")
        self.boot_report.setdefault("replugged_vf", []).append(
            {"step": step, "trial": trial, "name": vf["name"] if vf else None}
        )

    def agent_log(self) -> str:
        return self.g.sh("journalctl -u failoverd.service --no-pager -o cat; true")

    def record_udev_waits(self) -> None:
        """failoverd's waits for udev this boot (lower_udev_wait/_ready/_timeout events)."""
        waits = []
        for ln in self.agent_log().splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                msg = json.loads(ln)["msg"]
                if str(msg.get("event", "")).startswith("lower_udev_"):
                    waits.append(msg)
        self.boot_report["udev_waits"] = waits


def run_cloud(img: image.Image, s: Settings, stacks: tuple[str, ...]) -> dict[str, Any]:
    results: list[StepResult] = []
    boots: list[dict[str, Any]] = []
    timings: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    net = Net(s.prefix)
    for stack in stacks:
        for mode in s.modes:
            tag = f"{stack}/{mode}"
            net.up()
            watch: TapWatch | None = None
            dns: Dnsmasq | None = None
            m = CloudMode(mode, stack, img, net, s)
            t_mode = time.monotonic()
            try:
                dns = Dnsmasq(net, m.vm.workdir)
                watch = TapWatch(net)
                s.log(f"[{tag}] booting the cloud guest (TCG, systemd, cloud-init)")
                try:
                    m.start()
                finally:
                    m.dnsmasq_acks = dns.leases()
                    m.boot_report["dhcp_acks"] = m.dnsmasq_acks
                    boots.append({"stack": stack, "mode": mode, **m.boot_report})
                br = m.boot_report
                s.log(
                    f"[{tag}] ready in {m.timings['ready_s']:.0f}s: cloud-init "
                    f"{br.get('cloud_init_status')} errors {br.get('cloud_init_errors')}, "
                    f"address on {br.get('address_on')}"
                )
                steps = [st for st in s.steps if not (st == "planned" and mode == "kernel")]
                for trial in range(s.trials):
                    if m.vm.probes + len(steps) > E1000_MAX_NIC:
                        raise VMError("too many e1000e probes for one boot (lower --trials)")
                    for step in steps:
                        if step == "baseline" and trial > 0:
                            continue
                        r = run_step(m, watch, step, trial)
                        r.mode = f"{stack}/{mode}"
                        results.append(r)
                        if step in REPLUG_STEPS:
                            m.record_vf_name(step, trial)
                        s.log(
                            f"[{tag}] trial {trial + 1}/{s.trials} {step:<9} lost "
                            f"{r.lost_out:>4}/{r.lost_in:<4} gap {r.gap_ms:>7.1f}ms back "
                            f"{r.back_on_primary_ms} end {r.end_on} tcp "
                            f"{'ok' if r.tcp_survived else 'FAILED ' + str(r.tcp_error)}"
                            + (
                                f" VF {m.boot_report['replugged_vf'][-1]['name']}"
                                if step in REPLUG_STEPS
                                else ""
                            )
                        )
            except Exception as e:
                failures.append(f"{tag}: {e}")
                s.log(f"[{tag}] FAILED: {e}")
            finally:
                if m.vm.guest is not None:
                    if mode == "bpfailover":
                        with contextlib.suppress(Exception):
                            m.record_udev_waits()
                    # boots[-1] was copied when the boot was done: what the steps added
                    if boots and (boots[-1]["stack"], boots[-1]["mode"]) == (stack, mode):
                        for key in ("replugged_vf", "udev_waits"):
                            if key in m.boot_report:
                                boots[-1][key] = m.boot_report[key]
                    with contextlib.suppress(Exception):
                        (m.vm.workdir / "journal.txt").write_text(
                            m.g.sh("journalctl -b --no-pager -o short-monotonic; true", timeout=60)
                        )
                    with contextlib.suppress(Exception):
                        (m.vm.workdir / "cloud-init.log").write_text(
                            m.g.sh("cat /var/log/cloud-init.log; true", timeout=60)
                        )
                m.close()
                if watch is not None:
                    watch.close()
                if dns is not None:
                    dns.close()
                net.down()
            timings[tag] = {**m.timings, "total_s": time.monotonic() - t_mode}
    return {"results": results, "boots": boots, "timings": timings, "failures": failures}


# ---- report -------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Proving ground, cloud-guest variant (QEMU TCG, systemd + cloud-init)",
        "",
        f"Guest kernel {report['guest_kernel']}, Debian 12 packages: cloud-init "
        f"{report['versions'].get('cloud-init', '?')}, netplan.io "
        f"{report['versions'].get('netplan.io', '?')}, systemd "
        f"{report['versions'].get('systemd', '?')}, NetworkManager "
        f"{report['versions'].get('network-manager', '?')}. Predictable names (no "
        "net.ifnames=0); NoCloud seed (cloud-localds) with network-config v2 matching the "
        "NIC by MAC, DHCP from dnsmasq on the hypervisor bridge. bpfailover: virtio "
        "`failover=off`, failoverd.service from deploy/, the deploy/ snippets; kernel: "
        "`failover=on` (net_failover), no bpfailover. UDP "
        f"{s['rate_pps']} pps each way + TCP; {s['trials']} trial(s) per step. Generated by "
        f"`{s.get('command') or 'make proving-ground-cloud'}` (docs/cloud-guest.md).",
        "",
        "## Boot: what the guest's own tools did",
        "",
        "| stack / mode | cloud-init status | cloud-init errors | address on | expected | "
        "DHCP ACKs | failoverd | re-plugged VF named |",
        "|---|---|---|---|---|---:|---|---|",
    ]
    for b in report["boots"]:
        lines.append(
            f"| {b['stack']}/{b['mode']} | {b.get('cloud_init_status')} | "
            f"{len(b.get('cloud_init_errors', [])) if 'cloud_init_errors' in b else '?'} | "
            f"{', '.join(b.get('address_on', [])) or '–'} | "
            f"{', '.join(b.get('address_expected_on', []))} | {b.get('dhcp_acks')} | "
            f"{b.get('failoverd') if b['mode'] == 'bpfailover' else 'masked'} | "
            f"{vf_names(b)} |"
        )
    for b in report["boots"]:
        waits = [w for w in b.get("udev_waits", []) if w.get("event") != "lower_udev_wait"]
        if waits:
            lines.append(
                f"\n{b['stack']}/{b['mode']}: failoverd waited for udev before taking a new "
                "lower: "
                + ", ".join(
                    f"{w.get('lower')} {w.get('waited_ms')} ms"
                    + (" (timer: udev never did)" if w["event"] == "lower_udev_timeout" else "")
                    for w in waits
                )
                + "."
            )
    lines += [
        "",
        "## Steps",
        "",
    ]
    lines += steps_table(report["summary"], mode_header="stack/mode")
    t = report["timings"]
    lines += [
        "",
        "Runtimes: "
        + ", ".join(
            [f"image build {t['image_build_s']:.0f}s", f"total {t['total_s']:.0f}s"]
            + [
                f"{k} (boot to guestd {d.get('boot_s', 0):.0f}s, to cloud-init done "
                f"{d.get('cloud_init_done_s', 0):.0f}s) {d['total_s']:.0f}s"
                for k, d in t["modes"].items()
            ]
        )
        + ".",
    ]
    if report["failures"]:
        lines += ["", "**Failures:** " + "; ".join(report["failures"])]
    return "\n".join(lines) + "\n"


def vf_names(boot: dict[str, Any]) -> str:
    """The names the VF had after each re-plug, counted: `enp2s0 ×4`."""
    names = [str(v["name"]) for v in boot.get("replugged_vf", [])]
    return ", ".join(f"{n} ×{names.count(n)}" for n in dict.fromkeys(names)) or "–"


def _versions(img: image.Image) -> dict[str, str]:
    try:
        return dict(json.loads((img.dir / "versions.json").read_text()))
    except (OSError, ValueError):
        return {}


def _on_term(*_: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.proving_ground.cloud", description=__doc__)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--stacks", default=",".join(STACKS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", default=",".join(CLOUD_STEPS))
    ap.add_argument("--prefix", default="pgc", help="namespace/tap prefix (parallel runs)")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--image-only", action="store_true", help="build the image and stop")
    ap.add_argument("--out", type=Path, default=RESULTS / "proving_ground_cloud.json")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("proving ground: needs root", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_term)
    vm_mod.BOOT_TIMEOUT_S = max(vm_mod.BOOT_TIMEOUT_S, BOOT_TIMEOUT_S)  # VM.start() reads it
    t0 = time.monotonic()
    try:
        img, build_s = ensure_cloud_image(rebuild=args.rebuild)
        if args.image_only:
            print(json.dumps({"dir": str(img.dir), "build_s": round(build_s, 1), **img.meta}))
            return 0
        s = Settings(
            trials=args.trials,
            modes=tuple(args.modes.split(",")),
            steps=tuple(args.steps.split(",")),
            workdir=Path(f"/tmp/bpfailover-pg-cloud-{args.prefix}"),
            prefix=args.prefix,
        )
        got = run_cloud(img, s, tuple(args.stacks.split(",")))
    except KeyboardInterrupt:
        print("proving ground: interrupted (cleaned up)", file=sys.stderr)
        return 130
    except (image.ImageError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"proving ground: {e}", file=sys.stderr)
        return 1
    qemu = os.popen("qemu-system-x86_64 --version").read().split()[3:4]
    report = {
        "settings": {
            "trials": s.trials,
            "rate_pps": s.rate_pps,
            "tcp_rate": s.tcp_rate,
            "stacks": args.stacks.split(","),
            "modes": list(s.modes),
            "steps": list(s.steps),
            "network_config": network_config(),
            "command": " ".join(
                ["python -m bench.proving_ground.cloud", *(sys.argv[1:] if argv is None else argv)]
            ),
        },
        "guest_kernel": img.meta.get("kernel"),
        "versions": _versions(img),
        "qemu": qemu[0] if qemu else "?",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "timings": {
            "image_build_s": round(build_s, 1),
            "total_s": round(time.monotonic() - t0, 1),
            "modes": got["timings"],
        },
        "failures": got["failures"],
        "boots": got["boots"],
        "summary": summarize(got["results"]) if got["results"] else [],
        "trials": [{**asdict(r), "lost": r.lost, "gap_ms": r.gap_ms} for r in got["results"]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    bad = [
        f"{b['stack']}/{b['mode']}"
        for b in got["boots"]
        if b.get("cloud_init_status") != "done"
        or b.get("cloud_init_errors")
        or not b.get("address_ok")
    ]
    bad += [  # the kernel's eth<N>: opened before udev named it
        f"{b['stack']}/{b['mode']} (re-plugged VF named {v['name']})"
        for b in got["boots"]
        for v in b.get("replugged_vf", [])
        if b["mode"] == "bpfailover" and str(v["name"]).startswith("eth")
    ]
    bad += [
        f"{r['mode']}/{r['step']}"
        for r in report["summary"]
        if r["end_state_ok"] < r["trials"] or r["tcp_survived"] < r["trials"]
    ]
    if bad:
        print(f"proving ground (cloud): not as expected in {', '.join(bad)}", file=sys.stderr)
    return 1 if got["failures"] or bad else 0


if __name__ == "__main__":
    sys.exit(main())

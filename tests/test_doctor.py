"""failoverctl doctor: each check against fixtures (no root), then against the lab."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bpfailover.model import config
from bpfailover.ops import cli, doctor
from bpfailover.ops.doctor import Host, LinkInfo
from bpfailover_lab.topology import Lab
from tests import nonroot
from tests.nonroot import Mounts
from tests.opsutil import agent_in_lab, ctl
from tests.statusutil import agent

MAC = "52:54:00:00:12:53"
CFG = config.parse_config(
    "groups: [{name: ens10, standby: ens10nsby}]\nbpffs: /sys/fs/bpf/bpfailover-doctor-test\n"
)
ALL_CAPS = "000001ffffffffff"
MOUNTS = [
    Mounts(bpffs, run_dir, sock, agent)
    for bpffs in (0o700, 0o755)
    for run_dir in (0o700, 0o755)
    for sock, agent in ((0o600, False), (0o600, True), (0o666, True))
]


def links(**extra: object) -> dict[int, LinkInfo]:
    out = {
        1: LinkInfo(1, "lo", "00:00:00:00:00:00"),
        2: LinkInfo(2, "ens10nsby", MAC),
        3: LinkInfo(3, "ens11", MAC),
        4: LinkInfo(4, "ens10", MAC, "veth"),
        5: LinkInfo(5, "ens10_fo", "aa:bb:cc:dd:ee:ff", "veth"),
        6: LinkInfo(6, "ens11.100", MAC, "vlan"),
    }
    for k, v in extra.items():
        setattr(out[3], k, v)
    return out


def healthy_host(tmp: Path) -> Host:
    (tmp / "proc").mkdir()
    for knob in doctor.NEIGH_KNOBS:
        (tmp / "proc" / knob).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "proc" / knob).write_text("1\n")
    (tmp / "mounts").write_text("bpf /sys/fs/bpf bpf rw,relatime 0 0\n")
    (tmp / "status").write_text(f"Name:\tx\nCapEff:\t{ALL_CAPS}\n")
    inc = tmp / "modules" / "6.18.0" / "build" / "include"
    inc.mkdir(parents=True)
    (tmp / "vmlinux").write_bytes(b"btf")
    return Host(
        proc=tmp / "proc",
        run=tmp / "run",
        etc=tmp / "etc",
        src_dir=tmp / "src",
        modules=tmp / "modules",
        mounts=tmp / "mounts",
        self_status=tmp / "status",
        btf=tmp / "vmlinux",
        release="6.18.0",
        euid=0,
        bpffs=tmp / "bpffs",  # not the machine's: other runs' pins are not this host's
    )


def fake_proc(host: Host, pid: int, *argv: str) -> None:
    d = host.proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def mine(found: list[dict[str, str]]) -> list[dict[str, str]]:
    """A lab doctor's findings without orphaned-pins: on this shared machine other runs'
    pin directories come and go under /sys/fs/bpf (their own tests report them)."""
    return [f for f in found if f["check"] != "orphaned-pins"]


def checks(found: list[doctor.Finding]) -> list[tuple[str, str]]:
    return sorted((f.check, f.subject) for f in found)


def test_lowers_by_config_skip_failover_device_and_uppers() -> None:
    lowers = doctor.find_lowers(CFG, links(), None)
    assert [(lw.link.name, lw.role) for lw in lowers] == [
        ("ens10nsby", "standby"),
        ("ens11", "primary"),
    ]


def test_healthy_host_has_no_findings(tmp_path: Path) -> None:
    assert doctor.run_checks(healthy_host(tmp_path), CFG, None, links()) == []


@pytest.mark.parametrize(
    ("tx_path", "qdisc", "found"),
    [("direct", "pfifo", True), ("direct", "noqueue", False), ("veth", "pfifo", False)],
)
def test_a_root_qdisc_bypassed_by_direct_transmit(
    tmp_path: Path, tx_path: str, qdisc: str, found: bool
) -> None:
    """A root qdisc on the failover device shapes nothing with tx_path direct (the default):
    said, with where to put it instead; veth's own noqueue, and tx_path veth, are fine."""
    cfg = config.parse_config(
        f"groups: [{{name: ens10, standby: ens10nsby, tx_path: {tx_path}}}]\n"
        "bpffs: /sys/fs/bpf/bpfailover-doctor-test\n"
    )
    lk = links()
    lk[4].root_qdisc = qdisc
    got = doctor.run_checks(healthy_host(tmp_path), cfg, None, lk)
    if not found:
        assert got == []
        return
    assert checks(got) == [("qdisc-bypassed", "ens10")]
    assert "pfifo" in got[0].problem and "tx_path: veth" in got[0].fix


def test_each_finding_with_its_fix(tmp_path: Path) -> None:
    host = healthy_host(tmp_path)
    lk = links(addrs=[("198.18.0.9/24", "global")], master=6)
    fake_proc(host, 4242, "/sbin/dhclient", "-4", "-v", "ens11")
    fake_proc(host, 4243, "/usr/bin/python3", "-m", "bpfailover.agent", "--config", "a")
    fake_proc(host, 4244, "/usr/local/bin/failoverd", "--config", "b")
    (host.run / "NetworkManager" / "devices").mkdir(parents=True)
    (host.run / "NetworkManager" / "devices" / "3").write_text("[device]\nmanaged=true\n")
    (host.run / "systemd" / "netif" / "links").mkdir(parents=True)
    (host.run / "systemd" / "netif" / "links" / "2").write_text(
        "ADMIN_STATE=configured\nNETWORK_FILE=/etc/systemd/network/50-dhcp.network\n"
    )
    (host.etc / "network").mkdir(parents=True)
    (host.etc / "network" / "interfaces").write_text("auto ens10nsby\niface ens10nsby inet dhcp\n")
    host.mounts.write_text("proc /proc proc rw 0 0\n")
    host.self_status.write_text("CapEff:\t0000000000003000\n")  # NET_ADMIN + NET_RAW only
    host.euid = 1000
    for p in (host.modules / "6.18.0" / "build" / "include",):
        p.rmdir()
    (host.proc / doctor.NEIGH_KNOBS[1]).unlink()  # a 5.17 kernel: ARP knob only
    found = doctor.run_checks(host, CFG, None, lk)
    assert checks(found) == sorted(
        [
            ("lower-address", "ens11"),
            ("lower-dhcp", "ens11"),
            ("lower-ifupdown", "ens10nsby"),
            ("lower-networkmanager", "ens11"),
            ("lower-networkd", "ens10nsby"),
            ("lower-enslaved", "ens11"),
            ("bpffs", "/sys/fs/bpf"),
            ("kernel-headers", "6.18.0"),
            ("privileges", "euid 1000"),
            ("capabilities", "effective set"),
            ("realtime", "CAP_SYS_NICE"),
            ("kernel-neighbours", "6.18.0"),
            ("second-agent", "failoverd"),
        ]
    )
    assert all(f.fix for f in found)
    by = {f.check: f for f in found}
    assert "CAP_BPF" in by["capabilities"].problem and "CAP_PERFMON" in by["capabilities"].problem
    assert "mount -t bpf bpf /sys/fs/bpf" in by["bpffs"].fix
    assert "ip addr flush dev ens11" in by["lower-address"].fix
    assert "4242" in by["lower-dhcp"].problem
    assert "50-dhcp.network" in by["lower-networkd"].problem
    assert "ndisc_evict_nocarrier" in by["kernel-neighbours"].problem
    assert "arp_evict_nocarrier" not in by["kernel-neighbours"].problem
    assert "realtime_priority: 0" in by["realtime"].fix
    text = doctor.format_findings(found)
    assert text.count("    fix: ") == len(found) and text.endswith("doctor: 13 findings")


def test_headers_fallback_and_dhclient_on_all(tmp_path: Path) -> None:
    host = healthy_host(tmp_path)
    (host.modules / "6.18.0" / "build" / "include").rmdir()
    common = host.src_dir / "linux-headers-6.1.0-9-common" / "include" / "linux"
    common.mkdir(parents=True)
    (common / "kconfig.h").touch()
    (host.src_dir / "linux-headers-6.1.0-9-amd64" / "include" / "generated").mkdir(parents=True)
    fake_proc(host, 77, "dhclient")  # no interface: it runs on every one
    found = doctor.run_checks(host, CFG, None, links())
    assert checks(found) == [("lower-dhcp", "ens10nsby"), ("lower-dhcp", "ens11")]


def test_no_config_is_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BPFAILOVER_CONFIG", raising=False)
    p = ctl("--config", str(tmp_path / "missing.yaml"), "doctor")
    assert p.returncode == 2 and "no such file" in p.stderr


# ---- in the lab ------------------------------------------------------------------------------


@pytest.mark.root
def test_doctor_in_the_lab(lab: Lab) -> None:
    with agent_in_lab(lab) as run:
        n = lab.names(0)
        base = ["--config", str(run.config_path), "doctor", "--netns", lab.guest, "--json"]
        p = ctl(*base)
        found = mine(json.loads(p.stdout))
        assert found == []  # the agent, its lock and its lowers are fine
        # an address on the primary, a second agent in the same netns
        subprocess.run(
            ["ip", "-n", lab.guest, "addr", "add", "198.18.0.77/32", "dev", n.primary], check=True
        )
        stray = subprocess.Popen(
            ["ip", "netns", "exec", lab.guest, "bash", "-c", "exec -a failoverd sleep 60"]
        )
        try:
            cmdline = Path(f"/proc/{stray.pid}/cmdline")
            for _ in range(100):  # until `ip netns exec` has exec'd into "failoverd"
                if cmdline.read_bytes().startswith(b"failoverd"):
                    break
                time.sleep(0.05)
            p = ctl(*base)
            found = mine(json.loads(p.stdout))
            assert p.returncode == 4
            got = {(f["check"], f["subject"]) for f in found}
            assert got == {("lower-address", n.primary), ("second-agent", "failoverd")}, found
            human = ctl(*base[:-1])
            assert "fix: ip addr flush dev ens11" in human.stdout
        finally:
            stray.kill()
            stray.wait()


def test_no_realtime_finding_when_turned_off(tmp_path: Path) -> None:
    host = healthy_host(tmp_path)
    host.self_status.write_text("CapEff:\t0000000000003000\n")
    off = config.parse_config(
        "groups: [{name: ens10, standby: ens10nsby}]\nscheduling: {realtime_priority: 0}\n"
    )
    assert list(doctor.check_realtime(host, off)) == []
    assert [f.check for f in doctor.check_realtime(host, CFG)] == ["realtime"]


# ---- what doctor says, exactly (issue 16) -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "exe", "agent"),
    [
        (["/usr/local/bin/failoverd", "--config", "a"], None, True),
        (["failoverd"], "/opt/bpfailover/bin/failoverd", True),
        (["/opt/venv/bin/python3", "/opt/venv/bin/failoverd", "--netns", "x"], None, True),
        (["/usr/bin/python3", "-m", "bpfailover.agent", "--netns", "x"], None, True),
        (["python3.11", "-u", "-X", "dev", "-m", "bpfailover.agent"], None, True),
        (["/usr/bin/python3", "-mbpfailover.agent"], None, True),
        (["timeout", "60", "/usr/bin/python3", "-m", "bpfailover.agent"], None, False),
        (["sudo", "failoverd", "--config", "a"], "/usr/bin/sudo", False),
        (["/usr/bin/python3", "-m", "bpfailover.ops.cli", "doctor"], None, False),
        (["/usr/bin/python3", "-c", "import bpfailover.agent"], None, False),
        (["vim", "/etc/systemd/system/failoverd.service"], None, False),
        (["grep", "failoverd", "/var/log/syslog"], None, False),
        (["/usr/bin/python3", "/usr/bin/failoverctl", "status"], None, False),
    ],
)
def test_an_agent_is_known_by_what_runs(argv: list[str], exe: str | None, agent: bool) -> None:
    assert doctor.is_agent(argv, exe) is agent


def test_a_timeout_or_sudo_wrapper_is_not_a_second_agent(tmp_path: Path) -> None:
    host = healthy_host(tmp_path)
    fake_proc(host, 10, "timeout", "60", "/usr/bin/python3", "-m", "bpfailover.agent")
    fake_proc(host, 11, "/usr/bin/python3", "-m", "bpfailover.agent", "--config", "a")
    fake_proc(host, 12, "sudo", "failoverd", "--config", "b")
    fake_proc(host, 14, "/usr/bin/python3", "-m", "bpfailover.ops.cli", "doctor")
    assert doctor.run_checks(host, CFG, None, links()) == []  # one agent: 11, under timeout
    fake_proc(host, 13, "/opt/venv/bin/python3", "/opt/venv/bin/failoverd", "--config", "b")
    assert doctor.format_findings(doctor.run_checks(host, CFG, None, links())) == (
        "[second-agent] failoverd: 2 failoverd processes in this network namespace (11: "
        "/usr/bin/python3 -m bpfailover.agent --config a; 13: /opt/venv/bin/python3 "
        "/opt/venv/bin/failoverd --config b): two writers fight over the same lowers\n"
        "    fix: run exactly one (systemctl status failoverd; kill the stray one by its pid)\n"
        "doctor: 1 finding"
    )


def test_permission_denied_on_the_socket_is_said_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(path: str, *_: object, **__: object) -> None:
        raise doctor.api.AgentUnreachable(errno.EACCES, f"{path}: Permission denied")

    monkeypatch.setattr(doctor.api, "request", denied)
    found = doctor.run_checks(healthy_host(tmp_path), CFG, "/run/x.sock", links())
    assert doctor.format_findings(found) == (
        "[control-socket] /run/x.sock: permission denied: the running agent's lowers and state"
        " were not checked\n"
        "    fix: run as root or as a member of the config's control.group\n"
        "doctor: 1 finding"
    )


@pytest.mark.root
def test_cloud_init_is_checked_in_the_hosts_own_netns_only(
    tmp_path: Path, scratch_netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cloud-init configures the host's netns: a lab's lowers elsewhere are not its, whether
    or not the machine doctor runs on has cloud-init (a fake /etc here has it)."""
    etc = tmp_path / "etc"
    (etc / "cloud").mkdir(parents=True)
    (etc / "cloud" / "cloud.cfg").write_text("{}\n")
    lowers = doctor.find_lowers(CFG, links(), None)
    assert lowers

    def cloud(ns: str | None) -> list[str]:
        host = replace(doctor.host_for(ns), etc=etc, usr_lib=tmp_path / "usr", var_log=tmp_path)
        return [f.check for f in doctor.check_cloud_init(host, lowers)]

    assert cloud(scratch_netns) == []
    assert cloud(None) == ["cloud-init-duplicate-mac"]
    monkeypatch.setattr(doctor.netns, "path_of", lambda _ns: "/proc/self/ns/net")
    assert cloud("the-hosts-own") == ["cloud-init-duplicate-mac"]  # named, but the host's


@pytest.mark.root
@pytest.mark.parametrize("m", MOUNTS, ids=str)
def test_doctor_as_non_root_says_permission_denied(m: Mounts) -> None:
    """Each thing doctor may not read as nobody is a finding with the way to get it, on a
    bpffs mounted as `make setup` does (mode 700) and otherwise; never a traceback."""
    import pyroute2  # noqa: F401 - imported before the child drops root (it may not read it)

    from bpfailover.ops import orphans  # noqa: F401

    code, out = nonroot.run_as_nobody(cli.main, ["--config", str(nonroot.CONFIG), "doctor"], m)
    assert code == 4 and "Traceback" not in out, out
    sock = nonroot.SOCKET
    socket_denied = (
        f"[control-socket] {sock}: permission denied: the running agent's lowers and state were"
        " not checked\n    fix: run as root or as a member of the config's control.group\n"
    )
    assert (socket_denied in out) == (m.agent or m.run_dir == 0o700), out
    assert "none answers" not in out
    pins_denied = [ln for ln in out.splitlines() if ln.startswith("[second-agent] /")]
    assert len(pins_denied) == (m.agent or m.bpffs == 0o700), out
    if pins_denied:
        what = f"whether an agent holds {'these pins' if m.bpffs == 0o700 else nonroot.PINS}"
        assert f"permission denied: {what} was not checked" in pins_denied[0]
    orphans_denied = "permission denied: whether a datapath there is orphaned was not checked"
    assert (orphans_denied in out) == (m.agent or m.bpffs == 0o700), out
    lines = out.splitlines()
    for i, ln in enumerate(lines):  # every such finding says how to get what it lacks
        if "permission denied" in ln:
            assert lines[i + 1].startswith("    fix: run as root"), out


@pytest.mark.root
def test_doctor_names_the_netns_and_warns_when_the_agent_runs_in_another(lab: Lab) -> None:
    with agent_in_lab(lab) as run:
        pid = run.proc.pid  # type: ignore[union-attr]
        ours = os.readlink("/proc/self/ns/net")
        p = ctl("--config", str(run.config_path), "doctor")  # no --netns: this namespace
        assert p.returncode == 4, p.stdout
        lines = p.stdout.splitlines()
        assert lines[0] == f"doctor: checking this process's network namespace ({ours})"
        i = lines.index(
            f"[agent-netns] pid {pid}: failoverd runs in network namespace {lab.guest}, doctor"
            f" checked this process's network namespace ({ours}): the agent's lowers were not"
            " checked"
        )
        assert lines[i + 1] == f"    fix: failoverctl doctor --netns {lab.guest}"
        p = ctl("--config", str(run.config_path), "doctor", "--netns", lab.guest)
        assert p.stdout.startswith(f"doctor: checking network namespace {lab.guest}\n")
        p = ctl("--config", str(run.config_path), "doctor", "--netns", lab.guest, "--json")
        assert mine(json.loads(p.stdout)) == []


@pytest.mark.root
def test_doctor_recognises_a_lab_agent(lab: Lab) -> None:
    """The agent of the config `failover-lab up` writes, and `failoverctl --config … doctor
    --netns PREFIX-guest`: the lab's config, socket and namespace, not "[config] no agent
    config" and exit 4."""
    import shutil
    import sys

    lab.up()
    conf = str(lab.agent_config)
    agent = subprocess.Popen(
        [sys.executable, "-m", "bpfailover.agent", "--config", conf, "--netns", lab.guest],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # until it answers (bounded: 60 s)
            if ctl("--config", conf, "status").returncode == 0 or agent.poll() is not None:
                break
            time.sleep(0.1)
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        p = ctl("--config", conf, "doctor", "--netns", lab.guest)
        assert p.stdout.startswith(f"doctor: checking network namespace {lab.guest}\n")
        doc = ctl("--config", conf, "doctor", "--netns", lab.guest, "--json")
        assert mine(json.loads(doc.stdout)) == []
    finally:
        agent.terminate()
        agent.wait(20)
        shutil.rmtree(lab.agent_pins, ignore_errors=True)


def test_datapath_check_off_is_a_finding(tmp_path: Path) -> None:
    host = healthy_host(tmp_path)
    st = agent()
    assert list(doctor.check_datapath_check(host, None)) == []
    assert list(doctor.check_datapath_check(host, replace(st, datapath_check="on"))) == []
    (f,) = doctor.check_datapath_check(host, replace(st, datapath_check="refused"))
    assert f.check == "datapath-check" and "check is refused" in f.problem
    host.btf.unlink()
    (f,) = doctor.check_datapath_check(host, None)
    assert "no kernel BTF" in f.problem and "CONFIG_DEBUG_INFO_BTF" in f.fix


@pytest.mark.root
def test_orphaned_pins_are_those_no_agent_holds(tmp_path: Path) -> None:
    """A bpfailover pin directory (it holds fo_meta) whose single-instance lock nobody
    holds is reported with the command that removes it; a held one, or another tool's
    directory, is not."""
    import fcntl

    from bpfailover.datapath.maps import lock_path, open_lock

    host = healthy_host(tmp_path)
    host.bpffs.mkdir()
    held, orphan, other = (host.bpffs / d for d in ("held", "orphan", "other"))
    for d in (held, orphan, other):
        d.mkdir()
    (held / "fo_meta").write_bytes(b"")
    (orphan / "fo_meta").write_bytes(b"")
    (other / "some_map").write_bytes(b"")
    lock = lock_path(held)
    fd = open_lock(lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        found = [
            f for f in doctor.run_checks(host, CFG, None, links()) if f.check != "second-agent"
        ]
        assert [(f.check, f.subject) for f in found] == [("orphaned-pins", str(orphan))]
        assert found[0].fix.startswith(f"failoverctl teardown --pins {orphan} --all [--netns NAME]")
    finally:
        os.close(fd)
        lock.unlink()
    found = doctor.run_checks(host, CFG, None, links())
    assert sorted(f.subject for f in found if f.check == "orphaned-pins") == [
        str(held),
        str(orphan),
    ]


# Run in a private mount and network namespace with /proc/sys bound read-only (what a
# container runtime does): the agent's sysctl writes on `lo` (its own namespace's), twice,
# then doctor's checks.
READ_ONLY_SYSCTL = r"""
import json, logging, sys
from pathlib import Path
from bpfailover.datapath import attach
from bpfailover.effects import vlans
from bpfailover.ops import doctor
lines = []
class H(logging.Handler):
    def emit(self, r):
        lines.append(r.getMessage())
logging.getLogger("bpfailover").addHandler(H())
for _ in range(2):
    attach.keep_neighbours_without_carrier("lo")
    attach.disable_ipv6("lo")
found = list(doctor.check_sysctl_net(doctor.Host()))
print(json.dumps({"log": lines, "doctor": [f.__dict__ for f in found]}))
"""


@pytest.mark.root
def test_read_only_proc_sys_is_said_once_and_doctor_finds_it() -> None:
    import json
    import subprocess
    import sys

    script = (
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
        f'exec {sys.executable} -c "$0"'
    )
    p = subprocess.run(
        ["unshare", "-m", "-n", "--propagation", "private", "sh", "-c", script, READ_ONLY_SYSCTL],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    events = [json.loads(line) for line in out["log"]]
    assert [e["event"] for e in events] == ["sysctl_read_only"], events
    (said,) = events
    assert said["knob"] == "net.ipv4.conf.lo.arp_evict_nocarrier"
    assert "flushed" in said["effect"] and "IPv6" in said["effect"]
    assert "ReadWritePaths=/proc/sys/net" in said["fix"]
    (finding,) = out["doctor"]
    assert finding["check"] == "sysctl" and "Read-only file system" in finding["problem"]

"""deploy/systemd/failoverd.service under a real systemd (issue 11).

This machine (and CI's) has no systemd as PID 1, so the test boots one: systemd-nspawn
runs the host's own /usr as a container (`-D / --volatile=yes`: a tmpfs root with /usr
bound read-only; without --volatile the host's populated /dev makes the boot fail),
`--register=no --keep-unit` (there is no host systemd/machined to register with), every
capability and bpf(2) let through nspawn's seccomp filter (the agent loads BPF and attaches
tc filters), and the network namespace of a
lab's guest (`--network-namespace-path`): the lab's lowers, their far ends and the peer
host are the ones every other agent test uses, the far ends stay drivable from the host
(carrier changes) and the `lab` fixture removes the namespaces even on failure.
The container gets a bpffs of its own: its pins live and die with the container, nothing is
pinned on the host's /sys/fs/bpf.

Installed in the container: the shipped unit file byte for byte, and a drop-in that adapts
only what a test must (ExecStart: the checkout's venv, through the tests' entry point that
honours the fault hook; WatchdogSec shortened to 3 s; an optional EnvironmentFile for the
fault hook).  Proven, each part a systemd verdict:
(a) Type=notify: a oneshot ordered After= and Requires= failoverd.service runs only once the
    failover device exists with its carrier, and the same check fails against Type=simple
    (the agent held by the fault hook before it has set the carrier: deterministic);
(b) the fault hook's `stall` (the loop stops, so do its WATCHDOG=1 pings): systemd's watchdog
    kills the agent and restarts it (NRestarts=1, "Watchdog timeout" in the journal); the new
    agent adopts the pinned datapath (the same device, the map's active lower read back) and
    answers `failoverctl status`;
(c) `systemctl reload`: alive, same PID, reloaded; `systemctl stop`: Result=success, exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bpfailover import netns
from bpfailover_lab.topology import Lab

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "failoverd.service"
VENV_BIN = REPO / ".venv" / "bin"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
ENV |= {"SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
T = "/run/fotest"  # the test's files inside the container (its /run: a tmpfs of its own)

# (a)'s witness: started only once failoverd.service is "started" (After=, Requires=), it
# fails unless the failover device exists and has its carrier (LOWER_UP: the agent sets it
# once the group forwards), and leaves what it saw for the test.
CHECK_UNIT = f"""\
[Unit]
Description=needs the failover device once failoverd.service has started (test)
Requires=failoverd.service
After=failoverd.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'ip -o link show dev ens10 >{T}/check.out 2>&1; grep -q LOWER_UP {T}/check.out'
"""


def adapt_dropin(watchdog_s: int) -> str:
    """What a test must change, in a drop-in: the unit file itself is installed unchanged."""
    text = f"""\
[Service]
# The checkout's venv instead of the package's /usr/bin/failoverd, through the tests' own
# entry point (failoverd's main() with the fault hook, which failoverd itself never reads);
# the default config path.
ExecStart=
ExecStart={VENV_BIN}/python -m tests.fault_agent --config /etc/bpfailover/config.yaml
Environment=PYTHONPATH={REPO}
# Shortened from the shipped 10 s so that a stalled loop is restarted within the test's
# time; the loop pings every WatchdogSec/2.
WatchdogSec={watchdog_s}
# TEST-ONLY fault hook for the first start only: the test deletes the file once the agent
# is up, so the restarted agent runs without it.
EnvironmentFile=-{T}/fault.env
"""
    if any(REPO.is_relative_to(p) for p in ("/root", "/home", "/run/user")):
        # ProtectHome=yes would hide a checkout under a home directory: keep the rest of
        # it hidden (tmpfs), the checkout visible and read-only.
        text += f"ProtectHome=tmpfs\nBindReadOnlyPaths={REPO}\n"
    return text


# Type=simple, for the contrast in (a): "started" as soon as the process is forked.  The
# fault hook holds the agent at `adopt` (its device created, the carrier not yet set) until
# the test touches the gate, so the check cannot win the race by luck.  No watchdog here.
SIMPLE_DROPIN = f"""\
[Service]
Type=simple
WatchdogSec=0
Environment=BPFAILOVER_FAULT=adopt:stall BPFAILOVER_FAULT_GATE={T}/gate
"""


BOOTED = ("running", "degraded", "maintenance", "stopping")


class Container:
    """systemd booted by systemd-nspawn over the host's /usr, in netns `netns_name`."""

    def __init__(self, name: str, netns_name: str, log_path: Path) -> None:
        self.name = name
        self.netns_name = netns_name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0  # the container's PID 1, as the host sees it

    def boot(self, timeout: float = 60.0) -> None:
        argv = [
            "systemd-nspawn",
            "--quiet",
            "-D",
            "/",
            "--volatile=yes",
            "--register=no",
            "--keep-unit",
            "--boot",
            "--capability=all",
            # nspawn's own seccomp filter (on the container's PID 1, so on every unit) does
            # not allow bpf(2), even with every capability: the loader's first map fails EPERM.
            "--system-call-filter=bpf",
            f"--machine={self.name}",
            f"--network-namespace-path={netns.path_of(self.netns_name)}",
            f"--bind-ro={REPO}",
            "--console=pipe",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            self._alive_or_fail()
            self.leader = _container_init(self.proc.pid)
            if time.monotonic() > deadline:
                raise AssertionError(f"no container init after {timeout}s: {self.tail()}")
            time.sleep(0.05)
        state = ""  # "offline" / "Failed to connect to bus" until its manager listens
        while state not in BOOTED and time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            p = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left)
            state = p.stdout.strip() or p.stderr.strip()
            time.sleep(0 if state in BOOTED else 0.1)
        # "degraded": some unit of the host's /usr failed in the container (e.g. prometheus,
        # without its /etc); not ours
        assert state in ("running", "degraded"), (state, self.tail())
        # A bpffs of the container's own, as systemd mounts one at boot on a host (it does
        # not in a container, and refuses a sys-fs-bpf.mount unit for an API file system):
        # the pins live and die with the container, none lands on the host's /sys/fs/bpf.
        self.run("mount", "-t", "bpf", "-o", "mode=700", "bpf", "/sys/fs/bpf")

    def _alive_or_fail(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}: {self.tail()}")

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the container (all its namespaces, its root)."""
        self._alive_or_fail()
        full = ["nsenter", "-t", str(self.leader), "-a", "-r", "-w", "--", *argv]
        p = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, env=ENV, check=False
        )
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def path(self, p: str) -> Path:
        return Path(f"/proc/{self.leader}/root") / p.lstrip("/")

    def write(self, p: str, text: str) -> None:
        target = self.path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> list[str]:
        p = self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False)
        return p.stdout.splitlines()

    def events(self, name: str) -> list[dict[str, Any]]:
        """The agent's structured events (its stderr, in the journal) called `name`."""
        out = []
        for line in self.journal("failoverd.service"):
            try:
                msg = json.loads(line).get("msg")
            except (ValueError, AttributeError):
                continue
            if isinstance(msg, dict) and msg.get("event") == name:
                out.append(msg)
        return out

    def wait_for(self, pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            time.sleep(0.1)
        journal = "\n".join(self.journal("failoverd.service")[-15:])
        raise AssertionError(f"timed out waiting for {what}; failoverd's journal:\n{journal}")

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def terminate(self) -> None:
        """Shut the container down (nspawn's SIGTERM: an orderly poweroff of its systemd),
        then kill what is left; never raises."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            if self.leader:
                with contextlib.suppress(OSError):
                    os.kill(self.leader, signal.SIGKILL)
            self.proc.wait(10)


def _container_init(nspawn_pid: int) -> int:
    """The container's PID 1 (a descendant of nspawn whose pid in its own namespace is 1)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    for pid in parents:
        up, seen = pid, 0
        while up in parents and up != nspawn_pid and seen < 64:
            up, seen = parents[up], seen + 1
        if up != nspawn_pid or pid == nspawn_pid:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
        if len(nspid) > 1 and nspid[-1] == "1":
            # once it is systemd: before its exec, nspawn's child is still setting up mounts
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
            return 0
    return 0


@pytest.fixture
def container(lab: Lab, tmp_path: Path) -> Iterator[Container]:
    if shutil.which("systemd-nspawn") is None:
        pytest.fail("systemd-nspawn missing: `make setup` installs systemd-container")
    lab.up()
    c = Container(f"fo-{lab.prefix}", lab.guest, tmp_path / "nspawn.log")
    try:
        c.boot()
        yield c
    finally:
        c.terminate()


def status(c: Container) -> dict[str, Any]:
    """`failoverctl status --json` inside the container (the unit's default socket)."""
    p = c.run(str(VENV_BIN / "failoverctl"), "status", "--json")
    doc: dict[str, Any] = json.loads(p.stdout)
    return doc


def link_index(lab: Lab, dev: str) -> int | None:
    info = lab.link(lab.guest, dev)
    return int(info["ifindex"]) if info else None


def test_unit_ready_watchdog_reload_stop_under_systemd(lab: Lab, container: Container) -> None:
    c = container
    n = lab.names(0)
    c.write("/etc/systemd/system/failoverd.service", UNIT.read_text())  # as shipped
    c.write("/etc/systemd/system/failoverd.service.d/10-test.conf", adapt_dropin(3))
    c.write("/etc/systemd/system/fo-check.service", CHECK_UNIT)
    c.write(
        "/etc/bpfailover/config.yaml",
        f"groups:\n  - name: {n.failover}\n    standby: {n.standby}\n",
    )
    c.path(T).mkdir(parents=True, exist_ok=True)

    # (a), the contrast: Type=simple is "started" at fork, the check runs at once and fails.
    c.write("/etc/systemd/system/failoverd.service.d/20-simple.conf", SIMPLE_DROPIN)
    c.run("systemctl", "daemon-reload")
    p = c.run("systemctl", "start", "fo-check.service", check=False, timeout=60)
    assert p.returncode != 0, "the check passed against Type=simple: it proves nothing"
    # (the container's bpffs is its own: no pin lands on the host's)
    assert c.path("/sys/fs/bpf").stat().st_dev != Path("/sys/fs/bpf").stat().st_dev
    saw = c.path(f"{T}/check.out").read_text()
    assert "LOWER_UP" not in saw, saw
    print(f"\nType=simple: the check saw {saw.strip()[:90]!r}")
    c.path(f"{T}/gate").touch()
    c.wait_for(lambda: c.events("started"), "the Type=simple agent to finish starting", 90)
    # Loaded under the unit's capabilities (no CAP_SYSLOG): the per-packet check compiled in.
    (loaded,) = c.events("datapath_loaded")
    assert loaded["datapath_check"] == "on", loaded
    # Back to the shipped Type=notify, with a failover device still to be created: the
    # group torn down (the datapath stays pinned: the next start adopts it, no compile).
    c.run(str(VENV_BIN / "failoverctl"), "teardown", n.failover, "--yes")
    c.run("systemctl", "stop", "failoverd.service", timeout=30)
    c.path("/etc/systemd/system/failoverd.service.d/20-simple.conf").unlink()
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "reset-failed")
    assert link_index(lab, n.failover) is None
    # teardown closed the lowers (net_failover_destroy does too): up again, so the next
    # start finds both usable and makes exactly one switch (the fault below counts them)
    for lower in (n.standby, n.primary):
        netns.run_in(lab.guest, ["ip", "link", "set", lower, "up"])
    started_before = len(c.events("started"))

    # (a): with Type=notify the check runs after READY=1 and finds the device forwarding.
    # The first switch is the start's; the second (primary down, below) stalls before its map
    # write until the watchdog ends it (the gate never appears).
    fault = f"BPFAILOVER_FAULT=before-flip:stall@2\nBPFAILOVER_FAULT_GATE={T}/never\n"
    c.write(f"{T}/fault.env", fault)
    c.path(f"{T}/check.out").unlink()
    c.run("systemctl", "start", "fo-check.service", timeout=60)
    assert "LOWER_UP" in c.path(f"{T}/check.out").read_text()
    st = c.show("failoverd.service", "Type", "ActiveState", "MainPID", "NRestarts", "WatchdogUSec")
    assert st["Type"] == "notify" and st["ActiveState"] == "active", st
    assert st["NRestarts"] == "0" and st["WatchdogUSec"] == "3s", st
    first_pid = int(st["MainPID"])
    # /proc/sys and /sys read-only but for /proc/sys/net and the bpffs: the agent's own
    # sysctls are set (the knob reads 0, nothing logged as unavailable).
    mounts = c.run("cat", f"/proc/{first_pid}/mountinfo").stdout.splitlines()
    opts = {ln.split()[4]: ln.split()[5].split(",") for ln in mounts}
    assert "ro" in opts["/proc/sys"] and "rw" in opts["/proc/sys/net"], opts
    assert "ro" in opts["/sys"] and "rw" in opts["/sys/fs/bpf"], opts
    knob = f"/proc/sys/net/ipv4/conf/{n.failover}/arp_evict_nocarrier"
    assert c.run("cat", knob).stdout.strip() == "0"
    assert not c.events("neighbour_knob_unavailable")
    assert not c.events("sysctl_read_only")
    # MemoryDenyWriteExecute holds for the agent and the loader child it compiled with.
    st_mdwe = c.show("failoverd.service", "MemoryDenyWriteExecute", "CapabilityBoundingSet")
    assert st_mdwe["MemoryDenyWriteExecute"] == "yes", st_mdwe
    assert "cap_chown" not in st_mdwe["CapabilityBoundingSet"], st_mdwe
    master = link_index(lab, n.failover)
    assert master is not None
    c.path(f"{T}/fault.env").unlink()  # read at that start; a restart runs without it

    # (b): a switch decided, then the loop stalls before the map write; no more pings.
    lab.set_far_end(0, "primary", False)
    t0 = time.monotonic()

    def restarted() -> dict[str, str] | None:
        st = c.show("failoverd.service", "ActiveState", "MainPID", "NRestarts")
        again = st["NRestarts"] != "0" and st["ActiveState"] == "active"  # READY=1 again
        return st if again else None

    st = c.wait_for(restarted, "a restart, READY again", 40)
    print(f"stall -> restarted by the watchdog, ready again in {time.monotonic() - t0:.1f} s")
    assert st["NRestarts"] == "1" and int(st["MainPID"]) != first_pid, st
    journal = c.wait_for(
        lambda: (j := "\n".join(c.journal("failoverd.service"))) and "'watchdog'" in j and j,
        "the watchdog's verdict in the journal",
    )
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal
    c.wait_for(lambda: len(c.events("started")) >= started_before + 2, "the restarted agent", 40)
    stalled = [e for e in c.events("fault_injected") if e.get("point") == "before-flip"]
    assert len(stalled) == 1, stalled
    # The new agent adopted: the same failover device, the map's active lower read back (the
    # stall came before the map write, so still the primary), then switched to the standby.
    adopted = c.events("group")[-1]
    assert adopted["master"] == master and adopted["adopted_active"] == "primary", adopted
    doc = c.wait_for(
        lambda: (d := status(c)) and d["groups"][0]["active_lower"] == n.standby and d,
        "the restarted agent on the standby",
    )
    assert doc["agent"]["pid"] == int(st["MainPID"]), doc
    assert link_index(lab, n.failover) == master

    # (c): reload keeps the same process, stop ends it cleanly.
    pid = int(st["MainPID"])
    reloaded = len(c.events("reloaded"))
    c.run("systemctl", "reload", "failoverd.service")
    c.wait_for(lambda: len(c.events("reloaded")) > reloaded, "the reload")
    st = c.show("failoverd.service", "ActiveState", "MainPID", "NRestarts")
    assert st == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": "1"}, st
    c.run("systemctl", "stop", "failoverd.service", timeout=30)
    st = c.show("failoverd.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert st["ActiveState"] == "inactive" and st["Result"] == "success", st
    assert st["ExecMainStatus"] == "0", st
    c.wait_for(lambda: c.events("stopped"), "`stopped` in the journal")
    assert link_index(lab, n.failover) == master, "the datapath is left forwarding"

"""The shipped snippets parse, and the unit passes systemd-analyze verify."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
LAB_MAC = "52:54:00:00:12:53"


def ini(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def test_networkmanager_and_networkd_snippets() -> None:
    nm = ini(DEPLOY / "networkmanager" / "90-bpfailover-lowers.conf")
    spec = nm["keyfile"]["unmanaged-devices"].split(";")
    assert spec == [f"mac:{LAB_MAC}", "except:driver:veth"]  # never the failover device
    nd = ini(DEPLOY / "networkd" / "00-bpfailover-lowers.network")
    assert nd["Match"]["MACAddress"] == LAB_MAC and nd["Match"]["Driver"] == "!veth"
    assert nd["Link"]["Unmanaged"] == "yes"


def test_udev_rule() -> None:
    rules = [
        ln
        for ln in (DEPLOY / "udev" / "80-bpfailover-lowers.rules").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert len(rules) == 1
    keys = dict(re.findall(r'([A-Z_]+(?:\{[A-Za-z_]+\})?)[!=]=?"([^"]*)"', rules[0]))
    assert keys["SUBSYSTEM"] == "net" and keys["ATTR{address}"] == LAB_MAC
    assert keys["DRIVERS"] == "?*" and keys["ENV{NM_UNMANAGED}"] == "1"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "failoverd.service").read_text()
    failoverd = Path(sys.executable).parent / "failoverd"
    assert "ExecStart=/usr/bin/failoverd " in unit
    (tmp_path / "failoverd.service").write_text(unit.replace("/usr/bin/failoverd", str(failoverd)))
    p = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "failoverd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [
        ln
        for ln in (p.stdout + p.stderr).splitlines()
        if "failoverd.service" in ln and "Unknown" in ln or "Invalid" in ln
    ]
    assert p.returncode == 0 and not problems, p.stdout + p.stderr


def test_systemd_unit_is_notify_watchdog_and_hardened(tmp_path: Path) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)  # Wants= twice
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "systemd" / "failoverd.service").read_text())
    svc = unit["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["RestartPreventExitStatus"] == "2"  # a bad config is not restarted in a loop
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert "CAP_DAC_OVERRIDE" not in svc["CapabilityBoundingSet"]
    # CAP_CHOWN only through a drop-in, with control.group (the socket's group)
    assert "CAP_CHOWN" not in svc["CapabilityBoundingSet"] + svc["AmbientCapabilities"]
    assert svc["MemoryDenyWriteExecute"] == "yes"  # the loader child compiles under it too
    # /proc/sys and /sys read-only, but for /proc/sys/net (its device's sysctls) and bpffs
    assert {"/sys", "/proc/sys"} <= set(svc["ReadOnlyPaths"].split())
    assert {"/proc/sys/net", "/sys/fs/bpf"} <= set(svc["ReadWritePaths"].split())
    assert svc["UMask"] == "0077" and svc["IPAddressDeny"] == "any"
    assert svc["IPAddressAllow"] == "localhost"  # the default metrics.listen
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    (tmp_path / "failoverd.service").write_text(
        (DEPLOY / "systemd" / "failoverd.service").read_text()
    )
    p = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(tmp_path / "failoverd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for failoverd.service: ([\d.]+)", p.stdout)
    assert m is not None, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.9, p.stdout  # 7.0 before the hardening (docs/operators.md)


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """requirements.lock (make setup, the Dockerfile) pins what pyproject.toml asks for, each
    with its hashes, and pyroute2 below its next major."""
    import tomllib

    from packaging.requirements import Requirement

    root = DEPLOY.parent
    deps = [
        Requirement(d)
        for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    lock = (root / "requirements.lock").read_text()
    pins = dict(re.findall(r"^([a-z0-9._-]+)==([^\s\\]+) \\$", lock, flags=re.M))
    for block in re.split(r"\n(?=[a-z])", lock.split("\n\n", 1)[-1]):
        if "==" in block:
            assert "--hash=sha256:" in block, block[:60]
    for dep in deps:
        name = dep.name.lower().replace("_", "-")
        assert name in pins, f"{name} not in requirements.lock: make lock"
        assert dep.specifier.contains(pins[name]), f"{name} {pins[name]} vs {dep.specifier}"
    pyroute2 = next(d for d in deps if d.name == "pyroute2")
    assert not pyroute2.specifier.contains("1.0")  # an upper bound on the major
    assert "--require-hashes -r /src/requirements.lock" in (root / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in (root / "Makefile").read_text()


def test_dockerfile_takes_its_base_by_digest() -> None:
    """One FROM, from the BASE build argument (a digest: scripts/container-image passes
    the one of the base it made), never a tag written into the Dockerfile."""
    root = DEPLOY.parent
    froms = re.findall(r"^FROM\s+(\S+)", (root / "Dockerfile").read_text(), flags=re.M)
    assert froms == ["${BASE}"], froms
    assert re.search(r"^ARG BASE$", (root / "Dockerfile").read_text(), flags=re.M)
    script = (root / "scripts" / "container-image").read_text()
    assert '--build-arg "BASE=$base_ref"' in script and 'base_ref="${BASE%%:*}@$digest"' in script


def test_the_documented_docker_run_is_deployable() -> None:
    """The container recipe in docs/operators.md: udev's run directory (the hold of a new
    VF), a bounded restart (a bad config exits 2 every time), only the agent's own bpffs
    directory writable, and how to reach failoverctl inside."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "operators.md").read_text()
    block = re.search(r"```sh\n(docker run -d --name failoverd.*?)```", text, re.S)
    assert block is not None, "no docker run recipe"
    cmd = block.group(1)
    assert "-v /run/udev:/run/udev:ro" in cmd
    assert "--restart on-failure:" in cmd and "--restart always" not in cmd
    assert "-v /sys/fs/bpf/failoverd:/bpffs " in cmd and "-v /sys/fs/bpf:" not in cmd
    assert "docker exec failoverd failoverctl status" in cmd

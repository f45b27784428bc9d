"""The netns lab: names, MACs, carrier control, VF hot-plug, seed migration, cleanup, CLI."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfailover import netns
from bpfailover.model.config import ControlSettings, load_config
from bpfailover_lab import agent_config
from bpfailover_lab import cli as labmod
from bpfailover_lab.topology import IFF_LOWER_UP, IFF_UP, Lab, LabError, group_names

_seq = itertools.count()


def new_prefix() -> str:
    # pid-based and per test, so parallel runs and leftovers of a crash never collide.
    return f"t{os.getpid() % 10000}l{next(_seq)}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    lb = Lab(new_prefix())
    try:
        yield lb
    finally:
        lb.down()
        assert not lb.exists()


@pytest.fixture
def lab2() -> Iterator[Lab]:
    lb = Lab(new_prefix(), groups=2)
    try:
        yield lb
    finally:
        lb.down()
        assert not lb.exists()


def ip_json(ns: str, *argv: str) -> list[dict[str, object]]:
    out = netns.run_in(ns, ["ip", "-j", *argv]).stdout
    return json.loads(out) if out.strip() else []


def sysctl(ns: str, key: str) -> str:
    return netns.run_in(ns, ["sysctl", "-n", key]).stdout.strip()


# ---- no root needed --------------------------------------------------------------------------


def test_group_names() -> None:
    g0, g1 = group_names(0), group_names(1)
    assert (g0.failover, g0.standby, g0.primary) == ("ens10", "ens10nsby", "ens11")
    assert (g0.mac, g0.tap, g0.vfport) == ("52:54:00:00:12:53", "tap01", "vfport")
    assert (g0.guest_v4, g0.peer_v4, g0.prefixlen_v4) == ("198.18.0.1", "198.18.0.2", 24)
    assert (g0.guest_v6, g0.peer_v6, g0.prefixlen_v6) == ("2001:db8:0::1", "2001:db8:0::2", 64)
    assert (g1.failover, g1.standby, g1.primary) == ("ens20", "ens20nsby", "ens21")
    assert (g1.mac, g1.tap, g1.vfport) == ("52:54:00:00:12:54", "tap02", "vfport1")
    assert (g1.guest_v4, g1.guest_v6) == ("198.18.1.1", "2001:db8:1::1")


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(LabError, match="bad prefix"):
        Lab("Bad Prefix!")
    with pytest.raises(LabError, match="groups"):
        Lab("x", groups=0)
    with pytest.raises(LabError, match="out of range"):
        Lab("x").names(1)
    with pytest.raises(LabError, match="role"):
        Lab("x").far_end(0, "vf")  # type: ignore[arg-type]


def test_cli_argument_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        labmod.main(["up", "--groups", "many"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid int value" in err


def test_cli_runtime_error_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(labmod.os, "geteuid", lambda: 0)  # past the root check, as any user
    assert labmod.main(["migrate", "--prefix", new_prefix()]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "failover-lab up" in err


# ---- root ------------------------------------------------------------------------------------


@pytest.mark.root
def test_up_creates_namespaces_devices_and_macs(lab: Lab) -> None:
    lab.up()
    assert all(netns.exists(ns) for ns in lab.namespaces)
    g = lab.names(0)
    guest = {d["ifname"]: d for d in ip_json(lab.guest, "addr")}
    assert set(guest) == {"lo", g.standby, g.primary}  # no failover device: the agent makes it
    for dev in (g.standby, g.primary):
        assert guest[dev]["address"] == g.mac
        assert "UP" in guest[dev]["flags"] and "LOWER_UP" in guest[dev]["flags"]  # type: ignore[operator]
        assert guest[dev]["addr_info"] == []  # lowers carry no address, not even link-local
        assert sysctl(lab.guest, f"net.ipv6.conf.{dev}.disable_ipv6") == "1"
    hv = {d["ifname"]: d for d in ip_json(lab.hv, "link")}
    assert set(hv) == {"lo", "br0", "peer0", g.tap, g.vfport}
    for port in ("peer0", g.tap, g.vfport):
        assert hv[port].get("master") == "br0"
        assert sysctl(lab.hv, f"net.ipv6.conf.{port}.disable_ipv6") == "1"
    assert sysctl(lab.hv, "net.ipv6.conf.br0.disable_ipv6") == "1"
    assert all(not a["addr_info"] for a in ip_json(lab.hv, "addr") if a["ifname"] != "lo")
    peer = {d["ifname"]: d for d in ip_json(lab.peer, "addr")}
    addrs = {a["local"] for a in peer["eth0"]["addr_info"]}  # type: ignore[union-attr]
    assert {"198.18.0.2", "2001:db8::2"} <= addrs
    assert "UP" in peer["lo"]["flags"]  # type: ignore[operator]


@pytest.mark.root
def test_up_twice_is_a_clear_error(lab: Lab) -> None:
    lab.up()
    with pytest.raises(LabError, match=r"already exists.*failover-lab down"):
        lab.up()
    assert lab.exists()  # the failed second up must not tear down the first


@pytest.mark.root
def test_down_after_partial_up_and_twice() -> None:
    lb = Lab(new_prefix())
    try:
        subprocess.run(["ip", "netns", "add", lb.guest], check=True)
        assert lb.exists()
        lb.down()
        assert not lb.exists()
        lb.down()  # safe to call again
    finally:
        lb.down()
    assert not lb.exists()


@pytest.mark.root
def test_carrier_control(lab: Lab) -> None:
    lab.up(standby_link=False)
    assert lab.has_carrier(0, "primary") and not lab.has_carrier(0, "standby")
    lab.set_far_end(0, "primary", False)
    info = lab.link(lab.guest, "ens11")
    assert info is not None and info["flags"] & IFF_UP and not info["flags"] & IFF_LOWER_UP
    lab.set_far_end(0, "standby", True)
    assert lab.has_carrier(0, "standby")
    lab.set_far_end(0, "primary", True)
    assert lab.has_carrier(0, "primary")


@pytest.mark.root
def test_unplug_and_plug_vf(lab: Lab) -> None:
    lab.up()
    before = lab.link(lab.guest, "ens11")
    assert before is not None
    lab.unplug_vf(0)
    assert lab.link(lab.guest, "ens11") is None
    assert lab.link(lab.hv, "vfport") is None
    lab.plug_vf(0)
    after = lab.link(lab.guest, "ens11")
    assert after is not None
    assert after["ifindex"] != before["ifindex"]
    assert after["mac"] == "52:54:00:00:12:53"
    assert lab.has_carrier(0, "primary")
    assert sysctl(lab.guest, "net.ipv6.conf.ens11.disable_ipv6") == "1"
    port = ip_json(lab.hv, "link", "show", "vfport")[0]
    assert port.get("master") == "br0"
    with pytest.raises(LabError, match="already plugged"):
        lab.plug_vf(0)


@pytest.mark.root
def test_fdb_del(lab: Lab) -> None:
    lab.up(standby_link=False)
    lab.address_lower_directly(0)
    with netns.entered(lab.guest), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("198.18.0.2", 9))  # its ARP request teaches br0 the guest MAC
    deadline = time.monotonic() + 2
    while not lab.fdb_ports(0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lab.fdb_ports(0) == ["vfport"]
    lab.fdb_del(0)
    assert lab.fdb_ports(0) == []
    lab.fdb_del(0)  # a missing entry is not an error


@pytest.mark.root
def test_migrate_runs_all_steps(lab: Lab) -> None:
    lab.up(standby_link=False)
    before = lab.link(lab.guest, "ens11")
    lines: list[str] = []
    steps = lab.migrate(0, pause_s=0.05, log=lines.append)
    assert [s.n for s in steps] == list(range(1, 8)) and len(lines) == 7
    assert all(f"step {n}/7" in ln for n, ln in enumerate(lines, 1))
    assert "fdb del" in lines[1] and "unplug" in lines[2] and "vf" in lines[3]
    assert steps[5].t_mono - steps[4].t_mono >= 0.05  # the migration pause
    after = lab.link(lab.guest, "ens11")
    assert before is not None and after is not None
    assert after["ifindex"] != before["ifindex"] and after["mac"] == before["mac"]
    assert lab.has_carrier(0, "primary") and not lab.has_carrier(0, "standby")


@pytest.mark.root
def test_migration_steps_interleave(lab: Lab) -> None:
    lab.up(standby_link=False)
    steps = lab.migration_steps(0, pause_s=0.0)
    assert len(steps) == 7
    for n, (_, action) in enumerate(steps, 1):
        action()
        if n == 1:
            assert lab.has_carrier(0, "standby")
        if n == 3:  # between unplug and plug the guest has only the standby
            assert lab.link(lab.guest, "ens11") is None and lab.has_carrier(0, "standby")
    assert lab.has_carrier(0, "primary") and not lab.has_carrier(0, "standby")


@pytest.mark.root
def test_two_groups(lab2: Lab) -> None:
    lab2.up()
    guest = {d["ifname"]: d["address"] for d in ip_json(lab2.guest, "link")}
    assert guest == {
        "lo": "00:00:00:00:00:00",
        "ens10nsby": "52:54:00:00:12:53",
        "ens11": "52:54:00:00:12:53",
        "ens20nsby": "52:54:00:00:12:54",
        "ens21": "52:54:00:00:12:54",
    }
    hv = {d["ifname"] for d in ip_json(lab2.hv, "link")}
    assert {"tap01", "vfport", "tap02", "vfport1"} <= hv
    peer = ip_json(lab2.peer, "addr", "show", "eth0")[0]
    addrs = {a["local"] for a in peer["addr_info"]}  # type: ignore[attr-defined]
    assert {"198.18.0.2", "198.18.1.2", "2001:db8::2", "2001:db8:1::2"} <= addrs
    lab2.unplug_vf(1)  # groups are independent
    assert lab2.link(lab2.guest, "ens21") is None and lab2.has_carrier(0, "primary")
    lab2.plug_vf(1)
    assert lab2.has_carrier(1, "primary")


@pytest.mark.root
def test_cli_up_show_down_and_demo(capsys: pytest.CaptureFixture[str]) -> None:
    p = new_prefix()
    try:
        assert labmod.main(["up", "--prefix", p, "--groups", "2", "--standby-link", "down"]) == 0
        assert Lab(p, 2).has_carrier(1, "primary") and not Lab(p, 2).has_carrier(1, "standby")
        # up writes its agent's config and prints how to run it and talk to it
        out = capsys.readouterr().out
        assert f"failoverd --config /run/bpfailover/lab-{p}/config.yaml --netns {p}-guest" in out
        assert f"failoverctl --socket /run/bpfailover/lab-{p}.sock status" in out
        assert load_config(Lab(p).agent_config) == agent_config.agent_config(p)
        assert labmod.main(["up", "--prefix", p]) == 1
        assert "already exists" in capsys.readouterr().err
        assert labmod.main(["migrate", "--prefix", p, "--group", "1", "--pause", "0"]) == 0
        assert "step 7/7" in capsys.readouterr().out
        assert labmod.main(["down", "--prefix", p]) == 0
        assert not Lab(p).exists() and not Lab(p).agent_config.parent.exists()
        assert labmod.main(["demo", "--prefix", p]) == 0
        assert f"== {p}-guest" in capsys.readouterr().out
        assert not Lab(p).exists()
    finally:
        Lab(p).down()


# ---- by hand (docs/lab.md) -------------------------------------------------------------------


def test_agent_config_paths_come_from_the_prefix() -> None:
    cfg = agent_config.agent_config("nu")
    (g,) = cfg.groups
    assert (g.name, g.standby, g.primary) == ("ens10", "ens10nsby", "auto")
    assert cfg.metrics.address == ("127.0.0.1", 9617)  # the guest netns' own loopback
    assert cfg.control.socket == "/run/bpfailover/lab-nu.sock" == Lab("nu").agent_socket
    assert cfg.bpffs == "/sys/fs/bpf/bpfailover-lab-nu" == str(Lab("nu").agent_pins)
    assert Lab("nu").agent_config == Path("/run/bpfailover/lab-nu/config.yaml")
    default = Lab()  # failover-lab's default prefix, never the production paths
    assert default.agent_socket == "/run/bpfailover/lab-fo.sock" != ControlSettings().socket
    assert str(default.agent_pins) == "/sys/fs/bpf/bpfailover-lab-fo"


def test_every_option_has_help() -> None:
    import argparse

    parser = labmod._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(a.option_strings)}"
        for name, p in sub.choices.items()
        for a in p._actions
        if a.option_strings and not a.help
    ]
    assert missing == []


def test_traffic_fails_on_loss_or_send_errors() -> None:
    from bpfailover_lab.traffic import DirectionStats, StreamReport

    ok = DirectionStats(sent=2000, received=2000)
    lost = DirectionStats(sent=2000, received=0, lost=2000, send_errors=2000)
    some = DirectionStats(sent=2000, received=1970, lost=30)
    rep = StreamReport(ok, ok, a="g 198.18.0.1", b="p 198.18.0.2")
    assert labmod.traffic_failures(rep, 1.0) == []
    rep = StreamReport(lost, some, a="g 198.18.0.1", b="p 198.18.0.2")
    assert labmod.traffic_failures(rep, 1.0) == [
        "g 198.18.0.1 -> p 198.18.0.2: 2000 send errors",
        "g 198.18.0.1 -> p 198.18.0.2: 2000 of 2000 lost (100.0% > 1%)",
        "p 198.18.0.2 -> g 198.18.0.1: 30 of 2000 lost (1.5% > 1%)",
    ]
    assert labmod.traffic_failures(StreamReport(some, None), 2.0) == []


@pytest.mark.root
def test_lab_agent_traffic_without_address_fails_and_down_waits_for_the_agent(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil
    import sys

    from bpfailover.ops import api

    lab.up()
    cfg = agent_config.agent_config(lab.prefix)
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bpfailover.agent",
            "--config",
            str(lab.agent_config),
            "--netns",
            lab.guest,
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):  # until it answers (bounded: 60 s)
            try:
                api.request(cfg.control.socket, {"cmd": "status"})
                break
            except OSError:
                assert agent.poll() is None, "the lab's failoverd exited"
                time.sleep(0.1)
        capsys.readouterr()
        # the failover device has no address yet: every send fails, and traffic says so
        assert labmod.main(["traffic", "--prefix", lab.prefix, "--duration", "0.5"]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("failover-lab: traffic: "), err
        assert "send errors" in err[0] and "(100.0% > 1%)" in err[0]
        # down refuses while the lab's agent runs, and changes nothing
        assert labmod.main(["down", "--prefix", lab.prefix]) == 1
        assert capsys.readouterr().err == (
            f"failover-lab: the lab's failoverd still runs (pid {agent.pid},"
            f" holding {cfg.bpffs}): stop it first\n"
        )
        assert lab.exists() and Path(cfg.bpffs).is_dir()
        agent.terminate()
        assert agent.wait(20) == 0
        assert labmod.main(["down", "--prefix", lab.prefix]) == 0
        assert not lab.exists() and not Path(cfg.bpffs).exists()
    finally:
        agent.kill()
        agent.wait(20)
        shutil.rmtree(cfg.bpffs, ignore_errors=True)

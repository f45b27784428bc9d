"""failoverctl against a running agent in the lab: status, set-primary, refusals, teardown."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bpfailover import netns
from bpfailover.model.status import Fallback, LowerCounters
from bpfailover.ops import cli
from bpfailover_lab import traffic
from bpfailover_lab.topology import Lab
from tests.conftest import realtime_refused
from tests.opsutil import agent_in_lab, as_nobody, ctl, status_json
from tests.statusutil import agent, counted, group

# ---- no root needed --------------------------------------------------------------------------


def test_degraded_reasons() -> None:
    assert cli.degraded_reasons(group("primary", True, True)) == []
    assert cli.degraded_reasons(group("standby", False, True)) == []  # failover: as designed
    assert "no usable lower" in cli.degraded_reasons(group(None, False, False))[0]
    why = cli.degraded_reasons(group("standby", True, True, override="standby"))
    assert why == [
        "running on the standby while primary ens11 is usable"
        " (operator override: failoverctl set-primary ens10 --auto clears it)"
    ]


def test_redundancy_lost_only_after_the_grace() -> None:
    g = replace(group("standby", False, True), single_since=1000.0, redundancy_grace_s=300)
    assert cli.degraded_reasons(g) == []  # an unplanned failover: traffic flows
    assert cli.redundancy_reasons(g, now=1299.0) == []  # a migration's unplug stays below
    why = cli.redundancy_reasons(g, now=1300.0)
    assert len(why) == 1 and "only one usable lower" in why[0] and "primary not usable" in why[0]
    assert cli.redundancy_reasons(group("primary", True, True), now=1e12) == []


def test_check_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    lost = replace(group("standby", False, True), single_since=now - 400, redundancy_grace_s=300)
    fine = replace(group("primary", True, True), name="ens20")
    dead = replace(group(None, False, False), name="ens30", single_since=now - 400)
    assert cli.check(agent(fine), None) == cli.EXIT_OK
    assert cli.check(agent(fine, lost), None) == cli.EXIT_NOT_REDUNDANT == 6
    assert "ens10: redundancy lost: only one usable lower" in capsys.readouterr().err
    assert cli.check(agent(fine, lost), "ens20") == cli.EXIT_OK  # only the group asked for
    assert cli.check(agent(lost, dead), None) == cli.EXIT_DEGRADED  # 4 wins over 6
    assert cli.check(agent(), None) == cli.EXIT_DEGRADED  # no group: nothing is failed over
    assert "runs no failover group" in capsys.readouterr().err


def test_socket_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "groups: [{name: ens10, standby: ens10nsby}]\ncontrol: {socket: /run/x/ctl.sock}\n"
    )
    monkeypatch.delenv("BPFAILOVER_CONFIG", raising=False)
    assert cli.socket_path("/s", str(cfg)) == "/s"
    assert cli.socket_path(None, str(cfg)) == "/run/x/ctl.sock"
    monkeypatch.setenv("BPFAILOVER_CONFIG", str(cfg))
    assert cli.socket_path(None, None) == "/run/x/ctl.sock"
    monkeypatch.setenv("BPFAILOVER_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(cli.CliError) as e:
        cli.socket_path(None, None)
    assert e.value.code == cli.EXIT_USAGE


def test_usage_and_unreachable_exit_codes(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    assert ctl(socket=sock).returncode == 2  # no verb
    assert ctl("frobnicate", socket=sock).returncode == 2
    assert ctl("set-primary", "ens10", socket=sock).returncode == 2  # neither LOWER nor --auto
    assert ctl("set-primary", "ens10", "ens11", "--auto", socket=sock).returncode == 2
    p = ctl("status", socket=sock)
    assert (p.returncode, p.stderr) == (
        3,
        f"failoverctl: agent unreachable: {sock}: No such file or directory"
        " (is failoverd running?)\n",
    )


@pytest.mark.root
def test_permission_denied_on_the_socket_says_so(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(sock))
        srv.listen(1)
        os.chmod(sock, 0o600)  # root's, as failoverd makes it without control.group
        tmp_path.chmod(0o755)
        assert as_nobody(cli.main, ["--socket", str(sock), "status"]) == (
            3,
            f"failoverctl: permission denied on the control socket: {sock}: Permission denied"
            " (run as root or as a member of the config's control.group)\n",
        )


def test_format_table_of_empty_and_full_documents() -> None:
    assert cli.format_table(agent()) == "no groups"
    g = group()
    st = counted(agent(replace(g, last_switch=replace(g.last_switch, time=time.time()))))
    text = cli.format_table(st)
    assert "ens10: active ens11 (primary)" in text and "initial, 100 us" in text
    assert "tc_egress/no_lower 2" in text
    assert "xdp/inactive" not in text  # zero drops are not shown
    assert cli.format_table(st, "ens99") == "no groups"
    assert "datapath fallback (before the agent switched): primary -> standby tx 3 rx 1" in text
    assert "lower check" not in text  # on: nothing to say
    moved = (Fallback(from_role="primary", to_role="standby", tx_packets=5),)
    st = st.with_counters(
        lambda g, lw: LowerCounters(), lambda g: {}, lambda g: moved, datapath_check="refused"
    )
    assert st.document(cli.degraded_reasons)["agent"]["datapath_check"] == "refused"
    text = cli.format_table(st)
    assert "datapath fallback (before the agent switched): primary -> standby tx 5 rx 0" in text
    assert "per-packet lower check: refused" in text


class FakeAgent:
    """A control socket that answers set-primary and status from a scripted list of states:
    each status read takes the next one (the last one stays)."""

    def __init__(self, path: Path, states: list[Any], refuse: str | None = None) -> None:
        self.states, self.refuse, self.requests = list(states), refuse, []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(8)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                req = json.loads(conn.makefile("rb").readline())
                self.requests.append(req)
                if req["cmd"] == "set-primary":
                    reply = {"ok": False, "error": self.refuse} if self.refuse else {"ok": True}
                else:
                    st = self.states.pop(0) if len(self.states) > 1 else self.states[0]
                    reply = {"ok": True, "status": st.to_json()}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.srv.close()


def _set_primary(sock: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["--socket", str(sock), "set-primary", *argv])
        except SystemExit as e:  # argparse's own refusals
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_set_primary_wait_returns_once_the_lower_is_active(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    states = [agent(group("primary"))] * 3 + [agent(group("standby", override="standby"))]
    fake = FakeAgent(sock, states)
    try:
        code, out, err = _set_primary(sock, "ens10", "standby", "--wait", "30", "--json")
        assert (code, err) == (0, "")
        g = json.loads(out)["groups"][0]
        assert (g["active"], g["override"]) == ("standby", "standby")
        assert [r["cmd"] for r in fake.requests] == ["set-primary"] + ["status"] * 4
        assert fake.requests[0] == {"cmd": "set-primary", "group": "ens10", "lower": "standby"}
    finally:
        fake.close()


def test_set_primary_auto_wait_waits_for_the_primary_by_name_or_role(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    states = [agent(group("standby", primary_usable=False)), agent(group("primary"))]
    fake = FakeAgent(sock, states)
    try:
        code, out, err = _set_primary(sock, "ens10", "--auto", "--wait", "30")
        assert (code, out, err) == (0, "ens10: override auto, active ens11 (primary)\n", "")
        assert fake.requests[0]["lower"] is None
        code, out, _ = _set_primary(sock, "ens10", "ens11", "--wait", "30")  # by name
        assert code == 0 and [r["cmd"] for r in fake.requests].count("status") == 3
    finally:
        fake.close()


def _options(p: Any) -> Any:
    """(parser, option) for every option of p and of its subcommands."""
    import argparse

    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _options(sub)
        elif a.option_strings:
            yield p, a


def test_help_names_every_default() -> None:
    import argparse

    from bpfailover_lab import cli as labcli

    checked = 0
    for top in (cli.parser(), labcli._parser()):
        for p, a in _options(top):
            if a.default in (None, False, argparse.SUPPRESS):
                continue
            text = p.formatter_class(p.prog)._get_help_string(a) or ""
            assert "default" in text, (p.prog, a.option_strings, text)
            checked += 1
    assert checked >= 10
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        labcli.main(["traffic", "--help"])
    assert "(default: 1000)" in out.getvalue() and "(default: 2.0)" in out.getvalue()


def test_set_primary_says_the_same_with_and_without_wait(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    fake = FakeAgent(sock, [agent(group("standby", override="standby"))])
    try:
        plain = _set_primary(sock, "ens10", "standby")
        waited = _set_primary(sock, "ens10", "standby", "--wait", "30")
        line = "ens10: override standby, active ens10nsby (standby)\n"
        assert plain == waited == (0, line, "")
        as_json = [
            _set_primary(sock, "ens10", "standby", *w, "--json") for w in ([], ["--wait", "30"])
        ]
        assert as_json[0] == as_json[1] and as_json[0][0] == 0
        assert json.loads(as_json[0][1])["groups"][0]["active_lower"] == "ens10nsby"
    finally:
        fake.close()


def test_set_primary_wait_times_out_with_exit_5_and_the_state(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    fake = FakeAgent(sock, [agent(group("standby", primary_usable=False))])
    try:
        code, out, err = _set_primary(sock, "ens10", "--auto", "--wait", "0.3", "--json")
        assert code == cli.EXIT_TIMEOUT == 5
        assert json.loads(out)["groups"][0]["active"] == "standby"  # the state, even so
        assert err == (
            "failoverctl: ens10: primary ens11 not active after 0.3s (active: ens10nsby; "
            "ens11: not usable, admin up, carrier no)\n"
        )
    finally:
        fake.close()


def test_set_primary_wait_refused_or_bad_waits_nothing(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    fake = FakeAgent(sock, [agent(group("primary"))], refuse="lower ens10nsby is not usable")
    try:
        code, out, err = _set_primary(sock, "ens10", "standby", "--wait", "30")
        assert (code, out) == (1, "") and "not usable" in err
        assert [r["cmd"] for r in fake.requests] == ["set-primary"]  # no waiting after a no
        for bad in ("0", "-1", "nan", "x"):
            code, out, err = _set_primary(sock, "ens10", "standby", "--wait", bad)
            assert code == 2 and len(err.strip().splitlines()) >= 1, (bad, err)
        assert [r["cmd"] for r in fake.requests] == ["set-primary"]
    finally:
        fake.close()


# ---- against a running agent -------------------------------------------------------------------


def _state(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What a refused request must not change (counters move with background traffic)."""
    return [
        (
            g["group"],
            g["active"],
            g["active_lower"],
            g["override"],
            g["carrier"],
            sorted((lw["name"], lw["role"], lw["usable"]) for lw in g["lowers"]),
            sorted(g["switches"].items()),
        )
        for g in doc["groups"]
    ]


@pytest.mark.root
def test_status_table_and_json(lab: Lab) -> None:
    with agent_in_lab(lab) as run:
        n = lab.names(0)
        p = ctl("status", socket=run.socket)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0].startswith(f"{n.failover}: active {n.primary} (primary)")
        assert "-- ok" in lines[0]
        head = lines[1].split()
        assert head == [
            "LOWER",
            "IFINDEX",
            "ROLE",
            "USABLE",
            "ADMIN",
            "CARRIER",
            "TX_PKTS",
            "RX_PKTS",
        ]
        active_rows = [ln for ln in lines if ln.strip().startswith("*")]
        assert len(active_rows) == 1 and n.primary in active_rows[0]
        assert any("last switch" in ln and "initial" in ln for ln in lines)

        doc = status_json(run)
        assert doc["schema"] == 1 and doc["agent"]["pid"] == run.proc.pid  # type: ignore[union-attr]
        # the default, granted to root where the machine lets root have SCHED_FIFO
        want = "fifo:10" if realtime_refused() is None else "other"
        assert doc["agent"]["scheduling"] == want
        (g,) = doc["groups"]
        assert set(g) == {
            "group",
            "device",
            "ifindex",
            "mac",
            "mtu",
            "carrier",
            "active",
            "active_lower",
            "override",
            "reselect",
            "inactive_rx",
            "lowers",
            "switches",
            "last_switch",
            "drops",
            "speed_mbps",
            "mac_restored",
            "vlans",
            "waiting_for_udev",
            "datapath_fallback",
            "single_since",
            "redundancy_grace_s",
            "degraded",
        }
        assert (g["group"], g["device"], g["mac"]) == (n.failover, n.failover, n.mac)
        assert (g["active"], g["active_lower"], g["override"]) == ("primary", n.primary, None)
        lowers = {lw["name"]: lw for lw in g["lowers"]}
        assert set(lowers) == {n.primary, n.standby}
        assert lowers[n.primary]["role"] == "primary" and lowers[n.primary]["active"]
        assert all(lw["usable"] and lw["carrier"] and lw["admin_up"] for lw in lowers.values())
        with netns.entered(lab.guest):
            assert lowers[n.primary]["ifindex"] == __import__("socket").if_nametoindex(n.primary)
        assert g["last_switch"]["to"] == n.primary and g["last_switch"]["reason"] == "initial"
        assert g["degraded"] == []
        assert ctl("status", "--check", socket=run.socket).returncode == 0
        one = ctl("status", "--json", n.failover, socket=run.socket)
        assert json.loads(one.stdout)["groups"][0]["group"] == n.failover
        assert ctl("status", "nope", socket=run.socket).returncode == 1


@pytest.mark.root
def test_set_primary_both_ways_loses_nothing(lab: Lab) -> None:
    with agent_in_lab(lab) as run:
        n = lab.names(0)
        assert (
            traffic.run_stream(
                lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate_pps=200, duration_s=0.5
            ).total_lost
            == 0
        )  # warm: ARP, fdb
        with traffic.start_stream(
            lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate_pps=5000, duration_s=3.0
        ) as h:
            time.sleep(0.7)
            p = ctl("set-primary", n.failover, n.standby, socket=run.socket)
            assert p.returncode == 0, p.stderr
            assert f"override standby, active {n.standby} (standby)" in p.stdout
            run.wait_active(n.standby)
            time.sleep(0.8)
            p = ctl("set-primary", n.failover, "--auto", socket=run.socket)
            assert p.returncode == 0, p.stderr
            run.wait_active(n.primary)
            rep = h.wait()
        assert rep.total_lost == 0, rep.format()
        assert rep.a_to_b.received > 10000 and rep.b_to_a is not None
        switches = [e for e in run.events("switch") if e["reason"] == "override"]
        assert [(e["from"], e["to"]) for e in switches] == [
            (n.primary, n.standby),
            (n.standby, n.primary),
        ]
        g = status_json(run)["groups"][0]
        assert g["override"] is None and g["switches"]["override"] == 2


@pytest.mark.root
def test_refusals_change_nothing(lab: Lab) -> None:
    with agent_in_lab(lab) as run:
        n = lab.names(0)
        lab.set_far_end(0, "standby", False)  # the standby loses carrier: unusable
        run.wait_for(
            lambda: not {lw["name"]: lw for lw in run.group()["lowers"]}[n.standby]["usable"],
            what="standby unusable",
        )
        before = _state(status_json(run))
        cases = [
            (("set-primary", "ens99", n.primary), 1, "unknown group 'ens99'"),
            (("set-primary", n.failover, "eth7"), 1, f"'eth7' is not a lower of {n.failover}"),
            (("set-primary", n.failover, n.standby), 1, f"{n.standby} is not usable"),
            (("set-primary", n.failover, "standby"), 1, "not usable"),
            (("teardown", "ens99"), 1, "unknown group"),
            (("set-primary", n.failover), 2, "give either LOWER or --auto"),
            (("set-primary",), 2, "required"),
            (("status", "--bogus"), 2, "unrecognized arguments"),
        ]
        for argv, code, msg in cases:
            p = ctl(*argv, socket=run.socket)
            assert p.returncode == code, (argv, p.stdout, p.stderr)
            assert msg in p.stderr, (argv, p.stderr)
            assert p.stdout == "" or code == 2, (argv, p.stdout)
        after = _state(status_json(run))
        assert after == before
        assert not run.events("override")


@pytest.mark.root
def test_status_check_degraded(lab: Lab) -> None:
    with agent_in_lab(lab) as run:
        n = lab.names(0)
        lab.set_far_end(0, "primary", False)
        run.wait_active(n.standby)
        assert ctl("status", "--check", socket=run.socket).returncode == 0  # failover: fine
        lab.set_far_end(0, "standby", False)
        run.wait_active(None)
        p = ctl("status", "--check", socket=run.socket)
        assert p.returncode == 4 and "no usable lower" in p.stderr
        assert "DEGRADED" in p.stdout
        lab.set_far_end(0, "primary", True)
        lab.set_far_end(0, "standby", True)
        run.wait_active(n.primary)
        assert ctl("set-primary", n.failover, n.standby, socket=run.socket).returncode == 0
        p = ctl("status", "--check", "--json", socket=run.socket)
        assert p.returncode == 4 and "override" in p.stderr
        assert json.loads(p.stdout)["groups"][0]["degraded"]


@pytest.mark.root
def test_status_check_redundancy_lost_and_no_group(lab: Lab) -> None:
    """The standby left down after a migration (here: the grace set to 0 s) shows as exit 6
    and in the metric; after the last group is torn down --check is not healthy either."""
    with agent_in_lab(lab, redundancy_grace_s=0) as run:
        n = lab.names(0)
        assert ctl("status", "--check", socket=run.socket).returncode == 0
        lab.set_far_end(0, "standby", False)
        run.wait_for(lambda: not status_json(run)["groups"][0]["lowers"][1]["usable"])
        p = ctl("status", "--check", socket=run.socket)
        assert p.returncode == 6, (p.stdout, p.stderr)
        assert "redundancy lost: only one usable lower" in p.stderr and "standby" in p.stderr
        assert "REDUNDANCY LOST" in p.stdout
        lab.set_far_end(0, "standby", True)
        run.wait_for(lambda: ctl("status", "--check", socket=run.socket).returncode == 0)
        assert ctl("teardown", n.failover, "--yes", socket=run.socket).returncode == 0
        p = ctl("status", "--check", socket=run.socket)
        assert p.returncode == 4 and "runs no failover group" in p.stderr


@pytest.mark.root
def test_override_survives_restart_and_teardown_removes(lab: Lab) -> None:
    with agent_in_lab(lab) as run:
        n = lab.names(0)
        assert ctl("set-primary", n.failover, n.standby, socket=run.socket).returncode == 0
        run.wait_active(n.standby)
        run.restart()
        g = status_json(run)["groups"][0]
        assert (g["override"], g["active_lower"]) == ("standby", n.standby)
        # addressed and with carrier: refused without --yes, in one line, nothing changes
        v6 = str(ipaddress.ip_address(n.guest_v6))
        p = ctl("teardown", n.failover, socket=run.socket)
        assert (p.returncode, p.stdout, p.stderr) == (
            1,
            "",
            f"failoverctl: {n.failover} has carrier and addresses ({n.guest_v4}, {v6}):"
            " teardown deletes the device with them and its traffic stops; refused without"
            " --yes\n",
        )
        assert len(status_json(run)["groups"]) == 1 and not run.events("teardown")
        p = ctl("teardown", n.failover, "--yes", socket=run.socket)
        assert (p.returncode, p.stdout) == (
            0,
            f"{n.failover}: removed failover device {n.failover} (addresses: {n.guest_v4},"
            f" {v6}) and its peer {n.failover}_fo; programs detached from lowers"
            f" {n.standby}, {n.primary} (left in place)\n",
        )
        assert status_json(run)["groups"] == []
        assert lab.link(lab.guest, n.failover) is None
        p = ctl("set-primary", n.failover, "--auto", socket=run.socket)
        assert p.returncode == 1 and "unknown group" in p.stderr


@pytest.mark.root
def test_socket_from_config_and_env(lab: Lab) -> None:
    with agent_in_lab(lab, address=False) as run:
        p = ctl("--config", str(run.config_path), "status", "--json")
        assert p.returncode == 0, p.stderr
        env = {**os.environ, "BPFAILOVER_CONFIG": str(run.config_path)}
        assert ctl("status", env=env).returncode == 0


@pytest.mark.root
def test_orphaned_pins_reported_by_doctor_and_removed_without_an_agent(lab: Lab) -> None:
    """`failoverctl teardown --pins DIR` removes a datapath whose agent is gone: refused
    while an agent holds DIR, refused without --yes while the device has carrier and
    addresses (nothing changes), then filters, the veth pair and the pins go, and the pin
    directory's lock file with them (also one a killed agent left); doctor lists the orphan
    (with that command) until then."""
    from bpfailover.datapath.maps import lock_path, open_lock

    with agent_in_lab(lab) as run:
        n = lab.names(0)
        pins = run.pin_dir
        lock = lock_path(pins)
        teardown = ("teardown", "--pins", str(pins), "--netns", lab.guest)
        p = ctl(*teardown, "--all", "--yes")
        assert p.returncode == 1 and p.stdout == "", p.stderr
        assert len(p.stderr.splitlines()) == 1 and "another agent holds" in p.stderr, p.stderr
        assert status_json(run)["groups"][0]["group"] == n.failover

        def orphans() -> list[dict[str, str]]:
            out = ctl("--config", str(run.config_path), "doctor", "--netns", lab.guest, "--json")
            found = json.loads(out.stdout)
            return [f for f in found if (f["check"], f["subject"]) == ("orphaned-pins", str(pins))]

        assert orphans() == []  # held by its agent
        assert lock.exists(), "the refused teardown left the agent's lock file alone"
        assert run.stop() == 0  # the datapath stays pinned and forwarding
        assert not lock.exists(), "the lock file goes with a stopped agent"
        found = orphans()
        assert len(found) == 1, found
        assert f"failoverctl teardown --pins {pins} --all --netns {lab.guest}" in found[0]["fix"]

        p = ctl(*teardown, "--all")
        v6 = str(ipaddress.ip_address(n.guest_v6))
        assert (p.returncode, p.stdout, p.stderr) == (
            1,
            "",
            f"failoverctl: {n.failover} has carrier and addresses ({n.guest_v4}/24,"
            f" {v6}/64): teardown deletes the device with them and its traffic stops;"
            " refused without --yes\n",
        )
        p = ctl(*teardown, "nosuchgroup", "--yes")
        assert (p.returncode, p.stderr) == (
            1,
            f"failoverctl: {pins} has no group nosuchgroup (groups: {n.failover})\n",
        )
        assert ctl(*teardown).returncode == 2  # neither GROUP nor --all
        assert lab.link(lab.guest, n.failover) is not None and pins.exists()
        assert not lock.exists(), "refused teardowns leave no lock file"

        os.close(open_lock(lock))  # as an agent killed with SIGKILL leaves it
        p = ctl(*teardown, "--all", "--yes")
        assert (p.returncode, p.stdout) == (
            0,
            f"{n.failover}: removed failover device {n.failover} (addresses: {n.guest_v4}/24,"
            f" {v6}/64) and its peer {n.failover}_fo; programs detached from lowers"
            f" {n.standby}, {n.primary} (left in place)\n{pins}: pins removed\n",
        ), p.stderr
        assert lab.link(lab.guest, n.failover) is None
        assert lab.link(lab.guest, f"{n.failover}_fo") is None
        assert not pins.exists() and not lock.exists()
        for dev in (n.primary, n.standby):
            tc = netns.run_in(lab.guest, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
            assert "bpfailover:" not in tc, tc
            assert lab.link(lab.guest, dev) is not None  # lowers stay
        assert orphans() == []
        # a fresh agent starts on the same names: nothing of the old datapath is in its way
        run.start()
        assert status_json(run)["groups"][0]["active_lower"] == n.primary


@pytest.mark.root
def test_teardown_pins_refuses_a_datapath_another_running_agent_serves(lab: Lab) -> None:
    """A pin directory is orphaned only if no running agent serves its datapath: agent A is
    killed (its pins stay), agent B with another pin directory takes the same group over;
    doctor does not list A's pins, and `teardown --pins A GROUP --yes` refuses in one line
    naming B's pin directory, leaving B's device, addresses, hooks and traffic alone."""
    from bpfailover.datapath.maps import lock_path
    from bpfailover_lab.agent_run import AgentRun
    from tests.labutil import ping

    hooked = ("primary", "ingress"), ("standby", "ingress"), ("failover", "egress")

    def hooks(n: Any) -> dict[str, str]:
        return {
            f"{dev} {d}": netns.run_in(
                lab.guest, ["tc", "filter", "show", "dev", getattr(n, dev), d]
            ).stdout
            for dev, d in hooked
        }

    with agent_in_lab(lab) as a:
        n = lab.names(0)
        p1 = a.pin_dir
        a.kill()  # SIGKILL: A's pins stay, nobody holds them
        b = AgentRun(lab, name=f"{lab.prefix}-b")
        try:
            b.start()
            b.wait_active(n.primary)
            assert b.events("hooks_taken_over"), "B took A's failover device over"
            before = hooks(n)
            p = ctl("teardown", "--pins", str(p1), "--netns", lab.guest, n.failover, "--yes")
            assert (p.returncode, p.stdout) == (1, ""), (p.stdout, p.stderr)
            lines = p.stderr.splitlines()
            assert len(lines) == 1 and str(b.pin_dir) in lines[0], p.stderr
            assert b.proc is not None and f"(pid {b.proc.pid})" in lines[0], p.stderr
            assert n.failover in lines[0], p.stderr
            assert lab.link(lab.guest, n.failover) is not None, "B's device kept"
            assert hooks(n) == before, "B's hooks kept"
            v4 = netns.run_in(lab.guest, ["ip", "-4", "-o", "addr", "show", "dev", n.failover])
            assert f"{n.guest_v4}/" in v4.stdout, v4.stdout
            assert (p1 / "fo_meta").exists(), "A's pins kept (nothing removed)"
            assert ping(lab.guest, n.peer_v4), "B's traffic flows"
            assert b.group()["active_lower"] == n.primary
            assert not lock_path(p1).exists(), "the refused teardown left no lock file"
            found = ctl("--config", str(a.config_path), "doctor", "--netns", lab.guest, "--json")
            orphaned = [f for f in json.loads(found.stdout) if f["check"] == "orphaned-pins"]
            assert [f for f in orphaned if f["subject"] == str(p1)] == [], orphaned
        finally:
            b.cleanup()

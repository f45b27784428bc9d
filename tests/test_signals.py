"""failoverd and its signals, and the errors it survives: SIGTERM stops an idle agent
cleanly and at once, SIGHUP reloads (or refuses with one line) and never kills, one failing
step of the loop is logged and counted and the loop goes on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from bpfailover.ops import metrics
from bpfailover_lab.agent_run import AgentRun, HarnessError
from bpfailover_lab.topology import Lab
from tests import labutil
from tests.faultutil import fault_env
from tests.opsutil import METRICS_PORT, agent_in_lab, one, scrape

pytestmark = pytest.mark.root


def test_sigterm_stops_an_idle_agent_cleanly(lab: Lab) -> None:
    with agent_in_lab(lab) as run:
        n = lab.names(0)
        with labutil.stream(lab, rate=2000, seconds=1.0) as h:
            rep = h.wait()
        assert rep.a_to_b.sent > 0
        time.sleep(1.0)  # idle: no timer pending, nothing from the kernel
        assert run.proc is not None
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        rc = run.proc.wait(timeout=10)  # generous; the time is measured, not asserted
        took = time.monotonic() - t0
        print(f"SIGTERM -> exit {rc} in {took * 1000:.0f} ms")
        assert rc == 0, run.tail()
        assert run.events("signal")[-1]["signal"] == "SIGTERM"
        assert run.events("stopped"), run.tail()
        assert not os.path.exists(run.socket)
        # The datapath was left forwarding.
        assert labutil.ping(lab.guest, n.peer_v4), "no forwarding after the agent stopped"


def test_harness_fails_loudly_when_an_agent_does_not_stop(lab: Lab) -> None:
    run = AgentRun(lab)
    try:
        code = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        run.proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(0.5)  # its handler is in place
        with pytest.raises(HarnessError, match="did not stop within 1s of SIGTERM"):
            run.stop(timeout=1.0)
        assert run.proc.poll() is not None  # and nothing is left running
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()
        run.cleanup()


def _reload(run: AgentRun, name: str, before: int) -> dict[str, object]:
    assert run.proc is not None
    run.proc.send_signal(signal.SIGHUP)
    got = run.wait_for(lambda: len(run.events(name)) > before, 10, f"a {name} event")
    assert got and run.proc.poll() is None, run.tail()
    return run.events(name)[-1]


def test_sighup_reloads_what_can_change_and_refuses_the_rest(lab: Lab) -> None:
    with agent_in_lab(lab, address=False) as run:
        assert run.group()["reselect"] == "always"
        # policy and metrics change live
        run.config["groups"][0]["policy"] = {"reselect": "failure"}
        run.config["metrics"] = {"listen": f"127.0.0.1:{METRICS_PORT}"}
        run.config_path.write_text(yaml.safe_dump(run.config))
        ev = _reload(run, "reloaded", 0)
        assert set(ev["changed"]) == {"groups[0].policy.reselect", "metrics.listen"}  # type: ignore[arg-type]
        assert run.group()["reselect"] == "failure"
        assert one(scrape(lab), "failover_build_info", version=metrics.build_version()) == 1
        # what cannot change live: refused with one line, nothing applied
        run.config["bpffs"] = str(run.pin_dir) + "-other"
        run.config["groups"][0]["policy"] = {"reselect": "better"}
        run.config_path.write_text(yaml.safe_dump(run.config))
        ev = _reload(run, "reload_refused", 0)
        assert ev["keys"] == ["bpffs"] and "restart" in str(ev["why"])
        assert run.group()["reselect"] == "failure"
        # a broken file: refused, the agent goes on with what it has
        run.config_path.write_text("groups: [")
        ev = _reload(run, "reload_refused", 1)
        assert "YAML" in str(ev["error"])
        assert run.status()["groups"]
        assert len(run.events("reloaded")) == 1


def test_a_failing_timer_is_logged_counted_and_survived(lab: Lab) -> None:
    # switch 1: initial, 2: primary down (an event), 3: primary back after the hold-down
    # (the timer): that one raises; the timer is retried and the agent converges.
    with (
        fault_env("before-flip:raise@3"),
        agent_in_lab(lab, metrics=True, address=False, policy={"updelay_ms": 300}) as run,
    ):
        n = lab.names(0)
        lab.set_far_end(0, "primary", False)
        run.wait_active(n.standby)
        lab.set_far_end(0, "primary", True)
        run.wait_for(lambda: run.events("agent_error"), 10, "the injected error")
        err = run.events("agent_error")[0]
        assert err["where"] == "timer" and "injected" in str(err["error"])
        run.wait_active(n.primary)  # retried: converged
        assert run.proc is not None and run.proc.poll() is None
        assert one(scrape(lab), "failover_agent_errors_total", where="timer") == 1
        assert one(scrape(lab), "failover_agent_errors_total", where="event") == 0


def test_sd_notify_ready_after_the_device_and_watchdog_from_the_loop(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The systemd side, with our own NOTIFY_SOCKET: READY=1 comes once the failover
    device exists with its carrier; WATCHDOG=1 comes from the event loop, so a stalled loop
    (the fault hook's stall) sends none until it runs again."""
    n = lab.names(0)
    path = str(tmp_path / "notify")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.settimeout(0.2)
    got: list[tuple[float, str, bool]] = []  # (when, message, device up when it came)
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            try:
                msg = rx.recv(4096).decode()
            except TimeoutError:
                continue
            up = False
            if "READY=1" in msg:
                info = lab.link(lab.guest, n.failover)
                up = bool(info and info["flags"] & 0x10000)  # IFF_LOWER_UP: has carrier
            got.append((time.monotonic(), msg, up))

    t = threading.Thread(target=receive)
    t.start()
    gate = tmp_path / "gate"
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 100 ms
    try:
        with fault_env("before-flip:stall@2", gate), agent_in_lab(lab, address=False) as run:
            run.wait_for(lambda: any("READY=1" in m for _, m, _ in got), 10, "READY=1")
            ready = [g for g in got if "READY=1" in g[1]]
            assert len(ready) == 1 and ready[0][2], got[:3]
            assert f"MAINPID={run.proc.pid}" in ready[0][1]  # type: ignore[union-attr]
            run.wait_for(lambda: sum("WATCHDOG=1" in g[1] for g in got) >= 3, 10, "pings")
            lab.set_far_end(0, "primary", False)  # the loop decides, then stalls
            run.wait_for(lambda: run.events("fault_injected"), 10, "the stall")
            # A marker through the same socket, sent once the loop is stalled: every ping the
            # loop sent before the stall is queued ahead of it, so after the marker comes
            # nothing until the loop runs again (a running loop pings every 100 ms).
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
                tx.sendto(b"MARK", path)
            run.wait_for(lambda: any(m == "MARK" for _, m, _ in got), 10, "the marker")
            time.sleep(1.5)  # the stall lasts: ~15 pings' worth
            msgs = [m for _, m, _ in got]
            during = [m for m in msgs[msgs.index("MARK") + 1 :] if "WATCHDOG=1" in m]
            gate.touch()
            run.wait_active(n.standby)
            after = len(msgs)
            run.wait_for(
                lambda: any("WATCHDOG=1" in m for _, m, _ in got[after:]), 10, "pings again"
            )
            assert during == [], "watchdog pings while the loop was stalled"
            run.stop()
            assert any("STOPPING=1" in m for _, m, _ in got)
    finally:
        done.set()
        t.join(5)
        rx.close()

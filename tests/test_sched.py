"""The agent's event loop under SCHED_FIFO: granted to it alone, refused without
CAP_SYS_NICE (logged, the agent works on), or turned off by config."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from bpfailover.effects import sched
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab
from tests.conftest import realtime_refused
from tests.opsutil import METRICS_PORT

pytestmark = pytest.mark.root


@pytest.fixture
def realtime_allowed() -> None:
    """Granting SCHED_FIFO needs a machine that lets root have it: said when it does not."""
    why = realtime_refused()
    if why is not None:
        pytest.skip(why)


@pytest.mark.usefixtures("realtime_allowed")
def test_fifo_for_the_calling_thread_only_never_for_its_children() -> None:
    got: dict[str, Any] = {}

    def body() -> None:
        got["policy"] = sched.go_realtime(7)
        child = [sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"]
        got["child"] = int(subprocess.run(child, capture_output=True, text=True).stdout)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert got == {"policy": "fifo:7", "child": os.SCHED_OTHER}
    assert sched.current() == "other"  # this (the test's) thread was left alone
    assert sched.go_realtime(0) == "other"


def _policies(pid: int) -> dict[int, int]:
    return {
        int(t): os.sched_getscheduler(int(t)) & ~sched.SCHED_RESET_ON_FORK
        for t in os.listdir(f"/proc/{pid}/task")
    }


class _NoSysNice(AgentRun):
    """failoverd as root but without CAP_SYS_NICE (a container that did not grant it)."""

    @classmethod
    def command(cls, netns_name: str, config_path: Path) -> list[str]:
        return [
            "setpriv",
            "--inh-caps=-sys_nice",
            "--bounding-set=-sys_nice",
            *super().command(netns_name, config_path),
        ]


def _start(agent: AgentRun) -> AgentRun:
    try:
        return agent.start()
    except BaseException:
        agent.cleanup()
        raise


@pytest.mark.usefixtures("realtime_allowed")
def test_agent_scheduling_granted(lab: Lab) -> None:
    lab.up()
    agent = _start(AgentRun(lab, metrics_listen=f"127.0.0.1:{METRICS_PORT}"))
    try:
        assert agent.status()["scheduling"] == "fifo:10"
        assert agent.proc is not None
        pol = _policies(agent.proc.pid)
        assert pol.pop(agent.proc.pid) == os.SCHED_FIFO  # the event loop
        assert pol and set(pol.values()) == {os.SCHED_OTHER}  # the metrics server's thread
        assert [e["policy"] for e in agent.events("scheduling")] == ["fifo:10"]
    finally:
        agent.cleanup()


def test_agent_scheduling_refused_and_off(lab: Lab) -> None:
    """Whether or not this machine grants root SCHED_FIFO: refused is logged and the agent
    works on; turned off is never asked for."""
    lab.up()
    n = lab.names(0)
    agent = _start(_NoSysNice(lab))
    try:
        assert agent.status()["scheduling"] == "other"
        (refused,) = agent.events("scheduling_refused")
        assert (refused["priority"], refused["hint"]) == (10, "needs CAP_SYS_NICE")
        lab.set_far_end(0, "primary", False)  # and it still fails over
        agent.wait_active(n.standby)
        lab.set_far_end(0, "primary", True)
        agent.wait_active(n.primary)
    finally:
        agent.cleanup()

    agent = _start(AgentRun(lab, settings={"scheduling": {"realtime_priority": 0}}))
    try:
        assert agent.status()["scheduling"] == "other"
        assert agent.events("scheduling_refused") == []
    finally:
        agent.cleanup()

"""Layer 3: the datapath's per-packet lower check in the lab, with the agent SIGSTOPped.

While the agent cannot act, the primary loses its carrier (or is unplugged) under a UDP
stream: with the check the datapath moves the group's traffic to the standby at once and
guest -> peer loses only what was in flight; without it (the control case, the check turned
off in the pinned maps) everything sent while the agent is stopped is lost.  Peer -> guest
is checked too, in both inactive_rx modes: under `drop_inactive` only the check lets the standby's
frames in while the agent cannot flip.  After SIGCONT the agent switches too and agrees
with the datapath."""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from bpfailover.datapath import bpfsys
from bpfailover.datapath import layout_gen as L
from bpfailover.datapath.maps import Datapath
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab
from tests import labutil

pytestmark = pytest.mark.root

RATE = 5000  # pps each way
STOPPED_S = 1.0  # the agent is stopped this long after the failure
HANDFUL = 10  # packets in flight when the lower died (qdisc, socket, veth)
# peer -> guest: the hypervisor's bridge forgets the dead port and reaches the guest through
# the standby's once the guest sends from there; frames on their way to the dead lower are
# lost.  A tenth of what the agent's stopped second carries is a generous bound on that.
BACK_BOUND = RATE * STOPPED_S // 10


@pytest.fixture(params=["deliver", "drop_inactive"])
def running(lab: Lab, request: pytest.FixtureRequest) -> Iterator[tuple[Lab, AgentRun]]:
    """(lab, agent) as conftest's, in each inactive_rx mode."""
    agent = labutil.bring_up(lab, inactive_rx=request.param)
    try:
        assert agent.group()["inactive_rx"] == request.param
        yield lab, agent
    finally:
        agent.cleanup()


@contextmanager
def agent_stopped(agent: AgentRun) -> Iterator[None]:
    assert agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)


def set_check(agent: AgentRun, on: bool) -> None:
    with Datapath.open(agent.pin_dir, load=False) as dp:
        value = L.FO_DPC_ON if on else L.FO_DPC_OFF
        bpfsys.map_update(
            dp.fds["fo_meta"], struct.pack("=I", L.FO_META_DP_CHECK), struct.pack("=I", value)
        )
        assert dp.datapath_check() == ("on" if on else "off")


def fail_with_agent_stopped(lab: Lab, agent: AgentRun, fail: Callable[[], None]) -> tuple[int, int]:
    """(guest -> peer lost, peer -> guest lost) when `fail` happens while the agent is
    stopped; returns once the agent has switched to the standby."""
    n = lab.names(0)
    with labutil.stream(lab, rate=RATE, seconds=3.0) as h:
        time.sleep(0.8)
        with agent_stopped(agent):
            fail()
            time.sleep(STOPPED_S)
        agent.wait_active(n.standby)
        rep = h.wait()
    print(f"\n{rep.format()}")
    assert rep.b_to_a is not None
    return rep.a_to_b.lost, rep.b_to_a.lost


def assert_agent_agrees(agent: AgentRun, lab: Lab) -> None:
    n = lab.names(0)
    g = agent.group()
    assert (g["active"], g["active_lower"]) == ("standby", n.standby)
    sw = agent.events("switch")[-1]
    assert (sw["from"], sw["to"]) == (n.primary, n.standby)
    moved = {(f["from"], f["to"]): f for f in g["datapath_fallback"]}
    assert moved[("primary", "standby")]["tx_packets"] > 0  # the datapath moved them first
    assert agent.status()["datapath_check"] == "on"


def test_carrier_lost_while_agent_stopped(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    assert agent.status()["datapath_check"] == "on"
    tx_lost, rx_lost = fail_with_agent_stopped(
        lab, agent, lambda: lab.set_far_end(0, "primary", False)
    )
    print(f"carrier off, agent stopped {STOPPED_S}s: guest->peer lost {tx_lost}, back {rx_lost}")
    assert tx_lost <= HANDFUL
    assert rx_lost <= BACK_BOUND
    assert_agent_agrees(agent, lab)


def test_vf_deleted_while_agent_stopped(running: tuple[Lab, AgentRun]) -> None:
    lab, agent = running
    tx_lost, rx_lost = fail_with_agent_stopped(lab, agent, lambda: lab.unplug_vf(0))
    print(f"VF deleted, agent stopped {STOPPED_S}s: guest->peer lost {tx_lost}, back {rx_lost}")
    assert tx_lost <= HANDFUL
    assert rx_lost <= BACK_BOUND
    assert_agent_agrees(agent, lab)


def test_control_without_the_check_everything_is_lost_until_the_agent_acts(
    running: tuple[Lab, AgentRun],
) -> None:
    """The same failure with the check off: what the check saves (shows the test can fail)."""
    lab, agent = running
    set_check(agent, False)
    tx_lost, rx_lost = fail_with_agent_stopped(
        lab, agent, lambda: lab.set_far_end(0, "primary", False)
    )
    print(f"check off, agent stopped {STOPPED_S}s: guest->peer lost {tx_lost}, back {rx_lost}")
    assert tx_lost >= RATE * STOPPED_S * 0.5
    if agent.group()["inactive_rx"] == "drop_inactive":  # the standby's frames wait for the agent
        assert rx_lost >= RATE * STOPPED_S * 0.5
    assert all(f["tx_packets"] == 0 for f in agent.group()["datapath_fallback"])


def dp_hold(agent: AgentRun) -> bool:
    with Datapath.open(agent.pin_dir, load=False, read_only=True) as dp:
        return bool(dp.group(0).flags & L.FO_F_DP_HOLD)


def test_downdelay_holds_the_datapath_back_and_reload_updates_it(lab: Lab) -> None:
    """downdelay_ms > 0: the operator asked to wait, so the datapath does not move the
    group on its own (no fallback counted; the agent switches after the downdelay).  SIGHUP
    with downdelay 0 lets the datapath act again."""
    import yaml

    agent = labutil.bring_up(lab, policy={"downdelay_ms": 300})
    try:
        n = lab.names(0)
        assert dp_hold(agent)
        with labutil.stream(lab, rate=2000, seconds=1.5) as h:
            time.sleep(0.4)
            lab.set_far_end(0, "primary", False)
            agent.wait_active(n.standby)
            rep = h.wait()
        assert rep.a_to_b.lost > 0  # the downdelay's worth (what the operator asked for)
        assert all(f["tx_packets"] == 0 for f in agent.group()["datapath_fallback"])
        lab.set_far_end(0, "primary", True)
        agent.wait_active(n.primary)
        assert agent.proc is not None
        agent.config["groups"][0]["policy"] = {"downdelay_ms": 0}
        agent.config_path.write_text(yaml.safe_dump(agent.config))
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for(lambda: agent.events("reloaded"), 10, "the reload")
        assert not dp_hold(agent)
    finally:
        agent.cleanup()

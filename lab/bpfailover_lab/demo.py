"""`failover-lab demo` (`make demo`): the main job on its embedded default."""

from __future__ import annotations

import time
from collections.abc import Callable

from bpfailover_lab import traffic
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab


def run_demo(lab: Lab) -> int:
    """The main job on its embedded default: lab up, failoverd attached, traffic via the
    primary, the primary's carrier pulled under a stream, traffic via the standby, the
    primary back, everything torn down."""

    def show(title: str, agent: AgentRun) -> None:
        g = agent.group(0)
        lowers = ", ".join(
            f"{lw['name']} ({lw['role']}{', ACTIVE' if lw['active'] else ''}) "
            f"tx {lw['tx_packets']} rx {lw['rx_packets']}"
            for lw in g["lowers"]
        )
        print(
            f"\n== {title}\n   {g['device']}: carrier {'on' if g['carrier'] else 'off'}, "
            f"active {g['active_lower']} | {lowers}"
        )

    def stream(title: str, during: Callable[[], None] | None = None) -> None:
        h = traffic.start_stream(
            lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate_pps=2000, duration_s=2.0
        )
        if during is not None:
            time.sleep(0.7)
            during()
        print(f"-- {title}\n{h.wait().format()}")

    lab.up()
    agent = AgentRun(lab, name=f"{lab.prefix}-demo")
    try:
        print(lab.describe())
        agent.start()
        lab.address_failover(0)
        n = lab.names(0)
        show("failoverd up: traffic goes through the primary (the VF)", agent)
        stream("UDP 2000 pps both ways, guest <-> peer")
        show("after the stream", agent)
        stream(
            "the primary's carrier drops 0.7 s into the stream (vfport down in hv)",
            lambda: lab.set_far_end(0, "primary", False),
        )
        show("unplanned failover: traffic goes through the standby (virtio)", agent)
        for sw in agent.events("switch")[-1:]:
            print(
                f"   agent: switch {sw['from']} -> {sw['to']} ({sw['reason']}), "
                f"event -> map write {sw['latency_us']} us"
            )
        lab.set_far_end(0, "primary", True)
        agent.wait_active(n.primary)
        stream("the primary is back (reselect: always)")
        show("traffic back on the primary", agent)
        return 0
    finally:
        agent.cleanup()
        lab.down()
        print("\nlab torn down: namespaces, datapath and pins removed")


def demo(prefix: str = "fo") -> int:
    return run_demo(Lab(prefix))

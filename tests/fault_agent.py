"""TEST-ONLY entry point: failoverd with the test switches its environment names.

`python -m tests.fault_agent ARGS` (from the checkout's root) is `failoverd ARGS` with an
Agent built from these variables; the installed failoverd reads none of them:

- BPFAILOVER_FAULT="<point>[:<action>][@<nth>]", BPFAILOVER_FAULT_GATE=FILE: the fault hook
  (control/bpfailover/agent/fault.py);
- BPFAILOVER_TEST_NO_MCAST_EVENTS=1: RTM_NEWMULTICAST left unsubscribed (kernels < 6.13);
- BPFAILOVER_TEST_NETLINK_RCVBUF=BYTES: a small event socket buffer (ENOBUFS at will);
- BPFAILOVER_TEST_UDEV_DIR=DIR: DIR/control and DIR/data stand in for /run/udev (no
  namespace check: the lab's agent runs in a namespace of its own);
- BPFAILOVER_TEST_UDEV_HOLD_MS=MS: how long a new lower waits for udev.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from bpfailover.agent.fault import Fault, FaultSpecError
from bpfailover.agent.loop import Agent
from bpfailover.agent.main import main
from bpfailover.agent.ports import Netlink
from bpfailover.agent.udevwait import HOLD_MS
from bpfailover.events.udev import UdevDb
from bpfailover.model import config as configmod


def make_agent(env: Mapping[str, str]) -> Callable[[configmod.Config], Agent]:
    """A make_agent for failoverd's main(): the Agent with the switches `env` names
    (FaultSpecError at once for a bad fault spec, before failoverd starts)."""
    spec = env.get("BPFAILOVER_FAULT")
    fault = Fault(spec, env.get("BPFAILOVER_FAULT_GATE")) if spec else None
    links = Netlink(
        mcast=env.get("BPFAILOVER_TEST_NO_MCAST_EVENTS") != "1",
        rcvbuf=int(env.get("BPFAILOVER_TEST_NETLINK_RCVBUF") or 0) or None,
    )
    udev_dir = env.get("BPFAILOVER_TEST_UDEV_DIR")
    udev = UdevDb(Path(udev_dir), check_netns=False) if udev_dir else None
    hold_ms = int(env.get("BPFAILOVER_TEST_UDEV_HOLD_MS") or HOLD_MS)

    def build(cfg: configmod.Config) -> Agent:
        return Agent(cfg, links=links, udev=udev, fault=fault, udev_hold_ms=hold_ms)

    return build


if __name__ == "__main__":
    try:
        factory = make_agent(os.environ)
    except FaultSpecError as e:
        print(f"failoverd: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1:], factory))

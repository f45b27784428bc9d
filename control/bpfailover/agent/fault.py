"""TEST-ONLY fault injection for failoverd (the fault suite, tests/test_reliability.py).

Fault("<point>[:<action>][@<nth>]"), passed to the Agent by the tests' own entry point
(tests/fault_agent.py, from its BPFAILOVER_FAULT), makes the agent fail on purpose the nth
time (default 1st) it passes a named point.  failoverd itself never builds one and reads no
such variable: without one (always, outside tests) a point costs the agent one `is None`
test.  Actions: kill (SIGKILL itself), close-netlink (close the event socket under itself),
stall (wait, at most 30 s, until the file `gate` exists: the test acts meanwhile), raise
(an exception, as a bug would: the loop must survive it).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from bpfailover.ops.eventlog import event, flush


class FaultSpecError(ValueError):
    pass


FAULT_POINTS = ("adopt", "before-flip", "after-flip", "garp", "netlink-read")
FAULT_ACTIONS = ("kill", "close-netlink", "stall", "raise")


class InjectedFault(RuntimeError):
    """TEST-ONLY: the `raise` action."""


class Fault:
    def __init__(self, spec: str, gate: str | None = None) -> None:
        rest, _, nth = spec.partition("@")
        self.point, _, action = rest.partition(":")
        self.action = action or "kill"
        self.nth = int(nth or 1)
        self.hits = 0
        self.gate = gate
        self.close_netlink: Callable[[], None] | None = None  # set by the agent
        if self.point not in FAULT_POINTS or self.action not in FAULT_ACTIONS:
            raise FaultSpecError(f"fault {spec!r}: points {FAULT_POINTS}, actions {FAULT_ACTIONS}")

    def fire(self, point: str) -> None:
        """Fail as asked if this is the fault's point and turn."""
        if self.point != point:
            return
        self.hits += 1
        if self.hits != self.nth:
            return
        event("fault_injected", point=point, action=self.action)
        if self.action == "kill":
            flush()  # the line above is on the log queue: out before we die
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "close-netlink" and self.close_netlink is not None:
            self.close_netlink()
        elif self.action == "raise":
            raise InjectedFault(f"injected at {point}")
        elif self.action == "stall":
            deadline = time.monotonic() + 30
            while self.gate and not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.01)

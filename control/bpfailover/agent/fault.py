"""TEST-ONLY fault injection for failoverd (the fault suite, tests/test_reliability.py).

BPFAILOVER_FAULT="<point>[:<action>][@<nth>]" makes the agent fail on purpose the nth time
(default 1st) it passes a named point.  It is read once, at start; unset (always, outside
tests) a point costs the agent one `is None` test.  Actions: kill (SIGKILL itself),
close-netlink (close the event socket under itself), stall (wait, at most 30 s, until the
file $BPFAILOVER_FAULT_GATE exists: the test acts meanwhile).
"""

from __future__ import annotations

import os


class FaultSpecError(ValueError):
    pass


FAULT_POINTS = ("adopt", "before-flip", "after-flip", "garp", "netlink-read")
FAULT_ACTIONS = ("kill", "close-netlink", "stall")


class Fault:
    def __init__(self, spec: str, gate: str | None = None) -> None:
        rest, _, nth = spec.partition("@")
        self.point, _, action = rest.partition(":")
        self.action = action or "kill"
        self.nth = int(nth or 1)
        self.hits = 0
        self.gate = gate
        if self.point not in FAULT_POINTS or self.action not in FAULT_ACTIONS:
            raise FaultSpecError(
                f"BPFAILOVER_FAULT={spec!r}: points {FAULT_POINTS}, actions {FAULT_ACTIONS}"
            )

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get("BPFAILOVER_FAULT")
        return cls(spec, os.environ.get("BPFAILOVER_FAULT_GATE")) if spec else None

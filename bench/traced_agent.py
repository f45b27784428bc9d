"""failoverd with timing probes around its event path, for the benchmarks only.

`python -m bench.traced_agent ARGS` is `failoverd ARGS` with traced collaborators handed to
the Agent (bench code, not the agent's; nothing patched) that stamp CLOCK_MONOTONIC at:
select wake-up (the event source's read called), netlink read+parse done, policy.decide
start/end, and the map write (Datapath.flip) start/end.  After each handled batch that
flipped, one `bx_trace` event line goes to the log: the breakdown of the agent's own
`latency_us` (event received -> map written).  Each probe adds ~1 us; the plain agent is
what the other numbers come from.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

from bpfailover import policy
from bpfailover.agent.loop import Agent
from bpfailover.agent.main import main
from bpfailover.agent.ports import EventSource, Netlink
from bpfailover.datapath.maps import Datapath
from bpfailover.events import netlink
from bpfailover.model.config import Config
from bpfailover.ops.eventlog import event

_mono = time.monotonic_ns
_cur: dict[str, int] = {}
_flips: list[dict[str, int]] = []


class TracedEvents:
    """The netlink event socket, stamping the wake-up and the end of read+parse."""

    def __init__(self, inner: EventSource) -> None:
        self.inner = inner

    def fileno(self) -> int:
        return self.inner.fileno()

    def read(self) -> list[netlink.Event]:
        _cur.clear()
        _flips.clear()
        _cur["wake"] = _mono()
        out = self.inner.read()
        _cur.setdefault("read", _mono())
        return out

    def close(self) -> None:
        self.inner.close()


class TracedNetlink(Netlink):
    def subscribe(self) -> EventSource:
        return TracedEvents(super().subscribe())


class TracedDatapath(Datapath):
    """The real datapath (TracedDatapath.open adopts or loads the pins), flip timed."""

    def flip(self, g: int, slot: int) -> None:
        t = _mono()
        super().flip(g, slot)
        if "wake" in _cur:  # a flip on the event path (not a timer's or a request's)
            _flips.append(
                {
                    "decide_start": _cur.get("decide_start", t),
                    "decide_end": _cur.get("decide_end", t),
                    "flip_start": t,
                    "flip_end": _mono(),
                }
            )


def traced_decide(
    prev: policy.GroupPolicyState,
    lowers: Mapping[policy.Role, policy.LowerState],
    override: policy.Role | None,
    cfg: policy.PolicyConfig,
    now_ms: int,
) -> policy.Decision:
    t = _mono()
    out = policy.decide(prev, lowers, override, cfg, now_ms)
    _cur["decide_start"], _cur["decide_end"] = t, _mono()
    return out


def after_batch() -> None:
    """One bx_trace line for a batch of kernel events that flipped; then forget it."""
    if _flips:
        base = _cur["wake"]
        trace: dict[str, Any] = {
            "read_parse_us": (_cur["read"] - base) / 1e3,
            "flips": [{k: (v - base) / 1e3 for k, v in f.items()} for f in _flips],
        }
        event("bx_trace", **trace)
    _cur.clear()
    _flips.clear()


def traced_agent(cfg: Config) -> Agent:
    agent = Agent(cfg, datapath=TracedDatapath.open, links=TracedNetlink(), decide=traced_decide)
    agent.on_batch = after_batch
    return agent


if __name__ == "__main__":
    sys.exit(main(make_agent=traced_agent))

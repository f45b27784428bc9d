"""failoverd with timing probes around its event path, for the benchmarks only.

`python -m bench.traced_agent ARGS` is `failoverd ARGS` with wrappers (bench code, not the
agent's) that stamp CLOCK_MONOTONIC at: select wake-up (entry to _on_netlink), netlink
read+parse done, policy.decide start/end, and the map write (Datapath.flip) start/end.
After each handled batch that flipped, one `bx_trace` event line goes to the log:
the breakdown of the agent's own `latency_us` (event received -> map written).
Each wrapper adds ~1 us; the plain agent is what the other numbers come from.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bpfailover import policy
from bpfailover.agent import loop as agentmod
from bpfailover.agent.main import main
from bpfailover.datapath.maps import Datapath
from bpfailover.events import netlink

_mono = time.monotonic_ns
_cur: dict[str, Any] = {}
_flips: list[dict[str, int]] = []


def _install() -> None:
    orig_on_netlink = agentmod.Agent._on_netlink
    orig_read = netlink.EventSocket.read
    orig_decide = policy.decide
    orig_flip = Datapath.flip

    def on_netlink(self: Any) -> None:
        _cur.clear()
        _cur["wake"] = _mono()
        _flips.clear()
        orig_on_netlink(self)
        if _flips:
            base = _cur["wake"]
            agentmod.event(
                "bx_trace",
                read_parse_us=(_cur["read"] - base) / 1e3,
                flips=[{k: (v - base) / 1e3 for k, v in f.items()} for f in _flips],
            )
        _cur.clear()

    def read(self: Any) -> Any:
        out = orig_read(self)
        _cur.setdefault("read", _mono())
        return out

    def decide(*a: Any, **k: Any) -> Any:
        t = _mono()
        out = orig_decide(*a, **k)
        _cur["decide_start"], _cur["decide_end"] = t, _mono()
        return out

    def flip(self: Any, g: int, slot: int) -> None:
        t = _mono()
        orig_flip(self, g, slot)
        if "wake" in _cur:
            _flips.append(
                {
                    "decide_start": _cur.get("decide_start", t),
                    "decide_end": _cur.get("decide_end", t),
                    "flip_start": t,
                    "flip_end": _mono(),
                }
            )

    agentmod.Agent._on_netlink = on_netlink  # type: ignore[method-assign]
    netlink.EventSocket.read = read  # type: ignore[method-assign]
    policy.decide = decide
    Datapath.flip = flip  # type: ignore[method-assign]


if __name__ == "__main__":
    _install()
    sys.exit(main())

"""The fault suite's bookkeeping: what it survived, what bad input it tried, what it lost,
and what it left behind (tests/test_reliability.py fills it, conftest.py prints it)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfailover import netns, policy
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab

OUR_PROGS = ("fo_egress", "lower_ingress", "xdp_lower_rx", "fo_peer_pass")
BPFFS = Path("/sys/fs/bpf")


@dataclass
class Tally:
    faults: int = 0
    bad_inputs: int = 0
    lost: int = 0
    leaks: int | None = None  # None until the leak check ran
    leak_detail: list[str] = field(default_factory=list)
    prefixes: set[str] = field(default_factory=set)  # lab/agent names this suite used
    prog_ids: set[int] = field(default_factory=set)  # programs this suite's agents pinned
    ran: bool = False

    def fault(self, lost: int = 0) -> None:
        self.ran = True
        self.faults += 1
        self.lost += lost

    def bad(self, n: int = 1) -> None:
        self.ran = True
        self.bad_inputs += n

    def line(self) -> str | None:
        if not self.ran:
            return None
        leaks = "not checked" if self.leaks is None else str(self.leaks)
        return (
            f"faults survived {self.faults}, bad inputs tried {self.bad_inputs}, "
            f"packets lost {self.lost}, leaks {leaks}"
        )


TALLY = Tally()


# -- leaks ------------------------------------------------------------------------------------
# Only what this suite made counts: its prefixes' namespaces and pins, and the programs its
# agents pinned.  Another run's agents or containers on the same machine load programs with
# the same names at any time; they are not this suite's leaks.
def bpf_progs() -> dict[int, dict[str, Any]]:
    """Our programs (by name) currently loaded anywhere: id -> bpftool's record."""
    out = subprocess.run(
        ["bpftool", "-j", "-f", "prog", "show"], capture_output=True, text=True, check=False
    ).stdout
    try:
        progs = json.loads(out or "[]")
    except ValueError:
        return {}
    return {p["id"]: p for p in progs if p.get("name") in OUR_PROGS}


def note_progs(agent: AgentRun) -> None:
    """Remember the programs in an agent's pin directory (ids are not reused soon)."""
    from bpfailover.agent.setup import pinned_prog_ids

    TALLY.prog_ids |= pinned_prog_ids(agent.pin_dir)


@contextmanager
def noting_progs() -> Iterator[None]:
    """Every AgentRun.start() in the block notes its agent's programs, even when the agent
    dies right after pinning them (a fault point)."""
    start = AgentRun.start

    def noted(self: AgentRun, *args: Any, **kwargs: Any) -> AgentRun:
        try:
            return start(self, *args, **kwargs)
        finally:
            note_progs(self)

    AgentRun.start = noted  # type: ignore[method-assign]
    try:
        yield
    finally:
        AgentRun.start = start  # type: ignore[method-assign]


def leaks(prog_ids: set[int], prefixes: set[str]) -> list[str]:
    """What this suite left behind: namespaces, pins, tc filters and XDP in namespaces left
    over, and the programs its agents pinned (`prog_ids`) still loaded."""
    found: list[str] = []
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout.split()
    for ns in names:
        if any(ns.startswith(f"{p}-") for p in prefixes):
            found.append(f"netns {ns}")
            tc = netns.run_in(ns, ["tc", "-j", "filter", "show"], check=False).stdout
            found += [f"tc filter in {ns}"] * tc.count("bpfailover:")
            xdp = netns.run_in(ns, ["ip", "-j", "link", "show"], check=False).stdout
            found += [f"xdp in {ns}"] * xdp.count('"xdp"')
    for p in prefixes:
        found += [f"pins {d}" for d in glob.glob(str(BPFFS / f"bpfailover-{p}*"))]
    for pid, rec in bpf_progs().items():
        if pid in prog_ids:
            found.append(f"bpf prog {pid} {rec.get('name')} pinned={rec.get('pinned') or []}")
    return found


def settle_leaks(prog_ids: set[int], prefixes: set[str], timeout: float = 20.0) -> list[str]:
    """Programs are freed after an RCU grace period once their netns is gone: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        found = leaks(prog_ids, prefixes)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


# -- the lab, the agent, the policy ------------------------------------------------------------
def link_state(lab: Lab, dev: str) -> policy.LowerState | None:
    info = lab.link(lab.guest, dev)
    if info is None:
        return None
    return policy.LowerState(True, bool(info["flags"] & 0x1), bool(info["flags"] & 0x10000))


def expected_active(lab: Lab, agent: AgentRun, i: int = 0, override: str | None = None) -> Any:
    """The lower the policy picks for the links as they are now (no hold-down pending)."""
    n = lab.names(i)
    lowers = {}
    for role, dev in (("primary", n.primary), ("standby", n.standby)):
        st = link_state(lab, dev)
        if st is not None:
            lowers[role] = st
    d = policy.decide(policy.GroupPolicyState(), lowers, override, policy.PolicyConfig(), 0)  # type: ignore[arg-type]
    if d.active is None:
        return None
    return n.primary if d.active == "primary" else n.standby


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@contextmanager
def fault_env(point: str, gate: Path | None = None) -> Iterator[None]:
    """BPFAILOVER_FAULT for agents started inside the block (the env is read once, at start)."""
    old = {k: os.environ.get(k) for k in ("BPFAILOVER_FAULT", "BPFAILOVER_FAULT_GATE")}
    os.environ["BPFAILOVER_FAULT"] = point
    if gate is not None:
        os.environ["BPFAILOVER_FAULT_GATE"] = str(gate)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def our_filters(lab: Lab, dev: str, where: str = "ingress") -> int:
    out = netns.run_in(lab.guest, ["tc", "filter", "show", "dev", dev, where], check=False)
    return out.stdout.count("bpfailover:")

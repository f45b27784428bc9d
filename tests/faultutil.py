"""The fault suite's bookkeeping: what it survived, what bad input it tried, what it lost,
and what it left behind (tests/test_reliability.py fills it, conftest.py prints it)."""

from __future__ import annotations

import contextlib
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

import pytest

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


REPO = Path(__file__).resolve().parents[1]
TEST_ENTRY = "tests.fault_agent"  # failoverd built with test switches (the real one has none)


@contextmanager
def agent_switches(**env: str) -> Iterator[None]:
    """Agents started inside the block run through the tests' own entry point
    (tests/fault_agent.py) with these switches in its environment."""
    old_env = {k: os.environ.get(k) for k in env}
    old_entry = (AgentRun.module, AgentRun.cwd)
    os.environ.update(env)
    AgentRun.module, AgentRun.cwd = TEST_ENTRY, REPO
    try:
        yield
    finally:
        AgentRun.module, AgentRun.cwd = old_entry
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def use_test_switches(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """agent_switches() for the rest of the test."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(AgentRun, "module", TEST_ENTRY)
    monkeypatch.setattr(AgentRun, "cwd", REPO)


def fault_env(point: str, gate: Path | None = None) -> contextlib.AbstractContextManager[None]:
    """The fault hook for agents started inside the block."""
    gated = {"BPFAILOVER_FAULT_GATE": str(gate)} if gate is not None else {}
    return agent_switches(BPFAILOVER_FAULT=point, **gated)


def our_filters(lab: Lab, dev: str, where: str = "ingress") -> int:
    out = netns.run_in(lab.guest, ["tc", "filter", "show", "dev", dev, where], check=False)
    return out.stdout.count("bpfailover:")

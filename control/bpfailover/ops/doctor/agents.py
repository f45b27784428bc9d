"""Agents and pins: is a process failoverd, a second agent, an agent in another namespace,
its datapath check off, pin directories no running agent holds."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from bpfailover import netns
from bpfailover.model.status import AgentStatus
from bpfailover.ops import api
from bpfailover.ops.doctor.host import (
    ROOT_FIX,
    Finding,
    Host,
    describe_netns,
    exe,
    exists,
    netns_id,
    netns_name,
    procs,
)

AGENT_PROGRAM = "failoverd"

AGENT_MODULES = {"bpfailover.agent", "bpfailover.agent.__main__", "bpfailover.agent.core"}

_PYTHON = re.compile(r"^python[0-9.]*$")

_PY_OPTS_WITH_VALUE = {"-W", "-X", "-Q"}


def is_agent(argv: list[str], exe: str | None = None) -> bool:
    """failoverd by what runs, never by a word of its arguments: the executable (or argv[0])
    is `failoverd`, or a Python running the `failoverd` script or `-m bpfailover.agent`.
    `timeout 60 failoverd`, `sudo failoverd`, `failoverctl doctor` are not agents."""
    progs = {os.path.basename(p) for p in (exe, argv[0] if argv else None) if p}
    if AGENT_PROGRAM in progs:
        return True
    if not any(_PYTHON.match(p) for p in progs):
        return False
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return i + 1 < len(argv) and argv[i + 1] in AGENT_MODULES
        if arg.startswith("-m"):
            return arg[2:] in AGENT_MODULES
        if arg == "-c" or arg.startswith("-c") or arg == "-":
            return False
        if arg.startswith("-"):
            i += 2 if arg in _PY_OPTS_WITH_VALUE else 1
            continue
        return os.path.basename(arg) == AGENT_PROGRAM  # the script: .../bin/failoverd
    return False


def check_datapath_check(host: Host, status: AgentStatus | None) -> Iterator[Finding]:
    """The datapath's per-packet lower check: what the running agent says, else whether
    this kernel has the BTF it needs."""
    state = status.datapath_check if status is not None else None
    if state is None:
        if exists(host.btf):
            return
        problem = f"no kernel BTF at {host.btf}: the datapath cannot check lowers per packet"
    elif state == "on":
        return
    else:
        problem = f"the datapath's per-packet lower check is {state}"
    yield Finding(
        "datapath-check",
        host.release,
        problem + " (failover waits for the agent: link-watch can delay it up to 1 s)",
        "a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's is); failoverd's log says "
        "why the check is off",
    )


def check_agent_netns(host: Host, status: AgentStatus | None) -> Iterator[Finding]:
    """The agent that answers runs in another namespace than the one inspected: its lowers
    are not where doctor looks."""
    if status is None:
        return
    pid = status.pid
    try:
        raw = (host.proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return  # not in our pid namespace (a container): nothing to compare
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not is_agent(argv, exe(host, pid)):
        return  # that pid is someone else here: the agent has its own pid namespace
    ours, theirs = netns_id(host, None), netns_id(host, pid)
    if ours is None or theirs is None or ours == theirs:
        return
    name = netns_name(host, theirs)
    yield Finding(
        "agent-netns",
        f"pid {pid}",
        f"failoverd runs in network namespace {name or theirs}, doctor checked "
        f"{describe_netns(host)}: the agent's lowers were not checked",
        f"failoverctl doctor --netns {name}"
        if name
        else f"run doctor in the agent's namespace: nsenter -t {pid} -n failoverctl doctor",
    )


def check_agents(
    host: Host, pin_dir: str, sock: str | None, denied: bool = False
) -> Iterator[Finding]:
    mine = os.getpid()
    ours = netns_id(host, None)
    agents, unknown = [], []
    for pid, argv in procs(host):
        if pid == mine or not is_agent(argv, exe(host, pid)):
            continue
        theirs = netns_id(host, pid)
        if ours is not None and theirs is None:
            unknown.append(str(pid))  # another user's process, as non-root: we cannot tell
        elif ours is None or theirs == ours:
            agents.append((pid, " ".join(argv)))
    if unknown:
        yield _not_checked(
            "second-agent",
            f"pid {', '.join(unknown)}",
            "which network namespace these failoverd processes run in",
        )
    if len(agents) > 1:
        listed = "; ".join(f"{p}: {c[:80]}" for p, c in agents)
        yield Finding(
            "second-agent",
            "failoverd",
            f"{len(agents)} failoverd processes in this network namespace ({listed}): two "
            "writers fight over the same lowers",
            "run exactly one (systemctl status failoverd; kill the stray one by its pid)",
        )
    pins = Path(pin_dir)
    try:
        if not pins.is_dir():
            return
    except PermissionError:
        yield _not_checked("second-agent", pin_dir, "whether an agent holds these pins")
        return
    from bpfailover.datapath.maps import lock_held, lock_path  # under /run, not the pins

    lock = str(lock_path(pins))
    try:
        locked = lock_held(pins)
    except PermissionError:
        yield _not_checked("second-agent", lock, f"whether an agent holds {pin_dir}")
        return
    if locked and sock is not None and not denied:  # denied: said by [control-socket]
        try:
            api.request(sock, {"cmd": "status"}, timeout=2.0)
        except (api.AgentUnreachable, api.ReplyError):
            yield Finding(
                "second-agent",
                pin_dir,
                f"an agent holds the pin lock of {pin_dir} but none answers on {sock}: a "
                "second agent with another socket, or a hung one",
                "find it (fuser -v " + lock + "), stop it, then start failoverd once",
            )


def _not_checked(check: str, path: str, what: str) -> Finding:
    """A check we may not do as this user: what was not read, and how to get it."""
    return Finding(check, path, f"permission denied: {what} was not checked", ROOT_FIX)


def check_orphaned_pins(host: Host, netns_hint: str | None) -> Iterator[Finding]:
    """bpfailover datapaths under the bpffs that no running agent holds: their programs
    may still be attached and forwarding, with nobody to fail over.  One whose failover
    device another running agent adopted (with pins of its own) is that agent's: not an
    orphan, judged in the namespace the devices are in."""
    from bpfailover.ops import orphans

    denied: list[Path] = []
    try:
        with netns.entered(netns_hint):
            found = orphans.find(host.bpffs, denied)
    except OSError:  # cannot enter it: the devices are not checked
        denied = []
        found = orphans.find(host.bpffs, denied)
    if denied:
        paths = ", ".join(str(p) for p in denied)
        yield _not_checked("orphaned-pins", paths, "whether a datapath there is orphaned")
    for d in found:
        ns = f" --netns {netns_hint}" if netns_hint else " [--netns NAME]"
        yield Finding(
            "orphaned-pins",
            str(d),
            "a bpfailover datapath that no running agent holds (its agent is gone): its "
            "programs and failover devices stay until removed",
            f"failoverctl teardown --pins {d} --all{ns} (--yes while a failover device has "
            "carrier and addresses); or start its failoverd again to adopt it",
        )

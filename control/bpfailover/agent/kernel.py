"""What the kernel says, fed to the agent's jobs: link, address and multicast events, and
the full re-reads that follow when events may have been missed (an overflow, the socket
lost, an event whose handling failed).
"""

from __future__ import annotations

import contextlib
import selectors
from typing import TYPE_CHECKING

from bpfailover.agent import addrlists
from bpfailover.events import netlink
from bpfailover.ops.eventlog import event

if TYPE_CHECKING:
    from bpfailover.agent.loop import Agent


def on_netlink(agent: Agent) -> None:
    """Serve what the event socket holds: each event guarded on its own."""
    assert agent.events is not None and agent.lowers is not None
    t_ns = agent.clock.monotonic_ns()
    if agent.fault is not None:
        agent.fault.fire("netlink-read")  # TEST-ONLY
    try:
        batch = agent.events.read()
    except netlink.Overflow:
        # The kernel dropped the newest events and kept older ones queued behind the error:
        # applied after the dump they would undo it, so they go with their socket.
        event("netlink_overflow", action="new socket, re-dump and reconcile")
        if resubscribe(agent):
            reconcile(agent)
        return
    except OSError as e:  # the socket itself failed: a new one, then a full re-read
        reconnect(agent, e)
        return
    mcast: set[int] = set()  # served once, after the batch's links and addresses
    for ev in batch:
        try:
            if isinstance(ev, netlink.Link):
                agent.lowers.on_link(ev, t_ns)
            elif isinstance(ev, netlink.Addr):
                addrlists.on_addr(agent.groups, agent.addrs, ev)
            else:
                mcast.add(ev.ifindex)
        except Exception as e:  # one bad event (a device gone meanwhile) must not kill us
            agent.errors["event"] += 1
            event(
                "event_error",
                error=f"{type(e).__name__}: {e}",
                ifindex=getattr(ev, "ifindex", None),
                count=agent.errors["event"],
                action="full re-read in 1 s",
            )
            if agent.reconcile_due_ms is None:  # what that event should have done
                agent.reconcile_due_ms = agent.now_ms() + 1000
    if mcast:
        agent.guard(
            "netlink", addrlists.on_mcast, agent.groups, mcast, agent.mc_pacer, agent.now_ms()
        )


def reconnect(agent: Agent, err: OSError) -> None:
    """The socket itself failed: a new one, subscribed before the dump, then a full re-read."""
    if resubscribe(agent):
        event("netlink_reconnected", error=str(err), action="re-dump and reconcile")
        reconcile(agent)


def resubscribe(agent: Agent) -> bool:
    """The event socket closed with whatever it still holds, a new one subscribed (before
    the dump that must follow, as at start).  False: none for now, tried again soon."""
    old = agent.events
    with contextlib.suppress(KeyError, ValueError):
        agent.sel.unregister(old)  # type: ignore[arg-type]
    if old is not None:
        old.close()
    agent.events = None
    agent.netlink_retry_ms = None
    try:
        agent.events = agent.links.subscribe()
    except OSError as e:  # (ENOBUFS, EMFILE...): deaf for now, so try again soon
        agent.error("netlink", e)
        agent.netlink_retry_ms = agent.now_ms() + 500
        return False
    agent.sel.register(agent.events, selectors.EVENT_READ, "netlink")
    return True


def reconcile(agent: Agent) -> None:
    """Full re-read of links and addresses; never trust a missed event.  If the dump
    itself fails (devices vanishing under a link storm, a dump interrupted by changes on
    every try), it is tried again shortly; a group that fails does not stop the others."""
    assert agent.lowers is not None
    agent.reconcile_due_ms = None
    try:
        links = {link.ifindex: link for link in agent.links.dump_links()}
        load_addrs(agent)
    except Exception as e:
        agent.error("reconcile", e)
        agent.reconcile_due_ms = agent.now_ms() + 200
        return
    for grp in list(agent.groups.values()):
        agent.guard(
            "reconcile",
            agent.lowers.reconcile_group,
            grp,
            links,
            agent.clock.monotonic_ns(),
            group=grp.name,
        )


def load_addrs(agent: Agent) -> None:
    agent.addrs.clear()  # in place: the jobs hold this dict
    for a in agent.links.dump_addrs():
        agent.addrs.setdefault(a.ifindex, set()).add((a.family, a.address))

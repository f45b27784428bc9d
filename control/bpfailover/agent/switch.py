"""A group's switch: decide, write the map, then everything that comes after it.

Order on a switch: the policy decides; the new active lower's slot is filled if it was
re-plugged with a new ifindex; the active slot is flipped (the switch itself); only then the
Switch record, its log line, the metrics hook, the failover device's carrier and the peer
notifications (GARP/NA), which go out now and again every garp_interval_ms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from bpfailover import policy
from bpfailover.agent.fault import Fault
from bpfailover.agent.ports import Clock
from bpfailover.datapath.attach import Wiring
from bpfailover.datapath.layout import ROLE_SLOTS
from bpfailover.datapath.maps import Datapath
from bpfailover.effects import notify
from bpfailover.model.groups import Adopted, Group, Switch
from bpfailover.ops.eventlog import event

# policy.decide's signature: the bench passes a traced one
Decide = Callable[
    [
        policy.GroupPolicyState,
        Mapping[policy.Role, policy.LowerState],
        policy.Role | None,
        policy.PolicyConfig,
        int,
    ],
    policy.Decision,
]


class Switcher:
    """The one place that moves a group's traffic."""

    def __init__(
        self,
        dp: Datapath,
        wiring: Wiring,
        addrs: dict[int, set[tuple[int, str]]],
        clock: Clock,
        fault: Fault | None = None,
        decide: Decide = policy.decide,
    ) -> None:
        self.dp = dp
        self.wiring = wiring
        self.addrs = addrs  # ifindex -> {(family, address)}, kept by the agent
        self.clock = clock
        self.fault = fault  # TEST-ONLY: None outside the fault suite
        self.policy_decide = decide
        self.on_switch: Callable[[Group, Switch], None] | None = None  # metrics hook

    def now_ms(self) -> int:
        return self.clock.monotonic_ns() // 1_000_000

    def decide(self, grp: Group, t_event_ns: int, cause: str) -> None:
        """Ask the policy; switch if it says so; then the failover device's carrier."""
        lowers = {role: lw.state() for role, lw in grp.lowers.items()}
        if grp.adopted is not None:
            replaced = self._resume(grp, grp.adopted, lowers)
            grp.adopted = None
            if replaced is not None:
                # re-plugged while no agent ran: decided as a running agent would have seen
                # it, the old device gone first, then the new one registered
                gone = {r: s for r, s in lowers.items() if r != replaced}
                self._decide(grp, gone, t_event_ns, f"replaced {grp.lowers[replaced].name}")
                if grp.active != replaced:
                    self._fill(grp, replaced)  # no longer active: the new device's slot
        self._decide(grp, lowers, t_event_ns, cause)

    def _resume(
        self, grp: Group, adopted: Adopted, lowers: dict[policy.Role, policy.LowerState]
    ) -> policy.Role | None:
        """The policy state of an adopted datapath (policy.resume); the active lower's role
        when its slot holds a device that is no longer there but another of that role is."""
        role = adopted.active
        lower = grp.lowers.get(role) if role is not None else None
        replaced = role if lower is not None and lower.ifindex != adopted.ifindex else None
        grp.pstate = policy.resume(role, grp.override, lowers, grp.pcfg, self.now_ms())
        return replaced

    def _decide(
        self,
        grp: Group,
        lowers: dict[policy.Role, policy.LowerState],
        t_event_ns: int,
        cause: str,
    ) -> None:
        d = self.policy_decide(grp.pstate, lowers, grp.override, grp.pcfg, self.now_ms())
        grp.pstate = d.state
        grp.deadline_ms = d.next_deadline_ms
        if d.active != grp.active:
            self._flip(grp, d.active)
            latency = (self.clock.monotonic_ns() - t_event_ns) / 1e9
            self._switched(grp, d.active, d.reason or cause, cause, latency)
        if d.carrier != grp.carrier:
            self.wiring.set_carrier(grp.peer, d.carrier)
            grp.carrier = d.carrier
            event("carrier", group=grp.name, on=d.carrier)
        redundant = sum(lw.usable for lw in grp.lowers.values()) == 2
        if redundant == (grp.single_since is not None):
            grp.single_since = None if redundant else self.clock.time()
            event("redundancy", group=grp.name, redundant=redundant)

    def _fill(self, grp: Group, role: policy.Role) -> None:
        """The role's slot holds its registered lower (re-plugged: a new ifindex)."""
        ifindex = grp.lowers[role].ifindex
        if self.dp.lower(grp.gid, ROLE_SLOTS[role]) != ifindex:
            self.dp.set_lower(grp.gid, ROLE_SLOTS[role], ifindex)

    def _flip(self, grp: Group, active: policy.Role | None) -> None:
        slot = ROLE_SLOTS[active] if active else 0
        if active is not None:
            self._fill(grp, active)  # (re)plugged: its slot filled before the flip
        if self.fault is not None:
            self.fault.fire("before-flip")  # TEST-ONLY: decided, map not written
        self.dp.flip(grp.gid, slot)  # the switch itself: everything else comes after
        if self.fault is not None:
            self.fault.fire("after-flip")  # TEST-ONLY: map written, nothing else yet

    def _switched(
        self, grp: Group, active: policy.Role | None, reason: str, cause: str, latency: float
    ) -> None:
        """After the map write: the record, its log line, the hook, the peers."""
        old = grp.active
        sw = Switch(
            wall_time=self.clock.time(),
            from_role=old,
            to_role=active,
            from_lower=grp.lowers[old].name if old in grp.lowers else None,
            to_lower=grp.lowers[active].name if active else None,
            reason=reason,
            latency_s=latency,
        )
        grp.active = active
        grp.last_switch = sw
        grp.switches[sw.reason] += 1
        event(
            "switch",
            group=grp.name,
            **{"from": sw.from_lower, "to": sw.to_lower},
            reason=sw.reason,
            cause=cause,
            latency_us=round(latency * 1e6, 1),
        )
        if self.on_switch is not None:
            self.on_switch(grp, sw)
        if active is not None and grp.cfg.notify.garp_count > 0:
            grp.notify_due = [(self.now_ms(), active, grp.cfg.notify.garp_count)]
            self.notify_peers(grp, self.now_ms())

    def renotify(self, grp: Group) -> None:
        """Adopted an active lower without switching: if the run that switched to it died
        before its GARP/NA went out (peers still send to the old port, the pins say so),
        tell them.  A restart whose peers were told sends nothing."""
        if grp.active is None or grp.cfg.notify.garp_count <= 0 or grp.told == grp.active:
            return
        event("renotify", group=grp.name, via=grp.lowers[grp.active].name, why="adopted")
        grp.notify_due = [(self.now_ms(), grp.active, grp.cfg.notify.garp_count)]
        self.notify_peers(grp, self.now_ms())

    def notify_peers(self, grp: Group, t: int) -> None:
        """Send the notification rounds due by `t`; keep the later ones."""
        keep = []
        for due, role, left in grp.notify_due:
            if due > t:
                keep.append((due, role, left))
                continue
            lower = grp.lowers.get(role)
            if lower is None or grp.active != role:
                continue  # switched again meanwhile: the newer switch notifies
            addrs = sorted(self.addrs.get(grp.master, set()))
            if self.fault is not None:
                self.fault.fire("garp")  # TEST-ONLY: switched, peers not told yet
            try:
                n = notify.send(lower.name, notify.frames_for(grp.mac, addrs))
                event("notify", group=grp.name, via=lower.name, frames=n)
                if grp.told != role:  # pinned: a restart then knows the peers were told
                    self.dp.set_told(grp.gid, ROLE_SLOTS[role])
                    grp.told = role
            except OSError as e:
                event("notify_error", group=grp.name, via=lower.name, error=str(e))
            if left > 1:
                keep.append((t + grp.cfg.notify.garp_interval_ms, role, left - 1))
        grp.notify_due = keep

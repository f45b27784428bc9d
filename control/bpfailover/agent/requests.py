"""Control requests (failoverctl over the control socket): status, set-primary, teardown.

Served from the agent's loop like every other event, so a request that changes the group
goes through the same Switcher as a link event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bpfailover.agent.ports import Clock
from bpfailover.agent.switch import Switcher
from bpfailover.datapath.attach import Wiring, peer_name
from bpfailover.datapath.layout import ROLE_SLOTS
from bpfailover.datapath.maps import Datapath
from bpfailover.model.groups import Group
from bpfailover.ops.api import RequestError, short
from bpfailover.ops.eventlog import event
from bpfailover.policy import Role


class Requests:
    def __init__(
        self,
        groups: dict[str, Group],
        dp: Datapath,
        wiring: Wiring,
        switch: Switcher,
        addrs: dict[int, set[tuple[int, str]]],
        status: Callable[[], dict[str, Any]],
        clock: Clock,
        let_go: Callable[[Group], None] | None = None,
    ) -> None:
        self.groups = groups
        self.dp = dp
        self.wiring = wiring
        self.switch = switch
        self.addrs = addrs  # ifindex -> {(family, address)}, kept by the agent
        self.status = status
        self.clock = clock
        self.let_go = let_go  # teardown: the lowers let go (Lowers.let_go_all)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "set-primary":
            return self._set_primary(req)
        if cmd == "teardown":
            return self._teardown(req)
        raise RequestError(f"unknown command {short(cmd)} (status, set-primary, teardown)")

    def _group_arg(self, req: dict[str, Any]) -> Group:
        name = req.get("group")
        if not isinstance(name, str) or name not in self.groups:
            raise RequestError(f"unknown group {short(name)} (groups: {', '.join(self.groups)})")
        return self.groups[name]

    def _target(self, grp: Group, lower: object) -> Role | None:
        """The role `lower` (a name or a role; None: --auto) names, or RequestError."""
        if lower is None:
            return None  # --auto: back to the configured preference
        if not isinstance(lower, str):
            raise RequestError("lower must be a name")
        found = [lw for lw in grp.lowers.values() if lower in (lw.name, lw.role)]
        if not found:
            names = ", ".join(f"{lw.name} ({lw.role})" for lw in grp.lowers.values())
            raise RequestError(f"{short(lower)} is not a lower of {grp.name} (lowers: {names})")
        if not found[0].usable:
            raise RequestError(f"{found[0].name} is not usable (down or no carrier): refused")
        return found[0].role

    def _set_primary(self, req: dict[str, Any]) -> dict[str, Any]:
        grp = self._group_arg(req)
        lower = req.get("lower")
        target = self._target(grp, lower)
        grp.override = target
        # persisted with the pins: survives a restart
        self.dp.update_group(grp.gid, override_slot=ROLE_SLOTS[target] if target else 0)
        self.switch.decide(grp, self.clock.monotonic_ns(), "set-primary")
        event("override", group=grp.name, lower=lower, role=target)
        return {"ok": True, "active": grp.active, "override": grp.override}

    def _teardown(self, req: dict[str, Any]) -> dict[str, Any]:
        grp = self._group_arg(req)
        force = req.get("force", False)
        if not isinstance(force, bool):
            raise RequestError("force must be true or false")
        # configured addresses: an IPv6 link-local comes with every carrier, guards nothing
        addrs = sorted(
            a for _, a in self.addrs.get(grp.master, set()) if not a.lower().startswith("fe80:")
        )
        if grp.carrier and addrs and not force:
            raise RequestError(
                f"{grp.name} has carrier and addresses ({', '.join(addrs)}): teardown deletes "
                "the device with them and its traffic stops; refused without --yes"
            )
        removed = {
            "device": grp.name,
            "peer": peer_name(grp.name),
            "addresses": addrs,
            "lowers": sorted(lw.name for lw in grp.lowers.values()),
        }
        self.wiring.teardown_group(grp.name)
        if self.let_go is not None:
            self.let_go(grp)
        del self.groups[grp.name]
        event("teardown", group=grp.name, **{k: v for k, v in removed.items() if k != "device"})
        return {"ok": True, "removed": removed}

"""Which lower carries a group's traffic: pure decisions with bonding semantics.

No I/O and no clock: the caller passes the lowers' states, the operator's override and the
current time, and gets back the new state and what to do. Call `decide()` on every link event,
every override change, and again at `next_deadline_ms` while a hold-down is pending.

Semantics (net_failover plus bonding's flap damping):
- a lower is usable when present, admin up and with carrier (netif_running && carrier_ok);
- updelay/downdelay debounce each lower; the active lower is always a debounced-up one;
- preference is the override, else the primary; `reselect` (bonding primary_reselect) says
  when to move back to the preferred lower while the other one is active and still up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

Role = Literal["primary", "standby"]
Reselect = Literal["always", "better", "failure"]
ROLES: tuple[Role, ...] = ("primary", "standby")

# Why the active lower changed (Decision.reason when switched): the first decision, the
# operator's override, no usable lower left, a return to the preferred lower that stayed up
# meanwhile, "<role>_up" (a lower came up and took over), "<role>_down" (the active lower went
# down).  Metrics export every one of them from 0; docs/status-schema.md lists them.
SwitchReason = Literal[
    "initial",
    "override",
    "no_lower",
    "reselect",
    "primary_up",
    "standby_up",
    "primary_down",
    "standby_down",
]
SWITCH_REASONS: tuple[SwitchReason, ...] = get_args(SwitchReason)


@dataclass(frozen=True)
class LowerState:
    present: bool
    admin_up: bool
    carrier: bool
    speed_mbps: int | None = None


def usable(lower: LowerState | None) -> bool:
    return lower is not None and lower.present and lower.admin_up and lower.carrier


class PolicySettingsLike(Protocol):
    """What `PolicyConfig.from_settings` reads (config.PolicySettings has it)."""

    @property
    def reselect(self) -> Reselect: ...
    @property
    def updelay_ms(self) -> int: ...
    @property
    def downdelay_ms(self) -> int: ...


@dataclass(frozen=True)
class PolicyConfig:
    reselect: Reselect = "always"
    updelay_ms: int = 0
    downdelay_ms: int = 0

    def __post_init__(self) -> None:
        if self.reselect not in get_args(Reselect):
            raise ValueError(f"reselect must be one of {get_args(Reselect)}: {self.reselect!r}")
        if self.updelay_ms < 0 or self.downdelay_ms < 0:
            raise ValueError("updelay_ms and downdelay_ms must be >= 0")

    @classmethod
    def from_settings(cls, settings: PolicySettingsLike) -> PolicyConfig:
        return cls(settings.reselect, settings.updelay_ms, settings.downdelay_ms)


@dataclass(frozen=True)
class RoleState:
    """Debounced view of one lower."""

    up: bool = False
    # When `up` flips unless the raw state returns to `up` first; None: nothing pending.
    deadline_ms: int | None = None

    @property
    def pending(self) -> Literal["up", "down"] | None:
        if self.deadline_ms is None:
            return None
        return "down" if self.up else "up"


@dataclass(frozen=True)
class GroupPolicyState:
    primary: RoleState = field(default_factory=RoleState)
    standby: RoleState = field(default_factory=RoleState)
    active: Role | None = None
    override: Role | None = None  # as seen by the last decide(), to spot a change
    # An override whose target was not up when it was set: it moves traffic once the target
    # comes up, whatever `reselect` says (it is the operator's planned switch).
    override_pending: bool = False
    started: bool = False  # False until the first decide(): its switch is "initial"

    def role(self, role: Role) -> RoleState:
        return self.primary if role == "primary" else self.standby

    def up_roles(self) -> list[Role]:
        return [r for r in ROLES if self.role(r).up]


@dataclass(frozen=True)
class Decision:
    state: GroupPolicyState
    active: Role | None  # None: no usable lower, the datapath drops (reason no_lower)
    carrier: bool  # failover device carrier: some lower is debounced-up
    switched: bool
    reason: str  # why `active` changed; "" when it did not
    next_deadline_ms: int | None  # call decide() again then if nothing else happens


def other(role: Role) -> Role:
    return "standby" if role == "primary" else "primary"


def _debounce(
    prev: RoleState, lower: LowerState | None, cfg: PolicyConfig, now_ms: int
) -> RoleState:
    """One lower's hold-down step (the no-lower-up exception is applied by the caller)."""
    raw = usable(lower)
    if raw == prev.up:
        return RoleState(prev.up)  # back to its debounced state: cancel what was pending
    if prev.up and (lower is None or not lower.present):
        return RoleState(False)  # removed: the device is gone, nothing to wait for
    delay = cfg.updelay_ms if raw else cfg.downdelay_ms
    deadline = now_ms + delay if prev.deadline_ms is None else prev.deadline_ms
    if now_ms >= deadline:
        return RoleState(raw)
    return RoleState(prev.up, deadline)


def _speed(lower: LowerState | None) -> int:
    return (lower.speed_mbps or 0) if lower is not None else 0


def resume(
    active: Role | None,
    override: Role | None,
    lowers: Mapping[Role, LowerState],
    cfg: PolicyConfig,
    now_ms: int,
) -> GroupPolicyState:
    """The state an agent starts from when it adopts a running datapath, so that its first
    decide() moves traffic only where the previous agent's would have.  `active`: the lower
    the datapath sends through (None: none, or its device was replaced while no agent ran);
    `override`: the operator's, as pinned; `lowers`: what is registered now.

    The active lower counts as up (a loss is then debounced with downdelay, as it would
    have been).  Another lower usable now is taken as one whose carrier just came up: how
    long it has been up is not known, so it waits a full updelay before it can take over (a
    VF inside its updelay at the restart keeps waiting).  With reselect failure or better a
    usable active lower stays, whatever the other does."""
    roles: dict[Role, RoleState] = {}
    for role in ROLES:
        lower = lowers.get(role)
        if role == active and lower is not None and lower.present:
            roles[role] = RoleState(True)
        elif usable(lower) and cfg.updelay_ms > 0:
            roles[role] = RoleState(False, now_ms + cfg.updelay_ms)
        else:
            roles[role] = RoleState(usable(lower))
    return GroupPolicyState(
        primary=roles["primary"],
        standby=roles["standby"],
        active=active,
        override=override,
        override_pending=override is not None and override != active,
        started=True,  # a switch from here has a reason of its own, never "initial"
    )


def decide(
    prev: GroupPolicyState,
    lowers: Mapping[Role, LowerState],
    override: Role | None,
    cfg: PolicyConfig,
    now_ms: int,
) -> Decision:
    """Next state and active lower. A role missing from `lowers` is not registered."""
    preferred: Role = override or "primary"
    roles = {r: _debounce(prev.role(r), lowers.get(r), cfg, now_ms) for r in ROLES}

    # Like bonding: while no lower is up, one that became usable is taken at once rather
    # than leaving the group without carrier for updelay. Only one (the preferred if it
    # can): the other keeps its own updelay.
    if not any(s.up for s in roles.values()):
        waiting = [r for r in (preferred, other(preferred)) if roles[r].pending == "up"]
        if waiting:
            roles[waiting[0]] = RoleState(True)

    up = [r for r in ROLES if roles[r].up]
    override_changed = prev.started and override != prev.override
    pending_override = override_changed or (prev.override_pending and override == prev.override)
    current = prev.active

    active: Role | None
    if not up:
        active, reason = None, "no_lower"
    elif current is None or current not in up:
        active = preferred if preferred in up else other(preferred)
        if not prev.started:
            reason = "initial"
        elif current is None:
            reason = f"{active}_up"
        else:
            reason = f"{current}_down"
    elif current == preferred or preferred not in up:
        active, reason = current, ""
    elif pending_override:
        active, reason = preferred, "override"
    elif cfg.reselect == "always" or (
        cfg.reselect == "better" and _speed(lowers.get(preferred)) > _speed(lowers.get(current))
    ):
        # Came up this step, or was waiting on its updelay: either way it is back.
        active = preferred
        reason = f"{preferred}_up" if not prev.role(preferred).up else "reselect"
    else:
        active, reason = current, ""  # failure, or not better: stay while current is up

    switched = active != current
    state = GroupPolicyState(
        primary=roles["primary"],
        standby=roles["standby"],
        active=active,
        override=override,
        override_pending=pending_override and active != preferred,
        started=True,
    )
    deadlines = [s.deadline_ms for s in roles.values() if s.deadline_ms is not None]
    return Decision(
        state=state,
        active=active,
        carrier=bool(up),
        switched=switched,
        reason=reason if switched else "",
        next_deadline_ms=min(deadlines) if deadlines else None,
    )

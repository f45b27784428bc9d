"""The agent's view of each group: registered lowers, policy state, last switch."""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass, field

from bpfailover import policy
from bpfailover.model import config
from bpfailover.policy import Role


@dataclass
class Lower:
    role: Role
    ifindex: int
    name: str
    admin_up: bool
    carrier: bool
    mtu: int
    speed_mbps: int | None = None  # ethtool's figure, read when its carrier comes up
    duplex: str | None = None
    min_mtu: int = 0  # the MTU range its driver takes (0: not known / no limit)
    max_mtu: int = 0

    def state(self) -> policy.LowerState:
        return policy.LowerState(
            present=True, admin_up=self.admin_up, carrier=self.carrier, speed_mbps=self.speed_mbps
        )

    @property
    def usable(self) -> bool:
        return policy.usable(self.state())


@dataclass(frozen=True)
class Adopted:
    """What a running datapath was doing when this agent adopted it: the active lower and
    the ifindex its slot holds.  The agent's first decision starts from it (policy.resume)
    instead of from nothing, so a restart moves no traffic of its own."""

    active: Role | None
    ifindex: int


@dataclass(frozen=True)
class Switch:
    wall_time: float
    from_role: Role | None
    to_role: Role | None
    from_lower: str | None
    to_lower: str | None
    reason: str
    latency_s: float  # link event received -> map written


@dataclass
class Group:
    cfg: config.Group
    gid: int  # datapath group id (index into the per-group maps)
    mac: str
    master: int  # failover netdev ifindex
    peer: int  # its hidden veth peer
    pcfg: policy.PolicyConfig
    pstate: policy.GroupPolicyState = field(default_factory=policy.GroupPolicyState)
    lowers: dict[Role, Lower] = field(default_factory=dict)
    override: Role | None = None
    active: Role | None = None  # what the datapath map holds
    adopted: Adopted | None = None  # set at start-up from the pins; the first decide() uses it
    told: Role | None = None  # the lower whose peers were last told of it (pinned)
    # wall time since when fewer than two lowers have been usable (None: both are)
    single_since: float | None = None
    carrier: bool | None = None
    mtu: int = 0
    deadline_ms: int | None = None
    last_switch: Switch | None = None
    switches: Tally[str] = field(default_factory=Tally)
    # pending peer notifications: (due monotonic ms, lower role, how many rounds left)
    notify_due: list[tuple[int, Role, int]] = field(default_factory=list)
    mc_added: dict[int, set[str]] = field(default_factory=dict)  # lower ifindex -> our adds
    uc_added: dict[int, set[str]] = field(default_factory=dict)  # the same, unicast list
    mac_restored: int = 0  # times the failover device's MAC was changed and put back
    # VLAN devices on the failover device: ifindex -> (protocol, VLAN id)
    vlans: dict[int, tuple[int, int]] = field(default_factory=dict)
    # our VLAN filter devices on the lowers: lower ifindex -> {(protocol, VLAN id)}
    vlan_filters: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    vlan_error: str | None = None  # the last failure to program a lower's VLAN filter
    # the failover device's native XDP as last acted on (our pass program on the peer
    # follows it: Lowers.peer_xdp); None: not looked at yet
    user_xdp: bool | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    def lower_by_ifindex(self, ifindex: int) -> Lower | None:
        for lower in self.lowers.values():
            if lower.ifindex == ifindex:
                return lower
        return None

"""The config's schema: the pydantic models with their field types and limits, and
`ConfigError`, whose text is one line per problem naming the key."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

MAX_GROUPS = 64  # = FO_MAX_GROUPS of bpf/failover.h (the config layer cannot import the
# datapath layer; tests/test_config.py::test_max_groups_is_the_datapaths keeps them equal)
IFNAMSIZ = 16  # kernel limit including the trailing NUL

Loc = tuple[str | int, ...]


REFERENCE = "docs/config.md"  # generated: python -m bpfailover.model.config --reference


# Everything str.splitlines() breaks at, shown escaped: one problem stays one line.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class ConfigError(Exception):
    """A config that cannot be used.  `str()` has one line per problem, `source: path:
    message`; a problem with a key points at the reference on its line."""

    def __init__(
        self, source: str, message: str, path: Loc = (), more: Sequence[tuple[Loc, str]] = ()
    ) -> None:
        self.source = source
        self.path = path
        self.message = message
        self.problems: list[tuple[Loc, str]] = [(path, message), *more]
        lines = []
        for where, what in self.problems:
            prefix = f"{source}: {format_path(where)}: " if where else f"{source}: "
            lines.append((prefix + what).translate(_LINE_BREAKS))
        if any(where for where, _ in self.problems):
            lines[-1] += f"; see {REFERENCE}"
        super().__init__("\n".join(lines))


def format_path(path: Loc) -> str:
    """`('groups', 0, 'policy')` -> `groups[0].policy`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class LocatedError(ValueError):
    """A validator's error about a key below the model it runs on (pydantic keeps the object)."""

    def __init__(self, path: Loc, message: str) -> None:
        super().__init__(message)
        self.path = path


PEER_PREFIX_BYTES = 12  # + "_fo": at most 15 bytes, a valid interface name


def peer_name(name: str) -> str:
    """The hidden veth peer of failover device `name` (its admin state is our carrier): the
    name's first 12 *bytes* (never half a UTF-8 character) + "_fo"."""
    return name.encode()[:PEER_PREFIX_BYTES].decode(errors="ignore") + "_fo"


# --- field types -----------------------------------------------------------------------------


def _ifname(value: str) -> str:
    # Same rules as the kernel's dev_valid_name().
    if not 0 < len(value.encode()) < IFNAMSIZ:
        raise ValueError(f"interface name must be 1..{IFNAMSIZ - 1} bytes (got {value!r})")
    if value in (".", "..") or any(c in "/:\0" or c.isspace() for c in value):
        raise ValueError(f"not a valid interface name (got {value!r})")
    return value


def _primary(value: str) -> str:
    return value if value == "auto" else _ifname(value)


def _mac(value: str) -> str:
    if value == "auto":
        return value
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", value):
        raise ValueError(f"must be 'auto' or a MAC like 52:54:00:00:12:53 (got {value!r})")
    mac = value.lower()
    if int(mac[:2], 16) & 1:
        raise ValueError(f"must be a unicast MAC, not multicast/broadcast (got {value!r})")
    if mac == "00:00:00:00:00:00":
        raise ValueError(f"must not be the zero MAC (got {value!r})")
    return mac


def _abs_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise ValueError(f"must be an absolute path (got {value!r})")
    # the path checked is the path used: no component that resolves elsewhere
    if os.path.normpath(value) != value or value.startswith("//"):
        raise ValueError(
            f"must be a normalised path: no '.' or '..' component, no '//' or trailing '/' "
            f"(got {value!r})"
        )
    return value


def _socket_path(value: str) -> str:
    # sun_path holds 108 bytes including the NUL; a longer path fails only at bind().
    if len(_abs_path(value).encode()) > 107:
        raise ValueError("unix socket path longer than 107 bytes")
    return value


def _unix_group(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", value):
        raise ValueError(f"not a valid unix group name (got {value!r})")
    return value


def _listen(value: str | None) -> str | None:
    if not value:
        return None  # "" and null both disable the exporter
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port with port 1..65535 (got {value!r})")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(f"bad IPv6 address in {value!r}") from None
    elif not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise ValueError(f"bad host in {value!r} (IPv6 goes in brackets: [::]:9617)")
    return value


def _in_range(lo: int, hi: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise ValueError(f"must be an integer in {lo}..{hi} (got {value})")
        return value

    return check


# `inactive_rx` rules, the datapath's FO_IRX_* by name (tests/test_config.py keeps them equal);
# `drop`, an older name of drop_inactive, still accepted.
INACTIVE_RX_ALIASES = {"drop": "drop_inactive"}


def _inactive_rx_alias(value: Any) -> Any:
    return INACTIVE_RX_ALIASES.get(value, value) if isinstance(value, str) else value


IfName = Annotated[str, AfterValidator(_ifname)]
Millis = Annotated[int, AfterValidator(_in_range(0, 600_000))]


class _Model(BaseModel):
    # strict: YAML `yes` is not a string, "5" is not an integer, 1.0 is not an integer.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StandbyDriver(_Model):
    """Pick the standby by kernel driver instead of by name."""

    driver: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_-]{1,64}$",
            description="kernel driver of the standby (e.g. `virtio_net`, as `ethtool -i` "
            "shows it); the netdev with that driver and the group MAC is the standby",
        ),
    ]


# The standby is a name or {driver: ...}; the tags only steer pydantic and are cut from paths.
STANDBY_TAGS = ("standby:ifname", "standby:driver")


def _standby_kind(value: Any) -> str:
    return STANDBY_TAGS[1] if isinstance(value, dict | StandbyDriver) else STANDBY_TAGS[0]


Standby = Annotated[
    Annotated[IfName, Tag(STANDBY_TAGS[0])] | Annotated[StandbyDriver, Tag(STANDBY_TAGS[1])],
    Discriminator(_standby_kind),
]


class PolicySettings(_Model):
    """When the active lower changes (bonding's semantics)."""

    reselect: Literal["always", "better", "failure"] = Field(
        default="always",
        description="when to move back to the preferred lower (the override, else the "
        "primary) while the other one is active and still usable (bonding's "
        "primary_reselect): `always`, `better` (only if its link speed is higher), "
        "`failure` (never: only when the active lower fails)",
    )
    updelay_ms: Millis = Field(
        default=0, description="ms a lower must stay usable before it counts as up (0..600000)"
    )
    downdelay_ms: Millis = Field(
        default=0, description="ms a lower must stay unusable before it counts as down (0..600000)"
    )


class NotifySettings(_Model):
    """Gratuitous ARP and unsolicited NA sent through the new active lower after a switch."""

    garp_count: Annotated[int, AfterValidator(_in_range(0, 255))] = Field(
        default=1, description="how many rounds after every switch (0..255; 0: none)"
    )
    garp_interval_ms: Annotated[int, AfterValidator(_in_range(0, 60_000))] = Field(
        default=200, description="ms between rounds (0..60000)"
    )


class Group(_Model):
    """One failover device and its two lowers."""

    name: IfName = Field(
        description="the failover netdev to create (an interface name, 1..15 bytes); "
        "also the group's name in status, metrics (`device`) and failoverctl. Its hidden "
        "veth peer is named from its first 12 bytes + `_fo`: that name must not be another "
        "group's peer, a group or a lower"
    )
    standby: Standby = Field(
        description="the standby lower (virtio-net): an interface name, or "
        "`{driver: NAME}` to pick it by kernel driver"
    )
    primary: Annotated[str, AfterValidator(_primary)] = Field(
        default="auto",
        description="the primary lower (the VF): an interface name, or `auto`: any other "
        "netdev with the group MAC, also one hot-plugged later",
    )
    mac: Annotated[str, AfterValidator(_mac)] = Field(
        default="auto",
        description="the group MAC (unicast, e.g. `52:54:00:00:12:53`), or `auto`: the standby's",
    )
    policy: PolicySettings = Field(default=PolicySettings(), description=PolicySettings.__doc__)
    notify: NotifySettings = Field(default=NotifySettings(), description=NotifySettings.__doc__)
    inactive_rx: Annotated[
        Literal["deliver", "drop_standby", "drop_inactive"], BeforeValidator(_inactive_rx_alias)
    ] = Field(
        default="deliver",
        description="which received frames the failover device does not get (counted as "
        "drop reason `inactive_rx`): `deliver` (none: frames from either lower go up, so "
        "nothing is lost while the hypervisor moves the MAC), `drop_standby` (net_failover's "
        "rule: the standby's frames while a primary is registered, whichever lower is "
        "active; the primary's never), `drop_inactive` (bonding's rule: the frames of "
        "whichever lower is not the active one, so after `set-primary GROUP standby` the "
        "VF's too). `drop` is accepted as another name of `drop_inactive`",
    )
    rx_path: Literal["tc", "xdp"] = Field(
        default="tc",
        description="receive path from the lowers to the failover device: `tc` (clsact "
        "ingress) or `xdp` (XDP redirect; what XDP cannot redirect falls through to tc)",
    )
    tx_path: Literal["direct", "veth"] = Field(
        default="direct",
        description="transmit path of the failover device: `direct` (its clsact egress "
        "redirects to the active lower: the fewest cycles, but the device's own tx "
        "counters stay 0, tcpdump on it sees no transmit and a root qdisc on it is "
        "bypassed; the datapath's per-lower counters and the lowers have it all) or `veth` "
        "(it transmits into its hidden peer, whose clsact ingress redirects: its tx "
        "counters, packet taps and a root qdisc see the traffic, for one backlog trip more "
        "per packet: up to 8 % of transmit throughput where the CPU is the limit)",
    )
    address_resync_s: Annotated[int, AfterValidator(_in_range(0, 3600))] = Field(
        default=10,
        description="seconds between re-reads of the failover device's address lists for "
        "the additions no kernel announces (`ip maddr add`, a packet socket's "
        "PACKET_ADD_MEMBERSHIP); IP joins, macvlans and VLANs on top are synced at once by "
        "events.  0: only on events",
    )
    redundancy_grace_s: Annotated[int, AfterValidator(_in_range(0, 86400))] = Field(
        default=300,
        description="seconds a group may run with fewer than two usable lowers before "
        "its redundancy counts as lost (`failoverctl status --check` exits 6, the metric "
        "`failover_redundancy_lost` is 1): long enough for a migration's VF unplug, short "
        "enough that a standby left down, or a VF never plugged back, is seen before the "
        "next unplug cuts the guest off",
    )

    @property
    def standby_name(self) -> str | None:
        return self.standby if isinstance(self.standby, str) else None

    @property
    def primary_name(self) -> str | None:
        return None if self.primary == "auto" else self.primary

    def lower_names(self) -> list[tuple[str, str]]:
        """(key, name) of the lowers this group names explicitly."""
        named = [("standby", self.standby_name), ("primary", self.primary_name)]
        return [(key, name) for key, name in named if name is not None]

    @model_validator(mode="after")
    def _distinct_devices(self) -> Group:
        if self.standby_name is not None and self.standby_name == self.primary_name:
            raise LocatedError(("primary",), f"same device as the standby ({self.primary!r})")
        for key, name in self.lower_names():
            if name == self.name:
                raise LocatedError((key,), f"is the failover device itself ({name!r})")
        return self


class MetricsSettings(_Model):
    """The Prometheus exporter."""

    listen: Annotated[str | None, AfterValidator(_listen)] = Field(
        default="127.0.0.1:9617",
        description="`host:port` to serve /metrics on (IPv6 in brackets: `[::1]:9617`); "
        "loopback unless set: a remote Prometheus needs an address here (e.g. `[::]:9617`); "
        '`""` or null disables the exporter',
    )

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, brackets stripped; None when disabled."""
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class ControlSettings(_Model):
    """The control socket failoverctl talks to."""

    socket: Annotated[str, AfterValidator(_socket_path)] = Field(
        default="/run/bpfailover/control.sock",
        description="absolute path of the Unix socket (at most 107 bytes)",
    )
    group: Annotated[str, AfterValidator(_unix_group)] | None = Field(
        default=None,
        description="a Unix group whose members may run `status` besides root (null: root "
        "only); it must exist",
    )
    admin_group: Annotated[str, AfterValidator(_unix_group)] | None = Field(
        default=None,
        description="a Unix group whose members may also change things (`set-primary`, "
        "`teardown`) besides root (null: root only); it must exist",
    )


class SchedulingSettings(_Model):
    """How the agent's event loop is scheduled."""

    # See effects/sched.py.
    realtime_priority: Annotated[int, AfterValidator(_in_range(0, 99))] = Field(
        default=10,
        description="SCHED_FIFO priority of the event loop (1..99; 0: normal scheduling). "
        "Without CAP_SYS_NICE the agent logs `scheduling_refused` and runs normally",
    )


class LogSettings(_Model):
    """failoverd's log (JSON lines on stderr)."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="lowest level logged"
    )


class Config(_Model):
    groups: Annotated[list[Group], Field(min_length=1, max_length=MAX_GROUPS)] = Field(
        description=f"the failover groups (1..{MAX_GROUPS})"
    )
    metrics: MetricsSettings = Field(default=MetricsSettings(), description=MetricsSettings.__doc__)
    control: ControlSettings = Field(default=ControlSettings(), description=ControlSettings.__doc__)
    bpffs: Annotated[str, AfterValidator(_abs_path)] = Field(
        default="/sys/fs/bpf/bpfailover",
        description="directory on a bpf filesystem where programs and maps are pinned "
        "(they outlive the agent, so a restart loses nothing)",
    )
    log: LogSettings = Field(default=LogSettings(), description=LogSettings.__doc__)
    scheduling: SchedulingSettings = Field(
        default=SchedulingSettings(), description=SchedulingSettings.__doc__
    )

    @model_validator(mode="after")
    def _groups_disjoint(self) -> Config:
        names: dict[str, int] = {}
        lowers: dict[str, Loc] = {}
        macs: dict[str, int] = {}
        by_driver: dict[str, int] = {}
        for i, g in enumerate(self.groups):
            if g.name in names:
                raise LocatedError(("groups", i, "name"), f"duplicate group {g.name!r}")
            names[g.name] = i
        for i, g in enumerate(self.groups):
            for key, name in g.lower_names():
                if name in names:
                    raise LocatedError(("groups", i, key), f"{name!r} is a failover device")
                if name in lowers:
                    other = format_path(lowers[name])
                    raise LocatedError(("groups", i, key), f"{name!r} already used by {other}")
                lowers[name] = ("groups", i, key)
            if g.mac != "auto":
                if g.mac in macs:
                    raise LocatedError(
                        ("groups", i, "mac"), f"{g.mac} already used by groups[{macs[g.mac]}]"
                    )
                macs[g.mac] = i
            elif isinstance(g.standby, StandbyDriver):
                # Two groups asking for "the virtio_net device" cannot both be satisfied.
                driver = g.standby.driver
                if driver in by_driver:
                    raise LocatedError(
                        ("groups", i, "standby"),
                        f"driver {driver!r} also picks the standby of groups[{by_driver[driver]}]"
                        " (set mac to tell them apart)",
                    )
                by_driver[driver] = i
        self._peers_distinct(names, lowers)
        return self

    def _peers_distinct(self, names: dict[str, int], lowers: dict[str, Loc]) -> None:
        """Each group also creates a hidden veth peer, peer_name(name): it must not be any
        other netdev the config names (two names sharing their first 12 bytes, a group
        called X_fo next to a group X)."""
        peers: dict[str, int] = {}
        for i, g in enumerate(self.groups):
            peer = peer_name(g.name)
            where = ("groups", i, "name")
            if peer in peers:
                raise LocatedError(
                    where,
                    f"its hidden peer {peer!r} is also that of groups[{peers[peer]}] "
                    f"({self.groups[peers[peer]].name!r}: the first {PEER_PREFIX_BYTES} bytes "
                    "are the same): rename one",
                )
            if peer in names:
                owner = "its own name" if names[peer] == i else f"groups[{names[peer]}].name"
                fix = "rename the group" if names[peer] == i else "rename one of them"
                raise LocatedError(where, f"its hidden peer {peer!r} is {owner}: {fix}")
            if peer in lowers:
                raise LocatedError(
                    where, f"its hidden peer {peer!r} is {format_path(lowers[peer])}: rename it"
                )
            peers[peer] = i

    def group(self, name: str) -> Group | None:
        return next((g for g in self.groups if g.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, for `status --json` and logs."""
        return self.model_dump(mode="json")


def model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None

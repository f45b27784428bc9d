"""policy.decide(): the full table at zero delays, hold-down timelines, random sequences."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfailover.model.config import PolicySettings
from bpfailover.policy import (
    ROLES,
    Decision,
    GroupPolicyState,
    LowerState,
    PolicyConfig,
    Reselect,
    Role,
    RoleState,
    decide,
    resume,
    usable,
)

UP = LowerState(present=True, admin_up=True, carrier=True)
NO_CARRIER = LowerState(present=True, admin_up=True, carrier=False)
ADMIN_DOWN = LowerState(present=True, admin_up=False, carrier=True)
GONE = LowerState(present=False, admin_up=True, carrier=True)

RESELECTS = ("always", "better", "failure")
OVERRIDES: tuple[Role | None, ...] = (None, "standby", "primary")
# (primary, standby) speeds: faster, equal, unknown primary (counts as 0), unknown standby
SPEEDS = ((25_000, 1_000), (1_000, 1_000), (None, 1_000), (1_000, None))


def test_usable_is_present_and_admin_up_and_carrier() -> None:
    for present, admin_up, carrier in itertools.product((False, True), repeat=3):
        state = LowerState(present, admin_up, carrier)
        assert usable(state) == (present and admin_up and carrier)
    assert not usable(None)


def lowers_of(**kw: LowerState | None) -> dict[Role, LowerState]:
    return {role: s for role, s in kw.items() if s is not None}  # type: ignore[misc]


def oracle(
    up: set[Role],
    override: Role | None,
    prev_override: Role | None,
    reselect: str,
    current: Role | None,
    speed: Mapping[str, int | None],
) -> Role | None:
    """What the active lower must be, written out plainly from the rules."""
    if not up:
        return None
    want: Role = override if override is not None else "primary"
    fallback: Role = "standby" if want == "primary" else "primary"
    if current is None or current not in up:
        return want if want in up else fallback
    if current == want or want not in up:
        return current  # never leave a lower that stays up without a reason
    # current stays up and the preferred lower is up as well
    if override != prev_override:
        return want  # the operator's planned switch ignores reselect
    if reselect == "always":
        return want
    if reselect == "better":
        return want if (speed[want] or 0) > (speed[current] or 0) else current
    return current  # failure: only when the current one goes down


@pytest.mark.parametrize("reselect", RESELECTS)
@pytest.mark.parametrize("override", OVERRIDES)
@pytest.mark.parametrize("prev_override", OVERRIDES)
@pytest.mark.parametrize("current", (None, "standby", "primary"))
def test_table_zero_delays(
    reselect: str, override: Role | None, prev_override: Role | None, current: Role | None
) -> None:
    cfg = PolicyConfig(reselect=reselect)  # type: ignore[arg-type]
    kinds = ("usable", "unusable", "absent")
    for s_kind, p_kind, other_was_up, (p_speed, s_speed) in itertools.product(
        kinds, kinds, (False, True), SPEEDS
    ):
        speed = {"primary": p_speed, "standby": s_speed}
        lowers: dict[Role, LowerState] = {}
        role: Role
        for role, kind in (("standby", s_kind), ("primary", p_kind)):
            if kind != "absent":
                base = UP if kind == "usable" else NO_CARRIER
                lowers[role] = LowerState(True, base.admin_up, base.carrier, speed[role])
        was_up = {r: r == current or (current is not None and other_was_up) for r in ROLES}
        prev = GroupPolicyState(
            primary=RoleState(was_up["primary"]),
            standby=RoleState(was_up["standby"]),
            active=current,
            override=prev_override,
            started=True,
        )
        case = f"{s_kind=} {p_kind=} {other_was_up=} {speed=}"
        d = decide(prev, lowers, override, cfg, now_ms=1_000)

        up = {r for r in ROLES if usable(lowers.get(r))}
        assert d.active == oracle(up, override, prev_override, reselect, current, speed), case
        assert d.active is None or d.active in up, case  # never an unusable lower
        assert d.carrier == bool(up), case
        assert d.switched == (d.active != current), case
        assert bool(d.reason) == d.switched, case
        assert d.next_deadline_ms is None, case
        assert d.state.active == d.active and d.state.override == override, case
        assert set(d.state.up_roles()) == up, case
        if d.switched and current is not None:
            if d.active is None:
                assert d.reason == "no_lower", case
            elif current not in up:
                assert d.reason == f"{current}_down", case
            elif override != prev_override:
                assert d.reason == "override", case
            else:
                assert d.reason in (f"{d.active}_up", "reselect"), case
        if d.switched and current is None:
            assert d.reason == f"{d.active}_up", case


def test_first_decision_is_initial_and_prefers_primary() -> None:
    d = decide(GroupPolicyState(), lowers_of(primary=UP, standby=UP), None, PolicyConfig(), 0)
    assert (d.active, d.reason, d.switched, d.carrier) == ("primary", "initial", True, True)
    d = decide(GroupPolicyState(), {}, None, PolicyConfig(), 0)
    assert (d.active, d.switched, d.carrier, d.reason) == (None, False, False, "")


# --- timelines with hold-down ---------------------------------------------------------------


class Timeline:
    """Feeds decide() step by step, as the agent would."""

    def __init__(self, cfg: PolicyConfig, override: Role | None = None) -> None:
        self.cfg = cfg
        self.override = override
        self.state = GroupPolicyState()
        self.lowers: dict[Role, LowerState] = {}

    def at(self, now_ms: int, **change: LowerState | None) -> Decision:
        for role, lower in change.items():
            if lower is None:
                self.lowers.pop(role, None)  # type: ignore[call-overload]
            else:
                self.lowers[role] = lower  # type: ignore[index]
        d = decide(self.state, self.lowers, self.override, self.cfg, now_ms)
        self.state = d.state
        return d


def test_flap_shorter_than_downdelay_does_not_switch() -> None:
    t = Timeline(PolicyConfig(downdelay_ms=100))
    assert t.at(0, primary=UP, standby=UP).active == "primary"
    d = t.at(1_000, primary=NO_CARRIER)
    assert (d.active, d.switched, d.carrier, d.next_deadline_ms) == ("primary", False, True, 1_100)
    assert d.state.primary.pending == "down"
    d = t.at(1_060, primary=UP)
    assert (d.active, d.switched, d.next_deadline_ms) == ("primary", False, None)
    assert d.state.primary == RoleState(up=True)
    d = t.at(1_100)  # the old deadline passes: nothing left to do
    assert (d.active, d.switched, d.next_deadline_ms) == ("primary", False, None)


def test_downdelay_expires_then_switches() -> None:
    t = Timeline(PolicyConfig(downdelay_ms=100))
    t.at(0, primary=UP, standby=UP)
    assert t.at(1_000, primary=ADMIN_DOWN).next_deadline_ms == 1_100
    d = t.at(1_099)  # a call before the deadline changes nothing and keeps it
    assert (d.active, d.switched, d.next_deadline_ms) == ("primary", False, 1_100)
    d = t.at(1_100)
    assert (d.active, d.switched, d.reason, d.next_deadline_ms) == (
        "standby",
        True,
        "primary_down",
        None,
    )


def test_last_lower_held_by_downdelay_keeps_carrier_then_no_lower() -> None:
    t = Timeline(PolicyConfig(downdelay_ms=50))
    t.at(0, standby=UP)
    d = t.at(10, standby=NO_CARRIER)
    assert (d.active, d.carrier, d.next_deadline_ms) == ("standby", True, 60)
    d = t.at(60)
    assert (d.active, d.carrier, d.switched, d.reason) == (None, False, True, "no_lower")


@pytest.mark.parametrize("how", ["unregistered", "present_false"])
def test_removal_bypasses_downdelay(how: str) -> None:
    t = Timeline(PolicyConfig(downdelay_ms=10_000))
    t.at(0, primary=UP, standby=UP)
    d = t.at(500, primary=None if how == "unregistered" else GONE)
    assert (d.active, d.switched, d.reason, d.next_deadline_ms) == (
        "standby",
        True,
        "primary_down",
        None,
    )
    assert not d.state.primary.up


def test_updelay_holds_a_returning_primary() -> None:
    t = Timeline(PolicyConfig(updelay_ms=500))
    assert t.at(0, standby=UP).active == "standby"
    d = t.at(2_000, primary=UP)
    assert (d.active, d.switched, d.next_deadline_ms) == ("standby", False, 2_500)
    assert d.state.primary.pending == "up"
    # a flap during updelay starts the wait again: usability must be continuous
    assert t.at(2_200, primary=NO_CARRIER).next_deadline_ms is None
    assert t.at(2_300, primary=UP).next_deadline_ms == 2_800
    assert t.at(2_799).switched is False
    d = t.at(2_800)
    assert (d.active, d.switched, d.reason, d.next_deadline_ms) == (
        "primary",
        True,
        "primary_up",
        None,
    )


def test_first_lower_up_bypasses_updelay() -> None:
    t = Timeline(PolicyConfig(updelay_ms=500))
    d = t.at(0, standby=UP)
    assert (d.active, d.carrier, d.reason, d.next_deadline_ms) == ("standby", True, "initial", None)
    d = t.at(10, primary=UP)  # a lower is up now: the primary waits its updelay
    assert (d.active, d.next_deadline_ms) == ("standby", 510)


def test_both_arrive_together_preferred_taken_at_once_other_waits() -> None:
    t = Timeline(PolicyConfig(updelay_ms=300), override="standby")
    d = t.at(0, primary=UP, standby=UP)
    assert (d.active, d.next_deadline_ms) == ("standby", 300)
    assert d.state.standby.up and d.state.primary.pending == "up"


def test_pending_up_lower_taken_at_once_when_the_last_up_one_goes() -> None:
    t = Timeline(PolicyConfig(updelay_ms=1_000))
    t.at(0, standby=UP)
    assert t.at(100, primary=UP).active == "standby"
    d = t.at(200, standby=None)  # nothing up any more: do not wait for the primary's updelay
    assert (d.active, d.switched, d.reason, d.carrier) == ("primary", True, "standby_down", True)
    assert d.next_deadline_ms is None


def test_next_deadline_is_the_earliest_pending() -> None:
    t = Timeline(PolicyConfig(updelay_ms=400, downdelay_ms=100))
    t.at(0, standby=UP)
    t.at(10, primary=UP)  # primary pending up until 410
    d = t.at(20, standby=NO_CARRIER)  # standby pending down until 120
    assert d.next_deadline_ms == 120
    d = t.at(120)
    # standby is down; primary was pending up, nothing is up: taken at once
    assert (d.active, d.reason, d.next_deadline_ms) == ("primary", "standby_down", None)


def test_override_to_unusable_lower_waits_then_applies_despite_failure_reselect() -> None:
    t = Timeline(PolicyConfig(reselect="failure"))
    t.at(0, primary=UP, standby=NO_CARRIER)
    t.override = "standby"
    d = t.at(10)
    assert (d.active, d.switched) == ("primary", False)  # never sends to an unusable lower
    assert d.state.override_pending
    d = t.at(20, standby=UP)
    assert (d.active, d.switched, d.reason) == ("standby", True, "override")
    assert not d.state.override_pending
    t.override = None  # `set-primary --auto`: a planned switch back, at once
    d = t.at(30)
    assert (d.active, d.reason) == ("primary", "override")


def test_failure_reselect_keeps_standby_until_it_fails() -> None:
    t = Timeline(PolicyConfig(reselect="failure"))
    t.at(0, standby=UP)
    assert t.at(10, primary=UP).active == "standby"
    assert t.at(20).active == "standby"
    d = t.at(30, standby=ADMIN_DOWN)
    assert (d.active, d.reason) == ("primary", "standby_down")


def test_better_reselect_follows_speed() -> None:
    t = Timeline(PolicyConfig(reselect="better"))
    t.at(0, standby=LowerState(True, True, True, 10_000))
    d = t.at(10, primary=LowerState(True, True, True, 10_000))
    assert d.active == "standby"  # equal is not better
    d = t.at(20, primary=LowerState(True, True, True, 25_000))
    assert (d.active, d.reason) == ("primary", "reselect")


def test_policy_config_checks_and_from_settings() -> None:
    with pytest.raises(ValueError):
        PolicyConfig(updelay_ms=-1)
    with pytest.raises(ValueError):
        PolicyConfig(reselect="sometimes")  # type: ignore[arg-type]
    settings_ = PolicySettings(reselect="better", updelay_ms=5, downdelay_ms=7)
    assert PolicyConfig.from_settings(settings_) == PolicyConfig("better", 5, 7)


# --- random event sequences -------------------------------------------------------------------

lower_states = st.one_of(
    st.none(),
    st.builds(
        LowerState,
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.sampled_from([None, 0, 1_000, 10_000, 25_000]),
    ),
)
steps = st.lists(
    st.tuples(
        st.integers(0, 400),  # time advance
        st.dictionaries(st.sampled_from(ROLES), lower_states),  # changes
        st.sampled_from((*OVERRIDES, "keep")),
    ),
    max_size=40,
)
configs = st.builds(
    PolicyConfig,
    st.sampled_from(RESELECTS),
    st.sampled_from([0, 50, 100, 250]),
    st.sampled_from([0, 50, 100, 250]),
)


@settings(max_examples=300, deadline=None)
@given(cfg=configs, events=steps)
def test_random_sequences_keep_invariants(
    cfg: PolicyConfig,
    events: list[tuple[int, dict[Role, LowerState | None], Role | Literal["keep"] | None]],
) -> None:
    state, lowers, now = GroupPolicyState(), dict[Role, LowerState](), 0
    override: Role | None = None
    for dt, change, new_override in events:
        now += dt
        for role, lower in change.items():
            if lower is None:
                lowers.pop(role, None)
            else:
                lowers[role] = lower
        if new_override != "keep":
            override = new_override
        d = decide(state, lowers, override, cfg, now)
        up = d.state.up_roles()
        assert d.active is None or d.state.role(d.active).up
        assert (d.active is None) == (not up)
        assert d.carrier == bool(up)
        assert d.switched == (d.active != state.active)
        assert bool(d.reason) == d.switched
        assert d.next_deadline_ms is None or d.next_deadline_ms > now
        for role in ROLES:
            lower, rs = lowers.get(role), d.state.role(role)
            if lower is None or not lower.present:
                assert not rs.up  # a removed lower is down at once
            if rs.up != usable(lower):
                # disagreeing with the raw state only while a hold-down runs
                assert rs.deadline_ms is not None
                assert rs.deadline_ms <= now + (cfg.downdelay_ms if rs.up else cfg.updelay_ms)
            if cfg.updelay_ms == cfg.downdelay_ms == 0:
                assert rs.up == usable(lower)
        # nothing pending: asking again later changes nothing
        if d.next_deadline_ms is None:
            again = decide(d.state, lowers, override, cfg, now + 10_000)
            assert again.state == d.state and not again.switched
        # at the deadline the due hold-down resolves
        else:
            due = decide(d.state, lowers, override, cfg, d.next_deadline_ms)
            assert due.next_deadline_ms is None or due.next_deadline_ms > d.next_deadline_ms
        state = d.state


# -- resume: the state an agent starts from when it adopts a running datapath --------------
@pytest.mark.parametrize("reselect", ["always", "better", "failure"])
@pytest.mark.parametrize("active", ["primary", "standby"])
def test_resume_keeps_a_usable_active_lower(reselect: Reselect, active: Role) -> None:
    cfg = PolicyConfig(reselect, updelay_ms=500)
    lowers = lowers_of(primary=UP, standby=UP)
    s = resume(active, None, lowers, cfg, 1000)
    d = decide(s, lowers, None, cfg, 1000)
    assert (d.active, d.switched) == (active, False)
    if active == "standby":  # the other one waits a full updelay from the restart
        d = decide(d.state, lowers, None, cfg, 1499)
        assert d.active == "standby"
        d = decide(d.state, lowers, None, cfg, 1500)
        want = "primary" if reselect == "always" else "standby"
        assert d.active == want and d.reason == ("primary_up" if d.switched else "")


def test_resume_a_lost_active_lower_is_a_switch_with_its_reason() -> None:
    cfg = PolicyConfig()
    down = LowerState(present=True, admin_up=True, carrier=False)
    s = resume("primary", None, lowers_of(primary=down, standby=UP), cfg, 0)
    d = decide(s, lowers_of(primary=down, standby=UP), None, cfg, 0)
    assert (d.active, d.reason) == ("standby", "primary_down")
    s = resume(None, None, lowers_of(standby=UP), cfg, 0)  # nothing was active
    d = decide(s, lowers_of(standby=UP), None, cfg, 0)
    assert (d.active, d.reason) == ("standby", "standby_up")


def test_resume_keeps_an_override_that_still_waits_for_its_lower() -> None:
    cfg = PolicyConfig("failure", updelay_ms=100)
    lowers = lowers_of(primary=UP, standby=UP)
    s = resume("primary", "standby", lowers, cfg, 0)
    assert s.override_pending
    d = decide(s, lowers, "standby", cfg, 100)  # after its updelay, despite `failure`
    assert (d.active, d.reason) == ("standby", "override")

"""The typed status snapshot: JSON both ways, the keys the socket always had, the generated
schema document, and the agent's snapshot staying frozen while the agent goes on."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bpfailover import policy
from bpfailover.agent import status as agent_status
from bpfailover.datapath import counters
from bpfailover.model import config as configmod
from bpfailover.model.groups import Group, Lower, Switch
from bpfailover.model.status import AgentStatus, LowerCounters, StatusFormatError, schema_markdown
from bpfailover.ops import cli, doctor, metrics
from tests.statusutil import agent, counted, group

ROOT = Path(__file__).resolve().parent.parent


# ---- JSON ---------------------------------------------------------------------------------------


def test_json_round_trip_through_text() -> None:
    st = counted(agent(group(), dataclasses.replace(group("standby"), name="ens20", gid=1)))
    back = AgentStatus.from_json(json.loads(json.dumps(st.to_json())))
    assert back == st
    assert back.group("ens20") is not None and back.group("ens20").active == "standby"  # type: ignore[union-attr]
    uncounted = agent(group())  # the frozen snapshot: no counters, and none invented
    assert AgentStatus.from_json(uncounted.to_json()) == uncounted


def test_socket_json_keeps_its_keys() -> None:
    """The control socket's status object: the keys every earlier agent sent (+ gid, errors)."""
    out = counted(agent(group())).to_json()
    assert list(out) == ["pid", "started_at", "scheduling", "datapath_check", "groups", "errors"]
    g = out["groups"]["ens10"]
    assert list(g) == [
        "device",
        "gid",
        "ifindex",
        "mac",
        "mtu",
        "carrier",
        "active",
        "active_lower",
        "override",
        "reselect",
        "inactive_rx",
        "rx_path",
        "lowers",
        "switches",
        "last_switch",
        "drops",
        "tx_path",
        "speed_mbps",
        "mac_restored",
        "vlans",
        "waiting_for_udev",
        "datapath_fallback",
        "single_since",
        "redundancy_grace_s",
    ]
    assert out["datapath_check"] == "on"
    assert g["datapath_fallback"] == [
        {"from": "primary", "to": "standby", "tx_packets": 3, "rx_packets": 1},
        {"from": "standby", "to": "primary", "tx_packets": 0, "rx_packets": 0},
    ]
    assert g["lowers"][0] == {
        "name": "ens11",
        "ifindex": 3,
        "role": "primary",
        "usable": True,
        "admin_up": True,
        "carrier": True,
        "mtu": 1500,
        "active": True,
        "tx_packets": 7,
        "tx_bytes": 700,
        "rx_packets": 9,
        "rx_bytes": 900,
        "speed_mbps": None,
        "duplex": None,
    }
    assert g["last_switch"] == {
        "time": 1.7e9,
        "from": None,
        "to": "ens11",
        "reason": "initial",
        "latency_s": 0.0001,
    }
    assert g["drops"] == {"tc_egress/no_lower": 2, "xdp/inactive": 0}


def test_reply_of_an_older_agent_parses() -> None:
    old = counted(agent(group())).to_json()
    del old["groups"]["ens10"]["gid"]  # agents before the snapshot did not send it
    del old["scheduling"]
    st = AgentStatus.from_json(old)
    g = st.groups[0]
    assert g.gid is None and st.scheduling == "" and g.lowers[0].counters is not None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("pid"), "status: missing key 'pid'"),
        (lambda d: d["groups"]["ens10"]["lowers"][1].pop("role"), "ens10.lowers[1]: missing"),
        (lambda d: d["groups"]["ens10"].update(mtu="big"), "ens10.mtu: expected int, got str"),
        (lambda d: d["groups"]["ens10"].update(active="eth0"), "ens10.active: 'eth0' is not"),
        (lambda d: d["groups"]["ens10"].update(carrier=1), "ens10.carrier: expected bool"),
        (lambda d: d.update(groups=[]), "status.groups: expected an object by name"),
        (lambda d: d["groups"]["ens10"]["switches"].update(x=None), "switches.x: expected int"),
    ],
)
def test_malformed_reply_names_the_key(mutate: Any, message: str) -> None:
    data = counted(agent(group())).to_json()
    mutate(data)
    with pytest.raises(StatusFormatError) as e:
        AgentStatus.from_json(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_snapshot_is_frozen() -> None:
    st = agent(group())
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.groups[0].active = "standby"  # type: ignore[misc]


# ---- the schema document ----------------------------------------------------------------------


def test_schema_doc_is_the_generators_output() -> None:
    """docs/status-schema.md is generated: regenerate with
    `python -m bpfailover.model.status --schema-md > docs/status-schema.md`."""
    assert (ROOT / "docs/status-schema.md").read_text() == schema_markdown()


def test_schema_doc_lists_every_key_of_both_documents() -> None:
    doc = schema_markdown()
    st = counted(agent(group()))
    socket_keys = set(st.to_json()) | set(st.to_json()["groups"]["ens10"])
    cli_doc = cli.status_document(st)
    cli_keys = set(cli_doc) | set(cli_doc["agent"]) | set(cli_doc["groups"][0])
    lw = cli_doc["groups"][0]["lowers"][0]
    for key in socket_keys | cli_keys | set(lw) | set(cli_doc["groups"][0]["last_switch"]):
        assert f"`{key}`" in doc, key


def test_help_names_the_schema_doc_that_exists(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    assert "docs/status-schema.md" in capsys.readouterr().out
    assert (ROOT / "docs/status-schema.md").is_file()


# ---- switch reasons ------------------------------------------------------------------------------


def test_every_reason_the_policy_gives_is_a_known_reason() -> None:
    """Metrics export SWITCH_REASONS from 0 and the schema lists them: the policy gives no
    other (every lower state, override and previous active, with and without a hold-down)."""
    seen = set()
    states = [
        policy.LowerState(present=True, admin_up=a, carrier=c)
        for a, c in itertools.product((True, False), repeat=2)
    ]
    roles: list[policy.Role | None] = [None, "primary", "standby"]
    for p, s, override, act, started, delay in itertools.product(
        [None, *states], [None, *states], roles, roles, (True, False), (0, 100)
    ):
        lowers = {r: st for r, st in (("primary", p), ("standby", s)) if st is not None}
        prev = policy.GroupPolicyState(
            primary=policy.RoleState(up=act == "primary"),
            standby=policy.RoleState(up=act == "standby"),
            active=act,
            override=None,
            started=started,
        )
        for reselect in ("always", "failure"):
            cfg = policy.PolicyConfig(reselect, delay, delay)  # type: ignore[arg-type]
            d = policy.decide(prev, lowers, override, cfg, 1000)
            if d.switched:
                seen.add(d.reason)
    assert seen <= set(policy.SWITCH_REASONS)
    assert seen >= {"initial", "override", "no_lower", "primary_down", "standby_up"}


# ---- the agent's snapshot ------------------------------------------------------------------------


def _agent_group() -> Group:
    gcfg = configmod.Group(name="ens10", standby="ens10nsby")
    grp = Group(
        cfg=gcfg,
        gid=3,
        mac="52:54:00:00:12:53",
        master=5,
        peer=6,
        pcfg=policy.PolicyConfig.from_settings(gcfg.policy),
        mtu=1500,
        carrier=True,
        active="primary",
    )
    grp.lowers["primary"] = Lower("primary", 3, "ens11", True, True, 1500)
    grp.lowers["standby"] = Lower("standby", 4, "ens10nsby", True, False, 1500)
    grp.last_switch = Switch(1.7e9, None, "primary", None, "ens11", "initial", 0.00002)
    grp.switches["initial"] += 1
    return grp


def test_agent_snapshot_of_its_groups_stays_as_built() -> None:
    grp = _agent_group()
    st = agent_status.snapshot([grp], 1.6e9, "other")
    (g,) = st.groups
    assert (g.name, g.gid, g.ifindex, g.active, g.active_lower) == (
        "ens10",
        3,
        5,
        "primary",
        "ens11",
    )
    assert [(lw.role, lw.usable, lw.active) for lw in g.lowers] == [
        ("primary", True, True),
        ("standby", False, False),
    ]
    assert g.last_switch is not None and g.last_switch.to_lower == "ens11"
    assert AgentStatus.from_json(json.loads(json.dumps(st.to_json()))) == st
    # the agent goes on changing its groups: the published snapshot does not move
    grp.switches["primary_down"] += 1
    grp.active = "standby"
    grp.lowers.pop("primary")
    assert g.switches == {"initial": 1} and g.active == "primary" and len(g.lowers) == 2
    with pytest.raises(TypeError):
        g.switches["initial"] = 5  # type: ignore[index]
    assert g.lowers[0].counters is None and g.drops is None  # counters are read, not frozen


def test_counters_read_from_the_datapath_at_request_time() -> None:
    class Counter:
        def __init__(self, packets: int) -> None:
            self.packets, self.bytes = packets, packets * 100

    reads: list[tuple[int, ...]] = []

    def stats(gid: int, slot: int, direction: int) -> Counter:
        reads.append((gid, slot, direction))
        return Counter(10 * slot + direction)

    dp = SimpleNamespace(
        L=SimpleNamespace(
            FO_DIR_TX=0,
            FO_DIR_RX=1,
            hooks=("tc_egress", "tc_ingress", "xdp"),
            drop_reasons=("no_lower", "inactive_rx", "loop"),
        ),
        stats=stats,
        drops=lambda gid, h, r: Counter(5),
        fallback_summary=lambda gid: [
            {"from": "primary", "to": "standby", "tx_packets": 4, "rx_packets": 0}
        ],
        datapath_check=lambda: "refused",
    )
    st = agent_status.snapshot([_agent_group()], 1.6e9, "other")
    assert not reads
    out = counters.read(st, dp)  # type: ignore[arg-type]
    prim = out.groups[0].lower("primary")
    assert prim is not None and prim.counters == LowerCounters(
        tx_packets=20, tx_bytes=2000, rx_packets=21, rx_bytes=2100
    )
    assert out.groups[0].drops == {"tc_egress/no_lower": 5, "tc_ingress/loop": 5}
    assert out.datapath_check == "refused" and st.datapath_check is None
    (fb,) = out.groups[0].datapath_fallback or ()
    assert (fb.from_role, fb.to_role, fb.tx_packets) == ("primary", "standby", 4)
    assert {r[0] for r in reads} == {3} and st.groups[0].lowers[0].counters is None


# ---- the consumers: failoverctl, doctor, metrics ----------------------------------------------


def test_cli_document_from_the_snapshot() -> None:
    doc = cli.status_document(counted(agent(group("standby", True, True, "standby"))))
    assert doc["schema"] == 1 and doc["agent"] == {
        "pid": 42,
        "started_at": 1.7e9,
        "scheduling": "fifo:10",
        "datapath_check": "on",
    }
    (g,) = doc["groups"]
    assert "gid" not in g and "rx_path" not in g and g["group"] == "ens10"
    assert "override" in g["degraded"][0]
    assert g["lowers"][1]["tx_packets"] == 7


def test_doctor_takes_the_lowers_from_the_agent() -> None:
    def link(ifindex: int, name: str) -> doctor.LinkInfo:
        return doctor.LinkInfo(ifindex, name, "52:54:00:00:12:53")

    links = {3: link(3, "ens11"), 4: link(4, "ens10nsby")}
    found = doctor.find_lowers(None, links, agent(group()))
    assert [(lw.group, lw.role, lw.link.name) for lw in found] == [
        ("ens10", "standby", "ens10nsby"),
        ("ens10", "primary", "ens11"),
    ]


def test_metrics_read_the_latest_snapshot() -> None:
    class Counter:
        packets, bytes = 1, 100

    dp = SimpleNamespace(
        L=SimpleNamespace(
            FO_DIR_TX=0,
            FO_DIR_RX=1,
            hooks=("tc_egress", "tc_ingress", "xdp"),
            drop_reasons=("no_lower", "inactive_rx", "loop"),
            names=lambda prefix: ("off", "on", "refused", "probe_failed", "mismatch"),
        ),
        active=lambda gid: 2,  # the primary's slot
        stats=lambda gid, slot, d: Counter(),
        drops=lambda gid, h, r: Counter(),
        fallback_summary=lambda gid: [
            {"from": "primary", "to": "standby", "tx_packets": 6, "rx_packets": 0}
        ],
        datapath_check=lambda: "on",
    )
    src = SimpleNamespace(snapshot=agent(group()), dp=dp)
    col = metrics.FailoverCollector(src)  # type: ignore[arg-type]

    def samples() -> dict[tuple[str, tuple[str, ...]], float]:
        return {
            (s.name, tuple(s.labels.values())): s.value for m in col.collect() for s in m.samples
        }

    first = samples()
    (errors,) = [m for m in col.collect() if m.name == "failover_agent_errors"]
    listed = errors.documentation.rsplit("by where: ", 1)[1]
    assert set(listed.split(", ")) == set(metrics.ERROR_PLACES) >= {"doorbell"}, listed
    assert first[("failover_switches_total", ("ens10", "initial"))] == 1
    assert first[("failover_switches_total", ("ens10", "primary_down"))] == 0
    assert first[("failover_switch_duration_seconds_count", ("ens10",))] == 1
    assert first[("failover_lower_up", ("ens10", "ens10nsby", "standby"))] == 1
    key = ("ens10", "primary", "standby", "transmit")
    assert first[("failover_datapath_fallback_packets_total", key)] == 6
    # every state exported, the current one 1: an alert on `{state="on"} == 0` can fire
    checks = {k[1][0]: v for k, v in first.items() if k[0] == "failover_datapath_check"}
    assert checks == {"on": 1, "off": 0, "refused": 0, "probe_failed": 0, "mismatch": 0}
    # the agent swaps a new snapshot in: the next scrape shows it, nothing copied before
    src.snapshot = agent(
        dataclasses.replace(
            group("standby", False, True), switches={"initial": 1, "primary_down": 1}
        )
    )
    second = samples()
    assert second[("failover_switches_total", ("ens10", "primary_down"))] == 1
    assert second[("failover_lower_up", ("ens10", "ens11", "primary"))] == 0

"""config: every broken input gives one line naming the key; good input gets sane defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfailover.model.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    StandbyDriver,
    changes,
    config_path,
    load_config,
    parse_config,
    validate_config,
)

G = "groups:\n  - name: ens10\n    standby: ens10nsby\n"  # a valid one-group start


def group(**extra: str) -> str:
    """YAML of one group with extra `key: value` lines."""
    return G + "".join(f"    {k}: {v}\n" for k, v in extra.items())


def two_groups(first: str, second: str) -> str:
    return f"groups:\n  - {first}\n  - {second}\n"


ALIAS_BOMB = "groups:\n- &a [{name: e, standby: s},x,x,x,x,x,x,x,x]\n" + "".join(
    f"- &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)

# (id, YAML text, the path (or line) that must appear, a word of the message)
BROKEN: list[tuple[str, str, str, str]] = [
    # wrong types
    ("groups-not-list", "groups: 5", "groups: ", "list"),
    ("group-not-mapping", "groups: [ens10]", "groups[0]: ", "mapping"),
    ("name-int", "groups: [{name: 12, standby: s}]", "groups[0].name: ", "string"),
    ("name-bool", "groups: [{name: yes, standby: s}]", "groups[0].name: ", "string"),
    ("standby-list", group().replace("ens10nsby", "[a]"), "groups[0].standby: ", "string"),
    ("standby-driver-int", group().replace("ens10nsby", "{driver: 1}"), "standby.driver: ", ""),
    ("policy-str", group(policy="always"), "groups[0].policy: ", "mapping"),
    ("updelay-str", group(policy="{updelay_ms: '5'}"), "groups[0].policy.updelay_ms: ", ""),
    ("updelay-float", group(policy="{updelay_ms: 1.5}"), "groups[0].policy.updelay_ms: ", ""),
    ("garp-bool", group(notify="{garp_count: true}"), "groups[0].notify.garp_count: ", ""),
    ("reselect", group(policy="{reselect: sometimes}"), "groups[0].policy.reselect: ", "better"),
    ("inactive-rx", group(inactive_rx="pass"), "groups[0].inactive_rx: ", "drop_standby"),
    ("inactive-rx-int", group(inactive_rx="1"), "groups[0].inactive_rx: ", "drop_inactive"),
    ("rx-path", group(rx_path="dpdk"), "groups[0].rx_path: ", "tc, xdp"),
    ("listen-int", G + "metrics: {listen: 9617}", "metrics.listen: ", "string"),
    ("log-level", G + "log: {level: verbose}", "log.level: ", "warning"),
    ("bpffs-int", G + "bpffs: 5", "bpffs: ", "string"),
    ("bpffs-relative", G + "bpffs: sys/fs/bpf", "bpffs: ", "absolute"),
    ("socket-relative", G + "control: {socket: ctl.sock}", "control.socket: ", "absolute"),
    ("bpffs-dotdot", G + "bpffs: /sys/fs/bpf/../../../etc", "bpffs: ", "'..'"),
    ("bpffs-dot", G + "bpffs: /sys/fs/bpf/./x", "bpffs: ", "normalised"),
    ("bpffs-slashes", G + "bpffs: //sys/fs/bpf/x", "bpffs: ", "'//'"),
    ("bpffs-trailing", G + "bpffs: /sys/fs/bpf/x/", "bpffs: ", "trailing '/'"),
    ("socket-dotdot", G + "control: {socket: /run/../tmp/c.sock}", "control.socket: ", "'..'"),
    ("socket-slashes", G + "control: {socket: /run//c.sock}", "control.socket: ", "'//'"),
    ("socket-too-long", G + f"control: {{socket: /{'x' * 120}}}", "control.socket: ", "107"),
    ("unix-group", G + "control: {group: 'two words'}", "control.group: ", "group"),
    # unknown keys at several depths
    ("unknown-top", G + "extra: 1", "extra: ", "unknown key"),
    ("unknown-group", group(prio="1"), "groups[0].prio: ", "unknown key"),
    ("unknown-policy", group(policy="{flap: 1}"), "groups[0].policy.flap: ", "unknown key"),
    ("unknown-notify", group(notify="{count: 1}"), "groups[0].notify.count: ", "unknown key"),
    ("unknown-standby", group().replace("ens10nsby", "{drivr: x}"), "standby.drivr: ", "unknown"),
    ("unknown-metrics", G + "metrics: {port: 1}", "metrics.port: ", "unknown key"),
    ("unknown-log", G + "log: {file: /x}", "log.file: ", "unknown key"),
    ("non-string-key", G + "1: 2", "config.yaml: ", "strings"),
    # missing
    ("no-groups", "metrics: {listen: null}", "groups: ", "required"),
    ("no-name", "groups: [{standby: s}]", "groups[0].name: ", "required"),
    ("no-standby", "groups: [{name: ens10}]", "groups[0].standby: ", "required"),
    ("empty-groups", "groups: []", "groups: ", "at least one"),
    # relations
    (
        "dup-name",
        two_groups("{name: ens10, standby: a}", "{name: ens10, standby: b}"),
        "groups[1].name: ",
        "duplicate",
    ),
    ("standby-is-primary", group(primary="ens10nsby"), "groups[0].primary: ", "standby"),
    ("standby-is-name", group().replace("ens10nsby", "ens10"), "groups[0].standby: ", "failover"),
    ("primary-is-name", group(primary="ens10"), "groups[0].primary: ", "failover"),
    (
        "lower-in-two-groups",
        two_groups("{name: ens10, standby: a, primary: p}", "{name: ens11, standby: p}"),
        "groups[1].standby: ",
        "groups[0].primary",
    ),
    (
        "lower-is-other-failover",
        two_groups("{name: ens10, standby: a}", "{name: ens11, standby: ens10}"),
        "groups[1].standby: ",
        "failover",
    ),
    (
        "dup-mac",
        two_groups(
            "{name: ens10, standby: a, mac: '52:54:00:00:12:53'}",
            "{name: ens11, standby: b, mac: '52:54:00:00:12:53'}",
        ),
        "groups[1].mac: ",
        "already",
    ),
    (
        "two-driver-standbys",
        two_groups(
            "{name: a1, standby: {driver: virtio_net}}", "{name: a2, standby: {driver: virtio_net}}"
        ),
        "groups[1].standby: ",
        "mac",
    ),
    # MACs
    ("mac-multicast", group(mac="'01:00:5e:00:00:01'"), "groups[0].mac: ", "unicast"),
    ("mac-broadcast", group(mac="'ff:ff:ff:ff:ff:ff'"), "groups[0].mac: ", "unicast"),
    ("mac-zero", group(mac="'00:00:00:00:00:00'"), "groups[0].mac: ", "zero"),
    ("mac-short", group(mac="'52:54:00:00:12'"), "groups[0].mac: ", "MAC"),
    ("mac-nonhex", group(mac="'52:54:00:00:12:zz'"), "groups[0].mac: ", "MAC"),
    ("mac-dashes", group(mac="52-54-00-00-12-53"), "groups[0].mac: ", "MAC"),
    ("mac-int", group(mac="5"), "groups[0].mac: ", "string"),
    # interface names
    ("name-too-long", group().replace("ens10\n", "abcdefghijklmnop\n"), "groups[0].name: ", "15"),
    ("name-slash", group().replace("ens10\n", "'a/b'\n"), "groups[0].name: ", "interface"),
    ("name-colon", group().replace("ens10\n", "'a:b'\n"), "groups[0].name: ", "interface"),
    ("name-space", group().replace("ens10\n", "'a b'\n"), "groups[0].name: ", "interface"),
    ("name-dot", group().replace("ens10\n", "'.'\n"), "groups[0].name: ", "interface"),
    ("name-dotdot", group().replace("ens10\n", "'..'\n"), "groups[0].name: ", "interface"),
    ("name-empty", group().replace("ens10\n", "''\n"), "groups[0].name: ", "1..15"),
    ("primary-bad", group(primary="'a/b'"), "groups[0].primary: ", "interface"),
    # ranges
    ("updelay-neg", group(policy="{updelay_ms: -1}"), "groups[0].policy.updelay_ms: ", "0..600000"),
    ("downdelay-big", group(policy="{downdelay_ms: 600001}"), "policy.downdelay_ms: ", "0..600000"),
    ("garp-256", group(notify="{garp_count: 256}"), "groups[0].notify.garp_count: ", "0..255"),
    ("garp-interval", group(notify="{garp_interval_ms: 60001}"), "notify.garp_interval_ms: ", ""),
    ("port-0", G + "metrics: {listen: '0.0.0.0:0'}", "metrics.listen: ", "1..65535"),
    ("port-65536", G + "metrics: {listen: '0.0.0.0:65536'}", "metrics.listen: ", "1..65535"),
    (
        "rt-100",
        G + "scheduling: {realtime_priority: 100}",
        "scheduling.realtime_priority: ",
        "0..99",
    ),
    ("rt-neg", G + "scheduling: {realtime_priority: -1}", "scheduling.realtime_priority: ", ""),
    ("rt-str", G + "scheduling: {realtime_priority: high}", "scheduling.realtime_priority: ", ""),
    ("listen-no-port", G + "metrics: {listen: localhost}", "metrics.listen: ", "host:port"),
    ("listen-bad-v6", G + "metrics: {listen: '[zz::1]:9617'}", "metrics.listen: ", "IPv6"),
    ("listen-bare-v6", G + "metrics: {listen: '::1:9617'}", "metrics.listen: ", "brackets"),
    (
        "too-many-groups",
        "groups:\n" + "".join(f"  - {{name: g{i}, standby: s{i}}}\n" for i in range(65)),
        "groups: ",
        "64",
    ),
    # hidden veth peers (name's first 12 bytes + "_fo") colliding with each other or a name
    (
        "peer-collision",
        two_groups("{name: longgroupname1, standby: a}", "{name: longgroupname2, standby: b}"),
        "groups[1].name: ",
        "first 12 bytes",
    ),
    (
        "peer-is-a-group",
        two_groups("{name: ens10, standby: a}", "{name: ens10_fo, standby: b}"),
        "groups[0].name: ",
        "groups[1].name",
    ),
    ("peer-is-itself", "groups: [{name: abcdefghijkl_fo, standby: a}]", "groups[0].name", "own"),
    (
        "peer-is-a-lower",
        "groups: [{name: ens10, standby: ens10_fo}]",
        "groups[0].name: ",
        "groups[0].standby",
    ),
    (
        "peer-multibyte-collision",
        two_groups("{name: éééééé1, standby: a}", "{name: éééééé2, standby: b}"),
        "groups[1].name: ",
        "first 12 bytes",
    ),
    # documents that are not a config at all
    ("empty", "", "config.yaml: ", "empty"),
    ("comment-only", "# nothing here\n", "config.yaml: ", "empty"),
    ("list-at-top", "- a\n- b\n", "config.yaml: ", "mapping"),
    ("scalar-at-top", "hello", "config.yaml: ", "mapping"),
    ("yaml-syntax", G + "    policy: {reselect: [always\n", "line 5", "YAML"),
    ("yaml-tab", G + "\tmetrics: {}\n", "line 4", "YAML"),
    ("yaml-dup-key", G + "bpffs: /a\nbpffs: /b\n", "line 5", "duplicate"),
    ("yaml-python-tag", "groups: !!python/object:os.system {}", "line 1", "YAML"),
    ("yaml-bad-date", G + "bpffs: 2001-13-45", "config.yaml: ", "YAML"),
    ("yaml-deep", "[" * 5000 + "]" * 5000, "config.yaml: ", "deep"),
    ("yaml-self-alias", "groups: &a [*a]", "line 1", "anchor &a: anchors and aliases"),
    ("yaml-anchor", G + "bpffs: &p /sys/fs/bpf/x\n", "line 4", "anchor &p: anchors and aliases"),
    ("yaml-alias", "groups: *g\n", "line 1", "alias *g: anchors and aliases are not allowed"),
    ("yaml-merge", G + "    policy: {<<: *p}\n", "line 4", "alias *p: anchors and aliases"),
    # 325 bytes that expand to 9**9 values when built: refused at the first anchor
    ("yaml-alias-bomb", ALIAS_BOMB, "line 2, column 3", "anchor &a: anchors and aliases"),
]


def assert_one_line(err: ConfigError, *fragments: str) -> None:
    text = str(err)
    assert "\n" not in text and text.startswith("config.yaml: "), text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


@pytest.mark.parametrize(
    ("text", "where", "word"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_broken_config_names_the_key_in_one_line(text: str, where: str, word: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "config.yaml")
    assert_one_line(info.value, where, word)


def test_error_paths_are_exact() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(group(policy="{reselect: sometimes}"), "config.yaml")
    assert str(info.value) == (
        "config.yaml: groups[0].policy.reselect: must be one of always, better, failure"
        " (got 'sometimes'); see docs/config.md"
    )
    assert info.value.path == ("groups", 0, "policy", "reselect")
    with pytest.raises(ConfigError) as info:
        parse_config(group(policy="{flap: 1}"), "config.yaml")
    assert str(info.value) == "config.yaml: groups[0].policy.flap: unknown key; see docs/config.md"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            G + "metrics: {listen: 9617}\n",
            'metrics.listen: must be a string (got 9617): give host:port, e.g. "0.0.0.0:9617"',
        ),
        (
            "groups: [{name: ens10, standby: off}]\n",
            "groups[0].standby: must be a string (got False): YAML reads an unquoted "
            "yes/no/on/off/true/false as a boolean; quote it",
        ),
        (
            "groups: [{name: ens10, standby: ens10nsby, rx_path: on}]\n",
            "groups[0].rx_path: must be one of tc, xdp (got True): YAML reads an unquoted "
            "yes/no/on/off/true/false as a boolean; quote it",
        ),
    ],
)
def test_yaml_traps_get_a_hint(text: str, line: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "config.yaml")
    assert str(info.value) == f"config.yaml: {line}; see docs/config.md"


def test_a_misspelt_key_gets_a_suggestion_instead_of_the_missing_one() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("groups: [{nmae: ens10, standby: s}]", "config.yaml")
    assert str(info.value) == (
        "config.yaml: groups[0].nmae: unknown key (did you mean 'name'?); see docs/config.md"
    )


def test_every_problem_at_once_one_line_each() -> None:
    text = (
        "groups:\n  - name: ens10\n    standby: ens10nsby\n"
        "    policy: {reselect: sometimes, updelay: 5}\n"
        "metrics: {listne: x}\nlog: {levle: debug}\nbpffs: relative\nfrobnicate: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "config.yaml")
    assert str(info.value).splitlines() == [
        "config.yaml: groups[0].policy.reselect: must be one of always, better, failure"
        " (got 'sometimes')",
        "config.yaml: groups[0].policy.updelay: unknown key (did you mean 'updelay_ms'?)",
        "config.yaml: metrics.listne: unknown key (did you mean 'listen'?)",
        "config.yaml: bpffs: must be an absolute path (got 'relative')",
        "config.yaml: log.levle: unknown key (did you mean 'level'?)",
        "config.yaml: frobnicate: unknown key; see docs/config.md",
    ]
    assert len(info.value.problems) == 6


def test_failoverd_prints_every_problem_and_exits_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text("groups: [{name: ens10, standbi: ens10nsby}]\nlog: {level: loud}\n")
    p = subprocess.run(
        [sys.executable, "-m", "bpfailover.agent", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        f"failoverd: {cfg}: groups[0].standbi: unknown key (did you mean 'standby'?)",
        f"failoverd: {cfg}: log.level: must be one of debug, info, warning, error"
        " (got 'loud'); see docs/config.md",
    ]


def test_config_reference_is_generated_from_the_model() -> None:
    """docs/config.md is what the generator prints: regenerate it when a key changes
    (python -m bpfailover.model.config --reference > docs/config.md)."""
    import subprocess
    import sys

    doc = Path(__file__).parent.parent / "docs" / "config.md"
    p = subprocess.run(
        [sys.executable, "-m", "bpfailover.model.config", "--reference"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert p.stdout == doc.read_text(), "docs/config.md is stale: regenerate it"
    # every key of every model, with a meaning
    for line in p.stdout.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"no description: {line}"
    keys = {ln.split("`")[1] for ln in p.stdout.splitlines() if ln.startswith("| `")}
    assert {"groups[].policy.updelay_ms", "log.level", "control.group", "bpffs"} <= keys
    assert len(keys) == 29


def test_minimal_config_defaults() -> None:
    cfg = parse_config(G)
    (g,) = cfg.groups
    assert (g.name, g.standby, g.primary, g.mac) == ("ens10", "ens10nsby", "auto", "auto")
    assert (g.policy.reselect, g.policy.updelay_ms, g.policy.downdelay_ms) == ("always", 0, 0)
    assert (g.notify.garp_count, g.notify.garp_interval_ms) == (1, 200)
    assert (g.inactive_rx, g.rx_path) == ("deliver", "tc")
    assert (g.standby_name, g.primary_name) == ("ens10nsby", None)
    assert cfg.metrics.listen == "127.0.0.1:9617" and cfg.metrics.address == ("127.0.0.1", 9617)
    assert cfg.control.socket == "/run/bpfailover/control.sock" and cfg.control.group is None
    assert cfg.bpffs == "/sys/fs/bpf/bpfailover"
    assert cfg.log.level == "info"
    assert cfg.scheduling.realtime_priority == 10
    assert cfg.group("ens10") is g and cfg.group("nope") is None


def test_full_config_and_normalisation() -> None:
    cfg = parse_config(
        """
groups:
  - name: ens10
    standby: {driver: virtio_net}
    primary: ens11
    mac: 52:54:00:AB:12:53        # unquoted: must stay a string, not YAML 1.1 base 60
    policy: {reselect: better, updelay_ms: 200, downdelay_ms: 600000}
    notify: {garp_count: 0, garp_interval_ms: 60000}
    inactive_rx: drop
    rx_path: xdp
  - name: ens12
    standby: ens12nsby
    mac: 52:54:00:00:12:53
metrics: {listen: "[::1]:9100"}
control: {socket: /run/x.sock, group: netadm}
bpffs: /sys/fs/bpf/other
log: {level: debug}
scheduling: {realtime_priority: 0}
"""
    )
    a, b = cfg.groups
    assert a.standby == StandbyDriver(driver="virtio_net") and a.standby_name is None
    assert a.mac == "52:54:00:ab:12:53" and b.mac == "52:54:00:00:12:53"
    assert a.primary_name == "ens11" and a.policy.downdelay_ms == 600_000
    assert (a.inactive_rx, a.rx_path) == ("drop_inactive", "xdp")  # `drop`: its other name
    assert cfg.metrics.address == ("::1", 9100)
    assert cfg.control.group == "netadm"
    assert cfg.scheduling.realtime_priority == 0


@pytest.mark.parametrize("listen", ['""', "null", "''"])
def test_metrics_can_be_disabled(listen: str) -> None:
    cfg = parse_config(G + f"metrics: {{listen: {listen}}}")
    assert cfg.metrics.listen is None and cfg.metrics.address is None


def test_models_are_immutable() -> None:
    cfg = parse_config(G)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type
        cfg.bpffs = "/x"


def test_to_dict_round_trips() -> None:
    cfg = parse_config(group(mac="'52:54:00:00:12:53'", policy="{reselect: failure}"))
    data = cfg.to_dict()
    assert data["groups"][0]["policy"]["reselect"] == "failure"
    assert parse_config(yaml.safe_dump(data)) == cfg
    assert validate_config(data) == cfg


# --- files and the environment -------------------------------------------------------------------


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(G)
    assert load_config(path).groups[0].name == "ens10"
    assert load_config(str(path)) == load_config(path)


def test_load_config_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(group(policy="{reselect: sometimes}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: groups[0].policy.reselect: ")


@pytest.mark.parametrize(
    ("make", "word"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "cannot read"),
        (lambda p: p.write_bytes(b"groups: \xff\xfe\n"), "UTF-8"),
    ],
    ids=["missing", "directory", "not-utf8"],
)
def test_unreadable_file(tmp_path: Path, make: Any, word: str) -> None:
    path = tmp_path / "config.yaml"
    make(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path)) and word in text


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BPFAILOVER_CONFIG", raising=False)
    assert config_path(None) == DEFAULT_CONFIG_PATH == Path("/etc/bpfailover/config.yaml")
    monkeypatch.setenv("BPFAILOVER_CONFIG", "/tmp/from-env.yaml")
    assert config_path(None) == Path("/tmp/from-env.yaml")
    assert config_path("/tmp/cli.yaml") == Path("/tmp/cli.yaml")  # the command line wins
    monkeypatch.setenv("BPFAILOVER_CONFIG", "")
    assert config_path(None) == DEFAULT_CONFIG_PATH
    assert os.environ["BPFAILOVER_CONFIG"] == ""


# --- fuzzing: only ConfigError may escape --------------------------------------------------------


def assert_lines(e: ConfigError) -> None:
    """One line per problem, each naming the source."""
    lines = str(e).splitlines()
    assert len(lines) == len(e.problems) and all(ln.startswith("config.yaml: ") for ln in lines)


def parse_or_config_error(text: str) -> None:
    try:
        result = parse_config(text, "config.yaml")
    except ConfigError as e:
        assert_lines(e)
    else:
        assert isinstance(result, Config)


fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.text())
def test_fuzz_random_text(text: str) -> None:
    parse_or_config_error(text)


@fuzz
@given(st.text(alphabet=" \n\t-:[]{},#&*!|>'\"0123456789abeflmnoprstuvx._/"))
def test_fuzz_yaml_like_text(text: str) -> None:
    parse_or_config_error(G + text)
    parse_or_config_error(text)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["auto", "ens10", "always", "drop", "xdp", "52:54:00:00:12:53", "/x"]),
)
KEYS = [
    "groups",
    "name",
    "standby",
    "primary",
    "mac",
    "policy",
    "reselect",
    "updelay_ms",
    "notify",
    "garp_count",
    "metrics",
    "listen",
    "control",
    "socket",
    "bpffs",
    "log",
    "level",
    "driver",
    "scheduling",
    "realtime_priority",
]
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=30,
)


@fuzz
@given(st.dictionaries(st.sampled_from(KEYS), trees, max_size=6))
def test_fuzz_random_nested_dicts(data: dict[str, Any]) -> None:
    try:
        validate_config(data, "config.yaml")
    except ConfigError as e:
        assert_lines(e)
    parse_or_config_error(yaml.safe_dump(data))


@fuzz
@given(st.sampled_from(["name", "standby", "primary", "mac", "policy", "notify", "x"]), trees)
def test_fuzz_one_bad_value_in_a_good_group(key: str, value: Any) -> None:
    data: dict[str, Any] = {"groups": [{"name": "ens10", "standby": "ens10nsby", key: value}]}
    try:
        validate_config(data, "config.yaml")
    except ConfigError as e:
        assert_lines(e)
        assert all(ln.startswith("config.yaml: groups[0]") for ln in str(e).splitlines()), e


def test_peer_names_are_cut_in_bytes_and_stay_valid() -> None:
    from bpfailover.model.config import peer_name

    assert peer_name("ens10") == "ens10_fo"
    assert peer_name("abcdefghijklmno") == "abcdefghijkl_fo"  # as before for ASCII
    peer = peer_name("ééééééé")  # 14 bytes: cut at 12 bytes, never inside a character
    assert peer == "éééééé_fo" and len(peer.encode()) <= 15
    cfg = parse_config("groups: [{name: ééééééé, standby: a}]", "config.yaml")
    assert cfg.groups[0].name == "ééééééé"


@pytest.mark.parametrize(
    ("given", "rule"),
    [
        ("deliver", "deliver"),
        ("drop_standby", "drop_standby"),
        ("drop_inactive", "drop_inactive"),
        ("drop", "drop_inactive"),
    ],
)
def test_inactive_rx_rules_and_the_drop_alias(given: str, rule: str) -> None:
    """net_failover's rule and bonding's each under its own name; `drop` stays bonding's.
    The alias is resolved on reading, so a reload from `drop` to `drop_inactive` (or back)
    changes nothing."""
    old = parse_config(G, "a")
    new = parse_config(group(inactive_rx=given), "b")
    assert new.groups[0].inactive_rx == rule
    assert new.to_dict()["groups"][0]["inactive_rx"] == rule
    assert (changes(old, new) == []) == (rule == "deliver")
    same = parse_config(group(inactive_rx=rule), "c")
    assert changes(new, same) == []


def test_inactive_rx_rules_are_the_datapaths() -> None:
    """Each config rule is a FO_IRX_* of bpf/failover.h by name: the value the datapath
    gets (Wiring.setup_group) is looked up by it."""
    from typing import get_args

    from bpfailover.datapath.layout_gen import names
    from bpfailover.model.config import Group

    rules = get_args(Group.model_fields["inactive_rx"].annotation)
    assert set(rules) == set(names("FO_IRX_"))


def test_max_groups_is_the_datapaths() -> None:
    """The config's group limit restates FO_MAX_GROUPS of bpf/failover.h: kept equal here."""
    from bpfailover.datapath.layout_gen import FO_MAX_GROUPS
    from bpfailover.model import config as configmod

    assert configmod.MAX_GROUPS == FO_MAX_GROUPS

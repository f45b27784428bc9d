"""Prometheus for real: the shipped alert rules under promtool, and Debian's prometheus and
prometheus-node-exporter scraping failoverd in the lab's guest namespace through a failover."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpfailover import netns
from bpfailover_lab.topology import Lab
from tests.opsutil import METRICS_PORT, agent_in_lab

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROM_PORT = 9090
NODE_PORT = 9100
KNOWN_METRICS = {
    "failover_build_info",
    "failover_lower_active",
    "failover_lower_up",
    "failover_switches_total",
    "failover_switch_duration_seconds_bucket",
    "failover_last_switch_timestamp_seconds",
    "failover_lower_transmit_packets_total",
    "failover_lower_transmit_bytes_total",
    "failover_lower_receive_packets_total",
    "failover_lower_receive_bytes_total",
    "failover_datapath_drops_total",
    "failover_datapath_attached",
    "failover_lower_speed_mbps",
    "failover_mac_restored_total",
    "failover_datapath_fallback_packets_total",
    "failover_datapath_check",
    "node_network_up",
    "node_network_carrier",
    "node_network_transmit_packets_total",
    "node_network_receive_packets_total",
    "up",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=DEPLOY / "prometheus",
    )


def test_alert_rules_check_and_unit_tests() -> None:
    p = promtool("check", "rules", "alerts.yml")
    assert p.returncode == 0, p.stdout + p.stderr
    p = promtool("test", "rules", "alerts_test.yml")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def documented_lower_join() -> str:
    """The ```promql block of docs/operators.md (the node_exporter join of the lowers)."""
    doc = (DEPLOY.parent / "docs" / "operators.md").read_text()
    (block,) = re.findall(r"^```promql\n(.*?)^```", doc, re.M | re.S)
    return str(block)


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "bpfailover.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    return exprs


def test_dashboard_uses_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for e in exprs:
        names = set(re.findall(r"\b((?:failover|node)_[a-z_]+|up)\b(?=\{)", e))
        assert names and names <= KNOWN_METRICS, (e, names - KNOWN_METRICS)


# ---- a real Prometheus ---------------------------------------------------------------------------


def _spawn(ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(netns.cmd_in(ns, argv), stdout=f, stderr=subprocess.STDOUT)


@contextmanager
def prometheus_stack(lab: Lab, workdir: Path) -> Iterator[None]:
    """prometheus-node-exporter and prometheus on the guest's loopback, 1 s scrapes."""
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "bpfailover",
                "static_configs": [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}],
            },
            {"job_name": "node", "static_configs": [{"targets": [f"127.0.0.1:{NODE_PORT}"]}]},
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    procs = []
    try:
        procs.append(
            _spawn(
                lab.guest,
                [
                    "prometheus-node-exporter",
                    f"--web.listen-address=127.0.0.1:{NODE_PORT}",
                    "--collector.disable-defaults",
                    "--collector.netclass",
                    "--collector.netdev",
                ],
                workdir / "node.log",
            )
        )
        procs.append(
            _spawn(
                lab.guest,
                [
                    "prometheus",
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{PROM_PORT}",
                ],
                workdir / "prometheus.log",
            )
        )
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def api(lab: Lab, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{PROM_PORT}{path}?{urllib.parse.urlencode(params)}"
    with netns.entered(lab.guest), urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query(lab: Lab, q: str) -> list[dict[str, Any]]:
    res: list[dict[str, Any]] = api(lab, "/api/v1/query", query=q)["result"]
    return res


def wait_query(lab: Lab, q: str, what: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            res = query(lab, q)
        except OSError:
            res = []
        if res:
            return res
        time.sleep(0.3)
    raise AssertionError(f"Prometheus never answered {q!r} ({what})")


@pytest.mark.root
def test_real_prometheus_sees_the_failover(lab: Lab, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    # inactive_rx drop: the group counts every drop reason, so every panel has a series
    with (
        agent_in_lab(lab, metrics=True, inactive_rx="drop") as run,
        prometheus_stack(lab, tmp_path),
    ):
        n = lab.names(0)
        dev = f'device="{n.failover}"'
        wait_query(lab, "count(up == 1) == 2", "both targets scraped")
        wait_query(
            lab, f'failover_lower_active{{{dev},lower="{n.primary}"}} == 1', "primary active"
        )
        time.sleep(3)  # a few samples before the switch

        lab.set_far_end(0, "primary", False)  # the VF loses carrier: unplanned failover
        run.wait_active(n.standby)
        wait_query(
            lab, f'failover_lower_active{{{dev},lower="{n.standby}"}} == 1', "standby active"
        )
        res = wait_query(
            lab, f'failover_lower_active{{{dev},lower="{n.primary}"}} == 0', "primary inactive"
        )
        assert len(res) == 1
        exact = query(
            lab,
            f"sum by (device) (max_over_time(failover_switches_total{{{dev}}}[1m])"
            f" - min_over_time(failover_switches_total{{{dev}}}[1m]))",
        )
        assert [float(r["value"][1]) for r in exact] == [1.0]
        inc = query(lab, f"sum by (device) (increase(failover_switches_total{{{dev}}}[1m]))")
        assert len(inc) == 1 and round(float(inc[0]["value"][1])) == 1, inc
        moved = query(lab, f'changes(failover_lower_active{{{dev},lower="{n.primary}"}}[1m])')
        assert float(moved[0]["value"][1]) == 1
        # The device label joins with node_exporter's view of the same netdev.
        joined = query(
            lab,
            f"(failover_lower_active{{{dev}}} == 1) * on (device) "
            f"group_left () node_network_up{{{dev}}}",
        )
        assert len(joined) == 1, joined
        assert joined[0]["metric"]["lower"] == n.standby
        assert joined[0]["metric"]["device"] == n.failover
        assert float(joined[0]["value"][1]) == 1
        # The lowers join node_exporter through label_replace: the query of
        # docs/operators.md, verbatim, gives one row per lower with its group and role.
        wait_query(lab, f'node_network_carrier{{device="{n.primary}"}} == 0', "VF carrier scraped")
        rows = query(lab, documented_lower_join())
        got = sorted(
            (r["metric"]["device"], r["metric"]["failover"], r["metric"]["role"], r["value"][1])
            for r in rows
        )
        assert got == [
            (n.standby, n.failover, "standby", "1"),
            (n.primary, n.failover, "primary", "0"),
        ]

        # The shipped rules load and evaluate; one switch pages nobody.
        groups = api(lab, "/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        shipped = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
        want = sorted(r["alert"] for g in shipped["groups"] for r in g["rules"])
        assert sorted(r["name"] for r in rules) == want, rules
        assert all(r["health"] == "ok" for r in rules), rules
        firing = [
            a
            for a in api(lab, "/api/v1/alerts")["alerts"]
            if a["labels"].get("severity") == "page" and a["state"] == "firing"
        ]
        assert firing == []
        # Every dashboard query is valid PromQL and finds data: at least one series, each
        # with a number.  The one row that shows "no lower active" must be empty here.
        for e in dashboard_exprs():
            q = e.replace("$instance", ".*").replace("$device", ".*").replace("$host", ".*")
            q = q.replace("$__rate_interval", "1m")
            res = api(lab, "/api/v1/query", query=q)["result"]  # or the assert says why
            if 'role="none"' in e:
                assert res == [], (e, res)
                continue
            values = [float(r["value"][1]) for r in res]
            assert values and not any(math.isnan(v) for v in values), (e, res)


@pytest.mark.root
def test_prometheus_binaries_present() -> None:
    for tool in ("prometheus", "promtool", "prometheus-node-exporter"):
        assert shutil.which(tool), f"{tool} missing: `make setup` installs it"

"""The Prometheus exporter: scraped over HTTP, parsed with prometheus_client's parser,
checked against the lowers' own kernel counters and the agent's switch events."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpfailover import netns
from bpfailover.ops import metrics
from bpfailover_lab import traffic
from bpfailover_lab.topology import Lab
from tests.labutil import link_stats
from tests.opsutil import METRICS_PORT, agent_in_lab, one, pick, scrape, scrape_text

# ---- no root needed --------------------------------------------------------------------------


def test_histogram_is_cumulative() -> None:
    h = metrics.Histogram()
    for v in (0.00003, 0.0002, 0.0002, 0.003, 7.0):
        h.observe(v)
    b = dict(h.buckets())
    assert b["5e-05"] == 1 and b["0.00025"] == 3 and b["0.005"] == 4 and b["1.0"] == 4
    assert b["+Inf"] == 5 and abs(h.total - 7.00343) < 1e-9


def test_every_error_place_is_in_the_docs() -> None:
    import re

    places = set(metrics.ERROR_PLACES)
    assert "doorbell" in places
    doc = (Path(__file__).resolve().parents[1] / "docs" / "operators.md").read_text()
    para = doc[doc.index("counted in `failover_agent_errors_total{where}`") :].split("\n\n")[0]
    listed = para.split("{where}`", 1)[1].split("(", 1)[1].split(")", 1)[0]
    assert set(re.findall(r"`(\w+)`", listed)) == places, para


# ---- against a running agent -------------------------------------------------------------------

ALL_NAMES = {
    "failover_build_info",
    "failover_lower_active",
    "failover_lower_up",
    "failover_switches_total",
    "failover_switch_duration_seconds_bucket",
    "failover_switch_duration_seconds_count",
    "failover_switch_duration_seconds_sum",
    "failover_last_switch_timestamp_seconds",
    "failover_lower_transmit_packets_total",
    "failover_lower_transmit_bytes_total",
    "failover_lower_receive_packets_total",
    "failover_lower_receive_bytes_total",
    "failover_datapath_drops_total",
    "failover_datapath_attached",
    "failover_lower_speed_mbps",
    "failover_mac_restored_total",
    "failover_redundancy_lost",
}


def test_only_possible_drop_combinations() -> None:
    from bpfailover.datapath.counters import possible_drops

    assert possible_drops("tc", "deliver") == [("tc_egress", "no_lower"), ("tc_ingress", "loop")]
    assert possible_drops("tc", "drop_standby") == [
        ("tc_egress", "no_lower"),
        ("tc_ingress", "inactive_rx"),
        ("tc_ingress", "loop"),
    ]
    assert possible_drops("xdp", "deliver") == [
        ("tc_egress", "no_lower"),
        ("tc_ingress", "loop"),
        ("xdp", "loop"),
    ]
    every = possible_drops("xdp", "drop_inactive")
    assert ("tc_egress", "inactive_rx") not in every and ("tc_egress", "loop") not in every
    assert len(every) == 5


def test_every_drop_reason_is_explained_in_docs_and_dashboard() -> None:
    import json
    import re

    from bpfailover.datapath.counters import DROP_REASONS, possible_drops
    from bpfailover.datapath.layout_gen import names

    reasons, hooks = names("FO_DROP_"), names("FO_HOOK_")
    assert set(DROP_REASONS) == set(reasons)  # a new reason in failover.h needs words
    combos = {
        c
        for rx in ("tc", "xdp")
        for ir in ("deliver", "drop_standby", "drop_inactive")
        for c in possible_drops(rx, ir)
    }
    assert {h for h, _ in combos} == set(hooks) and {r for _, r in combos} == set(reasons)
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "operators.md").read_text()
    rows = {m for m in re.findall(r"^\| `(\w+)` \| `(\w+)`", doc, re.M)}
    for hook, reason in combos - {("xdp", "inactive_rx"), ("xdp", "loop")}:
        assert (hook, reason) in rows, (hook, reason)
    assert re.search(r"^\| `xdp` \| `inactive_rx`, `loop` \|", doc, re.M)
    dash = json.loads((root / "deploy" / "grafana" / "bpfailover.json").read_text())
    (panel,) = [p for p in dash["panels"] if "failover_datapath_drops_total" in str(p["targets"])]
    legends = [t["legendFormat"] for t in panel["targets"]]
    for reason in reasons:
        (legend,) = [lg for lg in legends if f" {reason}: " in lg]  # the reason, explained
        assert len(legend.split(": ", 1)[1]) > 15, legend
        assert reason in panel["description"]


def _http(port: int, payload: bytes, reset: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_http_side_answers_bad_requests_and_app_failures_in_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In-process: not HTTP -> 400, a failing scrape -> 500, resets: counted; the log gets
    one line per kind now and then, never a traceback."""
    calls: list[str] = []

    def app(environ: dict[str, str], start_response: Any) -> list[bytes]:
        calls.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/boom":
            raise RuntimeError("collector bug")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"up 1\n"]

    server = metrics.HttpServer("127.0.0.1", 0, app)
    port = server.sock.getsockname()[1]
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        with caplog.at_level("INFO", logger="bpfailover.metrics"):
            ok = _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.startswith(b"HTTP/1.0 200 OK\r\n") and ok.endswith(b"\r\n\r\nup 1\n")
            head = _http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200") and head.endswith(b"\r\n\r\n")
            assert _http(port, b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.0 400")
            assert _http(port, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000).startswith(
                b"HTTP/1.0 431"
            )
            for _ in range(5):
                assert _http(port, b"GET /boom HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 500")
            for _ in range(50):
                _http(port, b"", reset=True)
            assert _http(port, b"GET /metrics HTTP/1.1\r\n\r\n").endswith(b"up 1\n")
    finally:
        server.close()
        thread.join(30)
    assert not thread.is_alive()
    assert calls.count("/boom") == 5
    records = [r for r in caplog.records if r.name == "bpfailover.metrics"]
    assert not any(r.exc_info for r in records)
    events = [json.loads(r.getMessage())["event"] for r in records]
    assert events.count("metrics_error") == 1, events  # 5 failures, one line
    assert events.count("metrics_connections_dropped") == 1, events


def _tx_dropped(lab: Lab, dev: str) -> int:
    out = netns.run_in(lab.guest, ["ip", "-j", "-s", "link", "show", "dev", dev]).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["dropped"])


def kernel(lab: Lab, dev: str) -> dict[str, int]:
    return link_stats(lab.guest, dev)


@pytest.mark.root
def test_metrics_names_values_and_kernel_counters(lab: Lab) -> None:
    with agent_in_lab(lab, metrics=True):
        n = lab.names(0)
        dev = n.failover
        s = scrape(lab)
        assert {name for name, _ in s} >= ALL_NAMES
        assert one(s, "failover_build_info", version=metrics.build_version()) == 1
        active = pick(s, "failover_lower_active", device=dev)
        assert sorted(active.values()) == [0, 0, 1]  # primary, standby, none: exactly one 1
        assert one(s, "failover_lower_active", device=dev, lower=n.primary, role="primary") == 1
        assert one(s, "failover_lower_up", device=dev, lower=n.standby, role="standby") == 1
        assert one(s, "failover_datapath_attached", device=dev, hook="tc_egress", lower="") == 1
        ingress = pick(s, "failover_datapath_attached", device=dev, hook="tc_ingress")
        assert {dict(lb)["lower"]: v for lb, v in ingress.items()} == {n.primary: 1, n.standby: 1}
        assert one(s, "failover_switches_total", device=dev, reason="initial") == 1
        assert one(s, "failover_switches_total", device=dev, reason="primary_down") == 0

        # Counters agree with the lowers' own kernel counters, within the traffic sent.
        k0 = {d: kernel(lab, d) for d in (n.primary, n.standby)}
        m0 = scrape(lab)
        rep = traffic.run_stream(
            lab.guest, n.guest_v4, lab.peer, n.peer_v4, rate_pps=2000, duration_s=1.5
        )
        k1 = {d: kernel(lab, d) for d in (n.primary, n.standby)}
        m1 = scrape(lab)
        sent = rep.a_to_b.sent
        assert sent >= 2500 and rep.total_lost == 0

        def delta(name: str, lower: str) -> float:
            return one(m1, name, device=dev, lower=lower) - one(m0, name, device=dev, lower=lower)

        tx = delta("failover_lower_transmit_packets_total", n.primary)
        rx = delta("failover_lower_receive_packets_total", n.primary)
        ktx = k1[n.primary]["tx"] - k0[n.primary]["tx"]
        krx = k1[n.primary]["rx"] - k0[n.primary]["rx"]
        slack = 10  # ARP, GARP/NA sent on the lower directly, not through the datapath
        assert sent <= tx <= sent + slack and abs(tx - ktx) <= slack, (sent, tx, ktx)
        assert rep.b_to_a is not None and rep.b_to_a.sent <= rx <= rep.b_to_a.sent + slack
        assert abs(rx - krx) <= slack, (rx, krx)
        assert delta("failover_lower_transmit_packets_total", n.standby) <= slack
        txb = delta("failover_lower_transmit_bytes_total", n.primary)
        assert txb >= sent * (64 + 28 + 14)  # payload + IP/UDP + Ethernet


@pytest.mark.root
def test_switches_counted_once_with_durations_and_drops(lab: Lab) -> None:
    with agent_in_lab(lab, metrics=True) as run:
        n = lab.names(0)
        dev = n.failover
        # Scrape continuously while switching: the scrapes never disturb the switches.
        stop = threading.Event()
        scrapes: list[int] = []

        def scraper() -> None:
            while not stop.is_set():
                scrapes.append(len(scrape_text(lab)))

        t = threading.Thread(target=scraper)
        t.start()
        try:
            for _ in range(2):
                lab.set_far_end(0, "primary", False)
                run.wait_active(n.standby)
                lab.set_far_end(0, "primary", True)
                run.wait_active(n.primary)
        finally:
            stop.set()
            t.join(10)
        assert len(scrapes) >= 2
        s = scrape(lab)
        events = run.events("switch")
        assert len(events) == 5  # initial + 2 x (down, up)
        by_reason: dict[str, int] = {}
        for e in events:
            by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
        got = {
            dict(lb)["reason"]: v
            for lb, v in pick(s, "failover_switches_total", device=dev).items()
        }
        assert {r: v for r, v in got.items() if v} == by_reason
        assert one(s, "failover_switch_duration_seconds_count", device=dev) == 5
        lat_sum = sum(e["latency_us"] for e in events) / 1e6
        assert abs(one(s, "failover_switch_duration_seconds_sum", device=dev) - lat_sum) < 1e-3
        inf = one(s, "failover_switch_duration_seconds_bucket", device=dev, le="+Inf")
        assert inf == 5
        last = one(s, "failover_last_switch_timestamp_seconds", device=dev)
        assert abs(last - time.time()) < 30

        # No usable lower: lower=none is the one 1, and egress drops are counted.
        lab.set_far_end(0, "primary", False)
        lab.set_far_end(0, "standby", False)
        run.wait_active(None)
        d0 = one(
            scrape(lab),
            "failover_datapath_drops_total",
            device=dev,
            hook="tc_egress",
            reason="no_lower",
        )
        k0 = _tx_dropped(lab, dev)
        with netns.entered(lab.guest), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for _ in range(20):
                u.sendto(b"x", (n.peer_v4, 9))
        kd = _tx_dropped(lab, dev) - k0
        s = scrape(lab)
        assert one(s, "failover_lower_active", device=dev, lower="none", role="none") == 1
        assert sorted(pick(s, "failover_lower_active", device=dev).values()) == [0, 0, 1]
        assert sum(pick(s, "failover_lower_up", device=dev).values()) == 0
        d1 = one(
            s, "failover_datapath_drops_total", device=dev, hook="tc_egress", reason="no_lower"
        )
        # The failover device has no carrier now: with tx_path veth the kernel drops what the
        # stack sends before the datapath sees it (the device's own tx_dropped); with direct
        # (the default), and whatever still reaches the datapath without a lower, no_lower.
        # (Few frames get out at all: while the neighbour entry resolves, the stack queues
        # and drops them itself.)
        assert kd + (d1 - d0) >= 1, (kd, d1 - d0)
        assert one(s, "failover_switches_total", device=dev, reason="no_lower") == 1
        # only what the tc receive path with `inactive_rx: deliver` can count
        hooks = {
            (dict(lb)["hook"], dict(lb)["reason"])
            for lb in pick(s, "failover_datapath_drops_total", device=dev)
        }
        assert hooks == {("tc_egress", "no_lower"), ("tc_ingress", "loop")}


@pytest.mark.root
def test_port_taken_agent_keeps_running(lab: Lab) -> None:
    with agent_in_lab(lab, metrics=False) as run:
        with netns.entered(lab.guest):
            squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            squatter.bind(("127.0.0.1", METRICS_PORT))
            squatter.listen(1)
            run.stop()
            run.config["metrics"]["listen"] = f"127.0.0.1:{METRICS_PORT}"
            run.config_path.write_text(yaml.safe_dump(run.config))
            run.start()  # the agent serves without its exporter, and says so once
            assert run.status()["groups"]
            assert "metrics_unavailable" in run.log_path.read_text()
            lab.set_far_end(0, "primary", False)
            run.wait_active(lab.names(0).standby)
        finally:
            squatter.close()


@pytest.mark.root
def test_default_config_listens_on_loopback_only(lab: Lab) -> None:
    from bpfailover.model.config import MetricsSettings

    assert MetricsSettings().address == ("127.0.0.1", METRICS_PORT)
    with agent_in_lab(lab, metrics=False) as run:
        run.stop()
        del run.config["metrics"]  # the shipped default, not the harness's
        run.config_path.write_text(yaml.safe_dump(run.config))
        run.start()
        # the exporter starts (and logs) just after the control socket answers
        evs = run.wait_for(lambda: run.events("metrics"), what="the metrics event")
        assert evs[-1]["listen"] == f"127.0.0.1:{METRICS_PORT}"
        ss = subprocess.run(
            ["ip", "netns", "exec", lab.guest, "ss", "-Hlntu"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.splitlines()
        local = [line.split()[4] for line in ss]
        assert f"127.0.0.1:{METRICS_PORT}" in local
        assert all(a.startswith(("127.", "[::1]")) for a in local), local
        assert scrape(lab)  # and it serves there


@pytest.mark.root
def test_idle_connections_are_capped_and_time_out(lab: Lab) -> None:
    with agent_in_lab(lab, metrics=True) as run:
        assert run.proc is not None
        tasks = Path(f"/proc/{run.proc.pid}/task")
        before = len(list(tasks.iterdir()))
        idle: list[socket.socket] = []
        try:
            with netns.entered(lab.guest):
                for _ in range(metrics.MAX_PENDING + 16):  # more than may wait
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.connect(("127.0.0.1", METRICS_PORT))
                    idle.append(s)
            time.sleep(0.5)  # let the exporter accept them all
            during = len(list(tasks.iterdir()))
            assert during <= before, (before, during)  # no thread per connection
            # The switch path is not held up by them, nor is a scrape ...
            lab.set_far_end(0, "primary", False)
            run.wait_active(lab.names(0).standby)
            assert "failover_build_info" in scrape_text(lab)
            # ... and the idle ones are cut: the oldest made room, the rest at the deadline.
            for s in idle:
                s.settimeout(6 * metrics.CONN_TIMEOUT_S)
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(1) == b""
        finally:
            for s in idle:
                s.close()


@pytest.mark.root
def test_attached_means_our_programs_not_another_datapaths(lab: Lab, pin_dir: Path) -> None:
    """A second datapath (another pin directory: a second failoverd) puts its transmit
    program on our failover device: failover_datapath_attached says 0, not 1."""
    from pyroute2 import IPRoute

    from bpfailover.datapath import attach
    from bpfailover.datapath.maps import Datapath

    with agent_in_lab(lab, metrics=True, address=False) as run:
        dev = lab.names(0).failover
        assert one(scrape(lab), "failover_datapath_attached", device=dev, hook="tc_egress") == 1
        tx = run.group()["tx_path"]
        with Datapath.open(pin_dir) as other, netns.entered(lab.guest), IPRoute() as ipr:
            ifindex = ipr.link_lookup(ifname=dev if tx == "direct" else attach.peer_name(dev))[0]
            label = f"bpfailover:fo_egress:{other.prog_id('prog_fo_egress')}"
            attach.attach_tc(
                ipr,
                ifindex,
                "egress" if tx == "direct" else "ingress",
                other.prog_fd("prog_fo_egress"),
                label,
            )
        s = scrape(lab)
        assert one(s, "failover_datapath_attached", device=dev, hook="tc_egress") == 0
        for lower in (lab.names(0).primary, lab.names(0).standby):
            assert (
                one(s, "failover_datapath_attached", device=dev, hook="tc_ingress", lower=lower)
                == 1
            )


def _idle_clients(lab: Lab, n: int, stop: threading.Event, reconnects: list[int]) -> None:
    """n clients that connect and say nothing; each one cut is back at once."""
    with netns.entered(lab.guest):
        socks: list[socket.socket] = []
        try:
            while not stop.is_set():
                while len(socks) < n:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.settimeout(2)
                    try:
                        s.connect(("127.0.0.1", METRICS_PORT))
                    except OSError:
                        s.close()
                        break
                    socks.append(s)
                    reconnects[0] += 1
                readable, _, _ = select.select(socks, [], [], 0.1)
                for s in readable:  # closed by the exporter (EOF or reset)
                    socks.remove(s)
                    s.close()
        finally:
            for s in socks:
                s.close()


def _resetting_clients(lab: Lab, per_s: int, stop: threading.Event, sent: list[int]) -> None:
    """per_s connections a second, each closed with a reset (SO_LINGER 0) at once."""
    linger = struct.pack("ii", 1, 0)
    with netns.entered(lab.guest):
        t_next = time.monotonic()
        while not stop.is_set() and sent[0] < 200 * per_s:  # bounded however slow the test
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            with contextlib.suppress(OSError):
                s.connect(("127.0.0.1", METRICS_PORT))
            s.close()
            sent[0] += 1
            t_next += 1 / per_s
            time.sleep(max(0.0, t_next - time.monotonic()))


@pytest.mark.root
def test_scrapes_get_through_idle_and_resetting_clients_and_the_log_stays_json(lab: Lab) -> None:
    """16 idle clients that come back as soon as they are cut, and 200 connections a second
    reset by their client: scrapes still get their answer, a switch meanwhile is logged,
    and the log holds JSON lines only (no traceback per reset connection)."""
    with agent_in_lab(lab, metrics=True) as run:
        n = lab.names(0)
        stop = threading.Event()
        reconnects, resets = [0], [0]
        load = [
            threading.Thread(target=_idle_clients, args=(lab, 16, stop, reconnects)),
            threading.Thread(target=_resetting_clients, args=(lab, 200, stop, resets)),
        ]
        for t in load:
            t.start()
        ok = failed = 0
        try:
            time.sleep(1.0)  # the load is on
            for i in range(30):
                try:
                    ok += "failover_build_info" in scrape_text(lab)
                except OSError:
                    failed += 1
                if i == 10:
                    lab.set_far_end(0, "primary", False)
                    run.wait_active(n.standby)
                time.sleep(0.3)
        finally:
            stop.set()
            for t in load:
                t.join(30)
        print(
            f"scrapes {ok} ok, {failed} failed; {reconnects[0]} idle connects, {resets[0]} resets"
        )
        assert ok + failed == 30
        assert ok > 0.9 * 30, (ok, failed)
        assert resets[0] >= 1000 and reconnects[0] >= 16  # the load was there
        assert [e["reason"] for e in run.events("switch")][-1] == "primary_down"
        lines = run.log_path.read_text(errors="replace").splitlines()
        bad = [line for line in lines if not _is_json_object(line)]
        assert not bad, bad[:5]
        dropped = run.events("metrics_connections_dropped")
        assert len(dropped) <= 2, dropped  # one line now and then, not one per connection


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False

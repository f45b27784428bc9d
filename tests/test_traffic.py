"""The UDP stream tool: stats from synthetic arrivals, loopback runs, and the lab baseline path."""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bpfailover_lab import cli as labmod
from bpfailover_lab import traffic
from bpfailover_lab.topology import Lab
from bpfailover_lab.traffic import DirectionStats, StreamError, StreamReport, analyze

MS = 1_000_000
_seq = itertools.count()


def new_prefix() -> str:
    return f"t{os.getpid() % 10000}t{next(_seq)}"


def free_port() -> int:
    # Loopback streams share the host netns with whatever else runs: pick an unused port.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- stats, no root --------------------------------------------------------------------------


def test_analyze_clean_stream() -> None:
    t0 = 1_000 * MS
    arr = [(s, t0 + s * MS) for s in range(100)]
    d = analyze(arr, t0, sent=100)
    assert (d.sent, d.received, d.lost, d.duplicates, d.reordered) == (100, 100, 0, 0, 0)
    assert d.max_gap_ms == pytest.approx(1.0)
    assert d.first_arrival_s == 0.0 and d.last_arrival_s == pytest.approx(0.099)


def test_analyze_duplicates_reorder_gap() -> None:
    t0 = 0
    arr = [
        (0, 10 * MS),
        (1, 11 * MS),
        (3, 12 * MS),
        (2, 13 * MS),  # reordered: 2 < 3 seen before
        (2, 14 * MS),  # duplicate, not counted as reordered again
        (4, 15 * MS),
        (9, 115 * MS),  # 100 ms outage after seq 4; 5..8 lost
        (1, 116 * MS),  # late duplicate
    ]
    d = analyze(arr, t0, sent=10)
    assert d.received == 6  # 0 1 2 3 4 9
    assert d.lost == 4
    assert d.duplicates == 2
    assert d.reordered == 1
    assert d.max_gap_ms == pytest.approx(100.0)
    assert d.max_gap_at_s == pytest.approx(0.015)
    assert d.first_arrival_s == pytest.approx(0.010)
    assert d.last_arrival_s == pytest.approx(0.116)


def test_analyze_holes_say_where_loss_fell() -> None:
    arr = [(s, s * MS) for s in range(40) if s not in (0, 5, 6, 7, 20)]
    assert analyze(arr, 0).holes == [[0, 0], [5, 7], [20, 20]]
    many = [(s, s * MS) for s in range(0, 40, 2)]  # every odd seq lost: only the first 8
    assert analyze(many, 0).holes == [[k, k] for k in range(1, 17, 2)]
    assert analyze([], 0).holes == []


def test_analyze_nothing_received() -> None:
    d = analyze([], 0, sent=50)
    assert (d.received, d.lost, d.max_gap_ms, d.first_arrival_s) == (0, 50, 0.0, None)


def test_report_combines_sender_and_receiver() -> None:
    rx = analyze([(0, 1 * MS), (2, 3 * MS)], 0)
    d = DirectionStats.from_dict(json.loads(json.dumps({**rx.__dict__, "extra": 1})))
    d = d.with_sender(sent=4, send_errors=1, send_errnos={"ENETUNREACH": 1})
    assert (d.sent, d.received, d.lost, d.send_errors) == (4, 2, 2, 1)
    rep = StreamReport(d, analyze([], 0, sent=3), a="ga", b="pb", rate_pps=10, duration_s=1)
    assert rep.total_lost == 5
    assert rep.max_gap_ms == pytest.approx(2.0)
    j = json.loads(rep.to_json())
    assert j["total_lost"] == 5 and j["a_to_b"]["send_errnos"] == {"ENETUNREACH": 1}
    table = rep.format()
    assert "ga -> pb" in table and "pb -> ga" in table and len(table.splitlines()) == 4


# ---- real streams over loopback, no root -----------------------------------------------------


def test_loopback_stream() -> None:
    rep = traffic.run_stream(
        None, "127.0.0.1", None, "127.0.0.2", rate_pps=1000, duration_s=0.5, port=free_port()
    )
    for _, d in rep.directions:
        assert d.sent == 500 and d.received == 500 and d.lost == 0 and d.duplicates == 0


def test_one_way_stream() -> None:
    rep = traffic.run_stream(
        None,
        "127.0.0.1",
        None,
        "127.0.0.3",
        rate_pps=500,
        duration_s=0.3,
        port=free_port(),
        both_ways=False,
    )
    assert rep.b_to_a is None and rep.a_to_b.sent == 150 and rep.a_to_b.lost == 0


def test_endpoints_stop_when_coordinator_goes_away() -> None:
    h = traffic.start_stream(
        None, "127.0.0.1", None, "127.0.0.2", rate_pps=100, duration_s=30, port=free_port()
    )
    try:
        t = time.monotonic()
        for side in h.sides:  # what a dying coordinator looks like to an endpoint
            assert side.proc.stdin is not None
            side.proc.stdin.close()
        for side in h.sides:
            side.proc.wait(timeout=5)
        assert time.monotonic() - t < 5
    finally:
        h.kill()


def test_stop_line_ends_sending_at_once_and_receiving_a_linger_later() -> None:
    """`STOP` on the control channel: a stream as long as something else takes; everything
    sent up to then is received (the receiver drains its socket after the linger)."""
    port = free_port()
    rx = traffic.open_socket("127.0.0.2", port)
    tx = traffic.open_socket("127.0.0.1", port)
    r_fd, w_fd = os.pipe()
    control = os.fdopen(r_fd, "r")
    result: list[traffic.Paced] = []
    t0 = time.monotonic_ns()
    th = threading.Thread(
        target=lambda: result.append(
            traffic.paced(tx, ("127.0.0.2", port), 7, 200, 60.0, 0.2, 64, t0, control)
        )
    )
    th.start()
    try:
        while not result and time.monotonic_ns() - t0 < 0.3e9:
            time.sleep(0.05)
        os.write(w_fd, b"STOP\n")
        th.join(timeout=20)
        assert not th.is_alive()
        p = result[0]
        assert 0 < p.sent < 200 * 60 and p.errors == 0 and p.error_runs == []
        got = 0
        while True:
            try:
                rx.recv(128)
            except BlockingIOError:
                break
            got += 1
        assert got == p.sent
    finally:
        os.close(w_fd)
        control.close()
        th.join(timeout=20)
        rx.close()
        tx.close()


class _Refusing(socket.socket):
    """A UDP socket whose stack refuses seq 100..149 with EAGAIN (a full send buffer)."""

    calls = 0

    def sendto(self, data: Any, addr: Any) -> int:  # type: ignore[override]
        n, _Refusing.calls = _Refusing.calls, _Refusing.calls + 1
        if 100 <= n < 150:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return int(super().sendto(data, addr))


def test_a_late_sender_says_how_late_and_where_its_sends_were_refused() -> None:
    port = free_port()
    sink = traffic.open_socket("127.0.0.2", port)
    tx = _Refusing(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", port))
    tx.setblocking(False)
    _Refusing.calls = 0
    try:
        t0 = time.monotonic_ns() - 500 * MS  # it starts half a second behind its schedule
        p = traffic.paced(tx, ("127.0.0.2", port), 7, 1000, 0.6, 0.05, 64, t0)
    finally:
        tx.close()
        sink.close()
    assert p.sent == 600 and p.errors == 50 and p.errnos == {"EAGAIN": 50}
    assert p.error_runs == [[100, 149]]
    assert p.behind_max_ms >= 500 and len(p.error_runs_at_s) == 1


def test_bad_namespace_is_a_one_line_error() -> None:
    with pytest.raises(StreamError) as ex:
        traffic.run_stream("no-such-ns-x", "198.18.0.1", None, "127.0.0.1", duration_s=0.1)
    assert "no-such-ns-x" in str(ex.value) and "\n" not in str(ex.value)


# ---- the lab's baseline path (address directly on the primary), root ------------------------


@pytest.fixture
def baseline() -> Iterator[Lab]:
    lb = Lab(new_prefix())
    try:
        lb.up(standby_link=False)
        lb.address_lower_directly(0, "primary")
        yield lb
    finally:
        lb.down()
        assert not lb.exists()


@pytest.mark.root
def test_baseline_stream_loses_nothing(baseline: Lab) -> None:
    rep = traffic.run(baseline, 0, rate_pps=2000, duration_s=2.0)
    print(rep.format())
    assert rep.b_to_a is not None
    for _, d in rep.directions:
        assert d.sent == 4000 and d.received == 4000
        assert d.lost == 0 and d.duplicates == 0 and d.send_errors == 0
    assert rep.total_lost == 0


@pytest.mark.root
def test_far_end_down_mid_stream_shows_loss_and_gap(baseline: Lab) -> None:
    g = baseline.names(0)
    with traffic.start_stream(
        baseline.guest, g.guest_v4, baseline.peer, g.peer_v4, rate_pps=2000, duration_s=2.0
    ) as h:
        time.sleep(0.6)
        baseline.set_far_end(0, "primary", False)
        time.sleep(0.3)
        baseline.set_far_end(0, "primary", True)
        rep = h.wait()
    print(rep.format())
    assert rep.total_lost > 0
    for _, d in rep.directions:
        assert d.lost > 0 and d.max_gap_ms > 0
        assert d.received > 0


@pytest.mark.root
def test_ipv6_stream(baseline: Lab) -> None:
    rep = traffic.run(baseline, 0, rate_pps=1000, duration_s=1.0, ipv6=True)
    assert "2001:db8" in rep.a
    for _, d in rep.directions:
        assert d.sent == 1000 and d.lost == 0


@pytest.mark.root
def test_cli_traffic_json(baseline: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["traffic", "--prefix", baseline.prefix, "--rate", "500", "--duration", "0.5"]
    assert labmod.main([*argv, "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["a_to_b"]["sent"] == 250 and j["total_lost"] == 0

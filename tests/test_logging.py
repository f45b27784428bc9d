"""failoverd's log is JSON lines whose msg is always an event object."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest

from bpfailover.ops.eventlog import JsonLines
from bpfailover_lab.topology import Lab


def _line(logger: str, level: int, msg: str, *args: object, exc: bool = False) -> object:
    rec = logging.LogRecord(logger, level, __file__, 1, msg, args, None)
    if exc:
        try:
            raise ValueError("bad")
        except ValueError:
            import sys

            rec.exc_info = sys.exc_info()
    out = json.loads(JsonLines().format(rec))
    assert set(out) >= {"ts", "level", "msg"}
    return out


def test_events_stay_objects_and_plain_messages_become_strings() -> None:
    ev = _line("bpfailover.agent", logging.INFO, "%s", json.dumps({"event": "switch", "to": "x"}))
    assert ev["msg"] == {"event": "switch", "to": "x"}  # type: ignore[index]
    plain = _line("py.warnings", logging.WARNING, 'XDP refused on %d ("%s")', 5, "why")
    assert plain["msg"] == {  # type: ignore[index]
        "event": "log",
        "logger": "py.warnings",
        "text": 'XDP refused on 5 ("why")',
    }
    brace = _line("x", logging.INFO, "{not json: %s}", "x")  # a brace is not enough
    assert brace["msg"]["text"] == "{not json: x}"  # type: ignore[index]
    almost = _line("x", logging.INFO, "%s", "{half")
    assert almost["msg"]["text"] == "{half"  # type: ignore[index]
    err = _line("x", logging.ERROR, "boom", exc=True)
    assert "ValueError: bad" in err["exc"]  # type: ignore[index]


def test_fatal_is_an_exit_event_and_returns_the_code(capsys: Any) -> None:
    from bpfailover.ops import eventlog

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    eventlog.log.addHandler(handler)
    try:
        assert eventlog.fatal("needs root", 1) == 1
    finally:
        eventlog.log.removeHandler(handler)
    (line,) = capsys.readouterr().err.splitlines()
    rec = json.loads(line)
    assert rec["level"] == "ERROR"
    assert rec["msg"] == {"event": "exit", "code": 1, "error": "needs root"}


def test_losing_the_last_lower_and_refusals_are_warnings() -> None:
    from bpfailover.ops import eventlog

    seen: list[tuple[str, str]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((json.loads(record.getMessage())["event"], record.levelname))

    handler, level = Catch(), eventlog.log.level
    eventlog.log.addHandler(handler)
    eventlog.log.setLevel(logging.DEBUG)
    try:
        eventlog.event("switch", group="ens10", to=None, reason="no_lower")
        eventlog.event("switch", group="ens10", to="ens11", reason="primary_up")
        eventlog.event("carrier", group="ens10", on=False)
        eventlog.event("carrier", group="ens10", on=True)
        eventlog.event("reload_refused", why="no config file to read again (--lab)")
        eventlog.event("agent_error", where="timer", error="ValueError: x", count=1)
        eventlog.event("reloaded", changed=["log.level"])
    finally:
        eventlog.log.removeHandler(handler)
        eventlog.log.setLevel(level)
    assert seen == [
        ("switch", "WARNING"),
        ("switch", "INFO"),
        ("carrier", "WARNING"),
        ("carrier", "INFO"),
        ("reload_refused", "WARNING"),
        ("agent_error", "WARNING"),
        ("reloaded", "INFO"),
    ]


@pytest.mark.root
def test_a_whole_lab_run_log_is_json_events(lab: Lab) -> None:
    """Start, a failover and back, a planned switch, a teardown, a stop (the XDP path, so
    the datapath's own warnings are in it too): every line of the log is a JSON object
    whose msg is an event object, not a string or a Python repr."""
    from tests.labutil import bring_up
    from tests.opsutil import ctl

    run = bring_up(lab, rx_path="xdp")
    n = lab.names(0)
    try:
        lab.set_far_end(0, "primary", False)
        run.wait_active(n.standby)
        lab.set_far_end(0, "primary", True)
        run.wait_active(n.primary)
        assert ctl("set-primary", n.failover, n.standby, socket=run.socket).returncode == 0
        assert ctl("set-primary", n.failover, "--auto", socket=run.socket).returncode == 0
        run.wait_active(n.primary)
        assert ctl("teardown", n.failover, "--yes", socket=run.socket).returncode == 0
        assert run.stop() == 0
        lines = run.log_path.read_text().splitlines()
    finally:
        run.cleanup()
    assert len(lines) > 10
    events, msgs = [], []
    for line in lines:
        rec = json.loads(line)  # every line: valid JSON
        assert set(rec) >= {"ts", "level", "msg"}, line
        assert isinstance(rec["msg"], dict) and "event" in rec["msg"], line
        events.append(rec["msg"]["event"])
        msgs.append(rec["msg"])
    (loaded,) = [m for m in msgs if m["event"] == "datapath_loaded"]
    assert loaded["datapath_check"] == "on", loaded  # the lab kernel has BTF
    assert "datapath_check_note" not in loaded, loaded  # a note only when it says why not
    for name in ("datapath_loaded", "started", "switch", "override", "teardown", "stopped"):
        assert name in events, (name, sorted(set(events)))


def test_warnings_and_uncaught_exceptions_are_json_events_too() -> None:
    import subprocess
    import textwrap

    code = textwrap.dedent(
        """
        import threading, warnings
        from bpfailover.ops.eventlog import setup_logging
        setup_logging("info")
        warnings.warn("old thing")
        t = threading.Thread(target=lambda: 1 / 0, name="metrics"); t.start(); t.join()
        raise ValueError("boom")
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert p.returncode == 1
    recs = [json.loads(line) for line in p.stderr.splitlines()]  # every line: JSON
    msgs = [r["msg"] for r in recs]
    assert msgs[0]["event"] == "log" and "old thing" in msgs[0]["text"]
    assert msgs[1] == {
        "event": "crash",
        "thread": "metrics",
        "error": "ZeroDivisionError: division by zero",
    }
    assert msgs[2] == {"event": "crash", "error": "ValueError: boom"}
    assert "Traceback" in recs[2]["exc"] and len(recs) == 3

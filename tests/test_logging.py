"""failoverd's log is JSON lines: events as objects, everything else as strings."""

from __future__ import annotations

import json
import logging

from bpfailover.ops.eventlog import JsonLines


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
    plain = _line("bpfailover.datapath", logging.WARNING, 'XDP refused on %d ("%s")', 5, "why")
    assert plain["msg"] == 'XDP refused on 5 ("why")'  # type: ignore[index]
    brace = _line("x", logging.INFO, "{not json: %s}", "x")  # a brace is not enough
    assert brace["msg"] == "{not json: x}"  # type: ignore[index]
    almost = _line("x", logging.INFO, "%s", "{half")
    assert almost["msg"] == "{half"  # type: ignore[index]
    err = _line("x", logging.ERROR, "boom", exc=True)
    assert "ValueError: bad" in err["exc"]  # type: ignore[index]

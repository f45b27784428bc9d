"""failoverd's log: one JSON object per line on stderr, events as objects.

`event("switch", group=..., ...)` writes `{"ts": ..., "level": "INFO", "msg": {"event":
"switch", ...}}`; plain messages from other modules (the datapath's warnings) become
JSON strings, so a log pipeline never meets anything but JSON lines."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from typing import Any

log = logging.getLogger("bpfailover.events")


def event(name: str, **fields: Any) -> None:
    """One structured log line per event."""
    log.info("%s", json.dumps({"event": name, **fields}, default=str))


class JsonLines(logging.Formatter):
    """One JSON object per line: `msg` is the event object for `event()` lines (logged as
    "%s" of a json.dumps), a JSON string for plain messages from the other modules."""

    def format(self, record: logging.LogRecord) -> str:
        args, msg = record.args, None
        if (
            record.msg == "%s"
            and isinstance(args, tuple)
            and len(args) == 1
            and isinstance(args[0], str)
            and args[0].startswith("{")
        ):
            with contextlib.suppress(ValueError):
                json.loads(args[0])
                msg = args[0]
        if msg is None:
            msg = json.dumps(record.getMessage())
        line = f'{{"ts": "{self.formatTime(record)}", "level": "{record.levelname}", "msg": {msg}'
        if record.exc_info:
            line += f', "exc": {json.dumps(self.formatException(record.exc_info))}'
        return line + "}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])

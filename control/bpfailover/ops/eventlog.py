"""failoverd's log: one JSON object per line on stderr, events as objects.

`event("switch", group=..., ...)` writes `{"ts": ..., "level": "INFO", "msg": {"event":
"switch", ...}}`; a plain message (a Python warning, a library's log) becomes
`{"event": "log", "logger": ..., "text": ...}`, so a log pipeline meets nothing but JSON
lines whose `msg` is an object."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import Any

log = logging.getLogger("bpfailover.events")


# Events an operator should look at, whatever they carry: a refusal, an error survived.
WARNING_EVENTS = frozenset(
    {"reload_refused", "lower_refused", "agent_error", "event_error", "notify_error"}
)


def level_of(name: str, fields: dict[str, Any]) -> int:
    """WARNING for the events in WARNING_EVENTS and for the guest losing its last lower (a
    switch with reason no_lower, the failover device's carrier off); INFO for the rest."""
    if name in WARNING_EVENTS:
        return logging.WARNING
    if name == "switch" and fields.get("reason") == "no_lower":
        return logging.WARNING
    if name == "carrier" and fields.get("on") is False:
        return logging.WARNING
    return logging.INFO


def event(name: str, **fields: Any) -> None:
    """One structured log line per event, at the level level_of() gives it."""
    log.log(level_of(name, fields), "%s", json.dumps({"event": name, **fields}, default=str))


class JsonLines(logging.Formatter):
    """One JSON object per line: `msg` is the event object for `event()` lines (logged as
    "%s" of a json.dumps), a `log` event carrying the text of any other message."""

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
        if msg is None:  # a plain message (warnings, another module): an event all the same
            msg = json.dumps({"event": "log", "logger": record.name, "text": record.getMessage()})
        line = f'{{"ts": "{self.formatTime(record)}", "level": "{record.levelname}", "msg": {msg}'
        if record.exc_info:
            line += f', "exc": {json.dumps(self.formatException(record.exc_info))}'
        return line + "}"


def fatal(error: str, code: int) -> int:
    """failoverd gives up: one `exit` event (still a JSON line), and the exit code."""
    log.error("%s", json.dumps({"event": "exit", "code": code, "error": error}))
    flush()
    return code


QUEUE_MAX = 10_000  # log lines waiting for stderr; beyond that they are dropped, and counted


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Formats in the caller's thread (the JSON line is final), queues without ever
    waiting: a full queue (stderr stuck) drops the line and counts it."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            type(self).dropped += 1


_listener: logging.handlers.QueueListener | None = None
_queue: queue.Queue[logging.LogRecord] | None = None


def flush(timeout: float = 2.0) -> None:
    """Wait (bounded) until the queued lines are written: before exiting on purpose."""
    q = _queue
    deadline = time.monotonic() + timeout
    while q is not None and q.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.002)


def _stop_listener() -> None:
    global _listener
    listener, _listener = _listener, None
    if listener is not None:
        listener.stop()  # writes what is still queued


def setup_logging(level: str) -> None:
    """JSON lines on stderr from here on: also Python warnings and uncaught exceptions (of
    any thread), which would otherwise print a bare traceback into the log.

    The event loop never writes to stderr itself: a line is formatted, put on a bounded
    queue and written by a listener thread, so a stuck pipe (a journald that does not
    read) cannot stall a switch; lines beyond QUEUE_MAX are dropped instead."""
    global _listener, _queue
    _stop_listener()
    _queue = queue.Queue(QUEUE_MAX)
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(logging.Formatter("%(message)s"))  # already a JSON line
    handler = _DroppingQueueHandler(_queue)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    _listener = logging.handlers.QueueListener(_queue, out)
    _listener.start()
    atexit.register(_stop_listener)
    logging.captureWarnings(True)
    crash = logging.getLogger("bpfailover.crash")

    def excepthook(kind: Any, value: Any, tb: Any) -> None:
        error = f"{kind.__name__}: {value}"
        crash.critical(
            "%s", json.dumps({"event": "crash", "error": error}), exc_info=(kind, value, tb)
        )

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit and args.exc_value is not None:
            where = args.thread.name if args.thread is not None else "?"
            error = f"{args.exc_type.__name__}: {args.exc_value}"
            crash.critical(
                "%s",
                json.dumps({"event": "crash", "thread": where, "error": error}),
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook

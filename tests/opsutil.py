"""Helpers for the operators' surface tests: failoverctl runs, scrapes, agents in a lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bpfailover import netns
from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab

METRICS_PORT = 9617  # inside the lab's guest netns: every lab has its own loopback


def ctl(
    *args: str, socket: str | None = None, timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run failoverctl as a user would (a process of its own)."""
    argv = [sys.executable, "-m", "bpfailover.ops.cli"]
    if socket is not None:
        argv += ["--socket", socket]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def status_json(run: AgentRun) -> dict[str, Any]:
    p = ctl("status", "--json", socket=run.socket)
    assert p.returncode == 0, p.stderr
    doc: dict[str, Any] = json.loads(p.stdout)
    return doc


@contextmanager
def agent_in_lab(
    lab: Lab, metrics: bool = False, address: bool = True, **overrides: Any
) -> Iterator[AgentRun]:
    """Lab up, failoverd running in its guest netns; all of it removed on the way out."""
    lab.up()
    listen = f"127.0.0.1:{METRICS_PORT}" if metrics else None
    run = AgentRun(lab, group_overrides=overrides or None, metrics_listen=listen)
    try:
        run.start()
        if address:
            lab.address_failover(0)
        yield run
    finally:
        run.cleanup()
        lab.down()


def scrape_text(lab: Lab, port: int = METRICS_PORT, path: str = "/metrics") -> str:
    url = f"http://127.0.0.1:{port}{path}"
    # the socket is made inside the guest netns and keeps it
    with netns.entered(lab.guest), urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(lab: Lab, port: int = METRICS_PORT) -> Samples:
    """name + sorted labels -> value, parsed with prometheus_client's own parser."""
    out: Samples = {}
    for fam in text_string_to_metric_families(scrape_text(lab, port)):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def pick(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    want = set(labels.items())
    return {lb: v for (n, lb), v in samples.items() if n == name and want <= set(lb)}


def one(samples: Samples, name: str, **labels: str) -> float:
    found = pick(samples, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return next(iter(found.values()))


def as_nobody(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """main(argv) in a forked child that dropped root for uid/gid 65534: (exit, its stdout
    and stderr). Import what `main` imports lazily beforehand: the child may not read the
    checkout (e.g. one under /root)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only already-imported code runs, whatever the checkout's mode
        code = 99
        try:
            sys.stdout = sys.stderr = open(w, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            code = main(argv)
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err

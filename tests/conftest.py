"""Shared fixtures.  Tests marked `root` need root, netns and BPF: CI is root and runs
them all; only a non-root developer run skips them (CI=true turns a skip into a failure)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IS_ROOT = os.geteuid() == 0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT or IN_CI:
        return  # in CI a root test that cannot run must fail, not skip
    skip = pytest.mark.skip(reason="needs root (CI runs it as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def bpffs_root() -> Path:
    """/sys/fs/bpf, mounted as `make setup` mounts it (mode=700) when nothing is mounted
    there: every test that needs bpffs gets it this one way, whichever test comes first."""
    from bpfailover_lab.agent_run import BPFFS, ensure_bpffs

    ensure_bpffs()
    return BPFFS


def mount_bpffs(where: Path) -> None:
    """A bpffs of the test's own at `where`, mounted as `make setup` mounts one."""
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=700", "bpf", str(where)], check=True)


def realtime_refused() -> str | None:
    """Why root may not take SCHED_FIFO on this machine (None: it may), tried in a child:
    a container without CAP_SYS_NICE, or a cgroup with no real-time budget."""
    import sys

    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))"
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    if p.returncode == 0:
        return None
    err = (p.stderr.strip().splitlines() or ["?"])[-1]
    return (
        f"root may not take SCHED_FIFO here ({err}): no CAP_SYS_NICE (a container) or no "
        "real-time budget in this cgroup (cpu.rt_runtime_us)"
    )


@pytest.fixture
def bpffs() -> Path:
    return bpffs_root()


@pytest.fixture
def pin_dir(bpffs: Path) -> Iterator[Path]:
    """A private pin directory, removed even when the test fails."""
    import shutil

    d = bpffs / unique("bpfailover-test-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def scratch_netns() -> Iterator[str]:
    """An empty named netns of our own, deleted even when the test fails."""
    name = unique("fot-")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def lab_prefix() -> str:
    return unique("t")


@pytest.fixture
def running(lab: Any) -> Iterator[tuple[Any, Any]]:
    """(lab, agent): a one-group lab with failoverd running and traffic warmed up."""
    from tests.labutil import bring_up

    agent = bring_up(lab)
    try:
        yield lab, agent
    finally:
        agent.cleanup()


@pytest.fixture
def lab(lab_prefix: str) -> Iterator[Any]:
    """A one-group lab (not yet up); always taken down."""
    from bpfailover_lab.topology import Lab

    lab = Lab(lab_prefix)
    try:
        yield lab
    finally:
        lab.down()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's one-line summary (tests/test_reliability.py, issue 5)."""
    from tests.faultutil import TALLY

    line = TALLY.line()
    if line is not None:
        terminalreporter.write_sep("-", "reliability")
        terminalreporter.write_line(line)
        for item in TALLY.leak_detail:
            terminalreporter.write_line(f"  leak: {item}")

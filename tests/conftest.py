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


@pytest.fixture
def bpffs() -> Path:
    root = Path("/sys/fs/bpf")
    if subprocess.run(["mountpoint", "-q", str(root)], check=False).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "-o", "mode=700", "bpf", str(root)], check=True)
    return root


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

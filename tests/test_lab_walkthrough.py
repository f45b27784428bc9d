"""docs/lab.md, run as written: every command of its ```sh blocks, in order, in one shell
(only the prefix `lab1` is replaced by a unique one), so the walkthrough cannot drift."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bpfailover_lab.topology import Lab

DOC = Path(__file__).parent.parent / "docs" / "lab.md"


def documented_commands(text: str) -> list[str]:
    """The lines of every ```sh block, in order (comments and blank lines dropped)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    return [ln for b in blocks for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]


def test_the_walkthrough_has_every_step() -> None:
    cmds = documented_commands(DOC.read_text())
    wanted = [
        "failover-lab up",  # up
        "failoverd --config /run/bpfailover/lab-lab1/config.yaml",  # agent
        "addr add",  # address
        "failover-lab traffic",  # traffic
        "link set vfport down",  # a failover
        "failoverctl --socket /run/bpfailover/lab-lab1.sock status",  # status
        "/metrics",  # metrics
        "failover-lab down",  # down
    ]
    at = -1
    for w in wanted:  # each after the one before
        at = next((i for i, c in enumerate(cmds) if i > at and w in c), -1)
        assert at >= 0, f"no {w!r} after the previous step in docs/lab.md"


@pytest.mark.root
def test_the_documented_commands_run(lab_prefix: str) -> None:
    script = "\n".join(
        re.sub(r"\blab1\b", lab_prefix, c) for c in documented_commands(DOC.read_text())
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = Path(f"/tmp/{lab_prefix}-failoverd.log")
    try:
        p = subprocess.run(
            [
                "bash",
                "-c",
                "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\nlog: {log.read_text()[-2000:]}"
        out = p.stdout
        assert f"lab {lab_prefix} is up" in out  # up prints the next steps
        assert f"== {lab_prefix}-guest" in out  # show
        assert "active ens10nsby (standby)" in out  # status after the failover
        assert re.search(r'^failover_lower_active\{[^}]*lower="ens11"[^}]*\} 1', out, re.M), out
        assert re.search(
            r'^failover_switches_total\{[^}]*reason="primary_down"[^}]*\} 1', out, re.M
        )
        assert not Lab(lab_prefix).exists()  # down removed it
        assert not Lab(lab_prefix).agent_pins.exists()  # and the agent's pins
        assert not Lab(lab_prefix).agent_config.exists()  # and its config
    finally:
        Lab(lab_prefix).down()
        shutil.rmtree(Lab(lab_prefix).agent_pins, ignore_errors=True)
        log.unlink(missing_ok=True)

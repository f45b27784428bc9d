"""What docs/operators.md promises an operator, checked against the real programs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bpfailover_lab.agent_run import AgentRun
from bpfailover_lab.topology import Lab

DOCS = Path(__file__).parent.parent / "docs"


def doc_table(doc: str, header: str) -> dict[int, str]:
    """{exit code: meaning} of the markdown table whose header row starts with `header`."""
    lines = (DOCS / doc).read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {header} |"))
    rows: dict[int, str] = {}
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        code, meaning = (c.strip() for c in ln.strip("|").split("|", 1))
        rows[int(code)] = meaning
    return rows


def failoverd(*args: str) -> subprocess.CompletedProcess[str]:
    """(Exit 1 for not root: tests/test_bad_input.py::test_failoverd_not_root_says_so.)"""
    argv = [sys.executable, "-m", "bpfailover.agent", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_failoverd_exit_codes_are_documented() -> None:
    table = doc_table("operators.md", "failoverd exit")
    assert sorted(table) == [0, 1, 2]
    assert "stopped cleanly" in table[0]
    assert all(w in table[1] for w in ("not root", "pin lock", "runtime"))
    assert "bad config" in table[2]


def test_failoverd_exit_2_on_a_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("groups: [{name: ens10, standby: ens10nsby}]\nbpffs: relative\n")
    p = failoverd("--config", str(cfg))
    assert (p.returncode, p.stderr) == (
        2,
        f"failoverd: {cfg}: bpffs: must be an absolute path (got 'relative'); see docs/config.md\n",
    )


@pytest.mark.root
def test_failoverd_exit_1_when_the_pin_lock_is_held_and_0_on_a_clean_stop(lab: Lab) -> None:
    lab.up()
    with AgentRun(lab) as run:
        p = failoverd("--netns", lab.guest, "--config", str(run.config_path))
        (line,) = p.stderr.splitlines()
        msg = json.loads(line)["msg"]
        assert (p.returncode, msg["event"], msg["code"]) == (1, "exit", 1)
        assert "another agent" in msg["error"], msg
        assert run.stop() == 0

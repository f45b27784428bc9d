"""The README's figures are the committed results' (bench/headline.py writes them), and
every result names a commit that holds the code it measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from bench import headline
from bench.common import RESULTS

ROOT = Path(__file__).resolve().parents[1]


def test_readme_headline_is_the_generators_output() -> None:
    text = (ROOT / "README.md").read_text()
    assert headline.BEGIN in text and headline.END in text
    start = text.index(headline.BEGIN)
    end = text.index(headline.END) + len(headline.END)
    assert text[start:end] == headline.block(), (
        "README.md's figures differ from bench/results: python -m bench.headline --write"
    )


def test_splice_refuses_a_readme_without_the_block() -> None:
    with pytest.raises(ValueError, match="no"):
        headline.splice("# no block here\n", headline.block())
    assert headline.splice(f"a\n{headline.BEGIN}\nold\n{headline.END}\nb\n", "NEW") == "a\nNEW\nb\n"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_a_result_names_a_commit_of_this_history(path: Path) -> None:
    doc = json.loads(path.read_text())
    machine = doc.get("machine") if isinstance(doc, dict) else None
    commit = (machine or {}).get("git")
    if not commit:
        return  # not a bench.common result (the proving ground records its own fields)
    if commit.endswith("-dirty"):
        return  # says itself that no commit holds what ran
    p = subprocess.run(
        ["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, "HEAD"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, f"{path.name}: commit {commit} is not in this history"

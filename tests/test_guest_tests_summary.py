"""The suite-inside-the-guest runner's final line (bench/proving_ground/guest_tests.py), read
from pytest's own summary: failures and errors both count as failed."""

from __future__ import annotations

from bench.proving_ground.guest_tests import counts, final_line


def test_final_line_from_pytest_summary() -> None:
    out = (
        "..F.s\nFAILED tests/test_x.py::t - boom\n2 failed, 30 passed, 3 skipped, 1 error in 61.20s"
    )
    c = counts(out)
    assert c == {"failed": 2, "passed": 30, "skipped": 3, "error": 1}
    assert final_line("6.12.118+deb12-amd64", c) == (
        "guest-tests 6.12.118+deb12-amd64: 30 passed, 3 failed, 3 skipped"
    )


def test_no_summary_is_nothing_passed() -> None:
    # pytest killed before its summary: no counts, so the line cannot claim a pass
    assert final_line("6.1.0-1-amd64", counts("....\n")) == (
        "guest-tests 6.1.0-1-amd64: 0 passed, 0 failed, 0 skipped"
    )


def test_xfail_is_shown_apart() -> None:
    c = counts("5 passed, 1 xfailed in 3.00s")
    assert final_line("r", c) == "guest-tests r: 5 passed, 0 failed, 0 skipped (1 xfailed)"

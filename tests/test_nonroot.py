"""Every command run as a user who is not root: one line saying what it could not read and
how to get it, never a traceback, whatever the modes of bpffs, /run/bpfailover and the
control socket.  Each run gets a fresh bpffs and /run of its own (tests/nonroot.py), so the
machine's mounts cannot decide the outcome."""

from __future__ import annotations

import itertools
import os

import pytest

from bpfailover.agent import main as agent_main
from bpfailover.ops import cli, doctor, orphans  # noqa: F401 - imported before dropping root
from bpfailover_lab import cli as lab_cli
from tests.nonroot import CONFIG, PINS, ROOTS_CONFIG, SOCKET, Mounts, run_as_nobody

MOUNTS = [
    Mounts(bpffs, run_dir, sock, agent)
    for bpffs, run_dir in itertools.product((0o700, 0o755), (0o700, 0o755))
    for sock, agent in ((0o600, False), (0o600, True), (0o660, True), (0o666, True))
]
CTL = ["--config", str(CONFIG)]


def one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(autouse=True, scope="module")
def _imports() -> None:
    import pyroute2  # noqa: F401 - doctor imports it lazily; the child may not read it
    import yaml  # noqa: F401


@pytest.mark.root
@pytest.mark.parametrize("m", MOUNTS, ids=str)
@pytest.mark.parametrize(
    "argv",
    [["status"], ["set-primary", "ens10", "--auto"], ["teardown", "ens10"]],
    ids=lambda a: a[0],
)
def test_failoverctl_agent_commands(m: Mounts, argv: list[str]) -> None:
    code, text = run_as_nobody(cli.main, CTL + argv, m)
    line = one_line(text)
    if not m.agent and m.run_dir == 0o755:  # nothing is hidden: there is no agent
        assert code == 3 and "No such file or directory (is failoverd running?)" in line
    elif m.run_dir == 0o755 and m.socket == 0o666:  # the socket opens: the agent refuses
        assert (code, line) == (
            1,
            "failoverctl: permission denied (root or the control group only)",
        )
    else:
        assert code == 3, text
        assert line.startswith(f"failoverctl: permission denied on the control socket: {SOCKET}:")
        assert line.endswith(f"({cli.PERMISSION_HINT})")


@pytest.mark.root
@pytest.mark.parametrize("m", MOUNTS, ids=str)
def test_failoverctl_teardown_pins(m: Mounts) -> None:
    code, text = run_as_nobody(cli.main, ["teardown", "--pins", str(PINS), "--all"], m)
    assert (code, one_line(text)) == (
        1,
        "failoverctl: teardown --pins needs root (it opens the pins and the devices)",
    )


@pytest.mark.root
@pytest.mark.parametrize("m", MOUNTS, ids=str)
def test_failoverd(m: Mounts) -> None:
    code, text = run_as_nobody(agent_main.main, ["--config", str(CONFIG)], m)
    assert code == 1 and '"error": "needs root (CAP_BPF, CAP_NET_ADMIN)"' in one_line(text)


@pytest.mark.root
@pytest.mark.parametrize("m", MOUNTS, ids=str)
@pytest.mark.parametrize("verb", ["down", "show", "up"])
def test_failover_lab(m: Mounts, verb: str) -> None:
    code, text = run_as_nobody(lab_cli.main, [verb, "--prefix", "nonroot"], m)
    assert (code, one_line(text)) == (
        1,
        f"failover-lab: {verb} needs root (network namespaces, the bpffs)",
    )


@pytest.mark.root
@pytest.mark.parametrize("verb", ["status", "doctor"])
def test_failoverctl_default_config_it_may_not_read(verb: str) -> None:
    """The default config in a directory only root may search: said, not a traceback."""
    from bpfailover.model import paths

    def main(argv: list[str]) -> int:
        os.environ.pop(paths.CONFIG_ENV, None)
        paths.DEFAULT_CONFIG_PATH = ROOTS_CONFIG  # the child's own copy of the module
        return cli.main(argv)

    code, text = run_as_nobody(main, [verb])
    assert (code, one_line(text)) == (
        2,
        f"failoverctl: {ROOTS_CONFIG}: cannot read: Permission denied (run as root, or make it"
        " readable)",
    )

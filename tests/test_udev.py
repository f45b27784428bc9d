"""udev's database as failoverd reads it (events/udev.py): when udev serves our netdevs,
when it has processed one, and the watch that says so.  No root, no udev: a directory
stands in for /run/udev."""

from __future__ import annotations

import os
import selectors
from pathlib import Path

import pytest

from bpfailover.events import udev
from bpfailover.events.udev import UdevDb


def write_entry(
    root: Path, ifindex: int, text: str = "I:123456\nE:ID_NET_NAME_PATH=enp2s0\n"
) -> None:
    """As udev writes it: a temporary file renamed into place."""
    tmp = root / "data" / f".#n{ifindex}XXXXXX"
    tmp.write_text(text)
    os.rename(tmp, root / "data" / f"n{ifindex}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("name", "ifindex"),
    [
        ("n12", 12),
        ("n1", 1),
        ("b8:0", None),
        ("c1:3", None),
        ("+pci:0000:00:02.0", None),
        (".#n12Ab3dEf", None),
        ("n", None),
        ("n1x", None),
    ],
)
def test_entry_names_map_to_ifindexes_only_for_netdevs(name: str, ifindex: int | None) -> None:
    assert udev.ifindex_of(name) == ifindex
    if ifindex is not None:
        assert udev.entry_name(ifindex) == name


def test_an_entry_is_settled_unless_a_rename_is_being_completed() -> None:
    assert udev.settled("I:1700000000\nE:ID_NET_NAME_PATH=enp2s0\nG:systemd\n")
    assert udev.settled("")  # an entry with nothing in it still means "processed"
    assert not udev.settled("I:1700000000\nE:ID_RENAMING=1\n")
    assert not udev.settled("I:1700000000\nE:ID_PROCESSING=1\nE:ID_NET_NAME_PATH=enp2s0\n")
    assert udev.settled("I:1700000000\nE:ID_RENAMING_X=1\n")  # a whole line, not a prefix


@pytest.mark.parametrize(
    ("control", "own", "init", "serves"),
    [
        (False, "net:[1]", "net:[1]", False),  # udev does not run: never wait
        (True, "net:[1]", "net:[1]", True),  # the host's namespace, udev runs
        (True, "net:[2]", "net:[1]", False),  # a namespace of our own (the lab): not udev's
        (True, "net:[1]", None, True),  # PID 1's namespace hidden (hardened unit): ours
        (True, None, "net:[1]", True),
    ],
)
def test_udev_serves_only_its_own_namespace(
    control: bool, own: str | None, init: str | None, serves: bool
) -> None:
    assert udev.serves(control, own, init) is serves


def test_running_follows_the_control_socket(root: Path) -> None:
    db = UdevDb(root, check_netns=False)
    assert not db.running()
    (root / "control").touch()
    assert db.running()


def test_running_is_false_in_another_namespace_than_pid1s(root: Path, monkeypatch) -> None:
    (root / "control").touch()
    monkeypatch.setattr(udev, "_netns", lambda pid: "net:[7]" if pid == "self" else "net:[1]")
    assert not UdevDb(root).running()
    monkeypatch.setattr(udev, "_netns", lambda pid: "net:[1]")
    assert UdevDb(root).running()


def test_the_test_entry_builds_the_agent_with_the_switches_it_is_given(root: Path) -> None:
    from bpfailover.model.config import parse_config
    from tests.fault_agent import make_agent

    cfg = parse_config("groups: [{name: ens10, standby: s}]")
    switches = {
        "BPFAILOVER_TEST_UDEV_DIR": str(root),
        "BPFAILOVER_TEST_UDEV_HOLD_MS": "600000",
        "BPFAILOVER_TEST_NO_MCAST_EVENTS": "1",
        "BPFAILOVER_TEST_NETLINK_RCVBUF": "4096",
        "BPFAILOVER_FAULT": "adopt:stall",
    }
    agent = make_agent(switches)(cfg)
    plain = make_agent({})(cfg)
    try:
        db = agent.udev.udev
        assert db is not None
        assert (db.control, db.data, db.same_netns) == (root / "control", root / "data", True)
        assert agent.udev.hold_ms == 600000
        assert (agent.links.mcast, agent.links.rcvbuf) == (False, 4096)  # type: ignore[attr-defined]
        assert agent.fault is not None and agent.fault.point == "adopt"
        assert plain.udev.udev is not None
        assert plain.udev.udev.control == Path("/run/udev/control")
        assert plain.fault is None and plain.udev.hold_ms == 5000
    finally:
        agent.life.close()
        plain.life.close()


def test_initialized_reads_the_entry(root: Path) -> None:
    db = UdevDb(root, check_netns=False)
    assert not db.initialized(12)
    write_entry(root, 12, "I:1\nE:ID_RENAMING=1\n")
    assert not db.initialized(12)
    write_entry(root, 12)
    assert db.initialized(12)
    assert not db.initialized(13)


def test_the_watch_names_the_entries_written_and_is_silent_when_disarmed(root: Path) -> None:
    db = UdevDb(root, check_netns=False)
    sel = selectors.DefaultSelector()
    try:
        sel.register(db, selectors.EVENT_READ)
        db.arm()
        db.arm()  # idempotent
        write_entry(root, 12)
        write_entry(root, 14)
        (root / "data" / "b8:0").write_text("I:1\n")  # a block device's: not a netdev
        assert sel.select(0)
        assert db.read() == {12, 14}
        assert not sel.select(0)  # drained
        db.disarm()
        db.read()  # (the kernel's IN_IGNORED for the removed watch)
        write_entry(root, 15)
        assert not sel.select(0)  # no watch, no wake-up
    finally:
        sel.close()
        db.close()


def test_arming_without_a_database_directory_fails_clearly(tmp_path: Path) -> None:
    db = UdevDb(tmp_path, check_netns=False)
    try:
        with pytest.raises(OSError, match="inotify_add_watch"):
            db.arm()
    finally:
        db.close()

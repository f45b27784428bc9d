"""Bad input to the datapath and the agent: one clear line that says what to do, and
nothing half-created behind it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bpfailover.datapath import kheaders
from bpfailover.datapath.loader import LoadError
from bpfailover.datapath.maps import Datapath, DatapathError


def test_no_kernel_headers_at_all(tmp_path: Path) -> None:
    with pytest.raises(kheaders.HeadersError) as e:
        kheaders.find(release="0.0.0-none", src_dir=tmp_path, cache=tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install linux-headers-amd64" in msg
    assert not (tmp_path / "cache").exists()


def test_fallback_headers_pair_is_merged_and_reused(tmp_path: Path) -> None:
    common = tmp_path / "src" / "linux-headers-9.9.0-1-common"
    arch = tmp_path / "src" / "linux-headers-9.9.0-1-amd64"
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "kconfig.h").write_text("/* common */\n")
    (arch / "include" / "generated").mkdir(parents=True)
    (arch / "include" / "generated" / "autoconf.h").write_text("/* arch */\n")
    h = kheaders.find(release="0.0.0-none", src_dir=tmp_path / "src", cache=tmp_path / "c")
    tree = Path(h.env["BCC_KERNEL_SOURCE"])
    assert (tree / "include" / "linux" / "kconfig.h").read_text() == "/* common */\n"
    assert (tree / "include" / "generated" / "autoconf.h").read_text() == "/* arch */\n"
    assert "linux-headers-9.9.0-1-amd64" in h.description
    again = kheaders.find(release="0.0.0-none", src_dir=tmp_path / "src", cache=tmp_path / "c")
    assert again.env == h.env  # cached: built once


@pytest.mark.root
def test_pin_dir_not_on_bpffs_is_refused_and_nothing_created(tmp_path: Path) -> None:
    pins = tmp_path / "pins"
    with pytest.raises(LoadError) as e:
        Datapath.open(pins)
    assert "not a bpffs mount" in str(e.value) and "bpf filesystem" in str(e.value)
    assert "mount -t bpf" not in str(e.value)  # not over a directory that is not bpffs' place
    assert "\n" not in str(e.value)
    assert not pins.exists()


@pytest.mark.root
def test_an_existing_directory_off_bpffs_is_not_adopted_nor_offered_for_removal(
    tmp_path: Path,
) -> None:
    """bpffs naming someone's directory (a typo) gets what is wrong, never `rm -r`."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "thesis.tex").write_text("years of work")
    for load in (True, False):
        with pytest.raises((LoadError, DatapathError)) as e:
            Datapath.open(home, load=load)
        msg = str(e.value)
        assert "not a bpffs mount" in msg and "rm " not in msg and "\n" not in msg, msg
    assert (home / "thesis.tex").read_text() == "years of work"


@pytest.mark.root
def test_a_half_pinned_directory_is_named_not_adopted(pin_dir: Path) -> None:
    pin_dir.mkdir()  # e.g. someone removed pins by hand
    with pytest.raises(DatapathError) as e:
        Datapath.open(pin_dir)
    assert "not a complete bpfailover datapath" in str(e.value) and str(pin_dir) in str(e.value)


def test_failoverd_not_root_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # In-process with the uid faked: a real setuid run needs the venv readable by that user,
    # which a checkout under /root is not.
    from bpfailover.agent import main as agent

    cfg = tmp_path / "c.yaml"
    sock = tmp_path / "c.sock"
    cfg.write_text(
        f"groups: [{{name: ens10, standby: ens10nsby}}]\nbpffs: {tmp_path / 'pins'}\n"
        f"control: {{socket: {sock}}}\nmetrics: {{listen: null}}\n"
    )
    monkeypatch.setattr(agent.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # setup_logging replaces them
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    assert agent.main(["--config", str(cfg)]) == 1
    # the one line failoverd writes: its log's `exit` event (JSON, like every log line)
    (msg,) = [json.loads(r.getMessage()) for r in caplog.records]
    assert msg == {"event": "exit", "code": 1, "error": "needs root (CAP_BPF, CAP_NET_ADMIN)"}
    assert not (tmp_path / "pins").exists() and not sock.exists()  # nothing was started


def test_failoverd_bad_config_exits_2_with_the_key_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("groups: [{name: ens10, standby: ens10nsby, policy: {reselect: sometimes}}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bpfailover.agent", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "groups[0].policy.reselect" in lines[0]


def test_failoverd_unknown_control_group_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    sock = tmp_path / "c.sock"
    cfg.write_text(
        f"groups: [{{name: ens10, standby: ens10nsby}}]\nbpffs: {tmp_path / 'pins'}\n"
        f"control: {{socket: {sock}, admin_group: no-such-group-x}}\nmetrics: {{listen: null}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bpfailover.agent", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "control.admin_group: no such group 'no-such-group-x'" in lines[0]
    assert not (tmp_path / "pins").exists() and not sock.exists()  # nothing was started


@pytest.mark.root
def test_pins_trusted_only_from_root_and_locked_under_run(
    pin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl
    import os
    import pwd
    import stat

    from bpfailover.datapath import bpfsys, layout_gen, maps

    nobody = pwd.getpwnam("nobody")
    # Pre-created by another user, or writable by others: refused, and left as it was.
    pin_dir.mkdir()
    os.chown(pin_dir, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(DatapathError) as e:
        Datapath.open(pin_dir)
    msg = str(e.value)
    assert f"owned by uid {nobody.pw_uid}" in msg and "\n" not in msg
    assert "rm " not in msg and "not failoverd's" in msg  # never offered for removal
    assert pin_dir.stat().st_uid == nobody.pw_uid and not list(pin_dir.iterdir())
    os.chown(pin_dir, 0, 0)
    os.chmod(pin_dir, 0o777)
    with pytest.raises(DatapathError, match="mode 0777"):
        Datapath.open(pin_dir)
    os.chmod(pin_dir, 0o700)
    # Root's, but holding what failoverd never pins: named, not offered for removal.
    (pin_dir / "other-tool").mkdir()
    with pytest.raises(DatapathError) as e:
        Datapath.open(pin_dir)
    assert "other-tool" in str(e.value) and "rm " not in str(e.value), str(e.value)
    (pin_dir / "other-tool").rmdir()
    pin_dir.rmdir()

    # The loader child runs with -P from /: a bpfailover/ in our cwd is never imported.
    shadow = tmp_path / "cwd" / "bpfailover"
    shadow.mkdir(parents=True)
    marker = tmp_path / "shadow-imported"
    (shadow / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(shadow.parent)
    with Datapath.open(pin_dir) as dp:
        assert not marker.exists()
        assert stat.S_IMODE(pin_dir.stat().st_mode) == 0o700
        # The lock is a root-only file under /run, not the pin directory: holding a flock
        # on the directory stops nobody, and a second agent is refused.
        fd = os.open(pin_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            dp.lock()
        finally:
            os.close(fd)
        lock = maps.lock_path(pin_dir)
        st = lock.stat()
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        with Datapath.open(pin_dir, load=False) as other, pytest.raises(DatapathError) as e:
            other.lock()
        assert "another agent holds" in str(e.value)

        # The exporter's handles read and cannot write.
        with Datapath.open(pin_dir, load=False, read_only=True) as ro:
            assert ro.active(0) == dp.active(0)
            with pytest.raises(bpfsys.BpfError) as err:
                ro.flip(0, 1)
            assert err.value.errno == errno.EPERM
            assert "prog_fo_egress" not in ro.fds

    # Every map's shape is checked, not only the ABI number.
    key, value, entries = layout_gen.MAP_SHAPES["fo_dev"]
    monkeypatch.setitem(layout_gen.MAP_SHAPES, "fo_dev", (key, value + 8, entries))
    with pytest.raises(DatapathError) as e:
        Datapath.open(pin_dir, load=False)
    assert "fo_dev" in str(e.value) and "tear it down" in str(e.value)


@pytest.mark.root
def test_pin_lock_file_removed_with_its_holder_and_never_held_twice(
    pin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents one after another on the same pin directory: the lock file goes with its
    holder (none piles up under /run), and when it is removed while the next one has opened
    it but not yet locked it, that one locks the new file, so a third is still refused:
    never two holders."""
    import fcntl
    import shutil
    import types

    from bpfailover.datapath import maps

    lock_dir = tmp_path / "run"
    Datapath.open(pin_dir).close()  # loaded once; the rest adopt it
    a = Datapath.open(pin_dir, load=False)
    a.lock(lock_dir)
    path = maps.lock_path(pin_dir, lock_dir)
    assert path.exists()
    a.close()
    assert list(lock_dir.iterdir()) == [], "the lock file goes at a clean stop"

    a = Datapath.open(pin_dir, load=False)
    a.lock(lock_dir)
    b = Datapath.open(pin_dir, load=False)
    c = Datapath.open(pin_dir, load=False)
    try:

        def flock(fd: int, op: int) -> None:
            # b has opened the lock file and is about to lock it: a removes its file and
            # lets go right now (the order a stopping holder uses)
            if stall.armed:
                stall.armed = False
                path.unlink()
                a.close()
            fcntl.flock(fd, op)

        stall = types.SimpleNamespace(
            armed=True,
            flock=flock,
            LOCK_EX=fcntl.LOCK_EX,
            LOCK_SH=fcntl.LOCK_SH,
            LOCK_NB=fcntl.LOCK_NB,
        )
        monkeypatch.setattr(maps, "fcntl", stall)
        b.lock(lock_dir)  # a is gone: b holds the pin directory
        assert not stall.armed
        with pytest.raises(DatapathError) as e:
            c.lock(lock_dir)
        assert "another agent holds" in str(e.value), "b and c would both hold it"
        assert [p.name for p in lock_dir.iterdir()] == [path.name]
        # The pin directory removed by hand and put back (a new inode): still b's.
        ino = pin_dir.stat().st_ino
        shutil.rmtree(pin_dir)
        assert b.repin() and pin_dir.stat().st_ino != ino
        with pytest.raises(DatapathError, match="another agent holds"):
            c.lock(lock_dir)
    finally:
        for dp in (a, b, c):
            dp.close()
    assert list(lock_dir.iterdir()) == []


def test_repin_checks_what_it_pins_into_as_adoption_does(pin_dir: Path, bpffs: Path) -> None:
    """Pins removed by hand are put back only into a directory that would be adopted:
    not through a symlink, not into one made or opened up by someone else."""
    import os
    import pwd
    import shutil

    from tests.conftest import unique

    nobody = pwd.getpwnam("nobody")
    elsewhere = bpffs / unique("bpfailover-elsewhere-")
    elsewhere.mkdir(mode=0o700)
    try:
        with Datapath.open(pin_dir) as dp:
            # An incomplete datapath of ours: removing it is the fix, and said so.
            os.unlink(pin_dir / "prog_xdp_lower_rx")
            with pytest.raises(DatapathError) as e:
                Datapath.open(pin_dir, load=False)
            assert f"rm -r {pin_dir}" in str(e.value)
            assert dp.repin() == ["prog_xdp_lower_rx"]

            shutil.rmtree(pin_dir)
            os.symlink(elsewhere, pin_dir)  # the pin directory, pointing elsewhere
            with pytest.raises(DatapathError, match="not a directory"):
                dp.repin()
            assert not list(elsewhere.iterdir())  # nothing pinned through the link
            os.unlink(pin_dir)

            pin_dir.mkdir(mode=0o700)
            os.chown(pin_dir, nobody.pw_uid, nobody.pw_gid)  # made by someone else
            with pytest.raises(DatapathError, match=f"owned by uid {nobody.pw_uid}"):
                dp.repin()
            os.chown(pin_dir, 0, 0)
            os.chmod(pin_dir, 0o777)  # opened up to everyone
            with pytest.raises(DatapathError, match="mode 0777"):
                dp.repin()
            assert not list(pin_dir.iterdir())
            pin_dir.rmdir()

            assert len(dp.repin()) == len(dp.fds)  # gone for good: put back
            assert stat_mode(pin_dir) == 0o700
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
        if pin_dir.is_symlink():
            pin_dir.unlink()


def stat_mode(path: Path) -> int:
    import stat

    return stat.S_IMODE(path.lstat().st_mode)

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
    assert "not a bpffs mount" in str(e.value) and "mount -t bpf" in str(e.value)
    assert "\n" not in str(e.value)
    assert not pins.exists()


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
    from bpfailover.agent import core as agent

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

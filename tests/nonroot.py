"""Non-root runs against mounts of the test's own: whatever bpffs and /run look like on the
machine, the command sees a fresh bpffs mounted as `make setup` mounts it (or another mode
the test asks for) and a fresh /run, in a private mount namespace."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bpfailover.datapath import bpfsys
from bpfailover.datapath.maps import lock_path

NOBODY = 65534
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2

PINS = Path("/sys/fs/bpf/bpfailover")
RUN_DIR = Path("/run/bpfailover")
SOCKET = RUN_DIR / "control.sock"
CONFIG = Path("/run/bpfailover-nonroot.yaml")
ROOTS_CONFIG = Path("/run/bpfailover-root/config.yaml")  # in a directory only root may search
CONFIG_TEXT = (
    f"groups: [{{name: ens10, standby: ens10nsby}}]\nbpffs: {PINS}\n"
    f"control: {{socket: {SOCKET}}}\nmetrics: {{listen: null}}\n"
)
# what a running agent answers a caller outside root and control.group (ops/api.py)
REFUSAL = {"ok": False, "error": "permission denied (root or the control group only)"}


@dataclass(frozen=True)
class Mounts:
    bpffs: int = 0o700  # `make setup`: mount -t bpf -o mode=700
    run_dir: int = 0o755  # /run/bpfailover (failoverd creates it 0755)
    socket: int = 0o600  # the control socket without control.group
    agent: bool = True  # an agent's pins (a 0700 dir with fo_meta) and lock (0600) exist

    def __str__(self) -> str:
        return (
            f"bpffs{self.bpffs:o}-run{self.run_dir:o}-sock{self.socket:o}"
            f"{'-agent' if self.agent else ''}"
        )


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, src: str, target: str, fstype: str, data: str) -> None:
    _check(libc.mount(src.encode(), target.encode(), fstype.encode(), 0, data.encode()), target)


def _fake_pin(path: Path) -> None:
    """A real pinned object (bpffs holds nothing else): a one-entry array map."""
    attr = bpfsys._attr("=IIII", BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    fd = bpfsys._sys_bpf(BPF_MAP_CREATE, attr, "map create")
    try:
        bpfsys.obj_pin(fd, str(path))
    finally:
        os.close(fd)


def _serve_refusals(srv: socket.socket) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.sendall(json.dumps(REFUSAL).encode() + b"\n")


def _set_up(m: Mounts) -> None:
    """In the forked child, still root: private mounts, fresh bpffs and /run."""
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _mount(libc, "bpf", "/sys/fs/bpf", "bpf", f"mode={m.bpffs:o}")
    _mount(libc, "tmpfs", "/run", "tmpfs", "mode=755")
    RUN_DIR.mkdir()
    RUN_DIR.chmod(m.run_dir)
    CONFIG.write_text(CONFIG_TEXT)
    CONFIG.chmod(0o644)
    ROOTS_CONFIG.parent.mkdir(mode=0o700)
    ROOTS_CONFIG.write_text(CONFIG_TEXT)
    if m.agent:
        PINS.mkdir(mode=0o700)
        _fake_pin(PINS / "fo_meta")
        fd = os.open(lock_path(PINS), os.O_RDWR | os.O_CREAT, 0o600)
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)  # held, as by a running agent (fd kept open)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(SOCKET))
        srv.listen(4)
        SOCKET.chmod(m.socket)
        threading.Thread(target=_serve_refusals, args=(srv,), daemon=True).start()


def run_as_nobody(
    main: Callable[[list[str]], int], argv: list[str], mounts: Mounts = Mounts()
) -> tuple[int, str]:
    """main(argv) as uid/gid 65534 in a forked child with mounts of its own: (exit code,
    stdout and stderr).  Exit 99: it raised (its traceback is in the text).  Import what
    `main` imports lazily beforehand: the child may not read the checkout."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.dup2(w, 1)  # failoverd's log writes to fd 2 itself
            os.dup2(w, 2)
            out = open(w, "w", closefd=False)  # noqa: SIM115
            sys.stdout = sys.stderr = out
            logging.root.handlers.clear()  # pytest's capture: failoverd's log adds its own
            _set_up(mounts)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            code = main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text

"""Network-namespace helpers: enter a named netns for the calling thread, run commands in one.

Named namespaces are the ones `ip netns add` creates (bind mounts under /run/netns).
setns(2) changes only the calling thread, so `entered()` is safe in a single-threaded
test or tool; sockets opened inside keep their namespace after leaving.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def path_of(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter_for_good(name: str) -> None:
    """Move the calling thread (a process before it starts threads) into netns `name`."""
    fd = os.open(path_of(name), os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body in netns `name` (None: stay where we are), then come back."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path_of(name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def cmd_in(ns: str | None, argv: Sequence[str]) -> list[str]:
    """argv prefixed so that it runs in netns `ns`."""
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def run_in(
    ns: str | None, argv: Sequence[str], check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run argv in netns `ns`; on failure raise with the command's own stderr."""
    proc = subprocess.run(
        cmd_in(ns, argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} (netns {ns or 'host'}) failed: "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc

"""Kernel headers for bcc: the running kernel's, else the newest Debian headers pair.

bcc wants /lib/modules/$(uname -r)/build.  A guest whose kernel has no headers
package (a cloud or custom kernel) can still build the TC/XDP programs, which
use only UAPI structures, against Debian's linux-headers-amd64: its
`-common` (source) and `-amd64` (generated) trees are merged into one symlink
tree under the cache directory and handed to bcc as BCC_KERNEL_SOURCE.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bpfailover.kheaders")

CACHE_DIR = Path(os.environ.get("BPFAILOVER_CACHE", "/var/cache/bpfailover"))
SRC_DIR = Path("/usr/src")


class HeadersError(RuntimeError):
    pass


@dataclass(frozen=True)
class Headers:
    env: dict[str, str]  # environment for bcc
    description: str  # what was used, for the log


def _version_key(name: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", name)]


def _debian_pair(src_dir: Path) -> tuple[Path, Path] | None:
    """(common, arch) trees of the newest installed linux-headers-* pair."""
    arches = [
        p
        for p in src_dir.glob("linux-headers-*")
        if not p.name.endswith("-common") and (p / "include" / "generated").is_dir()
    ]
    for arch in sorted(arches, key=lambda p: _version_key(p.name), reverse=True):
        base = re.sub(r"-[a-z0-9_]+$", "", arch.name)  # linux-headers-6.1.0-56
        common = src_dir / f"{base}-common"
        if (common / "include" / "linux" / "kconfig.h").exists():
            return common, arch
        if (arch / "include" / "linux" / "kconfig.h").exists():  # a single full tree
            return arch, arch
    return None


def _merged_tree(common: Path, arch: Path, cache: Path) -> Path:
    target = cache / f"kheaders-{arch.name}"
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".kheaders-", dir=cache))
    try:
        # Symlink farms: cheap, and the arch tree's generated files win.
        subprocess.run(["cp", "-as", f"{common}/.", str(tmp)], check=True, capture_output=True)
        if arch != common:
            subprocess.run(["cp", "-asf", f"{arch}/.", str(tmp)], check=True, capture_output=True)
        (tmp / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HeadersError(f"cannot prepare kernel headers under {cache}: {e}") from e
    return target


def _readable_dir(path: Path) -> bool:
    """is_dir() that says no instead of raising EACCES: systemd's ProtectKernelModules=yes
    makes /lib/modules inaccessible, and without CAP_DAC_OVERRIDE (the shipped unit) even
    root gets EACCES there -- the fallback headers must then be used, not a crash (found by
    the cloud-guest proving ground, docs/cloud-guest.md)."""
    try:
        return path.is_dir()
    except PermissionError:
        return False


def find(release: str | None = None, src_dir: Path = SRC_DIR, cache: Path = CACHE_DIR) -> Headers:
    release = release or os.uname().release
    build = Path("/lib/modules") / release / "build"
    if _readable_dir(build / "include") or os.environ.get("BCC_KERNEL_SOURCE"):
        where = os.environ.get("BCC_KERNEL_SOURCE", str(build))
        return Headers({}, f"kernel headers of {release} ({where})")
    pair = _debian_pair(src_dir)
    if pair is None:
        raise HeadersError(
            f"no kernel headers: no /lib/modules/{release}/build, no {src_dir}/linux-headers-*;"
            " install them: apt-get install linux-headers-amd64"
        )
    tree = _merged_tree(*pair, cache)
    return Headers(
        {"BCC_KERNEL_SOURCE": str(tree)},
        f"fallback headers {pair[1].name} for kernel {release} (UAPI only) via {tree}",
    )

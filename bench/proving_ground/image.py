"""The guest image: Debian bookworm (debootstrap minbase) with its kernel, exact headers and bcc.

Built once into a cache directory outside the repository and reused while the recipe (this
file's RECIPE, the package list) and the product's sources (what scripts/build-deb packs)
are unchanged.  No loop mounts: the root tree is made with debootstrap + chroot and turned
into an ext4 image with `mke2fs -d`.  The product goes in the way an operator installs it:
the Debian package built by scripts/build-deb (`make deb`) from the working tree, installed
with the guest's apt (`apt-get install ./bpfailover_*.deb`), so every run proves the install
path; a change to the product's sources rebuilds the image.  At boot the live repository is
mounted read-only (9p) for the harness only (guestd, the traffic endpoints of
bpfailover_lab, tcpstream): failoverd and failoverctl are the package's.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RECIPE = "pg-image-6"  # bump when the build steps below change
SUITE = "bookworm"
MIRROR = os.environ.get("BPFAILOVER_PG_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("BPFAILOVER_PG_CACHE", "/var/cache/bpfailover/pg"))
GUEST_PACKAGES = (
    "linux-image-amd64",
    "linux-headers-amd64",
    "kmod",
    "iproute2",
    "python3",
    "python3-venv",
    "python3-bpfcc",
    "ethtool",
    "iputils-ping",
    "procps",
    "ca-certificates",
    "qemu-guest-agent",  # failover-migrate drives the guest through it (docs/host-migration.md)
    "bpftool",  # the test suite inside the guest (guest_tests.py) compares against it
    "python3-pytest",  # ... and runs with Debian's pytest and hypothesis, which the
    "python3-hypothesis",  # package's venv sees (it is made with --system-site-packages)
)
# The guest kernels (--kernel, BPFAILOVER_PG_KERNEL): Debian 12's own, each with its exact
# headers (bcc compiles against them).  6.12 is the generic flavour (the cloud one has no
# e1000e) and comes from bookworm-security.
KERNELS = {
    "6.1": ("linux-image-amd64", "linux-headers-amd64"),
    "6.12": ("linux-image-6.12.118+deb12-amd64", "linux-headers-6.12.118+deb12-amd64"),
}
DEFAULT_KERNEL = "6.1"
SECURITY_MIRROR = os.environ.get(
    "BPFAILOVER_PG_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
GUEST_REPO = "/srv/bpfailover"  # the repository (9p at run time): the harness, not the product
GUEST_VENV = "/opt/bpfailover"  # the package's venv (its python runs the harness too)
GUEST_BIN = "/usr/bin"  # the package's failoverd, failoverctl
# The harness's own modules (bpfailover_lab) from the repository; bpfailover is the package's.
GUEST_PYTHONPATH = f"{GUEST_REPO}/lab"
# What scripts/build-deb packs: a change to any of it rebuilds the image (and the package).
# Not docs/: the guest's copy of them plays no part in a run.
PACKAGE_SOURCES = (
    "pyproject.toml",
    "requirements.lock",
    "scripts/build-deb",
    "control",
    "bpf",
    "deploy",
)
IMAGE_SIZE = "4G"
HOST_PACKAGES = ("qemu-system-x86", "qemu-utils", "debootstrap", "e2fsprogs")
REPO = Path(__file__).resolve().parents[2]

# qemu-ga as operators run it, on the virtio-serial port org.qemu.guest_agent.0 (no udev
# here, so no /dev/virtio-ports/ link: the port is found by name), with only the RPCs
# failover-migrate needs (deploy/qemu-ga/qemu-ga-blocklist: Debian's 7.2 has no allow-list).
# The guest init starts it; the proving ground stops and restarts it with the same line.
QGA_PIDFILE = "/run/qemu-ga.pid"
QGA_START = (
    "for d in /sys/class/virtio-ports/*; do "
    '[ "$(cat $d/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${d##*/}; done; '
    f"/usr/sbin/qemu-ga --daemonize --pidfile={QGA_PIDFILE} --method=virtio-serial "
    '--path="$port" --logfile=/run/qemu-ga.log '
    '--block-rpcs="$(/usr/share/bpfailover/deploy/qemu-ga/qemu-ga-blocklist)"'
)

# PID 1 of the guest: mounts, modules, the repository, qemu-ga, then the command server.
INIT = f"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
for m in virtio_console 9pnet_virtio 9p virtio_net e1000e sch_ingress cls_bpf veth; do
  modprobe $m
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose repo {GUEST_REPO} || echo "no repo"
sysctl -qw net.ipv6.conf.default.disable_ipv6=1
ip link set lo up
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
{QGA_START} || echo "qemu-ga did not start"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH={GUEST_PYTHONPATH}
exec {GUEST_VENV}/bin/python3 {GUEST_REPO}/bench/proving_ground/guestd.py
"""


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    dir: Path
    disk: Path
    kernel: Path
    initrd: Path
    meta: dict[str, object]


def package_key() -> str:
    """A hash of the package's sources as the working tree has them (tracked files, edits
    included): the image holds the package built from them."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--", *PACKAGE_SOURCES],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    h = hashlib.sha256()
    for rel in sorted(filter(None, files)):
        path = REPO / rel.decode()
        h.update(rel + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<gone>")
    return h.hexdigest()[:12]


def kernel_choice(arg: str | None = None) -> str:
    """--kernel, else BPFAILOVER_PG_KERNEL, else 6.1; one clear line for anything else."""
    k = arg or os.environ.get("BPFAILOVER_PG_KERNEL") or DEFAULT_KERNEL
    if k not in KERNELS:
        raise ImageError(f"unknown guest kernel {k!r} (one of: {', '.join(KERNELS)})")
    return k


def guest_packages(kernel: str = DEFAULT_KERNEL) -> tuple[str, ...]:
    """GUEST_PACKAGES with that kernel's image and headers in place of 6.1's."""
    return KERNELS[kernel] + GUEST_PACKAGES[2:]


def _key(kernel: str = DEFAULT_KERNEL) -> str:
    h = hashlib.sha256()
    h.update(RECIPE.encode())
    h.update(" ".join(guest_packages(kernel)).encode())
    h.update(INIT.encode())
    h.update(package_key().encode())
    return h.hexdigest()[:12]


def build_deb(out: Path, log: Callable[[str], None]) -> Path:
    """scripts/build-deb into `out`: the package an operator would install."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "scripts/build-deb"), str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env={**os.environ, "BPFAILOVER_BUILD_PYTHON": sys.executable},
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise ImageError(f"scripts/build-deb failed ({proc.returncode}): {' | '.join(tail)}")
    deb = Path(proc.stdout.strip().splitlines()[-1])
    log(f"  scripts/build-deb: {deb.name}, {time.monotonic() - t0:.0f}s")
    return deb


def _run(argv: list[str], timeout: float, log: Callable[[str], None], **kw: object) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:]
        raise ImageError(f"{' '.join(argv[:4])}... failed ({proc.returncode}): {' | '.join(tail)}")
    log(f"  {' '.join(argv[:5])}{' ...' if len(argv) > 5 else ''}: {time.monotonic() - t0:.0f}s")


def ensure_host_packages(log: Callable[[str], None] = print) -> None:
    def absent(pkg: str) -> bool:
        return subprocess.run(["dpkg", "-s", pkg], capture_output=True, check=False).returncode != 0

    missing = [p for p in HOST_PACKAGES if absent(p)]
    if missing:
        log(f"installing host packages: {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], 300, log, env=env)
        _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            600,
            log,
            env=env,
        )


def _chroot(root: Path, argv: list[str], timeout: float, log: Callable[[str], None]) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
    }
    _run(["chroot", str(root), *argv], timeout, log, env=env)


def _rmtree_unmounted(root: Path) -> None:
    """rm -r of the build root, never while something (proc, sysfs) is still mounted in it."""
    with open("/proc/mounts") as f:
        if any(line.split()[1].startswith(str(root) + "/") for line in f):
            raise ImageError(f"{root} still has mounts in it; not removing it")
    shutil.rmtree(root, ignore_errors=True)


def _build(
    out: Path,
    log: Callable[[str], None],
    packages: tuple[str, ...] = GUEST_PACKAGES,
    customize: Callable[[Path, Callable[[str], None]], None] | None = None,
    key: str | None = None,
    kernel: str = DEFAULT_KERNEL,
) -> None:
    """The image; `customize(root, log)` runs before mke2fs (the cloud-guest variant)."""
    root = out / "root"
    _rmtree_unmounted(root)
    _run(
        ["debootstrap", "--variant=minbase", "--include=ca-certificates", SUITE, str(root), MIRROR],
        1200,
        log,
    )
    (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    (root / "usr/sbin/policy-rc.d").chmod(0o755)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    mounts = [("proc", root / "proc"), ("sysfs", root / "sys")]
    mounted: list[Path] = []
    try:
        for fstype, where in mounts:
            subprocess.run(["mount", "-t", fstype, fstype, str(where)], check=True, timeout=30)
            mounted.append(where)
        if kernel != DEFAULT_KERNEL:
            with open(root / "etc/apt/sources.list", "a") as f:
                f.write(f"deb {SECURITY_MIRROR} {SUITE}-security main\n")
        _chroot(root, ["apt-get", "update", "-qq"], 300, log)
        _chroot(
            root,
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            1200,
            log,
        )
        # The product as an operator installs it: the package, with the guest's own apt.
        deb = build_deb(out / "deb", log)
        shutil.copy(deb, root / "tmp" / deb.name)
        _chroot(
            root,
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", f"/tmp/{deb.name}"],
            900,
            log,
        )
        (root / "tmp" / deb.name).unlink()
        shutil.rmtree(out / "deb", ignore_errors=True)
        _chroot(root, ["apt-get", "clean"], 60, log)
        (root / GUEST_REPO.lstrip("/")).mkdir(parents=True, exist_ok=True)  # the 9p mount
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)
    init = root / "sbin/pg-init"
    init.write_text(INIT)
    init.chmod(0o755)
    (root / "etc/hostname").write_text("pg-guest\n")
    if customize is not None:
        customize(root, log)
    kernels = sorted((root / "boot").glob(f"vmlinuz-{kernel}.*"))
    if not kernels:
        raise ImageError("no kernel in the guest root")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    if not (root / "usr/src" / f"linux-headers-{release}").is_dir():
        raise ImageError(f"no headers for the guest kernel {release}")
    shutil.copy(kernels[-1], out / "vmlinuz")
    shutil.copy(root / "boot" / f"initrd.img-{release}", out / "initrd.img")
    disk = out / "root.img"
    disk.unlink(missing_ok=True)
    _run(
        ["mke2fs", "-q", "-t", "ext4", "-L", "pgroot", "-d", str(root), str(disk), IMAGE_SIZE],
        900,
        log,
    )
    (out / "meta.json").write_text(
        json.dumps(
            {
                "key": key or _key(kernel),
                "kernel": release,
                "kernel_choice": kernel,
                "suite": SUITE,
                "packages": list(packages),
                "built_at": time.time(),
            }
        )
    )
    _rmtree_unmounted(root)  # the disk image has it all


STALE_AFTER_S = 2 * 86400.0  # an image unused this long is removed when another is built


def _unused_for(image_dir: Path) -> float:
    return time.time() - image_dir.stat().st_mtime


def _kernel_of(d: Path) -> str:
    try:
        return str(json.loads((d / "meta.json").read_text()).get("kernel_choice", DEFAULT_KERNEL))
    except (OSError, ValueError):
        return DEFAULT_KERNEL


def ensure_image(
    log: Callable[[str], None] = print,
    rebuild: bool = False,
    key: str | None = None,
    build: Callable[[Path, Callable[[str], None]], None] | None = None,
    kernel: str = DEFAULT_KERNEL,
) -> tuple[Image, float]:
    """The cached image (built if missing or stale); returns it and the build time (0 if cached).
    `key` and `build`: another variant of the image (bench/proving_ground/cloud.py)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    key = key or _key(kernel)
    if build is None:
        build = functools.partial(_build, packages=guest_packages(kernel), key=key, kernel=kernel)

    out = CACHE / key
    lock = os.open(CACHE, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        built = 0.0
        if rebuild or not (out / "meta.json").exists():
            ensure_host_packages(log)
            log(f"building guest image {out} (debootstrap {SUITE}; a few minutes)")
            t0 = time.monotonic()
            if out.exists():
                _rmtree_unmounted(out / "root")
                shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            try:
                build(out, log)
            except BaseException:
                _rmtree_unmounted(out / "root")
                shutil.rmtree(out, ignore_errors=True)
                raise
            built = time.monotonic() - t0
            log(f"guest image built in {built:.0f}s")
            # Stale images go once unused for a while, never at once: the key follows the
            # package's sources, so runs from other working trees (other keys) may be using
            # theirs right now.
            for old in CACHE.iterdir():
                if old.is_dir() and old.name != key and _unused_for(old) > STALE_AFTER_S:
                    shutil.rmtree(old, ignore_errors=True)
        os.utime(out)  # in use: not stale
        meta = json.loads((out / "meta.json").read_text())
        return Image(out, out / "root.img", out / "vmlinuz", out / "initrd.img", meta), built
    finally:
        os.close(lock)


if __name__ == "__main__":
    img, secs = ensure_image(kernel=kernel_choice(sys.argv[1] if len(sys.argv) > 1 else None))
    print(json.dumps({"dir": str(img.dir), "build_s": round(secs, 1), **img.meta}))
